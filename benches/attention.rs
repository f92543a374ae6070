//! Benchmark (not a timed test): the fused attention op (`ops::attention::attention_qkv`) on
//! the kd-step workload's shapes: 4 sequences x 128 tokens, the teacher's 12 heads of 64 and the
//! student's 8 heads of 64; forward, and forward + backward. One JSON line per shape: median
//! ms and GFLOP/s (4·b·t²·d forward, twice that backward).
//!
//! Run: cargo bench --bench attention [-- --reps 20]

use candle_core::{Device, Tensor, Var};
use pocl::ops::attention::attention_qkv;
use std::time::Instant;

mod common;
use common::values;

fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(20usize);
    let (b, t) = (4, 128);
    for (name, heads) in [("teacher", 12), ("student", 8)] {
        let d = heads * 64;
        let dev = &Device::Cpu;
        let qkv = Var::from_tensor(&Tensor::from_vec(
            values(b * t * 3 * d, 7)
                .iter()
                .map(|v| v * 40.0)
                .collect::<Vec<_>>(),
            (b, t, 3 * d),
            dev,
        )?)?;
        // Causal bias [b, 1, t, t].
        let bias: Vec<f32> = (0..b * t * t)
            .map(|i| {
                if (i % t) > (i / t) % t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, t, t), dev)?;
        let flops = 4.0 * (b * t * t * d) as f64;
        let fwd = median(reps, || {
            attention_qkv(&qkv.as_tensor().detach(), heads, &bias, 0.125).unwrap();
        });
        let both = median(reps, || {
            let y = attention_qkv(qkv.as_tensor(), heads, &bias, 0.125).unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{{\"bench\":\"attention\",\"shape\":\"{name}\",\"forward_ms\":{:.3},\"forward_gflops\":{:.1},\"forward_backward_ms\":{:.3},\"forward_backward_gflops\":{:.1}}}",
            fwd * 1e3,
            flops / fwd / 1e9,
            both * 1e3,
            3.0 * flops / both / 1e9
        );
    }
    Ok(())
}
