//! One product's driver: checks, the per-thread buffer for converted x, groups of x rows, the
//! split of panels over rayon tasks, and the [`Job`] each kernel runs.

use super::cpu::Kernel;
use super::pack::{convert_x, step_lines, Line, PAIR, PANEL, STEP, TK, ZERO_LINE};
#[cfg(target_arch = "x86_64")]
use super::{amx, avx512bf16};
use super::{portable, widen, Element, Packed};
use rayon::prelude::*;
use std::cell::RefCell;

/// Target size of the converted x of one group of rows: it stays in the per-core L2 (2 MiB on
/// Sapphire Rapids) next to a chunk of W while every panel of W passes over it. Larger x is
/// done group by group, so the buffer never grows much beyond this.
const A_BLOCK_BYTES: usize = 1024 << 10;

impl Packed {
    pub(super) fn matmul_impl(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ldo: usize,
        bias: Option<&[f32]>,
    ) {
        // An f32 matrix has one kernel, the f32-widen variants' (`widen`).
        let kernel = match self.element {
            Element::Bf16 => kernel,
            Element::F32 => Kernel::F32Widen,
        };
        assert!(
            kernel.is_supported(),
            "{} kernel {kernel:?} unsupported here",
            if self.element == Element::F32 {
                "f32"
            } else {
                "bf16"
            }
        );
        // Checked products: a wrapped size could pass as in bounds and let the kernels write
        // outside `out` through their raw pointers.
        let k = self.k;
        assert!(
            m.checked_mul(k).is_some_and(|mk| mk <= x.len()),
            "matmul: x shorter than m·k (m = {m}, k = {k}, x has {})",
            x.len()
        );
        assert!(
            ldo >= self.n_out,
            "matmul: ldo < n_out ({ldo} < {})",
            self.n_out
        );
        if m == 0 || self.n_out == 0 {
            return;
        }
        assert!(
            (m - 1)
                .checked_mul(ldo)
                .and_then(|a| a.checked_add(self.n_out))
                .is_some_and(|need| need <= out.len()),
            "matmul: out shorter than (m-1)·ldo + n_out (m = {m}, ldo = {ldo}, n_out = {}, out has {})",
            self.n_out,
            out.len()
        );
        let block_lines = self.steps * STEP; // lines per 32-row x block
        if block_lines == 0 {
            // k == 0: the empty sum.
            for i in 0..m {
                let row = &mut out[i * ldo..i * ldo + self.n_out];
                match bias {
                    Some(b) => row.copy_from_slice(b),
                    None => row.fill(0.0),
                }
            }
            return;
        }
        let out_ptr = OutPtr(out.as_mut_ptr());
        if kernel == Kernel::F32Widen {
            // f32-widen, or an f32 matrix: x stays f32.
            return self.matmul_widen(x, m, out_ptr, ldo, bias);
        }
        // Rows per group: the group's converted x stays under A_BLOCK_BYTES, groups even-sized.
        let blocks = m.div_ceil(PAIR);
        let bytes = blocks * block_lines * 64;
        let groups = bytes.div_ceil(A_BLOCK_BYTES).clamp(1, blocks);
        let group_blocks = blocks.div_ceil(groups);
        let lines = group_blocks * block_lines;

        let run = |a: &mut Vec<Line>| {
            if a.len() < lines {
                a.resize(lines, ZERO_LINE);
            }
            for row0 in (0..m).step_by(group_blocks * PAIR) {
                let rows = (m - row0).min(group_blocks * PAIR);
                let a = &mut a[..rows.div_ceil(PAIR) * block_lines];
                convert_x(
                    &x[row0 * self.k..(row0 + rows) * self.k],
                    self.k,
                    self.steps,
                    a,
                );
                self.compute(kernel, X::Bf16(a), rows, row0, out_ptr, ldo, bias);
            }
        };
        // The converted x lives in a buffer owned by the calling thread and reused across calls;
        // a re-entrant call (this thread running another rayon job while it waits) gets a fresh one.
        A_BUF.with(|buf| match buf.try_borrow_mut() {
            Ok(mut a) => run(&mut a),
            Err(_) => run(&mut Vec::new()),
        });
    }

    /// The f32-widen path: x stays f32, copied group by group into a per-thread buffer whose
    /// rows are zero padded to the packed k (so kernels read whole k steps), then computed
    /// against the bf16 panels.
    fn matmul_widen(&self, x: &[f32], m: usize, out: OutPtr, ldo: usize, bias: Option<&[f32]>) {
        let (k, ld) = (self.k, self.steps * TK);
        let group = (X_F32_BYTES / (ld * 4)).clamp(8, m.next_multiple_of(8)) / 8 * 8;
        let run = |buf: &mut Vec<f32>| {
            if buf.len() < group * ld {
                buf.resize(group * ld, 0.0);
            }
            for row0 in (0..m).step_by(group) {
                let rows = (m - row0).min(group);
                let xs = &mut buf[..rows * ld];
                let copy = |(i, dst): (usize, &mut [f32])| {
                    dst[..k].copy_from_slice(&x[(row0 + i) * k..(row0 + i + 1) * k]);
                    dst[k..].fill(0.0);
                };
                if rows * ld >= 1 << 16 {
                    xs.par_chunks_mut(ld).enumerate().for_each(copy);
                } else {
                    xs.chunks_mut(ld).enumerate().for_each(copy);
                }
                let xs = X::F32 { data: xs, ld };
                self.compute(Kernel::F32Widen, xs, rows, row0, out, ldo, bias);
            }
        };
        X_BUF.with(|buf| match buf.try_borrow_mut() {
            Ok(mut b) => run(&mut b),
            Err(_) => run(&mut Vec::new()),
        });
    }

    /// One group of x rows (`rows` valid rows starting at output row `row0`) against all
    /// panels, split over rayon tasks by panel ranges.
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &self,
        kernel: Kernel,
        a: X,
        rows: usize,
        row0: usize,
        out: OutPtr,
        ldo: usize,
        bias: Option<&[f32]>,
    ) {
        let threads = rayon::current_num_threads().max(1);
        let tasks = self.panels.min(4 * threads).max(1);
        let per = self.panels.div_ceil(tasks);
        let tasks = self.panels.div_ceil(per);
        (0..tasks).into_par_iter().for_each(|t| {
            let panels = t * per..((t + 1) * per).min(self.panels);
            let job = Job {
                w: self,
                a,
                rows,
                row0,
                out,
                ldo,
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `kernel.is_supported()` was asserted (AMX permission granted); the
                // job's pointers are checked in `matmul_with` (see `Job`).
                Kernel::Amx => unsafe { amx::run(&job, panels.clone()) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX512F + AVX512-BF16 were detected (asserted in `matmul_with`).
                Kernel::Avx512Bf16 => unsafe { avx512bf16::run(&job, panels.clone()) },
                // SAFETY: f32-widen is supported (asserted), so its best variant's features
                // are present; the job holds f32 x (`matmul_widen`). Also an f32 matrix's.
                Kernel::F32Widen => unsafe { widen::run(widen_isa(), &job, panels.clone()) },
                _ => portable::run(&job, panels.clone()),
            }
            if let Some(bias) = bias {
                let (j0, j1) = (panels.start * PANEL, (panels.end * PANEL).min(self.n_out));
                for i in 0..rows {
                    // SAFETY: this task alone writes columns j0..j1 of these rows (its panels),
                    // which `matmul_impl` checked lie inside `out`; the kernel above is done
                    // with them.
                    let row = unsafe { std::slice::from_raw_parts_mut(job.out_at(i, j0), j1 - j0) };
                    row.iter_mut().zip(&bias[j0..j1]).for_each(|(o, b)| *o += b);
                }
            }
        });
    }
}

/// Target size of one group of f32 x rows (f32-widen): half of A_BLOCK_BYTES, the same
/// number of rows as a bf16 group.
const X_F32_BYTES: usize = 512 << 10;

thread_local! {
    static A_BUF: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    static X_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The f32-widen variant products use: the best one, unless a test forces another.
fn widen_isa() -> widen::Isa {
    #[cfg(test)]
    if let Some(isa) = FORCED_ISA.with(|f| f.get()) {
        return isa;
    }
    widen::Isa::best()
}

#[cfg(test)]
thread_local! {
    /// Set by tests on the thread that runs a product with a single-thread pool.
    static FORCED_ISA: std::cell::Cell<Option<widen::Isa>> = const { std::cell::Cell::new(None) };
}

/// x as a kernel reads it: converted to bf16 tile blocks, or f32 rows (f32-widen).
#[derive(Clone, Copy)]
pub(super) enum X<'a> {
    Bf16(&'a [Line]),
    F32 { data: &'a [f32], ld: usize },
}

/// Raw output pointer shared by the tasks of one call.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, column) sets of `out` (each owns a range of panels), and
// the `&mut [f32]` it came from outlives the parallel section.
unsafe impl Send for OutPtr {}
// SAFETY: as for Send; the pointer is only read to compute disjoint destinations.
unsafe impl Sync for OutPtr {}

/// What a task needs: W, the converted x group, and where its rows go.
/// Invariants (checked by `matmul_impl`): `a` holds `rows.div_ceil(32)` blocks of
/// `w.steps * STEP` lines; `out` is valid for writes at `(row0 + i) * ldo + j` for i < rows,
/// j < n_out.
pub(super) struct Job<'a> {
    pub(super) w: &'a Packed,
    a: X<'a>,
    pub(super) rows: usize,
    row0: usize,
    out: OutPtr,
    pub(super) ldo: usize,
}

impl Job<'_> {
    pub(super) fn panel(&self, p: usize) -> &[Line] {
        let n = self.w.steps * step_lines(self.w.element);
        &self.w.data[p * n..(p + 1) * n]
    }

    pub(super) fn block(&self, q: usize) -> &[Line] {
        let X::Bf16(a) = self.a else {
            unreachable!("a bf16 kernel was given f32 x")
        };
        let n = self.w.steps * STEP;
        &a[q * n..(q + 1) * n]
    }

    /// The f32 x rows and their stride (`w.steps`·TK, zero padded past k): f32-widen only.
    pub(super) fn x_f32(&self) -> (&[f32], usize) {
        let X::F32 { data, ld } = self.a else {
            unreachable!("the f32-widen kernel was given bf16 x")
        };
        (data, ld)
    }

    /// Valid columns of panel p (1..=32).
    pub(super) fn cols(&self, p: usize) -> usize {
        (self.w.n_out - p * PANEL).min(PANEL)
    }

    /// Valid rows of x block q (1..=32).
    pub(super) fn block_rows(&self, q: usize) -> usize {
        (self.rows - q * PAIR).min(PAIR)
    }

    /// Pointer to out[(row0 + i) * ldo + j].
    pub(super) fn out_at(&self, i: usize, j: usize) -> *mut f32 {
        self.out.0.wrapping_add((self.row0 + i) * self.ldo + j)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        amx_available, bf16_bits_to_f32, f32_to_bf16_bits, Element, Kernel, Packed,
    };

    /// Deterministic values in [-1, 1) (xorshift64*).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let u = (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
                2.0 * u - 1.0
            })
            .collect()
    }

    fn bf(x: f32) -> f64 {
        bf16_bits_to_f32(f32_to_bf16_bits(x)) as f64
    }

    /// Kernels to test here; prints a note for the ones this CPU lacks.
    fn kernels() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| {
                let ok = k.is_supported();
                if !ok {
                    eprintln!("note: {k:?} unsupported on this CPU/OS, not tested");
                }
                ok
            })
            .collect()
    }

    /// Checks every kernel and both constructors against an f64 reference of the bf16-rounded
    /// inputs (x left in f32 for f32-widen, which does not round it), and f32 panels against
    /// the unrounded inputs: error ≤ 1e-5 · Σ_l |x||w| per element (f32 accumulation).
    fn check(m: usize, k: usize, n: usize, ldo: usize) {
        let x = values(m * k, (m * 31 + k * 7 + n) as u64);
        let w = values(n * k, (n * 13 + k) as u64 + 99); // [n, k]
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
        let pack = |element| {
            let p = Packed::out_in(&w, n, k, element);
            let pt = Packed::in_out(&wt, k, n, element);
            assert_eq!((p.n_out(), p.k(), pt.n_out(), pt.k()), (n, k, n, k));
            assert!(
                p.data.iter().zip(&pt.data).all(|(a, b)| a.0 == b.0),
                "{element:?} packings differ"
            );
            (p, pt)
        };
        let reference = |round_x: bool, round_w: bool| {
            let r = |v: f32, round: bool| if round { bf(v) } else { v as f64 };
            let xb: Vec<f64> = x.iter().map(|&v| r(v, round_x)).collect();
            let wb: Vec<f64> = w.iter().map(|&v| r(v, round_w)).collect();
            let mut want = vec![0f64; m * n];
            let mut scale = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    let (xr, wr) = (&xb[i * k..][..k], &wb[j * k..][..k]);
                    want[i * n + j] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    scale[i * n + j] = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                }
            }
            (want, scale)
        };
        let (rounded, widened) = (reference(true, true), reference(false, true));
        let (bf16_p, bf16_pt) = pack(Element::Bf16);
        let mut runs = vec![];
        for kernel in kernels() {
            let want = if kernel == Kernel::F32Widen {
                &widened
            } else {
                &rounded
            };
            runs.push((format!("{kernel:?} out_in"), &bf16_p, kernel, want));
            runs.push((format!("{kernel:?} in_out"), &bf16_pt, kernel, want));
        }
        let exact = reference(false, false);
        let f32_packs = Packed::f32_supported().then(|| pack(Element::F32));
        if let Some((p, pt)) = &f32_packs {
            runs.push(("f32 out_in".into(), p, Kernel::best(), &exact));
            runs.push(("f32 in_out".into(), pt, Kernel::best(), &exact));
        }
        const SENTINEL: f32 = 12345.0;
        for (name, packed, kernel, (want, scale)) in runs {
            let mut out = vec![SENTINEL; m * ldo];
            packed.matmul_with(kernel, &x, m, &mut out, ldo);
            for i in 0..m {
                for j in 0..ldo {
                    let got = out[i * ldo + j];
                    if j >= n {
                        assert_eq!(got, SENTINEL, "{name} wrote past n_out");
                        continue;
                    }
                    let (e, s) = (want[i * n + j], scale[i * n + j]);
                    assert!(
                        (got as f64 - e).abs() <= 1e-5 * s + 1e-30,
                        "{name} m={m} k={k} n={n} [{i},{j}]: {got} vs {e} (scale {s})"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_reference_on_awkward_shapes() {
        for m in [1, 3, 16, 17, 100] {
            for k in [1, 31, 64, 768, 770] {
                for n in [1, 15, 48, 2304] {
                    check(m, k, n, n);
                }
            }
        }
    }

    #[test]
    fn matches_reference_full_size() {
        check(512, 768, 2304, 2304);
        check(512, 770, 48, 48);
        // Several x groups (converted x > A_BLOCK_BYTES).
        check(300, 3072, 48, 48);
    }

    #[test]
    fn matches_reference_vocab() {
        check(1, 64, 50257, 50257);
        check(3, 770, 50257, 50257);
    }

    /// Every kernel gives each row the same bits whether it is computed alone (decoding one
    /// sequence: the kernels' short row blocks) or among others (full blocks).
    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let (m, k, n) = (41, 100, 70);
        let (x, w) = (values(m * k, 8), values(n * k, 9));
        let p = Packed::bf16_out_in(&w, n, k);
        let f32_panels = Packed::f32_supported().then(|| Packed::out_in(&w, n, k, Element::F32));
        let runs = kernels().into_iter().map(|kernel| (kernel, &p));
        for (kernel, p) in runs.chain(f32_panels.iter().map(|p| (Kernel::best(), p))) {
            let mut all = vec![0f32; m * n];
            p.matmul_with(kernel, &x, m, &mut all, n);
            for i in 0..m {
                let mut one = vec![0f32; n];
                p.matmul_with(kernel, &x[i * k..(i + 1) * k], 1, &mut one, n);
                assert!(
                    one.iter()
                        .zip(&all[i * n..(i + 1) * n])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{kernel:?} {:?}: row {i} alone differs",
                    p.element()
                );
            }
        }
    }

    #[test]
    fn leading_dimension_larger_than_n_out() {
        check(17, 31, 15, 20);
        check(100, 770, 48, 53);
    }

    #[test]
    fn empty_inputs() {
        let f32_too = Packed::f32_supported().then_some(Element::F32);
        for element in [Element::Bf16].into_iter().chain(f32_too) {
            let p = Packed::out_in(&[], 4, 0, element);
            for kernel in kernels() {
                let mut out = vec![1.0; 8];
                p.matmul_with(kernel, &[], 2, &mut out, 4);
                assert_eq!(out, vec![0.0; 8]);
                p.matmul_with(kernel, &[], 0, &mut [], 4);
            }
        }
    }

    #[test]
    fn matmul_runs_the_best_kernel() {
        let (m, k, n) = (5, 40, 33);
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let p = Packed::bf16_out_in(&w, n, k);
        let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
        p.matmul(&x, m, &mut a, n);
        p.matmul_with(Kernel::best(), &x, m, &mut b, n);
        assert_eq!(a, b);
        assert_eq!(Kernel::best() == Kernel::Amx, amx_available());
    }

    #[test]
    fn bias_is_added_to_every_row_by_the_tasks() {
        // Several panels and tasks (n = 200 over 32-column panels), a strided output, and the
        // empty-k case that only writes the bias.
        for (m, k, n, ldo) in [(37, 40, 200, 203), (3, 0, 70, 70)] {
            let (x, w, bias) = (values(m * k, 3), values(n * k, 4), values(n, 5));
            let p = Packed::bf16_out_in(&w, n, k);
            let (mut plain, mut biased) = (vec![7.0; m * ldo], vec![7.0; m * ldo]);
            p.matmul(&x, m, &mut plain, ldo);
            p.matmul_bias(&x, m, &mut biased, ldo, &bias);
            for i in 0..m {
                for j in 0..ldo {
                    let want = if j < n {
                        plain[i * ldo + j] + bias[j]
                    } else {
                        7.0
                    };
                    assert_eq!(biased[i * ldo + j], want, "({i}, {j}) of [{m}, {n}]");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "matmul: x shorter than m·k (m = 9223372036854775808, k = 2")]
    fn a_row_count_whose_m_k_wraps_is_refused() {
        // m·k = 2⁶⁴ wraps to 0 in unchecked arithmetic, which an empty x would satisfy.
        let p = Packed::bf16_out_in(&[1.0; 4], 2, 2);
        p.matmul(&[], usize::MAX / 2 + 1, &mut [0.0; 2], 2);
    }

    #[test]
    #[should_panic(expected = "matmul: out shorter than (m-1)·ldo + n_out")]
    fn an_output_size_that_wraps_is_refused() {
        let p = Packed::bf16_out_in(&[], 2, 0);
        p.matmul(&[], usize::MAX / 2 + 1, &mut [0.0; 2], 2);
    }
}

#[cfg(test)]
mod widen_tests {
    use super::super::{widen::Isa, Kernel, Packed};
    use super::FORCED_ISA;

    /// Every f32-widen variant this CPU runs gives the same bits as the best one (same FMA
    /// chain), on shapes with partial panels, partial row blocks (and the AVX2 variant's
    /// whole-panel last 1-2 rows) and padded k; the ones the CPU cannot run are named.
    #[test]
    fn widen_variants_agree_to_the_bit() {
        if !Kernel::F32Widen.is_supported() {
            say("f32-widen: NOT RUN, this CPU cannot run it");
            return;
        }
        let (isas, pool) = variants();
        for (m, k, n) in SHAPES {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 11.0)
                .collect();
            let p = Packed::bf16_out_in(&w, n, k);
            let mut results = vec![];
            for &isa in &isas {
                if !isa.is_supported() {
                    continue;
                }
                let mut out = vec![0f32; m * n];
                pool.install(|| {
                    FORCED_ISA.with(|f| f.set(Some(isa)));
                    p.matmul_with(Kernel::F32Widen, &x, m, &mut out, n);
                    FORCED_ISA.with(|f| f.set(None));
                });
                results.push((isa, out));
            }
            let mut best = vec![0f32; m * n];
            pool.install(|| p.matmul_with(Kernel::F32Widen, &x, m, &mut best, n));
            for (isa, out) in &results {
                assert!(
                    out.iter()
                        .zip(&best)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} differs from {:?} on [{m}, {k}, {n}]",
                    Isa::best()
                );
            }
        }
        for &isa in &isas {
            say(&if isa.is_supported() {
                format!(
                    "f32-widen variant {isa:?}: ran, equal to the bit to {:?}",
                    Isa::best()
                )
            } else {
                format!("f32-widen variant {isa:?}: NOT RUN, this CPU cannot run it")
            });
        }
    }

    /// The f32 kernel is f32-widen on f32 panels: for a W whose values are bf16-exact, f32 and
    /// bf16 panels give the same bits, in every variant this CPU runs (and the f32 kernel's
    /// variants agree with each other).
    #[test]
    fn f32_panels_sum_as_f32_widen() {
        use super::super::Element;
        if !Packed::f32_supported() {
            say("f32 panels: NOT RUN, this CPU cannot run the f32 kernel");
            return;
        }
        let (isas, pool) = variants();
        for (m, k, n) in SHAPES {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            // Multiples of 1/8 below 64: exact in bf16.
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 8.0)
                .collect();
            let bf16 = Packed::bf16_out_in(&w, n, k);
            let f32 = Packed::out_in(&w, n, k, Element::F32);
            for isa in isas.iter().copied().filter(|i| i.is_supported()) {
                let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
                pool.install(|| {
                    FORCED_ISA.with(|f| f.set(Some(isa)));
                    bf16.matmul_with(Kernel::F32Widen, &x, m, &mut a, n);
                    f32.matmul(&x, m, &mut b, n);
                    FORCED_ISA.with(|f| f.set(None));
                });
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{isa:?}: f32 panels differ from f32-widen on [{m}, {k}, {n}]"
                );
            }
        }
        for &isa in &isas {
            say(&if isa.is_supported() {
                format!("f32 kernel variant {isa:?}: ran, equal to the bit to f32-widen's")
            } else {
                format!("f32 kernel variant {isa:?}: NOT RUN, this CPU cannot run it")
            });
        }
    }

    /// [m, k, n] of the variant tests: partial panels (n = 15, 33, 40, 47, 63, 100), every
    /// AVX2 row tail (1-2 rows alone or after blocks of 6) and block size, padded k.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (1, 70, 47),
        (2, 70, 47),
        (3, 31, 15),
        (8, 100, 63),
        (9, 70, 47),
        (13, 33, 40),
        (17, 770, 100),
        (40, 64, 33),
    ];

    /// Every f32-widen variant compiled for this architecture (the CPU may lack some), and a
    /// one-thread pool: on it the variant forced on the calling thread (a thread-local) is the
    /// one that runs.
    fn variants() -> (Vec<Isa>, rayon::ThreadPool) {
        #[cfg(target_arch = "x86_64")]
        let isas = vec![Isa::Avx512, Isa::Avx2, Isa::Portable];
        #[cfg(not(target_arch = "x86_64"))]
        let isas = vec![Isa::Portable];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        (isas, pool)
    }

    /// A line on stderr that the test harness does not capture (it captures `eprint!` only).
    fn say(line: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}
