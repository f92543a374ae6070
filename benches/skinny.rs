//! Benchmark (not a timed test): the streamed decoding matmul `ops::gemm::skinny` (y = x·Wᵀ for
//! a few rows) on the standard student's shapes (d = 512, GPT-2 layouts) at m = 1 and 8. Prints
//! one JSON line per shape: median time, GB/s of W read and GFLOP/s. W comes from memory each
//! time (copies rotated), as in decoding.
//!
//! Run: cargo bench --bench skinny [-- --reps 50 --only lm_head]

use pocl::ops::gemm::{skinny, View};
use std::time::Instant;

mod common;
use common::values;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = common::arg("--reps", 30usize);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    // (name, k, n, W stored [n, k] (nn.Linear / lm head) or [k, n] (Conv1D))
    let shapes = [
        ("attn_qkv", 512, 1536, false),
        ("attn_proj", 512, 512, false),
        ("mlp_fc", 512, 2048, false),
        ("mlp_proj", 2048, 512, false),
        ("lm_head", 512, 50257, true),
    ];
    for (name, k, n, out_in) in shapes {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        // Enough copies of W to stream from memory, as decoding does (a whole model per token),
        // not from a cache warmed by the previous repetition.
        let copies = (256 << 20) / (k * n * 4) + 1;
        let ws: Vec<Vec<f32>> = (0..copies).map(|c| values(k * n, 7 + c as u64)).collect();
        let view = |c: usize| {
            let w = &ws[c % copies];
            if out_in {
                View::rows(w, n, k, k)
            } else {
                View::rows(w, k, n, n).t()
            }
        };
        for m in [1, 2, 4, 8] {
            let x = values(m * k, 3);
            let mut y = vec![0f32; m * n];
            skinny(&x, m, view(0), &mut y);
            let mut times: Vec<f64> = (0..reps)
                .map(|r| {
                    let t = Instant::now();
                    skinny(&x, m, view(r + 1), &mut y);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let med = times[reps / 2];
            println!(
                "{{\"shape\":\"{name}\",\"m\":{m},\"median_ms\":{:.3},\"gb_per_s\":{:.1},\"gflop_per_s\":{:.1},\"checksum\":{}}}",
                med * 1e3,
                (k * n * 4) as f64 / med / 1e9,
                (2 * m * k * n) as f64 / med / 1e9,
                y.iter().map(|v| *v as f64).sum::<f64>()
            );
        }
    }
}
