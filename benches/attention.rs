//! Benchmark (not a timed test): the fused attention op (`ops::attention::attention_qkv`) on
//! the kd-step workload's shapes: 4 sequences x 128 tokens, the teacher's 12 heads of 64 and the
//! student's 8 heads of 64; forward, and forward + backward. One JSON line per shape: median
//! ms and GFLOP/s (4·b·t²·d forward, twice that backward).
//!
//! Run: cargo bench --bench attention [-- --reps 20]

use candle_core::{Device, Tensor, Var};
use pocl::ops::attention::attention_qkv;

mod common;
use common::{arg, median_secs, values};

fn main() -> candle_core::Result<()> {
    let reps = arg("--reps", 20usize);
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
        let fwd = median_secs(reps, || {
            attention_qkv(&qkv.as_tensor().detach(), heads, &bias, 0.125).unwrap();
        });
        let both = median_secs(reps, || {
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
