//! The KD loss's row op on materialised logits ([`KdRows`]): the per-row CE and divergence with
//! dL/dlogits written in place, by [`super::kernel::loss_rows_in_place`] on the CPU and by
//! pocl's CUDA kernel `pocl_kd_rows` (`src/ops/cuda/kd_rows.cu`, feature `cuda`) on a GPU. The
//! chunked lm head + loss of [`super::chunked`] applies it chunk by chunk.

use super::kernel::{loss_rows, loss_rows_in_place, LossSpec, RowLoss, Rows};
#[cfg(feature = "cuda")]
use candle_core::bail;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use std::sync::Mutex;

/// The KD loss of rows of logits with its gradient written over the student's logits: the
/// per-row CE and divergence of [`crate::kd::kernel::loss_rows_in_place`], computed on the CPU
/// by that function and on CUDA by `pocl_kd_rows` (kd_rows.cu). Applied in place to the student
/// logits [rows, vocab] (contiguous f32, a buffer the caller owns: it holds dL/dlogits after, or
/// is left as it was when `want_grad` is false), with the teacher's logits [rows, vocab] as the
/// second operand (none for CE alone). The per-row (CE, D) are left in `out`.
pub struct KdRows {
    pub spec: LossSpec,
    pub weights: Vec<f32>,
    pub labels: Option<Vec<u32>>,
    pub want_grad: bool,
    pub out: Mutex<Vec<RowLoss>>,
}

impl KdRows {
    pub fn new(
        spec: LossSpec,
        weights: Vec<f32>,
        labels: Option<Vec<u32>>,
        want_grad: bool,
    ) -> Self {
        KdRows {
            spec,
            weights,
            labels,
            want_grad,
            out: Mutex::new(Vec::new()),
        }
    }

    fn cpu(
        &self,
        s: &mut CpuStorage,
        ls: &Layout,
        t: Option<(&CpuStorage, &Layout)>,
    ) -> Result<()> {
        let (n, v) = ls.shape().dims2()?;
        let logits = crate::ops::cuda::f32_mut(s, ls, "kd rows: student logits")?;
        let teacher = match t {
            Some((t, lt)) => {
                let data = crate::ops::contiguous_f32(t, lt, "kd rows: teacher logits")?;
                Some(Rows::contiguous(data, v))
            }
            None => None,
        };
        let mut out = vec![RowLoss::default(); n];
        let labels = self.labels.as_deref();
        if self.want_grad {
            loss_rows_in_place(
                &self.spec,
                teacher,
                logits,
                v,
                labels,
                &self.weights,
                &mut out,
            )
        } else {
            let s = Rows::contiguous(logits, v);
            loss_rows(
                &self.spec,
                teacher,
                s,
                labels,
                &self.weights,
                None,
                &mut out,
            )
        }
        .map_err(candle_core::Error::wrap)?;
        *self.out.lock().unwrap() = out;
        Ok(())
    }

    /// Checks what the kernel cannot report itself (the CPU function checks the same).
    #[cfg(feature = "cuda")]
    fn check_with(&self, n: usize, v: usize, has_teacher: bool) -> Result<()> {
        if self.weights.len() != n {
            bail!("kd rows: {} weights for {n} rows", self.weights.len());
        }
        if self.spec.divergence.is_some() && !has_teacher {
            bail!("kd rows: a divergence needs teacher logits");
        }
        match &self.labels {
            Some(l) if l.len() != n => bail!("kd rows: {} labels for {n} rows", l.len()),
            Some(l) => {
                for (i, (&label, &w)) in l.iter().zip(&self.weights).enumerate() {
                    if w != 0.0 && label as usize >= v {
                        bail!("row {i}: label {label} is outside the vocabulary (size {v})");
                    }
                }
            }
            None if self.spec.ce_coef != 0.0 => bail!("kd rows: the CE term needs labels"),
            None => {}
        }
        Ok(())
    }
}

impl InplaceOp1 for KdRows {
    fn name(&self) -> &'static str {
        "pocl-kd-rows"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        self.cpu(s, l, None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        self.cuda(s, l, None)
    }
}

impl InplaceOp2 for KdRows {
    fn name(&self) -> &'static str {
        "pocl-kd-rows"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, ls: &Layout, t: &CpuStorage, lt: &Layout) -> Result<()> {
        self.cpu(s, ls, Some((t, lt)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        ls: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<()> {
        self.cuda(s, ls, Some((t, lt)))
    }
}

/// Threads per block of the row kernel (a multiple of 32; 84 registers a thread on sm_90a).
#[cfg(feature = "cuda")]
const ROW_THREADS: u32 = 256;

#[cfg(feature = "cuda")]
impl KdRows {
    fn cuda(
        &self,
        s: &mut candle_core::CudaStorage,
        ls: &Layout,
        t: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<()> {
        use crate::kd::Divergence;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let (n, v) = ls.shape().dims2()?;
        self.check_with(n, v, t.is_some())?;
        if n == 0 {
            *self.out.lock().unwrap() = Vec::new();
            return Ok(());
        }
        let dev = s.device().clone();
        let func = dev.get_or_load_custom_func(
            "pocl_kd_rows",
            "pocl_kd_rows",
            crate::ops::cuda::ptx::KD_ROWS,
        )?;
        let (a, b) = ls.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("kd rows: student logits must be contiguous".into())
        })?;
        let weights = dev.clone_htod(&self.weights)?;
        let labels = match &self.labels {
            Some(l) => dev.clone_htod(l)?,
            None => dev.alloc_zeros::<u32>(n)?,
        };
        let out = dev.alloc_zeros::<f64>(3 * n)?;
        let (div, param) = match self.spec.divergence {
            None | Some(Divergence::Fkl) => (0i32, 0f64),
            Some(Divergence::Rkl) => (1, 0.0),
            Some(Divergence::Jsd { beta }) => (2, beta),
            Some(Divergence::Tvd) => (3, 0.0),
            Some(Divergence::Skl { alpha }) => (4, alpha),
            Some(Divergence::Srkl { alpha }) => (5, alpha),
        };
        let (v_i, s_stride) = (v as i32, v as i64);
        let has_teacher = i32::from(t.is_some() && self.spec.divergence.is_some());
        let has_labels = i32::from(self.labels.is_some());
        let want_grad = i32::from(self.want_grad);
        let (inv_t, ce_coef, kd_coef) = (
            self.spec.inv_temperature,
            self.spec.ce_coef,
            self.spec.kd_coef,
        );
        let t_view = match t {
            Some((t, lt)) => {
                let (ta, tb) = lt.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("kd rows: teacher logits must be contiguous".into())
                })?;
                if lt.shape().dims2()? != (n, v) {
                    bail!(
                        "kd rows: teacher logits {:?}, student [{n}, {v}]",
                        lt.shape()
                    );
                }
                Some(t.as_cuda_slice::<f32>()?.slice(ta..tb))
            }
            None => None,
        };
        let t_stride = if t_view.is_some() { v as i64 } else { 0i64 };
        let mut s_view = s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let mut builder = func.builder();
        builder.arg(&mut s_view);
        match &t_view {
            Some(tv) => builder.arg(tv),
            // Never read (has_teacher = 0): any device pointer will do.
            None => builder.arg(&weights),
        };
        builder.arg(&weights);
        builder.arg(&labels);
        builder.arg(&out);
        builder.arg(&v_i);
        builder.arg(&s_stride);
        builder.arg(&t_stride);
        builder.arg(&div);
        builder.arg(&param);
        builder.arg(&inv_t);
        builder.arg(&ce_coef);
        builder.arg(&kd_coef);
        builder.arg(&has_teacher);
        builder.arg(&has_labels);
        builder.arg(&want_grad);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match pocl_kd_rows's parameters in order and type; every buffer
        // holds at least the elements the kernel indexes (n rows of v, n weights / labels, 3n out).
        unsafe { builder.launch(cfg) }.w()?;
        let host = dev.clone_dtoh(&out)?;
        let mut rows = Vec::with_capacity(n);
        for (i, r) in host.chunks_exact(3).enumerate() {
            match r[2] as i32 {
                0 => {}
                1 => bail!(
                    "row {i}: teacher row has no finite maximum logit; the softmax is undefined"
                ),
                _ => bail!(
                    "row {i}: student row has no finite maximum logit; the softmax is undefined"
                ),
            }
            rows.push(RowLoss { ce: r[0], kd: r[1] });
        }
        *self.out.lock().unwrap() = rows;
        Ok(())
    }
}

/// The KD loss of materialised logits by the row op: returns dL/dstudent (zeros where nothing
/// is differentiated) and the per-row (CE, D). `student` and `teacher` are [rows, vocab] on one
/// device; neither is modified (the op works on a copy of the student's logits).
pub fn kd_rows(
    spec: &LossSpec,
    teacher: Option<&Tensor>,
    student: &Tensor,
    weights: Vec<f32>,
    labels: Option<Vec<u32>>,
) -> Result<(Tensor, Vec<RowLoss>)> {
    let g = student
        .detach()
        .to_dtype(DType::F32)?
        .contiguous()?
        .copy()?;
    let op = KdRows::new(*spec, weights, labels, true);
    match teacher {
        Some(t) => g.inplace_op2(&t.detach().to_dtype(DType::F32)?.contiguous()?, &op)?,
        None => g.inplace_op1(&op)?,
    }
    let rows = std::mem::take(&mut *op.out.lock().unwrap());
    Ok((g, rows))
}
