//! The distillation objective: the divergences of POCL.md §4, temperature, the T² rule and the
//! CE mix, as fused CPU kernels with analytic gradients (see [`kernel`]).
//!
//! Rules decided here once:
//! - Temperature T divides teacher and student logits inside the divergence only; the CE term is at
//!   T = 1.
//! - The T² rule: the divergence is multiplied by T² for EVERY divergence (so its gradient keeps
//!   the same magnitude as T changes, Hinton et al.); `t2 = false` turns the factor off.
//! - Masks select rows (tokens) with weight 1; rows with weight 0 (prompt, padding) contribute
//!   nothing and may hold garbage. The mean is taken by the caller's denominator: the response-token
//!   count of the WHOLE optimizer step, so accumulation over micro-batches does not change the
//!   gradient (see [`Objective::loss`]).
//! - Vocabulary: teacher and student logits must have the same width; when they differ only by
//!   padding, check the tokenizers with [`vocab::common_vocab`] and narrow both with
//!   [`vocab::narrow_to_prefix`] (no copy).
//! - Zero probabilities: see [`divergence`] (teacher log p floored at −1e30; never NaN).
//!
//! With the portable kernels ([`Objective::kernels`]; any device) the same API computes the
//! differentiable candle composition of [`naive`] instead.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use pocl::kd::{Divergence, Mix, Objective, Targets};
//! # fn main() -> anyhow::Result<()> {
//! let dev = Device::Cpu;
//! let teacher = Tensor::randn(0f32, 1., (2, 3, 10), &dev)?; // [batch, seq, vocab]
//! let student = Var::randn(0f32, 1., (2, 3, 10), &dev)?;
//! let labels = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &dev)?; // already shifted
//! let mask = Tensor::new(&[[0f32, 1., 1.], [0., 1., 0.]], &dev)?; // prompt / padding = 0
//! // The response tokens of ALL micro-batches of the optimizer step (here one micro-batch).
//! let den = pocl::kd::step_denominator(&[mask.clone()])?;
//! let objective = Objective::new(Divergence::parse("srkl", None, None)?);
//! // Stage-dependent KD weight a = 0.7 and temperature T = 1.33 from the curriculum.
//! let mix = Mix { temperature: 1.33, kd_weight: 0.7 };
//! let targets = Targets { labels: &labels, mask: &mask, denominator: den };
//! let out = objective.loss(Some(&teacher), student.as_tensor(), targets, mix)?;
//! let grads = out.loss.backward()?;
//! assert!(grads.get(&student).is_some());
//! println!("loss {} (ce {}, kd {})", out.loss.to_scalar::<f32>()?, out.ce, out.kd);
//! # Ok(())
//! # }
//! ```

pub mod chunked;
pub mod divergence;
pub mod head;
pub mod kernel;
pub mod loss_kind;
pub mod naive;
pub mod objective;
pub mod rows;
pub mod sparse;
pub mod vocab;

pub use divergence::{Divergence, DEFAULT_ALPHA, DEFAULT_BETA, DIVERGENCE_NAMES, LOG_PROB_FLOOR};
pub use head::Head;
pub use loss_kind::LossKind;
pub use objective::{Mix, Objective, ObjectiveOutput, Targets};

use crate::ops::Kernels;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use kernel::{FusedLossOp, LossSpec};

/// The scale of the divergence under the T² rule: T² when `t2`, else 1.
pub fn t2_scale(temperature: f64, t2: bool) -> f64 {
    if t2 {
        temperature * temperature
    } else {
        1.0
    }
}

pub(crate) fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("temperature must be a finite positive number, got {temperature}");
    }
    Ok(())
}

/// Flattens [.., V] logits to [N, V] f32 with unit stride along V (no copy when it already has).
pub(crate) fn as_rows(x: &Tensor, who: &str) -> Result<Tensor> {
    let dims = x.dims();
    if dims.is_empty() {
        bail!("{who} logits must be [tokens, vocab] (or [batch, seq, vocab]), got a scalar");
    }
    let v = dims[dims.len() - 1];
    let n: usize = dims[..dims.len() - 1].iter().product();
    let x = if x.dtype() == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let x = if dims.len() == 2 {
        x
    } else {
        x.contiguous()?.reshape((n, v))?
    };
    // The kernel reads rows with any row stride (a narrowed vocabulary) but needs unit inner stride.
    let x = if v > 1 && x.stride()[1] != 1 {
        x.contiguous()?
    } else {
        x
    };
    Ok(x)
}

/// Mask [N] (or [B, T]) to host f32 weights, checked against the row count.
pub(crate) fn mask_weights(mask: &Tensor, n: usize) -> Result<Vec<f32>> {
    let m: Vec<f32> = mask
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()
        .context("reading the mask")?;
    if m.len() != n {
        bail!(
            "mask has {} entries but the logits have {n} rows (tokens)",
            m.len()
        );
    }
    if let Some(bad) = m.iter().find(|w| !w.is_finite() || **w < 0.0) {
        bail!(
            "mask entries must be finite and non-negative (1 = counted, 0 = excluded), found {bad}"
        );
    }
    Ok(m)
}

/// Labels [N] (u32 or i64; negative = ignore-index, allowed only on masked-out rows) to host u32.
pub(crate) fn label_ids(labels: &Tensor, n: usize) -> Result<Vec<u32>> {
    let l = labels.flatten_all()?;
    let ids: Vec<u32> = match l.dtype() {
        DType::U32 => l.to_vec1()?,
        DType::I64 => l
            .to_vec1::<i64>()?
            .into_iter()
            .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
            .collect(),
        DType::U8 => l.to_vec1::<u8>()?.into_iter().map(u32::from).collect(),
        dt => bail!("labels must be u32 or i64, got {dt:?}"),
    };
    if ids.len() != n {
        bail!(
            "labels have {} entries but the logits have {n} rows (tokens)",
            ids.len()
        );
    }
    Ok(ids)
}

/// The loss denominator of one optimizer step: the number of counted (response) tokens over ALL
/// its micro-batches, i.e. the sum of their masks. Pass it (in [`Targets`]) to every
/// [`Objective::loss`] call of the step, so that accumulating the micro-batch gradients gives the
/// full-batch gradient.
pub fn step_denominator(masks: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for m in masks {
        total += m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    if !(total.is_finite() && total > 0.0) {
        bail!(
            "the optimizer step has no response tokens (mask sum {total}); nothing to learn from"
        );
    }
    Ok(total)
}

/// Σ over rows with mask = 1 of scale·D_T(teacher_row ‖ student_row), scale = T² (or 1 if !t2), as a
/// scalar tensor differentiable w.r.t. `student` (the teacher gets no gradient).
/// teacher / student: [N, V] (or [B, T, V]) f32 of equal V; mask: \[N\] f32 (a general non-negative
/// weight per row works too).
pub fn kd_loss_sum(
    teacher: &Tensor,
    student: &Tensor,
    mask: &Tensor,
    div: Divergence,
    temperature: f64,
    t2: bool,
) -> Result<Tensor> {
    div.validate()?;
    check_temperature(temperature)?;
    let (t, s) = (as_rows(teacher, "teacher")?, as_rows(student, "student")?);
    check_same_shape(&t, &s)?;
    let spec = LossSpec {
        divergence: Some(div),
        inv_temperature: 1.0 / temperature,
        ce_coef: 0.0,
        kd_coef: t2_scale(temperature, t2),
    };
    let w = mask_weights(mask, s.dim(0)?)?;
    apply(Kernels::Fused, spec, Some(&t), &s, w, None).map(|(loss, _)| loss)
}

/// Σ over rows with mask = 1 of −log softmax(student)\[label\], scalar, differentiable w.r.t.
/// `student`. labels: \[N\] u32 (or i64; rows with mask 0 may hold any label).
pub fn ce_loss_sum(student: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let s = as_rows(student, "student")?;
    let n = s.dim(0)?;
    let spec = LossSpec {
        divergence: None,
        inv_temperature: 1.0,
        ce_coef: 1.0,
        kd_coef: 0.0,
    };
    apply(
        Kernels::Fused,
        spec,
        None,
        &s,
        mask_weights(mask, n)?,
        Some(label_ids(labels, n)?),
    )
    .map(|(loss, _)| loss)
}

pub(crate) fn check_same_shape(t: &Tensor, s: &Tensor) -> Result<()> {
    let (tn, tv) = t.dims2()?;
    let (sn, sv) = s.dims2()?;
    if tv != sv {
        bail!(
            "teacher vocab {tv} != student vocab {sv}: check that the tokenizers agree with \
             kd::vocab::common_vocab and narrow both logits to the common prefix with \
             kd::vocab::narrow_to_prefix"
        );
    }
    if tn != sn {
        bail!("teacher has {tn} token rows but the student has {sn}");
    }
    Ok(())
}

/// Runs the fused CPU op, the portable candle composition, or the row op of `ops::cuda`. Returns the loss and the
/// detached (Σ w·CE, Σ w·D).
pub(crate) fn apply(
    kernels: crate::ops::Kernels,
    spec: LossSpec,
    teacher: Option<&Tensor>,
    student: &Tensor,
    weights: Vec<f32>,
    labels: Option<Vec<u32>>,
) -> Result<(Tensor, (f64, f64))> {
    match kernels {
        crate::ops::Kernels::Portable => {
            return naive::loss(&spec, teacher, student, &weights, labels.as_deref())
        }
        crate::ops::Kernels::Cuda => {
            return chunked::logits_loss(&spec, teacher, student, weights, labels)
        }
        crate::ops::Kernels::Fused => {}
    }
    let op = FusedLossOp::new(spec, weights, labels, student.track_op());
    let parts = op.parts.clone();
    let loss = match teacher {
        Some(t) => student.apply_op2(&t.detach(), op)?,
        None => student.apply_op1(op)?,
    };
    let p = *parts.lock().unwrap();
    Ok((loss, p))
}
