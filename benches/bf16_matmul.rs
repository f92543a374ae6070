//! Benchmark (not a timed test): the frozen-teacher matmul y = x·Wᵀ on the GPT-2 small shapes at
//! m = 512 tokens, bf16 packed weights (`ops::bf16`, AMX and the AVX512-BF16 / f32-widen /
//! portable fallbacks), and f32 W packed into panels (`f32_packed`, where the CPU runs the f32
//! kernel), against candle's f32 `Tensor::matmul` (the `gemm` crate). Prints one JSON line per
//! measurement: GFLOP/s (2·m·k·n / median time), and the one-off packing cost of W.
//!
//! Run: cargo bench --bench bf16_matmul [-- --quick] [-- --m 512 --reps 10 --only amx]

use candle_core::{Device, Tensor};
use pocl::ops::bf16::{amx_available, Element, Kernel, Packed};
use std::time::Instant;

mod common;
use common::values;

/// CPU time of the whole process (all threads), seconds.
fn process_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

struct Timing {
    median: f64,
    min: f64,
    /// Process CPU time over wall time × threads during the timed runs: well below 1 means the
    /// threads were not all on a CPU (a shared machine), and the wall times are inflated.
    cpu_util: f64,
}

/// Median and min seconds of `reps` runs after one warm-up.
fn time(reps: usize, threads: usize, mut f: impl FnMut()) -> Timing {
    f();
    let (c0, t0) = (process_cpu(), Instant::now());
    let mut secs: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    let cpu_util = (process_cpu() - c0) / (t0.elapsed().as_secs_f64() * threads as f64);
    secs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Timing {
        median: secs[secs.len() / 2],
        min: secs[0],
        cpu_util,
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let m: usize = arg("--m").and_then(|v| v.parse().ok()).unwrap_or(512);
    let reps: usize = arg("--reps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3 } else { 10 });
    let only = arg("--only");
    let shape = arg("--shape");
    let threads = rayon::current_num_threads();
    let shapes: &[(&str, usize, usize)] = &[
        ("attn_qkv", 768, 2304),
        ("attn_proj", 768, 768),
        ("mlp_fc", 768, 3072),
        ("mlp_proj", 3072, 768),
        ("lm_head", 768, 50257),
    ];
    /// What a measured implementation multiplies: the bf16 panels with a kernel, the f32
    /// panels, or candle's f32 tensors.
    #[derive(Clone, Copy, PartialEq)]
    enum Imp {
        Bf16(Kernel),
        F32Packed,
        Candle,
    }
    let mut impls = vec![];
    for (name, kernel) in [
        ("bf16_amx", Kernel::Amx),
        ("bf16_avx512bf16", Kernel::Avx512Bf16),
        ("bf16_f32_widen", Kernel::F32Widen),
        ("bf16_portable", Kernel::Portable),
    ] {
        if kernel.is_supported() && !(quick && kernel == Kernel::Portable) {
            impls.push((name, Imp::Bf16(kernel)));
        } else if !kernel.is_supported() {
            eprintln!("{name}: this CPU cannot run it");
        }
    }
    if Packed::f32_supported() {
        impls.push(("f32_packed", Imp::F32Packed));
    } else {
        eprintln!("f32_packed: this CPU cannot run it");
    }
    impls.push(("candle_f32", Imp::Candle));
    eprintln!(
        "threads {threads}, amx_available {}, selected kernel {}",
        amx_available(),
        Kernel::best()
    );

    for &(name, k, n) in shapes {
        if shape.as_deref().is_some_and(|s| s != name) {
            continue;
        }
        let x = values(m * k, 1 + k as u64);
        let w = values(n * k, 7 + n as u64); // [n, k], nn.Linear layout
        let flops = 2.0 * (m * k * n) as f64;

        let t0 = Instant::now();
        let packed = Packed::bf16_out_in(&w, n, k);
        let pack_out_in = t0.elapsed().as_secs_f64();
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let t0 = Instant::now();
        let packed_t = Packed::bf16_in_out(&wt, k, n);
        let pack_in_out = t0.elapsed().as_secs_f64();
        drop((packed_t, wt));
        // f32 panels only where they are measured (the lm head's are 154 MB).
        let t0 = Instant::now();
        let packed_f32 = impls
            .iter()
            .any(|&(name, i)| {
                i == Imp::F32Packed && only.as_deref().is_none_or(|o| name.contains(o))
            })
            .then(|| Packed::out_in(&w, n, k, Element::F32));
        let pack_f32 = packed_f32
            .as_ref()
            .map(|_| round(t0.elapsed().as_secs_f64() * 1e3, 1));
        println!(
            "{}",
            serde_json::json!({
                "bench": "bf16_pack", "shape": name, "k": k, "n": n, "threads": threads,
                "from_out_in_ms": round(pack_out_in * 1e3, 1),
                "from_in_out_ms": round(pack_in_out * 1e3, 1),
                "f32_from_out_in_ms": pack_f32,
                "packed_mb": round(packed.bytes() as f64 / 1e6, 1),
                "f32_mb": round((n * k * 4) as f64 / 1e6, 1),
            })
        );

        let mut reference: Option<Vec<f32>> = None;
        for &(imp, which) in &impls {
            if only.as_deref().is_some_and(|o| !imp.contains(o)) {
                continue;
            }
            // The portable kernel is slow; fewer reps on the lm head.
            let reps = if which == Imp::Bf16(Kernel::Portable) {
                reps.min(3)
            } else {
                reps
            };
            let (t, out) = match which {
                Imp::Bf16(kernel) => {
                    let mut out = vec![0f32; m * n];
                    let t = time(reps, threads, || {
                        packed.matmul_with(kernel, &x, m, &mut out, n)
                    });
                    (t, out)
                }
                Imp::F32Packed => {
                    let p = packed_f32.as_ref().expect("packed where supported");
                    let mut out = vec![0f32; m * n];
                    let t = time(reps, threads, || p.matmul(&x, m, &mut out, n));
                    (t, out)
                }
                Imp::Candle => {
                    let dev = Device::Cpu;
                    let xt = Tensor::from_slice(&x, (m, k), &dev)?;
                    let wt = Tensor::from_slice(&w, (n, k), &dev)?.t()?;
                    let mut y = None;
                    let t = time(reps, threads, || y = Some(xt.matmul(&wt).unwrap()));
                    let out = y.unwrap().flatten_all()?.to_vec1::<f32>()?;
                    (t, out)
                }
            };
            // Cross-check against the first implementation (bf16 rounding: ~1e-2 relative).
            let max_rel = match &reference {
                None => {
                    reference = Some(out);
                    0.0
                }
                Some(r) => {
                    let scale = r.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-30);
                    r.iter()
                        .zip(&out)
                        .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
                        / scale
                }
            };
            println!(
                "{}",
                serde_json::json!({
                    "bench": "bf16_matmul", "impl": imp, "shape": name, "m": m, "k": k, "n": n,
                    "threads": threads, "reps": reps,
                    "median_ms": round(t.median * 1e3, 2), "min_ms": round(t.min * 1e3, 2),
                    "gflops": round(flops / t.median / 1e9, 1),
                    "gflops_best": round(flops / t.min / 1e9, 1),
                    "cpu_util": round(t.cpu_util, 2),
                    "max_rel_diff_vs_first": round(max_rel as f64, 5),
                })
            );
        }
    }
    Ok(())
}
