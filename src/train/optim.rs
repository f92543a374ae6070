//! AdamW (torch.optim.AdamW semantics), the global gradient-norm clip, and the LR schedule.
//!
//! The weight-decay rule lives here, once: parameters with one dimension (biases and norm
//! weights) are not decayed; matrices and embeddings are.

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::Var;

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
    /// given as flat f32 vectors in slot order (a missing gradient counts as zero). Parameters are
    /// updated in place in their own storage, in parallel chunks; the arithmetic (f64, torch's
    /// formula) is the same element by element whatever the thread count.
    pub fn update(&mut self, grads: &[Option<Vec<f32>>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let hyper = Hyper {
            b1: c.beta1,
            b2: c.beta2,
            bc1: 1.0 - c.beta1.powi(self.step as i32),
            bc2: 1.0 - c.beta2.powi(self.step as i32),
            eps: c.eps,
            lr,
            decay: 1.0,
        };
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let op = AdamWStep {
                hyper: Hyper {
                    decay: if slot.decay {
                        1.0 - lr * c.weight_decay
                    } else {
                        1.0
                    },
                    ..hyper
                },
                grad: g.as_deref(),
                moments: std::sync::Mutex::new((&mut slot.m, &mut slot.v)),
            };
            slot.var.as_tensor().inplace_op1(&op)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Hyper {
    b1: f64,
    b2: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
    /// 1 − lr·weight_decay, or 1 for parameters that are not decayed.
    decay: f64,
}

/// One parameter's AdamW update as a candle in-place op: writes the parameter's own storage, so
/// a step allocates nothing parameter-sized.
struct AdamWStep<'a> {
    hyper: Hyper,
    grad: Option<&'a [f32]>,
    /// (m, v); a Mutex because candle hands the op out by shared reference.
    moments: std::sync::Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

impl candle_core::InplaceOp1 for AdamWStep<'_> {
    fn name(&self) -> &'static str {
        "pocl-adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("AdamW: parameters must be f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW: parameters must be contiguous")
        };
        let p = &mut data[start..end];
        let mut guard = self.moments.lock().unwrap();
        let (m, v) = &mut *guard;
        if m.len() != p.len() || self.grad.is_some_and(|g| g.len() != p.len()) {
            candle_core::bail!("AdamW: gradient or moments do not match the parameter's size");
        }
        let h = self.hyper;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(k, ((p, m), v))| {
                let g = self.grad.map(|g| &g[k * CHUNK..k * CHUNK + p.len()]);
                match g {
                    Some(g) => adamw_chunk(p, m, v, |i| g[i] as f64, &h),
                    None => adamw_chunk(p, m, v, |_| 0.0, &h),
                }
            });
        Ok(())
    }
}

#[inline(always)]
fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: impl Fn(usize) -> f64, h: &Hyper) {
    for i in 0..p.len() {
        let gi = g(i);
        let mi = h.b1 * m[i] as f64 + (1.0 - h.b1) * gi;
        let vi = h.b2 * v[i] as f64 + (1.0 - h.b2) * gi * gi;
        m[i] = mi as f32;
        v[i] = vi as f32;
        let denom = (vi / h.bc2).sqrt() + h.eps;
        p[i] = (p[i] as f64 * h.decay - h.lr * (mi / h.bc1) / denom) as f32;
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
    use rayon::prelude::*;
    // Partial sums over fixed chunks, added in order: deterministic whatever the thread count.
    let partial: Vec<f64> = grads
        .iter()
        .flatten()
        .flat_map(|g| g.chunks(CHUNK))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect();
    let norm = partial.iter().sum::<f64>().sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            g.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32));
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
