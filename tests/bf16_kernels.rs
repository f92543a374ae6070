//! Every bf16 kernel this CPU can run, forced one by one, against an f64 reference, on awkward
//! shapes (partial panels and row blocks, k not a multiple of 32, strided output) with and
//! without the bias epilogue. The output names the kernels that ran and those this CPU cannot
//! run, so no path goes untested without saying so; portable and f32-widen must run everywhere
//! f32 FMAs exist (x86-64 with AVX2 + FMA or AVX-512, aarch64).

use pocl::ops::bf16::{bf16_bits_to_f32, f32_to_bf16_bits, selected_kernel, Kernel, Packed};

/// A line on stderr that the test harness does not capture (it captures `print!`/`eprint!`
/// only): which kernels ran is shown on every `cargo test`, not only with `--nocapture`.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Deterministic values in [-1, 1) (xorshift64*).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
            2.0 * u - 1.0
        })
        .collect()
}

fn bf(x: f32) -> f64 {
    bf16_bits_to_f32(f32_to_bf16_bits(x)) as f64
}

/// Whether the kernel rounds x to bf16 (all but f32-widen, which keeps x in f32).
fn rounds_x(kernel: Kernel) -> bool {
    kernel != Kernel::F32Widen
}

/// out[i, j] (row stride ldo) against Σ_l x[i, l]·bf16(W[j, l]) (+ bias[j]) in f64, x rounded
/// to bf16 where the kernel rounds it: |error| ≤ 1e-5 · (Σ_l |x w| + |bias|); columns past n
/// untouched.
#[allow(clippy::too_many_arguments)]
fn check(
    kernel: Kernel,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (m, k, n, ldo): (usize, usize, usize, usize),
    out: &[f32],
    sentinel: f32,
    case: &str,
) {
    for i in 0..m {
        for j in 0..ldo {
            let got = out[i * ldo + j];
            if j >= n {
                assert_eq!(
                    got, sentinel,
                    "{kernel} {case}: wrote past n_out at [{i}, {j}]"
                );
                continue;
            }
            let (mut want, mut scale) = (0f64, 0f64);
            for l in 0..k {
                let xv = if rounds_x(kernel) {
                    bf(x[i * k + l])
                } else {
                    x[i * k + l] as f64
                };
                let p = xv * bf(w[j * k + l]);
                want += p;
                scale += p.abs();
            }
            if let Some(b) = bias {
                want += b[j] as f64;
                scale += (b[j] as f64).abs();
            }
            assert!(
                (got as f64 - want).abs() <= 1e-5 * scale + 1e-30,
                "{kernel} {case} [{i}, {j}]: {got} vs {want} (scale {scale})"
            );
        }
    }
}

#[test]
fn every_bf16_kernel_this_cpu_runs_matches_the_f64_reference() {
    let mut ran = vec![];
    for kernel in Kernel::ALL {
        if !kernel.is_supported() {
            say(&format!(
                "bf16 kernel {kernel}: NOT RUN, this CPU (or OS) cannot run it"
            ));
            continue;
        }
        // m: one row (decoding), a partial 8/16-row block, several 32-row blocks; k: below,
        // at and past a 32-step; n: partial panels, several tasks; ldo > n once.
        for (m, k, n, ldo) in [
            (1, 1, 1, 1),
            (1, 768, 50, 50),
            (3, 31, 15, 20),
            (9, 70, 47, 47),
            (17, 33, 200, 203),
            (40, 64, 33, 33),
            (100, 770, 96, 96),
        ] {
            let x = values(m * k, (m * 31 + k) as u64);
            let w = values(n * k, (n * 7 + k) as u64 + 5); // [n, k]
            let bias = values(n, n as u64 + 11);
            let packed = Packed::bf16_out_in(&w, n, k);
            const SENTINEL: f32 = 4321.0;
            let case = format!("[{m}, {k}] x [{k}, {n}] ldo {ldo}");
            let mut out = vec![SENTINEL; m * ldo];
            packed.matmul_with(kernel, &x, m, &mut out, ldo);
            check(kernel, &x, &w, None, (m, k, n, ldo), &out, SENTINEL, &case);
            let mut out = vec![SENTINEL; m * ldo];
            packed.matmul_bias_with(kernel, &x, m, &mut out, ldo, &bias);
            let case = format!("{case} + bias");
            check(
                kernel,
                &x,
                &w,
                Some(&bias),
                (m, k, n, ldo),
                &out,
                SENTINEL,
                &case,
            );
        }
        say(&format!(
            "bf16 kernel {kernel}: ran, matches the f64 reference"
        ));
        ran.push(kernel);
    }
    say(&format!(
        "bf16 kernel selected for this process: {}",
        selected_kernel().map_or_else(|e| e.to_string(), |k| k.name().to_string())
    ));
    assert!(
        ran.contains(&Kernel::Portable),
        "the portable kernel must run"
    );
    if f32_fma_cpu() {
        assert!(
            ran.contains(&Kernel::F32Widen),
            "f32-widen must run on a CPU with f32 FMAs"
        );
    }
}

/// x86-64 with AVX2 + FMA, or aarch64: where f32-widen must be available.
fn f32_fma_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    return cfg!(target_arch = "aarch64");
}

/// f32-widen keeps x in f32, so it is closer to the f32 product than the kernels that round x.
#[test]
fn f32_widen_is_the_closest_to_f32() {
    if !Kernel::F32Widen.is_supported() {
        say("bf16 kernel f32-widen: NOT RUN, this CPU cannot run it");
        return;
    }
    let (m, k, n) = (16, 512, 64);
    let (x, w) = (values(m * k, 1), values(n * k, 2));
    let packed = Packed::bf16_out_in(&w, n, k);
    let exact: Vec<f64> = (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            (0..k)
                .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                .sum()
        })
        .collect();
    let err = |kernel: Kernel| {
        let mut out = vec![0f32; m * n];
        packed.matmul_with(kernel, &x, m, &mut out, n);
        out.iter()
            .zip(&exact)
            .map(|(a, b)| (*a as f64 - b).abs())
            .sum::<f64>()
    };
    assert!(err(Kernel::F32Widen) < err(Kernel::Portable));
}
