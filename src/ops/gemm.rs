//! A checked, safe front to the `gemm` crate (candle's own CPU matmul) for kernels that need
//! strided operands or accumulation into an existing buffer, which `Tensor::matmul` cannot do
//! without materialising transposes or fresh outputs.

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
///
/// Every function here that reads a view first checks that all its elements lie inside `data`:
/// the fields are public, and the `gemm` crate reads through raw pointers. Overlapping elements
/// (e.g. a zero stride) are fine, since views are only read.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major [rows, cols] with row stride `ld`. Panics if that reaches past `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        let v = View {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        };
        v.check("View::rows");
        v
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Panics (naming `who`) unless every element lies inside `data` and both strides fit an
    /// `isize` (the `gemm` crate's pointer offsets). Index arithmetic is checked, so a huge
    /// stride cannot wrap around to an index that looks in bounds.
    fn check(&self, who: &str) {
        let last = if self.rows == 0 || self.cols == 0 {
            Some(0)
        } else {
            (self.rows - 1)
                .checked_mul(self.rs)
                .zip((self.cols - 1).checked_mul(self.cs))
                .and_then(|(a, b)| a.checked_add(b))
                .map(|l| l + 1)
        };
        assert!(
            last.is_some_and(|l| l <= self.data.len())
                && self.rs <= isize::MAX as usize
                && self.cs <= isize::MAX as usize,
            "{who}: view [{}, {}] with strides ({}, {}) reaches past its {} elements",
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len()
        );
    }
}

/// dst[m, n] (row-major, row stride `ldd`) = lhs[m, k] · rhs[k, n], or += when `accumulate`.
/// Multi-threaded on the global rayon pool.
///
/// Panics unless lhs.cols == rhs.rows, both views lie inside their data, `ldd ≥ n` when m > 1
/// (rows of dst written in parallel must not overlap) and `dst` holds (m − 1)·ldd + n elements.
pub fn matmul(lhs: View, rhs: View, dst: &mut [f32], ldd: usize, accumulate: bool) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    matmul_with(lhs, rhs, dst, ldd, accumulate, par)
}

/// [`matmul`] on the calling thread only: for many small products that are themselves the
/// parallel tasks (attention heads).
pub fn matmul_serial(lhs: View, rhs: View, dst: &mut [f32], ldd: usize, accumulate: bool) {
    matmul_with(lhs, rhs, dst, ldd, accumulate, gemm::Parallelism::None)
}

fn matmul_with(
    lhs: View,
    rhs: View,
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(
        rhs.rows, k,
        "gemm: inner dimensions differ: lhs [{m}, {k}], rhs [{}, {n}]",
        rhs.rows
    );
    lhs.check("gemm: lhs");
    rhs.check("gemm: rhs");
    check_dst("gemm", m, n, ldd, dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * ldd..i * ldd + n].fill(0.0));
        }
        return;
    }
    // SAFETY: every index the gemm touches lies inside the three slices (checked above: the last
    // element of each view and of the destination is in bounds, computed without overflow, and
    // strides are non-negative and fit an isize); the destination rows do not overlap (ldd ≥ n),
    // so its parallel tasks write disjoint elements; and `dst` is borrowed mutably, so it cannot
    // alias the read-only operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Panics unless a row-major destination [m, n] with row stride `ldd` fits in `len` elements
/// and, having more than one row, has rows that do not overlap (ldd ≥ n).
fn check_dst(who: &str, m: usize, n: usize, ldd: usize, len: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        m == 1 || ldd >= n,
        "{who}: destination [{m}, {n}] with row stride {ldd} < {n}: its rows would overlap"
    );
    let need = (m - 1).checked_mul(ldd).and_then(|a| a.checked_add(n));
    assert!(
        need.is_some_and(|need| need <= len) && ldd <= isize::MAX as usize,
        "{who}: destination [{m}, {n}] with row stride {ldd} needs {need:?} elements, has {len}"
    );
}

/// A view built without [`View::rows`]'s check, as a caller may (the fields are public): what
/// the functions' own checks must catch.
#[cfg(test)]
fn raw_view(data: &[f32], rows: usize, cols: usize, rs: usize, cs: usize) -> View<'_> {
    View {
        data,
        rows,
        cols,
        rs,
        cs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_and_accumulation() {
        // lhs [2, 3], rhs given transposed as [2, 3] (so rhs = its .t() is [3, 2]).
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [1f32, 0., -1., 2., 1., 0.];
        let mut out = vec![0f32; 2 * 3];
        matmul(
            View::rows(&a, 2, 3, 3),
            View::rows(&b, 2, 3, 3).t(),
            &mut out,
            3,
            false,
        );
        // row 0: [1·1 + 2·0 + 3·(−1), 1·2 + 2·1 + 0] = [−2, 4]; row 1: [4 − 6, 8 + 5] = [−2, 13]
        assert_eq!(&out[..2], &[-2.0, 4.0]);
        assert_eq!(&out[3..5], &[-2.0, 13.0]);
        assert_eq!(out[2], 0.0, "columns beyond n are untouched");
        matmul(
            View::rows(&a, 2, 3, 3),
            View::rows(&b, 2, 3, 3).t(),
            &mut out,
            3,
            true,
        );
        assert_eq!(&out[3..5], &[-4.0, 26.0]);
    }

    const A: [f32; 6] = [1., 2., 3., 4., 5., 6.];

    /// lhs [2, 3] · rhs [3, 2] into `dst` with row stride `ldd`.
    fn product(dst: &mut [f32], ldd: usize) {
        matmul(
            View::rows(&A, 2, 3, 3),
            View::rows(&A, 3, 2, 2),
            dst,
            ldd,
            false,
        );
    }

    #[test]
    fn buffers_of_exactly_the_needed_length_are_accepted() {
        // [2, 2] with row stride 5: (2 − 1)·5 + 2 = 7 elements, the gap left untouched.
        let mut out = vec![9f32; 7];
        product(&mut out, 5);
        assert_eq!(out, [22., 28., 9., 9., 9., 49., 64.]);
        // One row needs no row stride; k = 0 fills only the [m, n] part.
        let mut one = vec![9f32; 2];
        matmul(
            View::rows(&A, 1, 3, 3),
            View::rows(&A, 3, 2, 2),
            &mut one,
            0,
            false,
        );
        assert_eq!(one, [22., 28.]);
        let mut zero = vec![9f32; 7];
        matmul(
            View::rows(&[], 2, 0, 0),
            View::rows(&[], 0, 2, 2),
            &mut zero,
            5,
            false,
        );
        assert_eq!(zero, [0., 0., 9., 9., 9., 0., 0.]);
        // A zero stride is a valid (broadcast) read-only view.
        let row = View::rows(&A[..3], 2, 3, 0);
        let mut out = vec![0f32; 4];
        matmul_serial(row, View::rows(&A, 3, 2, 2), &mut out, 2, false);
        assert_eq!(out, [22., 28., 22., 28.]);
    }

    #[test]
    #[should_panic(expected = "rows would overlap")]
    fn a_row_stride_below_n_is_refused() {
        product(&mut [0f32; 8], 1);
    }

    #[test]
    #[should_panic(expected = "needs Some(7) elements, has 6")]
    fn a_short_destination_is_refused() {
        product(&mut [0f32; 6], 5);
    }

    #[test]
    #[should_panic(expected = "needs None elements")]
    fn a_destination_size_that_overflows_is_refused() {
        let mut out = [0f32; 4];
        matmul(
            View::rows(&A, 3, 2, 2),
            View::rows(&A, 2, 2, 2),
            &mut out,
            usize::MAX / 2,
            false,
        );
    }

    #[test]
    #[should_panic(expected = "View::rows: view [2, 3] with strides (4, 1) reaches past its 6")]
    fn a_view_past_its_data_is_refused() {
        View::rows(&A, 2, 3, 4);
    }

    #[test]
    #[should_panic(expected = "gemm: rhs: view [3, 2]")]
    fn a_hand_built_view_past_its_data_is_refused() {
        let rhs = raw_view(&A, 3, 2, 3, 1);
        matmul(View::rows(&A, 2, 3, 3), rhs, &mut [0f32; 4], 2, false);
    }

    #[test]
    #[should_panic(expected = "gemm: lhs: view [3, 1]")]
    fn a_stride_that_wraps_around_is_refused() {
        // (3 − 1)·2⁶³ wraps to 0 in unchecked arithmetic: it would look in bounds.
        let lhs = raw_view(&A, 3, 1, usize::MAX / 2 + 1, 1);
        matmul(lhs, View::rows(&A, 1, 2, 2), &mut [0f32; 6], 2, false);
    }

    #[test]
    #[should_panic(expected = "inner dimensions differ: lhs [2, 3], rhs [2, 2]")]
    fn mismatched_inner_dimensions_are_refused() {
        matmul(
            View::rows(&A, 2, 3, 3),
            View::rows(&A, 2, 2, 2),
            &mut [0f32; 4],
            2,
            false,
        );
    }
}

/// Output rows up to which [`skinny`] beats the packed gemm (decoding: one row per sequence).
pub const SKINNY_ROWS: usize = 16;

/// y[m, n] = x[m, k] · Wᵀ for a few rows m, with W given as a [n, k] view (either layout: rows
/// contiguous, the torch `nn.Linear` / lm-head layout, or columns contiguous, GPT-2's Conv1D).
/// Why: for m ≪ 100 a gemm spends its time packing W, which it then uses for only m rows; in
/// decoding that packing copies every weight of the model once per token. Here W is streamed
/// once, straight from memory, in parallel blocks of output columns. f32 accumulation.
///
/// `x` is row-major [m, k], `y` row-major [m, n] (row stride n); panics if either is shorter
/// than that, if W reaches past its data, or if W has no unit stride.
pub fn skinny(x: &[f32], m: usize, w: View, y: &mut [f32]) {
    use rayon::prelude::*;
    let (n, k) = (w.rows, w.cols);
    w.check("skinny: W");
    assert!(
        m.checked_mul(k).is_some_and(|mk| mk <= x.len()),
        "skinny: x [{m}, {k}] needs m·k elements, has {}",
        x.len()
    );
    check_dst("skinny", m, n, n, y.len());
    let rows_contiguous = w.cs == 1;
    assert!(
        rows_contiguous || w.rs == 1,
        "skinny: W [{n}, {k}] with strides ({}, {}) needs one unit stride",
        w.rs,
        w.cs
    );
    // The register tiles win where several rows share each W load (measured on Zen 4 with W
    // streamed from memory, `benches/skinny.rs`: 1.6-2.6x for GPT-2's Conv1D layers at 4-8
    // rows, 1.2x for the lm head at 8); below that the plain loops stream W at least as fast.
    // AVX2's tiles (Conv1D only; the lm head keeps the plain loops there) are used from 8
    // rows: at 4 rows they ran 1.8-2.6x slower than the loops on two of the four shapes
    // (simulated AVX2-only build, `tools/simulate-avx2.sh`), at 8 rows 1.1-3x faster on all.
    let tiles = Tiles::selected().filter(|t| match (t, rows_contiguous) {
        (Tiles::Avx512, true) => m >= 8,
        (Tiles::Avx512, false) => m >= 4,
        (Tiles::Avx2, true) => false,
        (Tiles::Avx2, false) => m >= 8,
    });
    // Conv1D blocks for the tiles: at least two per thread (a [512, 512] W is otherwise one
    // task), at most 512 columns.
    let threads = rayon::current_num_threads().max(1);
    let block = if rows_contiguous {
        256
    } else if tiles.is_some() {
        (n.div_ceil(2 * threads).div_ceil(32) * 32).clamp(64, 512)
    } else {
        512
    };
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let (j0, j1) = (b * block, ((b + 1) * block).min(n));
            let mut out = vec![0f32; m * (j1 - j0)];
            #[cfg(target_arch = "x86_64")]
            if let Some(t) = tiles {
                // SAFETY: the tiles' features were detected (`Tiles::selected`); x, W and out
                // checked above / sized here.
                unsafe {
                    match (t, rows_contiguous) {
                        (Tiles::Avx512, true) => {
                            tiles512::dot_block(x, m, k, w.data, w.rs, j0, j1, &mut out)
                        }
                        (Tiles::Avx512, false) => {
                            tiles512::axpy_block(x, m, k, w.data, w.cs, j0, j1, &mut out)
                        }
                        (_, _) => tiles256::axpy_block(x, m, k, w.data, w.cs, j0, j1, &mut out),
                    }
                }
                return out;
            }
            if rows_contiguous {
                dot_block_mv(x, m, k, w.data, w.rs, j0, j1, &mut out);
            } else {
                axpy_block_mv(x, m, k, w.data, w.cs, j0, j1, &mut out);
            }
            out
        })
        .collect();
    for (b, out) in blocks.iter().enumerate() {
        let (j0, bw) = (b * block, out.len() / m.max(1));
        for i in 0..m {
            y[i * n + j0..i * n + j0 + bw].copy_from_slice(&out[i * bw..(i + 1) * bw]);
        }
    }
}

/// The register tiles [`skinny`] runs on this CPU: AVX-512 (dot and axpy tiles), AVX2 + FMA
/// (axpy tiles), or none (the plain loops). Tests force a copy with `simd::force`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tiles {
    Avx512,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
}

impl Tiles {
    fn selected() -> Option<Tiles> {
        #[cfg(target_arch = "x86_64")]
        {
            use super::simd::{forced, Level};
            use std::arch::is_x86_feature_detected as has;
            match forced() {
                None | Some(Level::Avx512) if has!("avx512f") => Some(Tiles::Avx512),
                None | Some(Level::Avx2) if has!("avx2") && has!("fma") => Some(Tiles::Avx2),
                _ => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// Rows j0..j1 of W (row stride `ld`) dotted with each of the m rows of x; out [m, j1 − j0].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dot_block(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ld: usize,
    j0: usize,
    j1: usize,
    out: &mut [f32],
) {
    // Two vectors of partial sums; chunks_exact lets the compiler drop the bounds checks and
    // vectorise the lane loop.
    const L: usize = 32;
    let bw = j1 - j0;
    let full = k / L * L;
    for j in j0..j1 {
        let wr = &w[j * ld..j * ld + k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; L];
            for (xc, wc) in xr[..full].chunks_exact(L).zip(wr[..full].chunks_exact(L)) {
                for l in 0..L {
                    acc[l] = xc[l].mul_add(wc[l], acc[l]);
                }
            }
            let mut s = acc.iter().sum::<f32>();
            for l in full..k {
                s = xr[l].mul_add(wr[l], s);
            }
            out[i * bw + (j - j0)] = s;
        }
    }
}

/// Columns j0..j1 of y = x·W for W stored [k, n] (row stride `ld`): rows of W streamed and
/// added, x[i, l]·W[l, j0..j1], into the m output rows; out [m, j1 − j0].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn axpy_block(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ld: usize,
    j0: usize,
    j1: usize,
    out: &mut [f32],
) {
    let bw = j1 - j0;
    for l in 0..k {
        let wr = &w[l * ld + j0..l * ld + j1];
        for i in 0..m {
            let a = x[i * k + l];
            let o = &mut out[i * bw..(i + 1) * bw];
            for j in 0..bw {
                o[j] = a.mul_add(wr[j], o[j]);
            }
        }
    }
}

super::simd::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn dot_block_mv => dot_block(x: &[f32], m: usize, k: usize, w: &[f32], ld: usize, j0: usize, j1: usize, out: &mut [f32]) -> ()
}

super::simd::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn axpy_block_mv => axpy_block(x: &[f32], m: usize, k: usize, w: &[f32], ld: usize, j0: usize, j1: usize, out: &mut [f32]) -> ()
}

/// Rows of W per panel of the axpy tiles (which prefetch the next panel).
#[cfg(target_arch = "x86_64")]
const AXPY_PANEL: usize = 32;

/// Rows of x in the next tile: the largest power of two up to `max` (a compiled tile shape)
/// that the `left` rows fill.
#[cfg(target_arch = "x86_64")]
fn tile_rows(left: usize, max: usize) -> usize {
    1 << left.min(max).ilog2()
}

/// (x at row i, column l0, row stride; W at row l0, column j, row stride; rows of the panel;
/// out at row i, column j, row stride)
#[cfg(target_arch = "x86_64")]
type AxpyArgs = (*const f32, usize, *const f32, usize, usize, *mut f32, usize);

/// [`axpy_block`]'s arguments: (x, m, k, W, ld, j0, j1, out).
#[cfg(target_arch = "x86_64")]
type AxpyBlock<'a> = (
    &'a [f32],
    usize,
    usize,
    &'a [f32],
    usize,
    usize,
    usize,
    &'a mut [f32],
);

/// The walk of the axpy register tiles over one column block (both instruction sets): W in
/// panels of AXPY_PANEL rows × the block's columns (read from memory in long runs, then from
/// cache by every tile), each panel by tiles of up to 8 rows of x × `nv` vectors of `lanes`
/// columns, with `budget` accumulators (few rows get wide tiles, so that enough independent
/// FMA chains hide the latency) and at least `min_nv` vectors; `tile(ti, nv, args)` runs one
/// (it keeps its sums in `out` between panels: exact). The last columns that fill no tile go
/// in [`axpy_block`]'s order, so every output is the same FMA chain as there.
///
/// # Safety
/// x holds m·k, out m·(j1 − j0), w rows 0..k with columns j0..j1 at stride ld; `tile` is safe
/// to call with such arguments.
#[cfg(target_arch = "x86_64")]
unsafe fn axpy_tiles(
    (x, m, k, w, ld, j0, j1, out): AxpyBlock,
    lanes: usize,
    budget: usize,
    min_nv: usize,
    tile: impl Fn(usize, usize, AxpyArgs),
) {
    debug_assert!(x.len() >= m * k && out.len() >= m * (j1 - j0));
    debug_assert!(k == 0 || j1 == j0 || (k - 1) * ld + j1 <= w.len());
    let bw = j1 - j0;
    let (xp, wp, o) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let mut j = j0;
    for l0 in (0..k).step_by(AXPY_PANEL) {
        let rows = AXPY_PANEL.min(k - l0);
        let mut i = 0;
        while i < m {
            let ti = tile_rows(m - i, 8);
            j = j0;
            while j + min_nv * lanes <= j1 {
                let nv = 1 << (budget / ti).min((j1 - j) / lanes).ilog2();
                // SAFETY: rows i..i + ti ≤ m, columns j..j + nv·lanes ≤ j1 and W rows
                // l0..l0 + rows ≤ k are in bounds (caller).
                let t = unsafe {
                    let wj = wp.add(l0 * ld + j);
                    let (xi, oij) = (xp.add(i * k + l0), o.add(i * bw + j - j0));
                    (xi, k, wj, ld, rows, oij, bw)
                };
                tile(ti, nv, t);
                j += lanes * nv;
            }
            i += ti;
        }
    }
    if j < j1 {
        // The last columns in [`axpy_block`]'s order.
        for l in 0..k {
            let wr = &w[l * ld + j..l * ld + j1];
            for i in 0..m {
                let a = x[i * k + l];
                let row = &mut out[i * bw + j - j0..(i + 1) * bw];
                for (r, w) in row.iter_mut().zip(wr) {
                    *r = a.mul_add(*w, *r);
                }
            }
        }
    }
}

/// AVX2 + FMA register tiles for [`skinny`]'s Conv1D layout (the lm head keeps the plain
/// loops on these CPUs): [`tiles512`]'s axpy tiles in vectors of 8 columns with 8
/// accumulators, so that they, W's vectors and the broadcast x fit in 16 ymm registers. Each
/// output is summed exactly as [`axpy_block`] sums it (tested).
#[cfg(target_arch = "x86_64")]
mod tiles256 {
    use super::{AxpyArgs, AXPY_PANEL as PANEL};
    use std::arch::x86_64::*;

    /// [`super::axpy_block`] in tiles of up to 8 rows of x × 1-8 vectors of 8 columns; the last
    /// n mod 8 columns untiled.
    ///
    /// # Safety
    /// AVX2 + FMA; x holds m·k, out m·(j1 − j0), w rows 0..k with columns j0..j1 at stride ld.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn axpy_block(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        ld: usize,
        j0: usize,
        j1: usize,
        out: &mut [f32],
    ) {
        // SAFETY: AVX2 + FMA (caller) for every tile; the walk's bounds (caller).
        let tile = |ti, nv, t| unsafe {
            match (ti, nv) {
                (8, _) => axpy_tile::<8, 1>(t),
                (4, 2) => axpy_tile::<4, 2>(t),
                (4, _) => axpy_tile::<4, 1>(t),
                (2, 4) => axpy_tile::<2, 4>(t),
                (2, 2) => axpy_tile::<2, 2>(t),
                (2, _) => axpy_tile::<2, 1>(t),
                (_, 8) => axpy_tile::<1, 8>(t),
                (_, 4) => axpy_tile::<1, 4>(t),
                (_, 2) => axpy_tile::<1, 2>(t),
                _ => axpy_tile::<1, 1>(t),
            }
        };
        // SAFETY: forwarded (caller).
        unsafe { super::axpy_tiles((x, m, k, w, ld, j0, j1, out), 8, 8, 1, tile) }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn axpy_tile<const TI: usize, const NV: usize>((x, k, w, ld, rows, out, bw): AxpyArgs) {
        let mut acc: [[__m256; NV]; TI] = std::array::from_fn(|b| {
            std::array::from_fn(|v| _mm256_loadu_ps(out.add(b * bw + 8 * v)))
        });
        for l in 0..rows {
            let p = w.add(l * ld);
            // One prefetch per 64-byte line of the next panel's row.
            for v in (0..NV).step_by(2) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PANEL * ld + 8 * v) as *const i8);
            }
            let wv: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(p.add(8 * v)));
            for (b, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_set1_ps(*x.add(b * k + l));
                for v in 0..NV {
                    acc[v] = _mm256_fmadd_ps(a, wv[v], acc[v]);
                }
            }
        }
        for (b, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(b * bw + 8 * v), *acc);
            }
        }
    }
}

/// AVX-512 register tiles for [`skinny`] (auto-vectorised tiles kept their accumulators on the
/// stack and ran slower than the untiled loops). Each output is summed exactly as
/// [`dot_block`] / [`axpy_block`] sum it, so the two paths agree bit for bit (tested).
#[cfg(target_arch = "x86_64")]
mod tiles512 {
    use std::arch::x86_64::*;

    use super::{tile_rows, AxpyArgs, AXPY_PANEL as PANEL};

    /// How far ahead (in elements of W) the dot tiles prefetch.
    const PREFETCH: usize = 1024;

    /// [`super::dot_block`] in tiles of one row of W × up to 4 rows of x: each W chunk loaded
    /// serves 4 rows of x. (Tiles of 2 rows of W measured up to 2x slower on Zen 4.) The
    /// lane sums stay sequential, as in [`super::dot_block`]: at d = 512 they cost about as
    /// much as the products, the price of bit-identical decoding.
    ///
    /// # Safety
    /// AVX-512F; x holds m·k, out m·(j1 − j0), w rows j0..j1 of k elements at stride ld.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dot_block(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        ld: usize,
        j0: usize,
        j1: usize,
        out: &mut [f32],
    ) {
        debug_assert!(x.len() >= m * k && out.len() >= m * (j1 - j0));
        debug_assert!(j1 == j0 || (j1 - 1) * ld + k <= w.len());
        let (bw, x, w, o) = (j1 - j0, x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        for j in j0..j1 {
            let mut i = 0;
            while i < m {
                let ti = tile_rows(m - i, 4);
                let (wj, xi, oij) = (w.add(j * ld), x.add(i * k), o.add(i * bw + j - j0));
                match ti {
                    4 => dot_tile::<4>(xi, k, wj, oij, bw),
                    2 => dot_tile::<2>(xi, k, wj, oij, bw),
                    _ => dot_tile::<1>(xi, k, wj, oij, bw),
                }
                i += ti;
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot_tile<const TI: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        out: *mut f32,
        bw: usize,
    ) {
        let full = k / 32 * 32;
        let mut acc = [[_mm512_setzero_ps(); 2]; TI];
        let mut c = 0;
        while c < full {
            // W streams from memory: ask for it ahead (a prefetch never faults; wrapping_add,
            // since the address may lie past W).
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c + PREFETCH + 16) as *const i8);
            let (w0, w1) = (_mm512_loadu_ps(w.add(c)), _mm512_loadu_ps(w.add(c + 16)));
            for (b, acc) in acc.iter_mut().enumerate() {
                let p = x.add(b * k + c);
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(p), w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(16)), w1, acc[1]);
            }
            c += 32;
        }
        for (b, acc) in acc.iter().enumerate() {
            let mut lanes = [0f32; 32];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16), acc[1]);
            let mut s = lanes.iter().sum::<f32>();
            for l in full..k {
                s = (*x.add(b * k + l)).mul_add(*w.add(l), s);
            }
            *out.add(b * bw) = s;
        }
    }

    /// [`super::axpy_block`] in tiles of up to 8 rows of x × 2-16 vectors of 16 columns (16
    /// accumulators), walked by [`super::axpy_tiles`]; the last n mod 32 columns untiled.
    ///
    /// # Safety
    /// AVX-512F; x holds m·k, out m·(j1 − j0), w rows 0..k with columns j0..j1 at stride ld.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn axpy_block(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        ld: usize,
        j0: usize,
        j1: usize,
        out: &mut [f32],
    ) {
        // SAFETY: AVX-512F (caller) for every tile; the walk's bounds (caller).
        let tile = |ti, nv, t| unsafe {
            match (ti, nv) {
                (8, _) => axpy_tile::<8, 2>(t),
                (4, 4) => axpy_tile::<4, 4>(t),
                (4, _) => axpy_tile::<4, 2>(t),
                (2, 8) => axpy_tile::<2, 8>(t),
                (2, 4) => axpy_tile::<2, 4>(t),
                (2, _) => axpy_tile::<2, 2>(t),
                (_, 16) => axpy_tile::<1, 16>(t),
                (_, 8) => axpy_tile::<1, 8>(t),
                (_, 4) => axpy_tile::<1, 4>(t),
                _ => axpy_tile::<1, 2>(t),
            }
        };
        // SAFETY: forwarded (caller).
        unsafe { super::axpy_tiles((x, m, k, w, ld, j0, j1, out), 16, 16, 2, tile) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn axpy_tile<const TI: usize, const NV: usize>((x, k, w, ld, rows, out, bw): AxpyArgs) {
        let mut acc: [[__m512; NV]; TI] = std::array::from_fn(|b| {
            std::array::from_fn(|v| _mm512_loadu_ps(out.add(b * bw + 16 * v)))
        });
        for l in 0..rows {
            let p = w.add(l * ld);
            for v in 0..NV {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PANEL * ld + 16 * v) as *const i8);
            }
            let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(p.add(16 * v)));
            for (b, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*x.add(b * k + l));
                for v in 0..NV {
                    acc[v] = _mm512_fmadd_ps(a, wv[v], acc[v]);
                }
            }
        }
        for (b, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(b * bw + 16 * v), *acc);
            }
        }
    }
}

/// candle op for [`skinny`]: (x [m, k], W) → [m, n], no backward (used only where nothing is
/// tracked, i.e. frozen models and generation). `out_in`: W is [n, k]; else [k, n].
pub(crate) struct Skinny {
    pub out_in: bool,
}

impl candle_core::CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "pocl-skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage::F32;
        let (F32(x), F32(w)) = (s1, s2) else {
            candle_core::bail!("skinny matmul: f32 only")
        };
        let (Some((xa, xb)), Some((wa, wb))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("skinny matmul: contiguous inputs only")
        };
        let (m, k) = l1.shape().dims2()?;
        let (r, c) = l2.shape().dims2()?;
        let (n, wk) = if self.out_in { (r, c) } else { (c, r) };
        if wk != k {
            candle_core::bail!("skinny matmul: x [{m}, {k}] vs W {:?}", l2.dims());
        }
        let view = if self.out_in {
            View::rows(&w[wa..wb], n, k, k)
        } else {
            View::rows(&w[wa..wb], k, n, n).t()
        };
        let mut y = vec![0f32; m * n];
        skinny(&x[xa..xb], m, view, &mut y);
        Ok((F32(y), candle_core::Shape::from((m, n))))
    }
}

#[cfg(test)]
mod skinny_tests {
    use super::*;

    #[test]
    fn skinny_matches_gemm_in_both_layouts() {
        let (m, k, n) = (3, 37, 600);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let mut want = vec![0f32; m * n];
        matmul(
            View::rows(&x, m, k, k),
            View::rows(&w, n, k, k).t(),
            &mut want,
            n,
            false,
        );
        let mut got = vec![0f32; m * n];
        skinny(&x, m, View::rows(&w, n, k, k), &mut got);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()))
        };
        assert!(close(&got, &want), "rows-contiguous layout");
        // The same W stored transposed, [k, n].
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut got = vec![0f32; m * n];
        skinny(&x, m, View::rows(&wt, k, n, n).t(), &mut got);
        assert!(close(&got, &want), "columns-contiguous layout");
    }

    /// Each compiled copy of the streamed matmul this CPU runs (AVX-512, AVX2 + FMA, baseline),
    /// forced in turn, against an f64 reference in both W layouts; the output names the copies
    /// that ran and those the CPU cannot run.
    #[test]
    fn every_skinny_variant_matches_an_f64_reference() {
        use super::super::simd::{force, Level};
        let (k, n) = (77, 530); // k past a 32-lane chunk, n over several column blocks
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut ran = vec![];
        for level in Level::ALL {
            if !level.is_supported() {
                say(&format!(
                    "skinny variant {level:?}: NOT RUN, this CPU cannot run it"
                ));
                continue;
            }
            for m in [1, 3, 16] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                    .collect();
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0)
                    .collect();
                let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                for (layout, view) in [
                    ("out_in", View::rows(&w, n, k, k)),
                    ("in_out", View::rows(&wt, k, n, n).t()),
                ] {
                    let mut y = vec![0f32; m * n];
                    pool.install(|| force(level, || skinny(&x, m, view, &mut y)));
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut scale) = (0f64, 0f64);
                            for l in 0..k {
                                let p = x[i * k + l] as f64 * w[j * k + l] as f64;
                                want += p;
                                scale += p.abs();
                            }
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * scale,
                                "{level:?} {layout} m={m} [{i}, {j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
            say(&format!(
                "skinny variant {level:?}: ran, matches the f64 reference"
            ));
            ran.push(level);
        }
        assert!(ran.contains(&Level::Baseline));
    }

    /// The register tiles (AVX-512 dot and axpy, AVX2 axpy) give the plain loops' outputs bit
    /// for bit (the decoding results must not depend on the batch size or the CPU's tile path):
    /// every row count up to 17 (all tile shapes and remainders), k with and without a 32-lane
    /// tail, n with and without a column tail and over several column blocks, both W layouts.
    /// The tiles this CPU cannot run are named.
    #[test]
    fn register_tiles_equal_the_plain_loops_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx512 = has!("avx512f");
            let avx2 = has!("avx2") && has!("fma");
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            for (k, n) in [(77, 530), (64, 96), (512, 70), (33, 1), (40, 13)] {
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.3)
                    .collect();
                // The same numbers as W [k, n] (Conv1D): element (l, j) at l·n + j.
                let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                for m in 1..=17 {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.1)
                        .collect();
                    for (j0, j1) in [(0, n), (n / 3, n)] {
                        let len = m * (j1 - j0);
                        let mut want = vec![0f32; len];
                        dot_block_mv(&x, m, k, &w, k, j0, j1, &mut want);
                        if avx512 {
                            let mut got = vec![0f32; len];
                            // SAFETY: AVX-512F checked; W [n, k] rows j0..j1, x [m, k], out sized.
                            unsafe { tiles512::dot_block(&x, m, k, &w, k, j0, j1, &mut got) };
                            assert!(
                                same(&want, &got),
                                "dot k={k} n={n} m={m} columns {j0}..{j1}"
                            );
                        }
                        let mut want = vec![0f32; len];
                        axpy_block_mv(&x, m, k, &wt, n, j0, j1, &mut want);
                        if avx512 {
                            let mut got = vec![0f32; len];
                            // SAFETY: as above, W [k, n] columns j0..j1.
                            unsafe { tiles512::axpy_block(&x, m, k, &wt, n, j0, j1, &mut got) };
                            assert!(same(&want, &got), "axpy512 k={k} n={n} m={m} {j0}..{j1}");
                        }
                        if avx2 {
                            let mut got = vec![0f32; len];
                            // SAFETY: AVX2 + FMA checked; as above.
                            unsafe { tiles256::axpy_block(&x, m, k, &wt, n, j0, j1, &mut got) };
                            assert!(same(&want, &got), "axpy256 k={k} n={n} m={m} {j0}..{j1}");
                        }
                    }
                }
            }
            for (name, ran) in [("AVX-512", avx512), ("AVX2", avx2)] {
                say(&if ran {
                    format!("skinny {name} tiles: ran, equal to the plain loops bit for bit")
                } else {
                    format!("skinny {name} tiles: NOT RUN, this CPU cannot run them")
                });
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        say("skinny register tiles: NOT RUN, not an x86-64 CPU");
    }

    /// A line on stderr that the test harness does not capture (it captures `eprint!` only).
    fn say(line: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    const W: [f32; 6] = [1., 2., 3., 4., 5., 6.];

    #[test]
    #[should_panic(expected = "skinny: x [2, 3] needs m·k elements, has 5")]
    fn skinny_refuses_a_short_x() {
        skinny(&[0.; 5], 2, View::rows(&W, 2, 3, 3), &mut [0.; 4]);
    }

    #[test]
    #[should_panic(expected = "skinny: destination [2, 2] with row stride 2 needs Some(4)")]
    fn skinny_refuses_a_short_y() {
        skinny(&[0.; 6], 2, View::rows(&W, 2, 3, 3), &mut [0.; 3]);
    }

    #[test]
    #[should_panic(expected = "skinny: W [2, 2] with strides (2, 2) needs one unit stride")]
    fn skinny_refuses_w_without_a_unit_stride() {
        let w = raw_view(&W, 2, 2, 2, 2);
        skinny(&[0.; 4], 2, w, &mut [0.; 4]);
    }

    #[test]
    #[should_panic(expected = "skinny: W: view [2, 3]")]
    fn skinny_refuses_w_past_its_data() {
        let w = raw_view(&W[..5], 2, 3, 3, 1);
        skinny(&[0.; 6], 2, w, &mut [0.; 4]);
    }
}
