//! AMX: 2×2 register blocking, tmm0-3 the C tiles (A0·B0, A0·B1, A1·B0, A1·B1), tmm4-5 the two A
//! tiles of a 32-row x block, tmm6-7 the two B tiles of a 32-column panel.

use super::matmul::Job;
use super::pack::{Line, PAIR, PANEL, STEP, TILE};
use core::arch::asm;

/// Palette 1: all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileCfg {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CFG: TileCfg = TileCfg {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Stride between tile rows in packed memory.
const STRIDE: usize = 64;

/// Panels per chunk: at most this many...
const CHUNK: usize = 8;
/// ...and at most this many bytes of W, so a chunk stays in L2 while every x block of the
/// group passes over it.
const CHUNK_BYTES: usize = 256 << 10;

/// One C tile, for tiles that are only partly inside `out`.
#[repr(C, align(64))]
struct Scratch([f32; 256]);

/// # Safety
/// AMX usable (permission granted); `job` satisfies its invariants; `panels` within W.
pub(super) unsafe fn run(job: &Job, panels: std::ops::Range<usize>) {
    // Tile configuration is per thread and rayon may run this on any worker, so load it here
    // (cheap next to a task's work) and release at the end so the OS need not save tiles.
    // SAFETY: CFG is a valid palette-1 config (rows ≤ 16, colsb ≤ 64); ldtilecfg reads its
    // 64 bytes.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CFG, options(nostack, readonly)) };
    let steps = job.w.steps;
    let blocks = job.rows.div_ceil(PAIR);
    // Loop order: chunk of W panels (in L2) × x block (reused across the chunk's panels) ×
    // panel. One panel at a time over all blocks measured the same on the layer shapes but
    // 1.3-1.5× slower on the lm head (W from DRAM, each x block re-read per panel).
    let chunk = (CHUNK_BYTES / (steps * STEP * 64)).clamp(1, CHUNK);
    let mut scratch = Scratch([0.0; 256]);
    let mut c0 = panels.start;
    while c0 < panels.end {
        let c1 = (c0 + chunk).min(panels.end);
        for q in 0..blocks {
            let a = job.block(q).as_ptr();
            let rows = job.block_rows(q);
            for p in c0..c1 {
                let b = job.panel(p).as_ptr();
                let cols = job.cols(p);
                // SAFETY: a and b point to `steps` steps of STEP lines each (Job
                // invariants); tiles configured above.
                unsafe {
                    match (rows > 16, cols > 16) {
                        (true, true) => block::<true, true>(a, b, steps),
                        (true, false) => block::<true, false>(a, b, steps),
                        (false, true) => block::<false, true>(a, b, steps),
                        (false, false) => block::<false, false>(a, b, steps),
                    }
                }
                for (tile, ta, tb) in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)] {
                    let r = rows.saturating_sub(16 * ta).min(16);
                    let c = cols.saturating_sub(16 * tb).min(16);
                    if r == 0 || c == 0 {
                        continue;
                    }
                    let dst = job.out_at(q * PAIR + 16 * ta, p * PANEL + 16 * tb);
                    if r == 16 && c == 16 {
                        // SAFETY: the 16 × 16 tile's rows are < job.rows and its columns
                        // < n_out: inside `out` (Job invariants), owned by this task (its
                        // panels).
                        unsafe { store(tile, dst, job.ldo * 4) };
                    } else {
                        // SAFETY: the scratch holds a whole tile (stride 64 bytes); only its
                        // valid r × c corner is copied to `out`, in bounds as above.
                        unsafe {
                            store(tile, scratch.0.as_mut_ptr(), 64);
                            for y in 0..r {
                                std::ptr::copy_nonoverlapping(
                                    scratch.0.as_ptr().add(16 * y),
                                    dst.add(y * job.ldo),
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
        c0 = c1;
    }
    // SAFETY: returns the tiles to the init state; no tile is used after this.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// C tiles = Σ_s A(s) · B(s). A1 / B1 are skipped when the second half is padding.
///
/// # Safety
/// Tiles configured; `a`, `b` valid for `steps * STEP` lines.
#[inline(always)]
unsafe fn block<const A2: bool, const B2: bool>(a: *const Line, b: *const Line, steps: usize) {
    // SAFETY (all asm here): tile registers are not used by compiled code; loads read 16
    // lines of 64 bytes at a, a + TILE, b, b + TILE within the current step (caller's bound).
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for s in 0..steps {
            let a0 = a.add(s * STEP);
            let b0 = b.add(s * STEP);
            let a1 = a0.add(TILE);
            let b1 = b0.add(TILE);
            if A2 && B2 {
                asm!(
                    "tileloadd tmm4, [{a0} + {st}*1]",
                    "tileloadd tmm6, [{b0} + {st}*1]",
                    "tileloadd tmm7, [{b1} + {st}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {st}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                    st = in(reg) STRIDE,
                    options(nostack, readonly)
                );
            } else if A2 {
                asm!(
                    "tileloadd tmm4, [{a0} + {st}*1]",
                    "tileloadd tmm6, [{b0} + {st}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a1} + {st}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                    st = in(reg) STRIDE,
                    options(nostack, readonly)
                );
            } else if B2 {
                asm!(
                    "tileloadd tmm4, [{a0} + {st}*1]",
                    "tileloadd tmm6, [{b0} + {st}*1]",
                    "tileloadd tmm7, [{b1} + {st}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                    st = in(reg) STRIDE,
                    options(nostack, readonly)
                );
            } else {
                asm!(
                    "tileloadd tmm4, [{a0} + {st}*1]",
                    "tileloadd tmm6, [{b0} + {st}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    a0 = in(reg) a0, b0 = in(reg) b0,
                    st = in(reg) STRIDE,
                    options(nostack, readonly)
                );
            }
        }
    }
}

/// Stores C tile `tile` (0-3) as 16 rows of 16 f32 at `dst`, rows `stride` bytes apart.
///
/// # Safety
/// Tiles configured; `dst` valid for 16 rows of 64 bytes at that stride.
#[inline(always)]
unsafe fn store(tile: usize, dst: *mut f32, stride: usize) {
    // SAFETY: caller's bound on dst; tile registers hold the block's result.
    unsafe {
        match tile {
            0 => {
                asm!("tilestored [{d} + {st}*1], tmm0", d = in(reg) dst, st = in(reg) stride, options(nostack))
            }
            1 => {
                asm!("tilestored [{d} + {st}*1], tmm1", d = in(reg) dst, st = in(reg) stride, options(nostack))
            }
            2 => {
                asm!("tilestored [{d} + {st}*1], tmm2", d = in(reg) dst, st = in(reg) stride, options(nostack))
            }
            _ => {
                asm!("tilestored [{d} + {st}*1], tmm3", d = in(reg) dst, st = in(reg) stride, options(nostack))
            }
        }
    }
}
