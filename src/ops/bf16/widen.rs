//! f32-widen kernel, for CPUs without a bf16 dot-product instruction: the packed bf16 W is
//! widened to f32 in registers (a bf16 is the high half of an f32: a shift for the even k of a
//! VNNI pair, a mask for the odd one) and multiplied with the f32 x (not rounded to bf16) by f32
//! FMAs. W keeps its half-size packed form; the arithmetic runs at f32 FMA speed.
//!
//! The same code is the f32 kernel for f32 panels ([`super::Element::F32`]): there the four
//! vectors of a k pair are loaded as they are instead of widened from two.
//!
//! Every variant computes each output as the same chain, acc = fma(x[l], W[j, l], acc) for
//! l = 0, 1, … in order, so they agree to the bit (tested), and bf16 and f32 panels of the same
//! bf16-exact W give the same bits: AVX-512F on 8 rows × 32 columns (16 zmm accumulators),
//! AVX2 + FMA on 6 rows × 16 columns (12 ymm accumulators; a last 1-2 rows on whole panels),
//! and a portable body on 4 rows × 16 columns (NEON on aarch64; on x86 it runs in tests only).

use super::matmul::Job;
use super::pack::{get_f32, Line, PANEL, STEP, TILE, TK};
use super::Element;

/// Which compiled variant runs (forced only by tests; [`run`] picks the best).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The portable body compiled for the target's baseline (aarch64: NEON, which has FMA).
    /// On x86 only tests run it (compiled without the `fma` target feature its `mul_add` is a library call), so the
    /// body aarch64 runs is checked here too.
    #[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
    Portable,
}

impl Isa {
    /// The best variant this CPU runs (f32-widen is only selected where one exists).
    pub(super) fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if super::cpu::has_avx512f() {
                Isa::Avx512
            } else {
                Isa::Avx2
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Portable
    }

    #[cfg(test)]
    pub(super) fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => super::cpu::has_avx512f(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Portable => true,
        }
    }
}

/// The job's rows against `panels`, with `isa`.
///
/// # Safety
/// The CPU has `isa`'s features; `job` satisfies its invariants and holds f32 x.
pub(super) unsafe fn run(isa: Isa, job: &Job, panels: std::ops::Range<usize>) {
    match isa {
        // SAFETY: AVX-512F present (caller); Job invariants (caller).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512(job, panels) },
        // SAFETY: AVX2 + FMA present (caller).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_avx2(job, panels) },
        Isa::Portable => run_portable(job, panels),
    }
}

/// Rows per AVX-512 register block.
const ROWS512: usize = 8;
/// Rows per portable register block.
const ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(job: &Job, panels: std::ops::Range<usize>) {
    let (x, ld) = job.x_f32();
    let steps = job.w.steps;
    for p in panels {
        let b = job.panel(p);
        let cols = job.cols(p);
        for i0 in (0..job.rows).step_by(ROWS512) {
            let r = (job.rows - i0).min(ROWS512);
            let xr = &x[i0 * ld..(i0 + r) * ld];
            let dst = job.out_at(i0, p * PANEL);
            // SAFETY: AVX-512F enabled here; xr holds r rows of ld = steps·TK values, b holds
            // `steps` steps; dst rows < job.rows and columns < n_out are in `out` and owned by
            // this task (Job invariants).
            unsafe {
                match job.w.element() {
                    Element::Bf16 => rows512_any::<false>(r, xr, ld, b, steps, cols, dst, job.ldo),
                    Element::F32 => rows512_any::<true>(r, xr, ld, b, steps, cols, dst, job.ldo),
                }
            }
        }
    }
}

/// [`rows512`] for r ≤ 8 rows.
///
/// # Safety
/// As [`rows512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows512_any<const F32: bool>(
    r: usize,
    xr: &[f32],
    ld: usize,
    b: &[Line],
    steps: usize,
    cols: usize,
    dst: *mut f32,
    ldo: usize,
) {
    // SAFETY: forwarded (caller).
    unsafe {
        match r {
            8 => rows512::<8, F32>(xr, ld, b, steps, cols, dst, ldo),
            7 => rows512::<7, F32>(xr, ld, b, steps, cols, dst, ldo),
            6 => rows512::<6, F32>(xr, ld, b, steps, cols, dst, ldo),
            5 => rows512::<5, F32>(xr, ld, b, steps, cols, dst, ldo),
            4 => rows512::<4, F32>(xr, ld, b, steps, cols, dst, ldo),
            3 => rows512::<3, F32>(xr, ld, b, steps, cols, dst, ldo),
            2 => rows512::<2, F32>(xr, ld, b, steps, cols, dst, ldo),
            _ => rows512::<1, F32>(xr, ld, b, steps, cols, dst, ldo),
        }
    }
}

/// R rows of x (row stride `ld`, zero padded to `steps`·TK) against one panel (f32 panels when
/// `F32`, else bf16); stores R rows × `cols` columns at `dst` (row stride `ldo`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows512<const R: usize, const F32: bool>(
    x: &[f32],
    ld: usize,
    b: &[Line],
    steps: usize,
    cols: usize,
    dst: *mut f32,
    ldo: usize,
) {
    use core::arch::x86_64::*;
    let lines = if F32 { 2 * STEP } else { STEP };
    assert!(x.len() >= (R - 1) * ld + steps * TK && b.len() >= steps * lines);
    let xp = x.as_ptr();
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..steps {
        let bt = &b[s * lines..][..lines];
        for k2 in 0..TILE {
            // SAFETY: Lines are 64 bytes, 64-byte aligned; x indices below are
            // < (R - 1)·ld + steps·TK (asserted).
            unsafe {
                // Columns 0..16 (e0, o0) and 16..32 (e1, o1) of the even and odd k.
                let (e0, e1, o0, o1) = if F32 {
                    let q = bt[4 * k2..].as_ptr() as *const f32;
                    (
                        _mm512_load_ps(q),
                        _mm512_load_ps(q.add(16)),
                        _mm512_load_ps(q.add(32)),
                        _mm512_load_ps(q.add(48)),
                    )
                } else {
                    let w0 = _mm512_load_si512(bt[k2].0.as_ptr() as *const __m512i);
                    let w1 = _mm512_load_si512(bt[TILE + k2].0.as_ptr() as *const __m512i);
                    // Even k in the low halves of the words.
                    (
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w0)),
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w1)),
                        _mm512_castsi512_ps(_mm512_and_si512(w0, high)),
                        _mm512_castsi512_ps(_mm512_and_si512(w1, high)),
                    )
                };
                let l = s * TK + 2 * k2;
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a0 = _mm512_set1_ps(*xp.add(i * ld + l));
                    let a1 = _mm512_set1_ps(*xp.add(i * ld + l + 1));
                    acc[0] = _mm512_fmadd_ps(a0, e0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(a0, e1, acc[1]);
                    acc[0] = _mm512_fmadd_ps(a1, o0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(a1, o1, acc[1]);
                }
            }
        }
    }
    let (m0, m1) = super::avx512bf16::column_masks(cols);
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

/// Rows per AVX2 register block: 6 rows × 16 columns are 12 ymm accumulators, leaving four
/// of the 16 registers for W's two vectors, the broadcast x and the odd-k mask.
#[cfg(target_arch = "x86_64")]
const ROWS256: usize = 6;

/// How many k steps ahead the AVX2 rows prefetch W where it streams from memory.
#[cfg(target_arch = "x86_64")]
const PREFETCH_STEPS: usize = 4;

/// Prefetches the lines of k pair `k2` PREFETCH_STEPS steps after the step at `step` (of
/// `lines` lines): four f32 lines, or a bf16 line in each half. Past the end of W it fetches
/// nothing useful and faults on nothing.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_pair<const F32: bool>(step: *const Line, k2: usize, lines: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let ahead = step.wrapping_add(PREFETCH_STEPS * lines);
    let at = |l: usize| ahead.wrapping_add(l) as *const i8;
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        if F32 {
            for l in 4 * k2..4 * k2 + 4 {
                _mm_prefetch::<_MM_HINT_T0>(at(l));
            }
        } else {
            _mm_prefetch::<_MM_HINT_T0>(at(k2));
            _mm_prefetch::<_MM_HINT_T0>(at(TILE + k2));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(job: &Job, panels: std::ops::Range<usize>) {
    let (x, ld) = job.x_f32();
    let steps = job.w.steps;
    let f32_panels = job.w.element() == Element::F32;
    // Blocks of 3-6 rows take a panel in two 16-column halves; a last 1 or 2 rows (decoding)
    // take it whole, reading W in order: half by half, every other kilobyte (bf16) or line
    // (f32) of the panel was read at a time, and one decoded token ran at a third of the
    // memory bandwidth.
    let tail = match job.rows % ROWS256 {
        t @ (1 | 2) => t,
        _ => 0,
    };
    let narrow = job.rows - tail;
    for p in panels {
        let b = job.panel(p);
        let cols = job.cols(p);
        for half in 0..2 {
            let c0 = 16 * half;
            if c0 >= cols {
                break;
            }
            let c = (cols - c0).min(16);
            for i0 in (0..narrow).step_by(ROWS256) {
                let r = (narrow - i0).min(ROWS256);
                // The panel's first pass reads it from memory (half 0 is every other
                // kilobyte or line of it): it prefetches both halves; later passes find them
                // cached.
                let first = half == 0 && i0 == 0;
                let xr = &x[i0 * ld..(i0 + r) * ld];
                let dst = job.out_at(i0, p * PANEL + c0);
                // SAFETY: AVX2 + FMA enabled here; xr holds r rows of ld = steps·TK values, b
                // holds `steps` steps; dst rows < job.rows and columns < n_out are in `out` and
                // owned by this task (Job invariants).
                unsafe {
                    if f32_panels {
                        rows256_any::<true>(r, xr, ld, b, steps, half, c, first, dst, job.ldo)
                    } else {
                        rows256_any::<false>(r, xr, ld, b, steps, half, c, first, dst, job.ldo)
                    }
                }
            }
        }
        if tail > 0 {
            let xr = &x[narrow * ld..job.rows * ld];
            let dst = job.out_at(narrow, p * PANEL);
            // SAFETY: as above, for the last `tail` rows and the whole panel.
            unsafe {
                match (tail, f32_panels) {
                    (1, false) => rows256w::<1, false>(xr, ld, b, steps, cols, dst, job.ldo),
                    (1, true) => rows256w::<1, true>(xr, ld, b, steps, cols, dst, job.ldo),
                    (_, false) => rows256w::<2, false>(xr, ld, b, steps, cols, dst, job.ldo),
                    (_, true) => rows256w::<2, true>(xr, ld, b, steps, cols, dst, job.ldo),
                }
            }
        }
    }
}

/// R ≤ 2 rows of x (row stride `ld`, zero padded to `steps`·TK) against a whole panel (f32
/// panels when `F32`, else bf16): [`rows256`]'s sums over 32 columns (4 ymm accumulators per
/// row), so W is read in order; stores R rows × `cols` (1..=32) columns at `dst`.
///
/// # Safety
/// AVX2 + FMA; `dst` is valid for writes of R rows (stride `ldo`) × `cols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows256w<const R: usize, const F32: bool>(
    x: &[f32],
    ld: usize,
    b: &[Line],
    steps: usize,
    cols: usize,
    dst: *mut f32,
    ldo: usize,
) {
    use core::arch::x86_64::*;
    let lines = if F32 { 2 * STEP } else { STEP };
    assert!(x.len() >= (R - 1) * ld + steps * TK && b.len() >= steps * lines);
    assert!((1..=32).contains(&cols));
    let xp = x.as_ptr();
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for s in 0..steps {
        let bt = &b[s * lines..][..lines];
        for k2 in 0..TILE {
            let l = s * TK + 2 * k2;
            // SAFETY: Lines are 64 bytes, 64-byte aligned (two aligned ymm each); x indices
            // below are < (R - 1)·ld + steps·TK (asserted).
            unsafe {
                // Columns 0..16 (line of half 0) and 16..32 (half 1), even k then odd k.
                let (h0, h1) = if F32 {
                    (bt[4 * k2..].as_ptr(), bt[4 * k2 + 1..].as_ptr())
                } else {
                    (bt[k2..].as_ptr(), bt[TILE + k2..].as_ptr())
                };
                // W streams from memory when decoding.
                prefetch_pair::<F32>(bt.as_ptr(), k2, lines);
                let vec = |line: *const Line, i: usize| (line as *const __m256i).add(i);
                let even = if F32 {
                    [0, 1, 2, 3].map(|i| _mm256_load_ps(vec([h0, h1][i / 2], i % 2) as *const f32))
                } else {
                    [0, 1, 2, 3].map(|i| {
                        let w = _mm256_load_si256(vec([h0, h1][i / 2], i % 2));
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
                    })
                };
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a0 = _mm256_broadcast_ss(&*xp.add(i * ld + l));
                    for (acc, e) in acc.iter_mut().zip(even) {
                        *acc = _mm256_fmadd_ps(a0, e, *acc);
                    }
                }
                // As in rows256: the odd k's words loaded again, after the even k's products.
                let odd = if F32 {
                    [0, 1, 2, 3]
                        .map(|i| _mm256_load_ps(vec([h0, h1][i / 2].add(2), i % 2) as *const f32))
                } else {
                    [0, 1, 2, 3].map(|i| {
                        let w = vec([h0, h1][i / 2], i % 2).read_volatile();
                        _mm256_castsi256_ps(_mm256_and_si256(w, high))
                    })
                };
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a1 = _mm256_broadcast_ss(&*xp.add(i * ld + l + 1));
                    for (acc, o) in acc.iter_mut().zip(odd) {
                        *acc = _mm256_fmadd_ps(a1, o, *acc);
                    }
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: row i < R and columns < cols ≤ 32 are in bounds (caller; asserted).
        unsafe { store_cols(acc, dst.add(i * ldo), cols) };
    }
}

/// Stores the first `cols` lanes of `v` (8 per vector) at `dst`: whole vectors when they are
/// all wanted, else through a stack copy.
///
/// # Safety
/// AVX; `cols` ≤ 8·N; `dst` is valid for writes of `cols` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn store_cols<const N: usize>(
    v: &[core::arch::x86_64::__m256; N],
    dst: *mut f32,
    cols: usize,
) {
    use core::arch::x86_64::_mm256_storeu_ps;
    // SAFETY: as the caller promises; t holds 8·N f32.
    unsafe {
        if cols == 8 * N {
            for (q, v) in v.iter().enumerate() {
                _mm256_storeu_ps(dst.add(8 * q), *v);
            }
        } else {
            let mut t = [[0f32; 8]; N];
            for (q, v) in v.iter().enumerate() {
                _mm256_storeu_ps(t[q].as_mut_ptr(), *v);
            }
            std::ptr::copy_nonoverlapping(t.as_ptr() as *const f32, dst, cols);
        }
    }
}

/// [`rows256`] for a block of 3 ≤ r ≤ 6 rows (fewer go to [`rows256w`]).
///
/// # Safety
/// As [`rows256`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows256_any<const F32: bool>(
    r: usize,
    xr: &[f32],
    ld: usize,
    b: &[Line],
    steps: usize,
    half: usize,
    cols: usize,
    prefetch: bool,
    dst: *mut f32,
    ldo: usize,
) {
    // SAFETY: forwarded (caller).
    unsafe {
        match r {
            6 => rows256::<6, F32>(xr, ld, b, steps, half, cols, prefetch, dst, ldo),
            5 => rows256::<5, F32>(xr, ld, b, steps, half, cols, prefetch, dst, ldo),
            4 => rows256::<4, F32>(xr, ld, b, steps, half, cols, prefetch, dst, ldo),
            3 => rows256::<3, F32>(xr, ld, b, steps, half, cols, prefetch, dst, ldo),
            _ => unreachable!("run_avx2 gives 1-2 rows to rows256w"),
        }
    }
}

/// R rows of x (row stride `ld`, zero padded to `steps`·TK) against half `half` of one panel
/// (f32 panels when `F32`, else bf16); stores R rows × `cols` (≤ 16) columns at `dst` (row
/// stride `ldo`). The even k's products go in before the odd k's, as in every variant. With
/// `prefetch`, W's lines (both halves) are prefetched [`PREFETCH_STEPS`] ahead.
///
/// # Safety
/// AVX2 + FMA; `dst` is valid for writes of R rows (stride `ldo`) × `cols` (1..=16) columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows256<const R: usize, const F32: bool>(
    x: &[f32],
    ld: usize,
    b: &[Line],
    steps: usize,
    half: usize,
    cols: usize,
    prefetch: bool,
    dst: *mut f32,
    ldo: usize,
) {
    use core::arch::x86_64::*;
    let lines = if F32 { 2 * STEP } else { STEP };
    assert!(x.len() >= (R - 1) * ld + steps * TK && b.len() >= steps * lines && half < 2);
    assert!((1..=16).contains(&cols));
    let xp = x.as_ptr();
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for s in 0..steps {
        let bt = &b[s * lines..][..lines];
        for k2 in 0..TILE {
            let l = s * TK + 2 * k2;
            if prefetch {
                prefetch_pair::<F32>(bt.as_ptr(), k2, lines);
            }
            // SAFETY: Lines are 64 bytes, 64-byte aligned (two aligned ymm each); x indices
            // below are < (R - 1)·ld + steps·TK (asserted).
            unsafe {
                // Columns 0..8 and 8..16 of this half: the even k's, then the odd k's.
                let (e0, e1, q) = if F32 {
                    let q = bt[4 * k2 + half..].as_ptr() as *const f32;
                    (
                        _mm256_load_ps(q),
                        _mm256_load_ps(q.add(8)),
                        q.add(32) as *const u8,
                    )
                } else {
                    let q = bt[half * TILE + k2].0.as_ptr() as *const __m256i;
                    let (w0, w1) = (_mm256_load_si256(q), _mm256_load_si256(q.add(1)));
                    (
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
                        q as *const u8,
                    )
                };
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a0 = _mm256_broadcast_ss(&*xp.add(i * ld + l));
                    acc[0] = _mm256_fmadd_ps(a0, e0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a0, e1, acc[1]);
                }
                // The odd k's vectors are loaded after the even k's products, so that the
                // four W vectors never hold registers at once.
                let (o0, o1) = if F32 {
                    let q = q as *const f32;
                    (_mm256_load_ps(q), _mm256_load_ps(q.add(8)))
                } else {
                    // Loaded again rather than kept from the even k's load: volatile, so that
                    // the compiler does not merge the two loads and hold the raw words in two
                    // registers through the even k's products (it then spilled an accumulator).
                    let q = q as *const __m256i;
                    let (w0, w1) = (q.read_volatile(), q.add(1).read_volatile());
                    (
                        _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                        _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
                    )
                };
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a1 = _mm256_broadcast_ss(&*xp.add(i * ld + l + 1));
                    acc[0] = _mm256_fmadd_ps(a1, o0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a1, o1, acc[1]);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: row i < R and columns < cols ≤ 16 are in bounds (caller; asserted).
        unsafe { store_cols(acc, dst.add(i * ldo), cols) };
    }
}

/// The portable body: 4 rows × 16 columns (half a panel) per register block.
#[inline(always)]
fn run_portable(job: &Job, panels: std::ops::Range<usize>) {
    let (x, ld) = job.x_f32();
    let steps = job.w.steps;
    for p in panels {
        let b = job.panel(p);
        let cols = job.cols(p);
        for half in 0..2 {
            let c0 = 16 * half;
            if c0 >= cols {
                break;
            }
            let c = (cols - c0).min(16);
            for i0 in (0..job.rows).step_by(ROWS) {
                let r = (job.rows - i0).min(ROWS);
                let f32_panels = job.w.element() == Element::F32;
                let acc = rows_half(&x[i0 * ld..], ld, r, b, steps, half, f32_panels);
                for (i, acc) in acc.iter().enumerate().take(r) {
                    let dst = job.out_at(i0 + i, p * PANEL + c0);
                    // SAFETY: row < job.rows and columns < n_out are inside `out` and owned
                    // by this task (its panel); Job invariants.
                    unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, c) };
                }
            }
        }
    }
}

/// Up to 4 rows (`r`; missing rows read as zero) against half `half` of one panel (f32 panels
/// when `f32_panels`, else bf16).
#[inline(always)]
fn rows_half(
    x: &[f32],
    ld: usize,
    r: usize,
    b: &[Line],
    steps: usize,
    half: usize,
    f32_panels: bool,
) -> [[f32; 16]; ROWS] {
    let mut acc = [[0f32; 16]; ROWS];
    let row = |i: usize| -> &[f32] {
        if i < r {
            &x[i * ld..i * ld + steps * TK]
        } else {
            &[]
        }
    };
    let xs = [row(0), row(1), row(2), row(3)];
    for s in 0..steps {
        for k2 in 0..TILE {
            let mut even = [0f32; 16];
            let mut odd = [0f32; 16];
            if f32_panels {
                let q = &b[s * 2 * STEP + 4 * k2 + half..];
                for c in 0..16 {
                    even[c] = get_f32(&q[0], c);
                    odd[c] = get_f32(&q[2], c);
                }
            } else {
                let line = &b[s * STEP + half * TILE + k2].0;
                for c in 0..16 {
                    let word = line[2 * c] as u32 | (line[2 * c + 1] as u32) << 16;
                    even[c] = f32::from_bits(word << 16);
                    odd[c] = f32::from_bits(word & 0xffff_0000);
                }
            }
            let l = s * TK + 2 * k2;
            for (acc, xr) in acc.iter_mut().zip(&xs) {
                let Some(&[a0, a1]) = xr.get(l..l + 2).map(|p| <&[f32; 2]>::try_from(p).unwrap())
                else {
                    continue;
                };
                for c in 0..16 {
                    acc[c] = a0.mul_add(even[c], acc[c]);
                }
                for c in 0..16 {
                    acc[c] = a1.mul_add(odd[c], acc[c]);
                }
            }
        }
    }
    acc
}
