//! AVX512-BF16: `vdpbf16ps` on 8 rows × 32 columns (16 zmm accumulators; fewer rows for the
//! last block, e.g. one row when decoding one sequence); a broadcast x pair times a B line is
//! exactly one VNNI step, so it reads the AMX layout unchanged.

use super::matmul::Job;
use super::pack::{Line, PAIR, PANEL, STEP, TILE};
use core::arch::x86_64::*;

/// # Safety
/// AVX512F and AVX512-BF16 available; `job` satisfies its invariants.
pub(super) unsafe fn run(job: &Job, panels: std::ops::Range<usize>) {
    let blocks = job.rows.div_ceil(PAIR);
    for p in panels {
        let b = job.panel(p);
        let cols = job.cols(p);
        for q in 0..blocks {
            let a = job.block(q);
            let rows = job.block_rows(q);
            for g in 0..rows.div_ceil(8) {
                let r = (rows - 8 * g).min(8);
                let dst = job.out_at(q * PAIR + 8 * g, p * PANEL);
                let (steps, ldo) = (job.w.steps, job.ldo);
                // SAFETY: features checked by the caller; dst rows < job.rows and columns
                // < n_out are in `out` and owned by this task (its panel).
                unsafe {
                    match r {
                        8 => rows_r::<8>(a, b, steps, g, cols, dst, ldo),
                        7 => rows_r::<7>(a, b, steps, g, cols, dst, ldo),
                        6 => rows_r::<6>(a, b, steps, g, cols, dst, ldo),
                        5 => rows_r::<5>(a, b, steps, g, cols, dst, ldo),
                        4 => rows_r::<4>(a, b, steps, g, cols, dst, ldo),
                        3 => rows_r::<3>(a, b, steps, g, cols, dst, ldo),
                        2 => rows_r::<2>(a, b, steps, g, cols, dst, ldo),
                        _ => rows_r::<1>(a, b, steps, g, cols, dst, ldo),
                    }
                }
            }
        }
    }
}

/// A 512-bit integer vector viewed as 32 bf16 (same bits).
#[inline]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 64-byte vectors; every bit pattern is valid for either.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// One line as 32 bf16.
#[inline]
#[target_feature(enable = "avx512f")]
fn load(l: &Line) -> __m512bh {
    // SAFETY: a Line is 64 bytes, 64-byte aligned, as the aligned load requires.
    bh(unsafe { _mm512_load_si512(l.0.as_ptr() as *const __m512i) })
}

/// Rows 8g .. 8g + R of an x block against one panel; stores R rows × `cols` columns. Each
/// row's sums are the same whatever R (rows do not interact).
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_r<const R: usize>(
    a: &[Line],
    b: &[Line],
    steps: usize,
    g: usize,
    cols: usize,
    dst: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..steps {
        // Rows 8g .. 8g + R of the block are lines 8g .. 8g + R of each step.
        let at = &a[s * STEP + 8 * g..][..R];
        let bt = &b[s * STEP..][..STEP];
        for k2 in 0..TILE {
            let (b0, b1) = (load(&bt[k2]), load(&bt[TILE + k2]));
            for i in 0..R {
                // The x pair (k = 2·k2, 2·k2 + 1) of row i, broadcast to all 16 lanes.
                let pair = (at[i].0[2 * k2] as u32) | ((at[i].0[2 * k2 + 1] as u32) << 16);
                let av = bh(_mm512_set1_epi32(pair as i32));
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
            }
        }
    }
    let (m0, m1) = column_masks(cols);
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: masked stores write only columns < cols of row i < R, in bounds (caller).
        unsafe {
            let d = dst.add(i * ldo);
            _mm512_mask_storeu_ps(d, m0, acc[0]);
            if m1 != 0 {
                _mm512_mask_storeu_ps(d.add(16), m1, acc[1]);
            }
        }
    }
}

/// Store masks for the two 16-column halves of a panel with `cols` valid columns.
pub(super) fn column_masks(cols: usize) -> (__mmask16, __mmask16) {
    let mask = |c: usize| -> __mmask16 {
        if c >= 16 {
            0xffff
        } else {
            (1u16 << c) - 1
        }
    };
    (mask(cols), mask(cols.saturating_sub(16)))
}
