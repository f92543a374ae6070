//! Portable kernel: 4 rows × 32 columns of f32 accumulators over the widened bf16 values
//! (products of two bf16 are exact in f32, so only the accumulation rounds).

use super::convert::bf16_bits_to_f32;
use super::matmul::Job;
use super::pack::{Line, PAIR, PANEL, STEP, TILE};

pub(super) fn run(job: &Job, panels: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected; the body is safe Rust compiled with AVX2 enabled.
        unsafe { run_avx2(job, panels) };
        return;
    }
    run_generic(job, panels)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2(job: &Job, panels: std::ops::Range<usize>) {
    run_generic(job, panels)
}

#[inline(always)]
fn run_generic(job: &Job, panels: std::ops::Range<usize>) {
    let blocks = job.rows.div_ceil(PAIR);
    let steps = job.w.steps;
    for p in panels {
        let b = job.panel(p);
        let cols = job.cols(p);
        for q in 0..blocks {
            let a = job.block(q);
            let rows = job.block_rows(q);
            for g in 0..rows.div_ceil(4) {
                let acc = rows4(a, b, steps, g);
                for (y, acc) in acc.iter().enumerate().take((rows - 4 * g).min(4)) {
                    let dst = job.out_at(q * PAIR + 4 * g + y, p * PANEL);
                    // SAFETY: row < job.rows and columns < n_out are inside `out` and
                    // owned by this task (its panel); Job invariants.
                    unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, cols) };
                }
            }
        }
    }
}

#[inline(always)]
fn rows4(a: &[Line], b: &[Line], steps: usize, g: usize) -> [[f32; PANEL]; 4] {
    let mut acc = [[0f32; PANEL]; 4];
    for s in 0..steps {
        // Rows 4g .. 4g + 4 of the block are lines 4g .. 4g + 4 of each step.
        let at = &a[s * STEP + 4 * g..][..4];
        let bt = &b[s * STEP..][..STEP];
        for k2 in 0..TILE {
            let (b0, b1) = (&bt[k2].0, &bt[TILE + k2].0);
            for (acc, al) in acc.iter_mut().zip(at) {
                let x0 = bf16_bits_to_f32(al.0[2 * k2]);
                let x1 = bf16_bits_to_f32(al.0[2 * k2 + 1]);
                for c in 0..16 {
                    acc[c] +=
                        x0 * bf16_bits_to_f32(b0[2 * c]) + x1 * bf16_bits_to_f32(b0[2 * c + 1]);
                    acc[16 + c] +=
                        x0 * bf16_bits_to_f32(b1[2 * c]) + x1 * bf16_bits_to_f32(b1[2 * c + 1]);
                }
            }
        }
    }
    acc
}
