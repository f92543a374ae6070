//! The training objective of POCL.md §3: loss = (1 − a)·CE(student, labels) + a·T²·D_T(teacher ‖
//! student), with the KD weight a and the temperature T supplied per step by the curriculum.
//! Both terms are computed by ONE fused kernel pass that writes one combined gradient.

use super::divergence::Divergence;
use super::kernel::LossSpec;
use super::{
    apply, as_rows, check_same_shape, check_temperature, label_ids, mask_weights, t2_scale,
};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The KD objective: which divergence, and whether the T² rule scales it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    pub divergence: Divergence,
    /// Multiply the divergence by T² (the default; see the module docs of `kd`).
    pub t2: bool,
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
        }
    }

    /// (1 − a)·CE + a·scale·D_T, each a SUM over rows with mask = 1 divided by `denominator`.
    ///
    /// `denominator` must be the number of response tokens of the whole optimizer step (all
    /// micro-batches together), so that accumulating the gradients of the micro-batches gives
    /// exactly the gradient of the full batch. `kd_weight` a ∈ [0, 1]; a = 0 is pure SFT and
    /// needs no teacher. Logits are [N, V] or [B, T, V] (labels / mask \[N\] or \[B, T\]), already
    /// shifted so that row i predicts labels\[i\].
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        teacher: Option<&Tensor>,
        student: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        kd_weight: f64,
        temperature: f64,
        denominator: f64,
    ) -> Result<ObjectiveOutput> {
        if !(0.0..=1.0).contains(&kd_weight) {
            bail!("the KD weight must lie in [0, 1], got {kd_weight}");
        }
        if !(denominator.is_finite() && denominator > 0.0) {
            bail!("the loss denominator (response tokens in the optimizer step) must be positive, got {denominator}");
        }
        check_temperature(temperature)?;
        self.divergence.validate()?;
        let s = as_rows(student, "student")?;
        let n = s.dim(0)?;
        let weights = mask_weights(mask, n)?;
        let labels = label_ids(labels, n)?;
        let scale = t2_scale(temperature, self.t2);
        let teacher = if kd_weight > 0.0 {
            let Some(t) = teacher else {
                bail!("KD weight {kd_weight} > 0 needs teacher logits")
            };
            let t = as_rows(t, "teacher")?;
            check_same_shape(&t, &s)?;
            Some(t)
        } else {
            None
        };
        let spec = LossSpec {
            divergence: teacher.as_ref().map(|_| self.divergence),
            inv_temperature: 1.0 / temperature,
            ce_coef: (1.0 - kd_weight) / denominator,
            kd_coef: kd_weight * scale / denominator,
        };
        let (loss, (ce, kd)) = apply(spec, teacher.as_ref(), &s, weights, Some(labels))?;
        Ok(ObjectiveOutput {
            loss,
            ce: ce / denominator,
            kd: kd * scale / denominator,
        })
    }
}
