//! The fused CPU kernel: loss and analytic gradient w.r.t. the student logits in one pass per row,
//! multi-threaded over rows (rayon), exposed to candle as custom ops with backward.
//!
//! Memory: besides the logits and the gradient it returns, the kernel holds four f64 vocab rows
//! of scratch per worker thread ([`RowScratch`]); no [tokens, vocab] temporary exists. The
//! gradient is computed during the forward pass (that is the fusion) and handed to candle's
//! backward pass from the op, so backward costs nothing but the (skipped when 1) scaling.
//!
//! [`loss_rows`] works on any slice of rows, so a later fused lm-head can call it chunk by chunk.

use super::divergence::{cross_entropy_row, divergence_row, Divergence, RowScratch};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Rows per rayon task: large enough to amortise scheduling, small enough to balance 2–64 cores.
const ROWS_PER_TASK: usize = 4;

/// A read-only [rows, width] f32 matrix whose rows start `stride` elements apart (stride > width
/// when the vocabulary has been narrowed to a common prefix without copying).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub width: usize,
    pub stride: usize,
}

impl<'a> Rows<'a> {
    pub fn contiguous(data: &'a [f32], width: usize) -> Self {
        Rows {
            data,
            rows: data.len() / width.max(1),
            width,
            stride: width,
        }
    }
    #[inline]
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..i * self.stride + self.width]
    }
}

/// What to compute per row: Σ_r w_r (ce_coef·CE_r + kd_coef·D_T,r).
#[derive(Debug, Clone, Copy)]
pub struct LossSpec {
    /// The KD divergence; None = no KD term (pure SFT / CE only).
    pub divergence: Option<Divergence>,
    /// 1/T of the divergence (CE is always at T = 1).
    pub inv_temperature: f64,
    /// Weight of the CE term.
    pub ce_coef: f64,
    /// Weight of the divergence term (the T² scale, the KD weight and the denominator folded in).
    pub kd_coef: f64,
}

/// Per-row unweighted values: CE and D_T (0 where not computed or masked out).
#[derive(Debug, Clone, Copy, Default)]
pub struct RowLoss {
    pub ce: f64,
    pub kd: f64,
}

/// Computes [`RowLoss`] for every row of `student` (and `teacher`), and, when `grad` is given
/// (contiguous [rows, width], zero-initialised by the caller), adds
/// d(Σ_r w_r (ce_coef·CE_r + kd_coef·D_r)) / d student to it. Rows with weight 0 are skipped
/// entirely (their logits may be garbage, e.g. padding). Parallel over rows.
pub fn loss_rows(
    spec: &LossSpec,
    teacher: Option<Rows>,
    student: Rows,
    labels: Option<&[u32]>,
    weights: &[f32],
    grad: Option<&mut [f32]>,
    out: &mut [RowLoss],
) -> Result<()> {
    let (n, w) = (student.rows, student.width);
    if n == 0 {
        return Ok(());
    }
    check(spec, teacher, n, w, labels, weights, out)?;
    let row = |i: usize, sc: &mut RowScratch, g: Option<&mut [f32]>| -> Result<RowLoss> {
        row_loss(spec, teacher, labels, weights, i, student.row(i), sc, g)
    };
    match grad {
        Some(grad) => {
            if grad.len() != n * w {
                bail!(
                    "kd kernel: gradient buffer has {} elements, expected {}",
                    grad.len(),
                    n * w
                );
            }
            grad.par_chunks_mut(ROWS_PER_TASK * w)
                .zip(out.par_chunks_mut(ROWS_PER_TASK))
                .enumerate()
                .try_for_each(|(blk, (g, o))| {
                    with_scratch(w, |sc| {
                        for (k, (gr, or)) in g.chunks_mut(w).zip(o.iter_mut()).enumerate() {
                            *or = row(blk * ROWS_PER_TASK + k, sc, Some(gr))?;
                        }
                        Ok(())
                    })
                })
        }
        None => out
            .par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .try_for_each(|(blk, o)| {
                with_scratch(w, |sc| {
                    for (k, or) in o.iter_mut().enumerate() {
                        *or = row(blk * ROWS_PER_TASK + k, sc, None)?;
                    }
                    Ok(())
                })
            }),
    }
}

/// [`loss_rows`] with the gradient written over the student's logits: `logits` [n, width] holds
/// them on entry and dL/dlogits on return (each row is copied to a per-thread row first). The
/// fused head uses it so that a chunk needs one [rows, vocab] buffer instead of two.
pub fn loss_rows_in_place(
    spec: &LossSpec,
    teacher: Option<Rows>,
    logits: &mut [f32],
    width: usize,
    labels: Option<&[u32]>,
    weights: &[f32],
    out: &mut [RowLoss],
) -> Result<()> {
    let w = width.max(1);
    check(spec, teacher, logits.len() / w, width, labels, weights, out)?;
    logits
        .par_chunks_mut(ROWS_PER_TASK * w)
        .zip(out.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .try_for_each(|(blk, (g, o))| {
            with_scratch(w, |sc| {
                ROW.with(|r| {
                    let mut s = r.borrow_mut();
                    s.resize(w, 0.0);
                    for (k, (gr, or)) in g.chunks_mut(w).zip(o.iter_mut()).enumerate() {
                        s.copy_from_slice(gr);
                        gr.fill(0.0);
                        let i = blk * ROWS_PER_TASK + k;
                        *or = row_loss(spec, teacher, labels, weights, i, &s, sc, Some(gr))?;
                    }
                    Ok(())
                })
            })
        })
}

thread_local! {
    /// The student row [`loss_rows_in_place`] reads while it writes the gradient over it.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Shapes and operands of a loss over `n` rows of `w` logits, checked.
fn check(
    spec: &LossSpec,
    teacher: Option<Rows>,
    n: usize,
    w: usize,
    labels: Option<&[u32]>,
    weights: &[f32],
    out: &[RowLoss],
) -> Result<()> {
    if weights.len() != n || out.len() != n {
        bail!(
            "kd kernel: {} weights / {} outputs for {n} rows",
            weights.len(),
            out.len()
        );
    }
    if let Some(t) = teacher {
        if t.rows != n || t.width != w {
            bail!(
                "kd kernel: teacher is [{}, {}] but student is [{n}, {w}]",
                t.rows,
                t.width
            );
        }
    }
    if w == 0 {
        bail!("kd kernel: the vocabulary is empty");
    }
    if spec.divergence.is_some() && teacher.is_none() {
        bail!("kd kernel: a divergence needs teacher logits");
    }
    if spec.ce_coef != 0.0 && labels.is_none() {
        bail!("kd kernel: the CE term needs labels");
    }
    if let Some(l) = labels {
        if l.len() != n {
            bail!("kd kernel: {} labels for {n} rows", l.len());
        }
    }
    Ok(())
}

/// One row's loss (and, with `g`, its gradient added into `g`) from student logits `s`.
#[allow(clippy::too_many_arguments)]
fn row_loss(
    spec: &LossSpec,
    teacher: Option<Rows>,
    labels: Option<&[u32]>,
    weights: &[f32],
    i: usize,
    s: &[f32],
    sc: &mut RowScratch,
    mut g: Option<&mut [f32]>,
) -> Result<RowLoss> {
    let wi = weights[i] as f64;
    let mut res = RowLoss::default();
    if wi == 0.0 {
        return Ok(res);
    }
    if let (Some(div), Some(t)) = (spec.divergence, teacher) {
        if spec.kd_coef != 0.0 {
            // d(kd_coef·D(a, b))/ds = kd_coef · (1/T) · dD/db: the chain factor of b = s/T.
            let c = wi * spec.kd_coef * spec.inv_temperature;
            let gk = g.as_deref_mut().map(|g| (g, c));
            res.kd = divergence_row(div, t.row(i), s, spec.inv_temperature, sc, gk)
                .map_err(|e| anyhow::anyhow!("row {i}: {e}"))?;
        }
    }
    // CE is evaluated whenever labels are given (for logging even at weight 0, e.g. a = 1);
    // its gradient only when it is weighted.
    if let Some(l) = labels {
        let gc = g
            .filter(|_| spec.ce_coef != 0.0)
            .map(|g| (g, wi * spec.ce_coef));
        res.ce = cross_entropy_row(s, l[i] as usize, sc, gc)
            .map_err(|e| anyhow::anyhow!("row {i}: {e}"))?;
    }
    Ok(res)
}

thread_local! {
    /// Per-thread row scratch, kept for the thread's lifetime: allocating it per call (or per
    /// rayon split) costs page faults and, on free, TLB shootdowns that made 2 threads slower
    /// than 1 in measurements.
    static SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::new(RowScratch::new(0));
}

pub(crate) fn with_scratch<R>(width: usize, f: impl FnOnce(&mut RowScratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => {
            sc.ensure(width);
            f(&mut sc)
        }
        // Re-entered on this thread (a nested rayon call): use a private buffer.
        Err(_) => f(&mut RowScratch::new(width)),
    })
}

/// A zeroed [tokens, vocab] buffer for the gradient, backed by transparent huge pages where the
/// OS allows it. Why: a fresh 100 MB buffer is 25k 4 KiB page faults on first touch, and faults
/// taken from several threads at once serialise in the kernel; measured here (512 × 50257, 2
/// threads) the kernel took 370 ms with 4 KiB pages against 57 ms on pre-faulted memory, and
/// ~110 ms with huge pages.
pub fn gradient_buffer(len: usize) -> Vec<f32> {
    // alloc_zeroed: large blocks come straight from mmap, untouched, so advice can still apply.
    let mut v = vec![0f32; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 1 << 21;
        let (p, bytes) = (v.as_mut_ptr() as usize, len * std::mem::size_of::<f32>());
        let (start, end) = ((p + HUGE - 1) & !(HUGE - 1), (p + bytes) & !(HUGE - 1));
        if end > start {
            // SAFETY: madvise only advises on [start, end), a page-aligned range inside `v`'s own
            // allocation; it does not change the contents, and failure (e.g. THP disabled) is
            // harmless, so the result is ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// Borrows a 2-D f32 CPU tensor as [`Rows`]; the inner stride must be 1 (callers make other
/// layouts contiguous first).
fn rows_of<'a>(s: &'a CpuStorage, l: &Layout, who: &str) -> candle_core::Result<Rows<'a>> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("kd: {who} logits must be f32"),
    };
    let dims = l.dims();
    if dims.len() != 2 {
        candle_core::bail!("kd: {who} logits must be [tokens, vocab], got {dims:?}");
    }
    let (n, w) = (dims[0], dims[1]);
    let st = l.stride();
    if w > 1 && st[1] != 1 {
        candle_core::bail!("kd: {who} logits need unit stride along the vocabulary");
    }
    let stride = if n > 1 { st[0] } else { w };
    let off = l.start_offset();
    let end = if n == 0 {
        off
    } else {
        off + (n - 1) * stride + w
    };
    if end > data.len() {
        candle_core::bail!("kd: {who} layout out of bounds");
    }
    Ok(Rows {
        data: &data[off..end],
        rows: n,
        width: w,
        stride,
    })
}

/// The candle op: scalar Σ_r w_r (ce_coef·CE_r + kd_coef·D_r); the gradient is made in the forward
/// pass and kept for `bwd`. Mask weights and labels are small host vectors captured in the op.
pub(crate) struct FusedLossOp {
    pub spec: LossSpec,
    pub weights: Vec<f32>,
    pub labels: Option<Vec<u32>>,
    /// Compute the gradient in the forward pass (false when nothing will backpropagate).
    pub want_grad: bool,
    pub grad: Mutex<Option<Tensor>>,
    /// (Σ w·CE, Σ w·D) for logging; shared so the caller can read it after the op is moved.
    pub parts: Arc<Mutex<(f64, f64)>>,
}

impl FusedLossOp {
    pub fn new(
        spec: LossSpec,
        weights: Vec<f32>,
        labels: Option<Vec<u32>>,
        want_grad: bool,
    ) -> Self {
        FusedLossOp {
            spec,
            weights,
            labels,
            want_grad,
            grad: Mutex::new(None),
            parts: Arc::new(Mutex::new((0.0, 0.0))),
        }
    }

    fn run(
        &self,
        teacher: Option<Rows>,
        student: Rows,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, w) = (student.rows, student.width);
        let mut out = vec![RowLoss::default(); n];
        let mut grad = if self.want_grad {
            Some(gradient_buffer(n * w))
        } else {
            None
        };
        loss_rows(
            &self.spec,
            teacher,
            student,
            self.labels.as_deref(),
            &self.weights,
            grad.as_deref_mut(),
            &mut out,
        )
        .map_err(candle_core::Error::wrap)?;
        // Sequential sum over per-row values: deterministic whatever the thread schedule.
        let (mut ce, mut kd) = (0.0, 0.0);
        for (r, &wi) in out.iter().zip(&self.weights) {
            if wi != 0.0 {
                ce += wi as f64 * r.ce;
                kd += wi as f64 * r.kd;
            }
        }
        let total = self.spec.ce_coef * ce + self.spec.kd_coef * kd;
        *self.parts.lock().unwrap() = (ce, kd);
        if let Some(g) = grad {
            *self.grad.lock().unwrap() =
                Some(Tensor::from_vec(g, (n, w), &candle_core::Device::Cpu)?);
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn student_grad(&self, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.grad.lock().unwrap().clone();
        let Some(g) = g else {
            candle_core::bail!("kd: backward through a loss computed without gradient tracking")
        };
        // The usual upstream gradient of a loss is exactly 1: skip a [tokens, vocab] multiply.
        if grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?
            == 1.0
        {
            Ok(Some(g))
        } else {
            Ok(Some(g.broadcast_mul(
                &grad_res.to_dtype(candle_core::DType::F32)?,
            )?))
        }
    }
}

/// Student only (no teacher): the CE loss.
impl CustomOp1 for FusedLossOp {
    fn name(&self) -> &'static str {
        "pocl-fused-ce"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(None, rows_of(s, l, "student")?)
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.student_grad(grad_res)
    }
}

/// (student, teacher): the teacher receives no gradient.
impl CustomOp2 for FusedLossOp {
    fn name(&self) -> &'static str {
        "pocl-fused-kd"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(Some(rows_of(t, lt, "teacher")?), rows_of(s, ls, "student")?)
    }
    fn bwd(
        &self,
        _s: &Tensor,
        _t: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.student_grad(grad_res)?, None))
    }
}
