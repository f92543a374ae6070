//! The same objective as a composition of differentiable candle ops (log_softmax, exp, sums).
//!
//! It is what the fused kernel replaces: it materialises several [tokens, vocab] temporaries and
//! is ~10× slower on the CPU (see PERFORMANCE.md). It stays as the off-CPU fallback (CUDA, Metal,
//! where the fused kernel has no implementation yet) and as an independent cross-check in tests.
//! Unlike the fused kernel it evaluates masked-out rows too (weighted by 0), so NaN / ±∞ garbage
//! in padding rows makes its loss NaN.

use super::divergence::{Divergence, LOG_PROB_FLOOR};
use super::kernel::LossSpec;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// log_softmax over the last dim, with backward (candle_nn's version is such a composition).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(x, D::Minus1)?)
}

/// Per-row D_T(teacher ‖ student) as an \[N\] tensor, differentiable w.r.t. `student`.
pub fn divergence_rows(
    div: Divergence,
    teacher: &Tensor,
    student: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let inv_t = 1.0 / temperature;
    // The teacher's log p is floored as in the fused kernel, so −∞ logits give no NaN.
    let lp = log_softmax(&teacher.detach().affine(inv_t, 0.0)?)?.maximum(LOG_PROB_FLOOR)?;
    let lq = log_softmax(&student.affine(inv_t, 0.0)?)?;
    let (p, q) = (lp.exp()?, lq.exp()?);
    // log m with m floored at the smallest normal f32 so that 0·log 0 stays 0 (not 0·∞).
    let log_mix = |wp: f64, wq: f64| -> Result<Tensor> {
        Ok((p.affine(wp, 0.0)? + q.affine(wq, 0.0)?)?
            .maximum(f32::MIN_POSITIVE as f64)?
            .log()?)
    };
    let sum = |x: Tensor| -> Result<Tensor> { Ok(x.sum(D::Minus1)?) };
    Ok(match div {
        Divergence::Fkl => sum((&p * (&lp - &lq)?)?)?,
        Divergence::Rkl => sum((&q * (&lq - &lp)?)?)?,
        Divergence::Tvd => sum((&p - &q)?.abs()?)?.affine(0.5, 0.0)?,
        Divergence::Jsd { beta } => {
            let lm = log_mix(beta, 1.0 - beta)?;
            let kl_pm = sum((&p * (&lp - &lm)?)?)?;
            let kl_qm = sum((&q * (&lq - &lm)?)?)?;
            (kl_pm.affine(beta, 0.0)? + kl_qm.affine(1.0 - beta, 0.0)?)?
        }
        Divergence::Skl { alpha } => sum((&p * (&lp - log_mix(alpha, 1.0 - alpha)?)?)?)?,
        Divergence::Srkl { alpha } => sum((&q * (&lq - log_mix(1.0 - alpha, alpha)?)?)?)?,
    })
}

/// Per-row −log softmax(student)\[label\] as an \[N\] tensor.
pub fn cross_entropy_rows(student: &Tensor, labels: &[u32], weights: &[f32]) -> Result<Tensor> {
    let v = student.dim(D::Minus1)?;
    let mut ids = Vec::with_capacity(labels.len());
    for (i, (&l, &w)) in labels.iter().zip(weights).enumerate() {
        if (l as usize) < v {
            ids.push(l);
        } else if w == 0.0 {
            ids.push(0); // masked-out row: any label, it is weighted by 0
        } else {
            bail!("row {i}: label {l} is outside the vocabulary (size {v})");
        }
    }
    let idx = Tensor::from_vec(ids, (labels.len(), 1), student.device())?;
    Ok(log_softmax(student)?.gather(&idx, 1)?.squeeze(1)?.neg()?)
}

/// The composition counterpart of the fused op: returns the scalar Σ_r w_r (ce_coef·CE_r +
/// kd_coef·D_r) (in the student's dtype) and the detached (Σ w·CE, Σ w·D).
///
/// Computed in f64, as the fused kernel computes: in f32 a small divergence between close
/// distributions is a difference of terms of order log V, and its rounding reached 1e-4 of the
/// loss on a 400-token vocabulary.
pub fn loss(
    spec: &LossSpec,
    teacher: Option<&Tensor>,
    student: &Tensor,
    weights: &[f32],
    labels: Option<&[u32]>,
) -> Result<(Tensor, (f64, f64))> {
    let dtype = student.dtype();
    let (loss, parts) = loss_f64(
        spec,
        teacher
            .map(|t| t.to_dtype(DType::F64))
            .transpose()?
            .as_ref(),
        &student.to_dtype(DType::F64)?,
        weights,
        labels,
    )?;
    Ok((loss.to_dtype(dtype)?, parts))
}

fn loss_f64(
    spec: &LossSpec,
    teacher: Option<&Tensor>,
    student: &Tensor,
    weights: &[f32],
    labels: Option<&[u32]>,
) -> Result<(Tensor, (f64, f64))> {
    let dev = student.device();
    let w = Tensor::from_slice(weights, weights.len(), dev)?.to_dtype(DType::F64)?;
    let zero = || Tensor::zeros((), DType::F64, dev);
    let (mut total, mut ce_sum, mut kd_sum) = (zero()?, 0.0, 0.0);
    if let (Some(div), Some(t)) = (spec.divergence, teacher) {
        if spec.kd_coef != 0.0 {
            let kd =
                (divergence_rows(div, t, student, 1.0 / spec.inv_temperature)? * &w)?.sum_all()?;
            kd_sum = kd.to_scalar::<f64>()?;
            total = (total + kd.affine(spec.kd_coef, 0.0)?)?;
        }
    }
    if spec.ce_coef != 0.0 {
        let Some(labels) = labels else {
            bail!("the CE term needs labels")
        };
        let ce = (cross_entropy_rows(student, labels, weights)? * &w)?.sum_all()?;
        ce_sum = ce.to_scalar::<f64>()?;
        total = (total + ce.affine(spec.ce_coef, 0.0)?)?;
    }
    Ok((total, (ce_sum, kd_sum)))
}
