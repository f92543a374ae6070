//! Benchmark (not a timed test): KD loss + gradient w.r.t. the student logits on 512 tokens × 50257
//! vocab, the fused kernel (`kd::kd_loss_sum` → custom op) against the naive candle composition it
//! replaces (`kd::naive`, log_softmax etc. with autograd). Prints one JSON line per measurement.
//!
//! Memory: a counting global allocator reports the peak bytes allocated above the inputs during
//! one forward + backward (the gradient itself, 103 MB, is included: it is the output), and the
//! /proc/self/status VmHWM rise (peak RSS, reset through /proc/self/clear_refs) as a cross-check.
//!
//! Run: cargo bench --bench kd_loss [-- --quick] [-- --tokens N --vocab V --reps R --no-naive]

use candle_core::{Device, Tensor, Var};
use pocl::kd::{self, Divergence};
use std::time::Instant;

mod common;
use common::counting_alloc::{self, Counting};

#[global_allocator]
static ALLOC: Counting = Counting;

fn status_kb(field: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); false when unsupported.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

struct Measure {
    secs: Vec<f64>,
    peak_extra: usize,
    hwm_extra_kb: Option<usize>,
    loss: f32,
}

fn measure(reps: usize, mut f: impl FnMut() -> f32) -> Measure {
    let mut secs = Vec::new();
    let (mut peak_extra, mut hwm_extra_kb, mut loss) = (0, None, 0.0);
    f(); // warm-up: thread pool, scratch buffers, first huge-page compaction
    for _ in 0..reps {
        let base = counting_alloc::reset_peak();
        let hwm_ok = reset_hwm();
        let rss0 = status_kb("VmRSS:");
        let t0 = Instant::now();
        loss = f();
        secs.push(t0.elapsed().as_secs_f64());
        peak_extra = peak_extra.max((counting_alloc::peak() - base) as usize);
        if let (true, Some(r0), Some(h)) = (hwm_ok, rss0, status_kb("VmHWM:")) {
            hwm_extra_kb = Some(hwm_extra_kb.unwrap_or(0).max(h.saturating_sub(r0)));
        }
    }
    Measure {
        secs,
        peak_extra,
        hwm_extra_kb,
        loss,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let quick = args.iter().any(|a| a == "--quick");
    let (n, v) = (arg("--tokens", 512), arg("--vocab", 50257));
    let reps = if quick { 2 } else { arg("--reps", 5) };
    let dev = Device::Cpu;
    // Deterministic logits roughly like an LM's: N(0, 2)-ish via a cheap LCG sum.
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut gen = || {
        let mut acc = 0.0f32;
        for _ in 0..4 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            acc += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        acc * 3.5
    };
    let t: Vec<f32> = (0..n * v).map(|_| gen()).collect();
    let s: Vec<f32> = (0..n * v).map(|_| gen()).collect();
    let teacher = Tensor::from_vec(t, (n, v), &dev)?;
    let mask = Tensor::ones(n, candle_core::DType::F32, &dev)?;
    let student = Var::from_vec(s, (n, v), &dev)?;
    let threads = rayon::current_num_threads();
    let temperature = 2.0;

    let report = |imp: &str, div: Divergence, m: &Measure| {
        println!(
            "{}",
            serde_json::json!({
                "bench": "kd_loss_fwd_bwd", "impl": imp, "loss": div.name(), "tokens": n, "vocab": v,
                "temperature": temperature, "threads": threads, "reps": m.secs.len(),
                "median_ms": (median(&m.secs) * 1e3 * 10.0).round() / 10.0,
                "min_ms": (m.secs.iter().cloned().fold(f64::INFINITY, f64::min) * 1e3 * 10.0).round() / 10.0,
                "peak_extra_mb": (m.peak_extra as f64 / 1e6 * 10.0).round() / 10.0,
                "vmhwm_extra_mb": m.hwm_extra_kb.map(|k| (k as f64 / 1e3 * 10.0).round() / 10.0),
                "logits_mb": (n * v * 4) as f64 / 1e6,
                "value": m.loss,
            })
        );
    };

    let names: Vec<&str> = if quick {
        vec!["fkl"]
    } else {
        kd::DIVERGENCE_NAMES.to_vec()
    };
    for name in names {
        let div = Divergence::parse(name, None, None)?;
        let fused = measure(reps, || {
            let loss =
                kd::kd_loss_sum(&teacher, student.as_tensor(), &mask, div, temperature, true)
                    .unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(&student).is_some());
            loss.to_scalar::<f32>().unwrap()
        });
        report("fused", div, &fused);
        // The kernel alone (what a fused lm-head would call per chunk): no candle graph around it.
        let (tv, sv): (Vec<f32>, Vec<f32>) = (
            teacher.flatten_all()?.to_vec1()?,
            student.as_tensor().flatten_all()?.to_vec1()?,
        );
        let ones = vec![1f32; n];
        let spec = kd::kernel::LossSpec {
            divergence: Some(div),
            inv_temperature: 1.0 / temperature,
            ce_coef: 0.0,
            kd_coef: temperature * temperature,
        };
        let kernel = measure(reps, || {
            let mut grad = kd::kernel::gradient_buffer(n * v);
            let mut out = vec![kd::kernel::RowLoss::default(); n];
            let (t, s) = (
                kd::kernel::Rows::contiguous(&tv, v),
                kd::kernel::Rows::contiguous(&sv, v),
            );
            kd::kernel::loss_rows(&spec, Some(t), s, None, &ones, Some(&mut grad), &mut out)
                .unwrap();
            out.iter().map(|r| r.kd).sum::<f64>() as f32 * (temperature * temperature) as f32
        });
        drop((tv, sv));
        report("fused_kernel_only", div, &kernel);
        if args.iter().any(|a| a == "--no-naive") {
            continue;
        }
        let naive = measure(reps.min(3), || {
            let rows = kd::naive::divergence_rows(div, &teacher, student.as_tensor(), temperature)
                .unwrap();
            let loss = (rows.broadcast_mul(&mask).unwrap().sum_all().unwrap()
                * (temperature * temperature))
                .unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(&student).is_some());
            loss.to_scalar::<f32>().unwrap()
        });
        report("naive", div, &naive);
        println!(
            "{}",
            serde_json::json!({"bench": "kd_loss_speedup", "loss": name,
                "speedup": (median(&naive.secs) / median(&fused.secs) * 10.0).round() / 10.0,
                "memory_ratio": (naive.peak_extra as f64 / fused.peak_extra.max(1) as f64 * 10.0).round() / 10.0})
        );
    }
    Ok(())
}
