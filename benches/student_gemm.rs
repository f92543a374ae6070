//! Benchmark (not a timed test): the student's training matmuls through `ops::gemm::matmul`
//! (the `gemm` crate) on the standard workload's shapes (512 tokens, d = 512, Conv1D layout):
//! the forward x·W, the backward dx = g·Wᵀ and dW = xᵀ·g; and the same forward and dx products
//! by the f32 kernel of `ops::bf16` on W packed once (the packing timed apart, once), and dx
//! through a transposed copy of W. One JSON line per product: median ms and GFLOP/s; the
//! packing once cold and as the median of repeats in a warm heap.
//!
//! Run: cargo bench --bench student_gemm [-- --reps 20]

use pocl::ops::bf16::{Element, Packed};
use pocl::ops::gemm::{matmul, View};
use std::time::Instant;

mod common;
use common::{arg, median_secs, values};

fn main() {
    let reps = arg("--reps", 20usize);
    let m = 512;
    for (name, k, n) in [
        ("attn_qkv", 512, 1536),
        ("attn_proj", 512, 512),
        ("mlp_fc", 512, 2048),
        ("mlp_proj", 2048, 512),
    ] {
        let (x, w, g) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
        let (mut y, mut dx, mut dw) = (vec![0f32; m * n], vec![0f32; m * k], vec![0f32; k * n]);
        let xv = View::rows(&x, m, k, k);
        let wv = View::rows(&w, k, n, n);
        let gv = View::rows(&g, m, n, n);
        let (mut wt, mut dx2) = (vec![0f32; n * k], vec![0f32; m * k]);
        let (mut y2, mut dx3) = (vec![0f32; m * n], vec![0f32; m * k]);
        let t0 = Instant::now();
        let pw = Packed::in_out(&w, k, n, Element::F32);
        let pack_fwd = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let pwt = Packed::out_in(&w, k, n, Element::F32);
        let pack_dx = t0.elapsed().as_secs_f64();
        // Packing again in a warm heap: what the step's backward pays per call.
        let pack_dx_warm = median_secs(reps, || drop(Packed::out_in(&w, k, n, Element::F32)));
        println!(
            "{{\"shape\":\"{name}\",\"pack_fwd_ms\":{:.3},\"pack_dx_ms\":{:.3},\"pack_dx_warm_ms\":{:.3}}}",
            pack_fwd * 1e3,
            pack_dx * 1e3,
            pack_dx_warm * 1e3
        );
        let products: [(&str, &mut dyn FnMut()); 6] = [
            ("forward x.W", &mut || matmul(xv, wv, &mut y, n, false)),
            ("dx = g.Wt", &mut || matmul(gv, wv.t(), &mut dx, k, false)),
            ("dW = xt.g", &mut || matmul(xv.t(), gv, &mut dw, n, true)),
            ("forward packed", &mut || pw.matmul(&x, m, &mut y2, n)),
            ("dx packed", &mut || pwt.matmul(&g, m, &mut dx3, k)),
            ("dx = g.(Wt copied)", &mut || {
                transpose(&w, k, n, &mut wt);
                matmul(gv, View::rows(&wt, n, k, k), &mut dx2, k, false)
            }),
        ];
        for (product, f) in products {
            let med = median_secs(reps, f);
            println!(
                "{{\"bench\":\"student_gemm\",\"shape\":\"{name}\",\"product\":\"{product}\",\"median_ms\":{:.3},\"gflops\":{:.1}}}",
                med * 1e3,
                2.0 * (m * k * n) as f64 / med / 1e9
            );
        }
    }
}

/// dst [c, r] = src [r, c]ᵀ, in 32 x 32 blocks, rows of blocks in parallel.
fn transpose(src: &[f32], r: usize, c: usize, dst: &mut [f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(32 * r)
        .enumerate()
        .for_each(|(bj, out)| {
            let j0 = bj * 32;
            let cols = (c - j0).min(32);
            for i0 in (0..r).step_by(32) {
                for i in i0..(i0 + 32).min(r) {
                    for j in 0..cols {
                        out[j * r + i] = src[i * c + j0 + j];
                    }
                }
            }
        });
}
