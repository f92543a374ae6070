//! AdamW (torch.optim.AdamW semantics), the global gradient-norm clip, and the LR schedule.
//!
//! The weight-decay rule lives here, once: parameters with one dimension (biases and norm
//! weights) are not decayed; matrices and embeddings are.

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter's optimiser state.
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub slots: Vec<Slot>,
    /// Number of updates taken (for bias correction).
    pub step: u64,
}

/// Whether a parameter is weight-decayed: not biases and norm weights (the 1-D tensors).
pub fn decays(var: &Var) -> bool {
    var.rank() > 1
}

impl AdamW {
    pub fn new<'a>(params: impl Iterator<Item = (&'a str, &'a Var)>, config: AdamWConfig) -> Self {
        let slots = params
            .map(|(name, var)| {
                let n = var.elem_count();
                Slot {
                    name: name.to_string(),
                    var: var.clone(),
                    decay: decays(var),
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            })
            .collect();
        AdamW {
            config,
            slots,
            step: 0,
        }
    }

    /// Applies one update with learning rate `lr` from the (already clipped) gradients `grads`,
    /// given as flat f32 vectors in slot order (a missing gradient counts as zero).
    pub fn update(&mut self, grads: &[Option<Vec<f32>>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let (b1, b2) = (c.beta1, c.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let mut p = slot.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let decay = if slot.decay {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            for i in 0..p.len() {
                let gi = g.as_ref().map_or(0.0, |g| g[i]) as f64;
                let m = b1 * slot.m[i] as f64 + (1.0 - b1) * gi;
                let v = b2 * slot.v[i] as f64 + (1.0 - b2) * gi * gi;
                slot.m[i] = m as f32;
                slot.v[i] = v as f32;
                let denom = (v / bc2).sqrt() + c.eps;
                p[i] = (p[i] as f64 * decay - lr * (m / bc1) / denom) as f32;
            }
            slot.var
                .set(&Tensor::from_vec(p, slot.var.dims(), slot.var.device())?)?;
        }
        Ok(())
    }
}

/// Flat gradients of `vars` from a backward pass, in order.
pub fn flat_grads(vars: &[Var], grads: &GradStore) -> Result<Vec<Option<Vec<f32>>>> {
    vars.iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .map(|g| g.flatten_all()?.to_vec1::<f32>().map_err(|e| anyhow!(e)))
                .transpose()
        })
        .collect()
}

/// Scales gradients in place so their global L2 norm is at most `max_norm` (torch's
/// clip_grad_norm_: coefficient max_norm / (norm + 1e-6), never above 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Vec<f32>>], max_norm: f64) -> f64 {
    let sq: f64 = grads
        .iter()
        .flatten()
        .flat_map(|g| g.iter())
        .map(|&x| x as f64 * x as f64)
        .sum();
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            g.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
        }
    }
    norm
}

/// Linear warmup then cosine annealing from `lr` to `lr_min` over `total` steps
/// (torch's CosineAnnealingLR after the warmup, as the reference code).
#[derive(Clone, Debug)]
pub struct LrSchedule {
    pub lr: f64,
    pub lr_min: f64,
    pub warmup: u64,
    pub total: u64,
}

impl LrSchedule {
    /// The learning rate of update number `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.lr_min + (self.lr - self.lr_min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_endpoints() {
        let s = LrSchedule {
            lr: 1e-4,
            lr_min: 1e-7,
            warmup: 0,
            total: 10,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-15);
        assert!((s.at(5) - (1e-7 + (1e-4 - 1e-7) / 2.0)).abs() < 1e-15);
        assert!((s.at(10) - 1e-7).abs() < 1e-15);
        let w = LrSchedule {
            lr: 1.0,
            lr_min: 0.0,
            warmup: 4,
            total: 8,
        };
        assert_eq!((w.at(0), w.at(3)), (0.25, 1.0));
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let mut g = vec![Some(vec![3.0f32, 0.0]), None, Some(vec![4.0f32])];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let after: f64 = g
            .iter()
            .flatten()
            .flatten()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((after - 1.0).abs() < 1e-5);
        let mut small = vec![Some(vec![0.1f32])];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0].as_ref().unwrap()[0], 0.1);
    }
}
