//! The training objective of POCL.md §3: loss = (1 − a)·CE(student, labels) + a·T²·D_T(teacher ‖
//! student), with the KD weight a and the temperature T supplied per step by the curriculum (one
//! [`Mix`]). Both terms are computed by ONE fused kernel pass that writes one combined gradient.

use super::divergence::Divergence;
use super::head::{flat_hidden, FusedHeadOp, Head};
use super::kernel::LossSpec;
use super::sparse::SparseTargets;
use super::{
    apply, as_rows, check_same_shape, check_temperature, label_ids, mask_weights, t2_scale,
};
use crate::ops::{Kernels, Weight};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// The KD objective: which divergence, whether the T² rule scales it, and which kernels
/// compute it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    pub divergence: Divergence,
    /// Multiply the divergence by T² (the default; see the module docs of `kd`).
    pub t2: bool,
    /// Fused: the CPU kernel of [`super::kernel`] (and the lm head fused into it, [`super::head`]);
    /// portable: the candle composition of [`super::naive`] on materialised logits, any device;
    /// cuda: the row kernel of `ops::cuda` (and the chunked head of [`super::chunked`]).
    pub kernels: Kernels,
}

/// A stage's temperature T and KD weight a, the two numbers the curriculum sets per stage:
/// loss = (1 − a)·CE + a·T²·D_T. They always travel together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// T > 0: divides teacher and student logits inside the divergence (the CE term is at T = 1).
    pub temperature: f64,
    /// a ∈ [0, 1]; 0 is pure cross-entropy and needs no teacher.
    pub kd_weight: f64,
}

impl Mix {
    /// Cross-entropy alone (a = 0, T = 1): the dev loss.
    pub const CE_ONLY: Mix = Mix {
        temperature: 1.0,
        kd_weight: 0.0,
    };
}

/// What the student's rows are scored against: `labels` \[N\] (or \[B, T\]), already shifted so that
/// row i predicts labels\[i\]; `mask` (1 = counted row, 0 = prompt or padding); and the
/// `denominator` every sum is divided by.
///
/// `denominator` must be the number of response tokens of the whole optimizer step (all
/// micro-batches together, [`super::step_denominator`]), so that accumulating the gradients of
/// the micro-batches gives exactly the gradient of the full batch.
#[derive(Debug, Clone, Copy)]
pub struct Targets<'a> {
    pub labels: &'a Tensor,
    pub mask: &'a Tensor,
    pub denominator: f64,
}

/// The scalar loss (differentiable w.r.t. the student logits) and its detached parts for logging.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    pub loss: Tensor,
    /// Σ CE over masked rows / denominator (the unweighted mean CE at T = 1, reported even at a = 1).
    pub ce: f64,
    /// Σ scale·D_T over masked rows / denominator (scale = T² or 1); 0 when a = 0.
    pub kd: f64,
}

impl Objective {
    pub fn new(divergence: Divergence) -> Self {
        Objective {
            divergence,
            t2: true,
            kernels: Kernels::Fused,
        }
    }

    /// (1 − a)·CE + a·scale·D_T, each a SUM over rows with mask = 1 divided by the targets'
    /// denominator. Logits are [N, V] or [B, T, V]; a = 0 needs no teacher.
    pub fn loss(
        &self,
        teacher: Option<&Tensor>,
        student: &Tensor,
        targets: Targets,
        mix: Mix,
    ) -> Result<ObjectiveOutput> {
        let s = as_rows(student, "student")?;
        let n = s.dim(0)?;
        let teacher = match teacher {
            Some(t) if mix.kd_weight > 0.0 => {
                let t = as_rows(t, "teacher")?;
                check_same_shape(&t, &s)?;
                Some(t)
            }
            _ => None,
        };
        let spec = self.spec(mix, targets.denominator, teacher.is_some())?;
        let weights = mask_weights(targets.mask, n)?;
        let labels = label_ids(targets.labels, n)?;
        let (loss, parts) = apply(
            self.kernels,
            spec,
            teacher.as_ref(),
            &s,
            weights,
            Some(labels),
        )?;
        Ok(self.output(loss, parts, mix, targets.denominator))
    }

    /// The same loss from the models' final hidden states and lm heads, with the head matmuls
    /// fused into the loss kernel (see [`super::head`]): no [tokens, vocab] logits are made.
    /// `vocab` is the width both models' logits are compared over (the common prefix of
    /// [`super::vocab::common_vocab`]; the full vocabulary when the models agree).
    pub fn loss_from_heads(
        &self,
        teacher: Option<Head>,
        student: Head,
        vocab: usize,
        targets: Targets,
        mix: Mix,
    ) -> Result<ObjectiveOutput> {
        self.heads_loss(teacher, None, student, vocab, targets, mix)
    }

    /// [`Self::loss_from_heads`] against a sparse teacher (top-K + rest, [`super::sparse`]; one
    /// row of `teacher` per counted row of the targets, in order), e.g. from a teacher cache.
    pub fn loss_from_sparse(
        &self,
        teacher: Arc<SparseTargets>,
        student: Head,
        vocab: usize,
        targets: Targets,
        mix: Mix,
    ) -> Result<ObjectiveOutput> {
        self.heads_loss(None, Some(teacher), student, vocab, targets, mix)
    }

    fn heads_loss(
        &self,
        teacher: Option<Head>,
        sparse: Option<Arc<SparseTargets>>,
        student: Head,
        vocab: usize,
        targets: Targets,
        mix: Mix,
    ) -> Result<ObjectiveOutput> {
        let teacher = teacher.filter(|_| mix.kd_weight > 0.0);
        let sparse = sparse.filter(|_| mix.kd_weight > 0.0);
        if sparse.is_some() && self.kernels != Kernels::Fused {
            bail!("a sparse teacher (teacher cache) needs the fused CPU kernels (run.kernels = \"fused\" on the CPU)");
        }
        if self.kernels == Kernels::Cuda {
            // The chunked head of `kd::chunked` (pocl's CUDA row kernel between cuBLAS matmuls).
            let spec = self.spec(mix, targets.denominator, teacher.is_some())?;
            let n = flat_hidden(student.hidden, "student")?.dim(0)?;
            let weights = mask_weights(targets.mask, n)?;
            let labels = label_ids(targets.labels, n)?;
            let (loss, parts) = super::chunked::head_loss(
                &spec,
                teacher,
                student,
                vocab,
                weights,
                labels,
                super::chunked::CHUNK_BYTES,
            )?;
            return Ok(self.output(loss, parts, mix, targets.denominator));
        }
        if self.kernels == Kernels::Portable {
            // The logits of the counted rows only (prompt and padding rows contribute nothing;
            // they are often half the tokens), materialised, then the composed loss.
            let weights = mask_weights(
                targets.mask,
                flat_hidden(student.hidden, "student")?.dim(0)?,
            )?;
            let counted: Vec<u32> = (0..weights.len() as u32)
                .filter(|&i| weights[i as usize] != 0.0)
                .collect();
            // With no counted row the loss is 0: one (weight 0) row keeps the graph's shape.
            let counted = if counted.is_empty() { vec![0] } else { counted };
            let dev = student.hidden.device();
            let rows = Tensor::new(counted.as_slice(), dev)?;
            let logits = |h: Head, who: &str| -> Result<Tensor> {
                let hidden = flat_hidden(h.hidden, who)?.index_select(&rows, 0)?;
                Ok(Kernels::Portable
                    .linear(h.weight, &hidden, None)?
                    .narrow(1, 0, vocab)?)
            };
            let t = teacher
                .map(|t| logits(t, "teacher").map(|l| l.detach()))
                .transpose()?;
            let labels = targets.labels.flatten_all()?.index_select(&rows, 0)?;
            let mask = targets.mask.flatten_all()?.index_select(&rows, 0)?;
            let targets = Targets {
                labels: &labels,
                mask: &mask,
                denominator: targets.denominator,
            };
            return self.loss(t.as_ref(), &logits(student, "student")?, targets, mix);
        }
        let Weight::F32 {
            w, out_in: true, ..
        } = student.weight
        else {
            bail!("the student's lm head must be an f32 [vocab, d] matrix (a trainable model)")
        };
        let spec = self.spec(
            mix,
            targets.denominator,
            teacher.is_some() || sparse.is_some(),
        )?;
        let h = flat_hidden(student.hidden, "student")?;
        let n = h.dim(0)?;
        let weights = mask_weights(targets.mask, n)?;
        let labels = label_ids(targets.labels, n)?;
        let t = match teacher {
            Some(t) => Some((
                flat_hidden(t.hidden, "teacher")?.detach(),
                match t.weight {
                    Weight::F32 {
                        w, out_in: true, ..
                    } => Weight::out_in(w.contiguous()?.detach()),
                    Weight::Packed(p) => Weight::Packed(p.clone()),
                    Weight::F32 { .. } => bail!("the teacher's lm head must be [vocab, d]"),
                    Weight::Bf16Tensor { .. } => {
                        bail!("a bf16 tensor head belongs to the portable kernels")
                    }
                },
            )),
            None => None,
        };
        let w = w.contiguous()?;
        let want_grad = h.track_op() || w.track_op();
        // A trainable head's dL/dW goes into its gradient buffer; only when w itself is tracked.
        let buffer = student.weight.grad_buffer().cloned();
        let mut op = FusedHeadOp::new(spec, weights, Some(labels), vocab, t, want_grad, buffer);
        op.sparse = sparse;
        let parts = op.parts.clone();
        let loss = h.apply_op2(&w, op)?;
        let p = *parts.lock().unwrap();
        Ok(self.output(loss, p, mix, targets.denominator))
    }

    /// Checks the per-step arguments and folds a, T², 1/T and the denominator into the kernel's spec.
    fn spec(&self, mix: Mix, denominator: f64, has_teacher: bool) -> Result<LossSpec> {
        let Mix {
            temperature,
            kd_weight,
        } = mix;
        if !(0.0..=1.0).contains(&kd_weight) {
            bail!("the KD weight must lie in [0, 1], got {kd_weight}");
        }
        if !(denominator.is_finite() && denominator > 0.0) {
            bail!("the loss denominator (response tokens in the optimizer step) must be positive, got {denominator}");
        }
        check_temperature(temperature)?;
        self.divergence.validate()?;
        if kd_weight > 0.0 && !has_teacher {
            bail!("KD weight {kd_weight} > 0 needs teacher logits");
        }
        Ok(LossSpec {
            divergence: has_teacher.then_some(self.divergence),
            inv_temperature: 1.0 / temperature,
            ce_coef: (1.0 - kd_weight) / denominator,
            kd_coef: kd_weight * t2_scale(temperature, self.t2) / denominator,
        })
    }

    fn output(
        &self,
        loss: Tensor,
        (ce, kd): (f64, f64),
        mix: Mix,
        denominator: f64,
    ) -> ObjectiveOutput {
        ObjectiveOutput {
            loss,
            ce: ce / denominator,
            kd: kd * t2_scale(mix.temperature, self.t2) / denominator,
        }
    }
}
