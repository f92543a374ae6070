//! One optimiser step, the code path both training and `pocl bench kd-step` run.
//!
//! The batch's examples are collated into micro-batches first, so the loss denominator is the
//! response-token count of the whole step (`kd::step_denominator`). Each micro-batch runs the
//! frozen teacher forward, the student forward, the fused lm head + loss (`kd::Objective`) and
//! the backward pass; gradients are summed in micro-batch order (deterministic, so resumed runs
//! are exact), clipped globally, and AdamW applies them. Running micro-batches on parallel
//! threads was measured slower here (PERFORMANCE.md).

use super::optim::{accumulate, clip_coef, AdamW};
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
        let out =
            models
                .objective
                .loss_from_heads(teacher, student, models.kd_vocab, targets, mix)?;
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
    if !(grad_norm.is_finite() && loss.is_finite()) {
        // Name the part that went non-finite first: the losses are read before the gradients.
        let part = if !ce.is_finite() {
            "the cross-entropy part of the loss"
        } else if !kd.is_finite() {
            "the KD divergence part of the loss"
        } else {
            "the gradient (the loss parts were finite)"
        };
        bail!(
            "non-finite values in {part}: ce {ce}, kd {kd}, gradient norm {grad_norm}; \
             the weights were not updated (lower optim.lr, or check the data and models)"
        );
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
