//! One optimiser step, the code path both training and `pocl bench kd-step` run.
//!
//! The batch's examples are collated into micro-batches first, so the loss denominator is the
//! response-token count of the whole step (`kd::step_denominator`). Each micro-batch runs the
//! frozen teacher forward, the student forward, the fused lm head + loss (`kd::Objective`) and
//! the backward pass; gradients are summed in micro-batch order (deterministic, so resumed runs
//! are exact), clipped globally, and AdamW applies them. Running micro-batches on parallel
//! threads was measured slower here (PERFORMANCE.md).

use super::optim::{accumulate, clip_coef, AdamW};
use crate::cache::SparseTeacher;
use crate::data::{collate, Batch, Example};
use crate::kd::{Head, Mix, Objective, Targets};
use crate::model::{CausalLm, Input};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The models and the loss a step trains with.
pub struct Models<'a> {
    pub student: &'a dyn CausalLm,
    /// Frozen; `None` for SFT (then the KD weight must be 0).
    pub teacher: Option<&'a dyn CausalLm>,
    /// Sparse teacher targets (a teacher cache) used instead of `teacher` when given.
    pub sparse_teacher: Option<&'a dyn SparseTeacher>,
    pub objective: Objective,
    /// The width the two models' logits are compared over (`kd::vocab::common_vocab`).
    pub kd_vocab: usize,
}

/// The parts of a step, in the order they run for each micro-batch; a step reports the end of
/// each part to its caller (`pocl bench kd-step` times them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    TeacherForward,
    StudentForward,
    /// The lm heads fused with the loss: no [tokens, vocab] logits are materialised.
    FusedHeadLoss,
    StudentBackward,
    /// Reading and summing the gradients, the clip and the AdamW update.
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::TeacherForward,
        Phase::StudentForward,
        Phase::FusedHeadLoss,
        Phase::StudentBackward,
        Phase::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::TeacherForward => "teacher_forward",
            Phase::StudentForward => "student_forward",
            Phase::FusedHeadLoss => "fused_head_loss",
            Phase::StudentBackward => "student_backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// What one step did (the sums over its micro-batches; each already divided by `tokens`).
#[derive(Clone, Copy, Debug)]
pub struct StepOutput {
    pub loss: f64,
    pub ce: f64,
    pub kd: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The loss denominator: response tokens of the whole step.
    pub tokens: f64,
}

/// The training NaN guard: `None` when the step's loss and gradient norm are finite, else the
/// message naming the part that went non-finite first (the losses are computed before the
/// gradients) and the gradient norm. The trainer adds the step number.
pub fn non_finite(loss: f64, ce: f64, kd: f64, grad_norm: f64) -> Option<String> {
    if grad_norm.is_finite() && loss.is_finite() {
        return None;
    }
    let part = if !ce.is_finite() {
        "the cross-entropy part of the loss"
    } else if !kd.is_finite() {
        "the KD divergence part of the loss"
    } else if !loss.is_finite() {
        "the loss (its parts were finite)"
    } else {
        "the gradient (the loss parts were finite)"
    };
    Some(format!(
        "non-finite values in {part}: ce {ce}, kd {kd}, gradient norm {grad_norm}; \
         the weights were not updated (lower optim.lr, or check the data and models)"
    ))
}

/// The step's examples as micro-batches of `micro_batch_size` sequences, on `device`.
pub fn collate_micro_batches(
    examples: &[Example],
    micro_batch_size: usize,
    pad_id: u32,
    device: &candle_core::Device,
) -> Result<Vec<Batch>> {
    examples
        .chunks(micro_batch_size)
        .map(|c| collate(&c.iter().collect::<Vec<_>>(), pad_id)?.to_device(device))
        .collect()
}

/// One optimiser step over the micro-batches of one batch with the stage's `mix`, learning rate
/// `lr` and global gradient-norm clip `clip` (0 = off). `phase_done(p)` is called as each part
/// of the step ends.
pub fn optimizer_step(
    models: &Models,
    opt: &mut AdamW,
    micro: &[Batch],
    mix: Mix,
    lr: f64,
    clip: f64,
    phase_done: &mut dyn FnMut(Phase),
) -> Result<StepOutput> {
    let masks: Vec<Tensor> = micro.iter().map(|b| b.loss_mask.clone()).collect();
    let tokens = crate::kd::step_denominator(&masks)?;
    let params = models.student.params();
    // The in-place gradient buffers start the step empty (torch's zero_grad).
    params.zero_grad();
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let (mut loss, mut ce, mut kd) = (0.0, 0.0, 0.0);
    for b in micro {
        let input = Input {
            ids: &b.input_ids,
            positions: &b.position_ids,
            key_mask: &b.attention_mask,
        };
        let teacher_hidden = match models.teacher {
            Some(t) if mix.kd_weight > 0.0 => Some((t, t.hidden(&input, None)?.detach())),
            _ => None,
        };
        let teacher = teacher_hidden.as_ref().map(|(t, h)| Head {
            hidden: h,
            weight: t.lm_head(),
        });
        phase_done(Phase::TeacherForward);
        let student_hidden = models.student.hidden(&input, None)?;
        let student = Head {
            hidden: &student_hidden,
            weight: models.student.lm_head(),
        };
        phase_done(Phase::StudentForward);
        let targets = Targets {
            labels: &b.labels.flatten_all()?,
            mask: &b.loss_mask.flatten_all()?,
            denominator: tokens,
        };
        let objective = &models.objective;
        let out = match models.sparse_teacher {
            Some(c) if mix.kd_weight > 0.0 => {
                let t = std::sync::Arc::new(c.targets(b, mix.temperature)?);
                objective.loss_from_sparse(t, student, models.kd_vocab, targets, mix)?
            }
            _ => objective.loss_from_heads(teacher, student, models.kd_vocab, targets, mix)?,
        };
        phase_done(Phase::FusedHeadLoss);
        let store = out.loss.backward()?;
        loss += out.loss.to_scalar::<f32>()? as f64;
        ce += out.ce;
        kd += out.kd;
        drop(out); // the graph, with its activations
        phase_done(Phase::StudentBackward);
        let micro_grads = params.grads(&store)?;
        drop(store);
        accumulate(&mut grads, micro_grads)?;
        phase_done(Phase::Optimizer);
    }
    let max_norm = if clip > 0.0 { clip } else { f64::INFINITY };
    let (grad_norm, coef) = clip_coef(&grads, max_norm, models.objective.kernels)?;
    if let Some(message) = non_finite(loss, ce, kd, grad_norm) {
        bail!(message);
    }
    opt.update(&grads, coef, lr)?;
    phase_done(Phase::Optimizer);
    Ok(StepOutput {
        loss,
        ce,
        kd,
        grad_norm,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::non_finite;

    #[test]
    fn the_nan_guard_names_the_part_and_the_norm() {
        assert!(non_finite(2.0, 1.5, 0.5, 3.0).is_none());
        let m = non_finite(f64::NAN, f64::NAN, 0.0, f64::NAN).unwrap();
        assert!(
            m.contains("cross-entropy part") && m.contains("gradient norm NaN"),
            "{m}"
        );
        let m = non_finite(f64::INFINITY, 0.7, f64::INFINITY, f64::NAN).unwrap();
        assert!(
            m.contains("KD divergence part") && m.contains("kd inf"),
            "{m}"
        );
        let m = non_finite(1.0, 0.4, 0.6, f64::INFINITY).unwrap();
        assert!(
            m.contains("the gradient (the loss parts were finite)"),
            "{m}"
        );
        assert!(
            m.contains("gradient norm inf") && !m.contains("loss 0"),
            "{m}"
        );
    }
}
