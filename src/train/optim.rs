//! AdamW (torch.optim.AdamW semantics), the global gradient-norm clip, and the LR schedule.
//!
//! The weight-decay rule lives here, once: parameters with one dimension (biases and norm
//! weights) are not decayed; matrices and embeddings are.
//!
//! Three implementations, chosen by [`Kernels`]: fused (an in-place CPU op per parameter, f64
//! arithmetic, moments in host memory), portable (candle tensor ops in f32 on the parameters'
//! device, moments as device tensors) and cuda (the in-place AdamW and norm kernels of
//! `ops::cuda`, f64 arithmetic as the fused ones, moments in one device tensor per parameter).

use crate::ops::Kernels;
use anyhow::Result;
use candle_core::{DType, Tensor, Var};

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
    pub moments: Moments,
}

/// A parameter's first and second moments (torch's exp_avg, exp_avg_sq).
pub enum Moments {
    /// In host memory, for the fused CPU update.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// As tensors on the parameter's device, for the portable update.
    Device { m: Tensor, v: Tensor },
    /// One [2, n] tensor on the parameter's device (m, then v), updated in place by the
    /// AdamW op of `ops::cuda`.
    Packed { mv: Tensor },
}

impl Moments {
    /// (m, v) in host memory (checkpoints).
    pub fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(match self {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            Moments::Device { m, v } => (m.to_vec1()?, v.to_vec1()?),
            Moments::Packed { mv } => (mv.get(0)?.to_vec1()?, mv.get(1)?.to_vec1()?),
        })
    }

    /// Replaces (m, v) with host values of the same length (a resumed checkpoint).
    pub fn set(&mut self, new_m: Vec<f32>, new_v: Vec<f32>) -> Result<()> {
        match self {
            Moments::Host { m, v } => (*m, *v) = (new_m, new_v),
            Moments::Device { m, v } => {
                let dev = m.device().clone();
                let n = new_m.len();
                (*m, *v) = (
                    Tensor::from_vec(new_m, n, &dev)?,
                    Tensor::from_vec(new_v, n, &dev)?,
                );
            }
            Moments::Packed { mv } => {
                let n = new_m.len();
                if new_v.len() != n || 2 * n != mv.elem_count() {
                    anyhow::bail!("optimizer state: moments of the wrong size");
                }
                let dev = mv.device().clone();
                *mv = Tensor::from_vec([new_m, new_v].concat(), (2, n), &dev)?;
            }
        }
        Ok(())
    }

    /// Elements per moment.
    pub fn len(&self) -> usize {
        match self {
            Moments::Host { m, .. } => m.len(),
            Moments::Device { m, .. } => m.elem_count(),
            Moments::Packed { mv } => mv.elem_count() / 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub slots: Vec<Slot>,
    /// Number of updates taken (for bias correction).
    pub step: u64,
    pub kernels: Kernels,
}

/// Whether a parameter is weight-decayed: not biases and norm weights (the 1-D tensors).
pub fn decays(var: &Var) -> bool {
    var.rank() > 1
}

impl AdamW {
    pub fn new<'a>(
        params: impl Iterator<Item = (&'a str, &'a Var)>,
        config: AdamWConfig,
        kernels: Kernels,
    ) -> Result<Self> {
        let slots = params
            .map(|(name, var)| {
                let n = var.elem_count();
                let moments = match kernels {
                    Kernels::Fused => Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                    Kernels::Portable => {
                        let zeros = || Tensor::zeros(n, DType::F32, var.device());
                        Moments::Device {
                            m: zeros()?,
                            v: zeros()?,
                        }
                    }
                    Kernels::Cuda => Moments::Packed {
                        mv: Tensor::zeros((2, n), DType::F32, var.device())?,
                    },
                };
                Ok(Slot {
                    name: name.to_string(),
                    var: var.clone(),
                    decay: decays(var),
                    moments,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            slots,
            step: 0,
            kernels,
        })
    }

    /// Applies one update with learning rate `lr` from the gradients `grads` (slot order; a
    /// missing gradient counts as zero), each multiplied by `grad_scale` first (the clip
    /// coefficient of [`clip_coef`]; 1 = unclipped), rounded to f32 as torch's in-place clip
    /// does. Parameters are updated in place in their own storage, reading the gradients where
    /// they lie, in parallel chunks; the arithmetic (f64, torch's formula) is the same element by
    /// element whatever the thread count.
    pub fn update(&mut self, grads: &[Option<Tensor>], grad_scale: f64, lr: f64) -> Result<()> {
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
            scale: grad_scale,
        };
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let hyper = Hyper {
                decay: if slot.decay {
                    1.0 - lr * c.weight_decay
                } else {
                    1.0
                },
                ..hyper
            };
            let (m, v) = match &mut slot.moments {
                Moments::Device { m, v } => {
                    (*m, *v) = portable_update(&slot.var, m, v, g.as_ref(), hyper)?;
                    continue;
                }
                Moments::Packed { mv } => {
                    let h = crate::ops::cuda::AdamWHyper {
                        b1: hyper.b1,
                        b2: hyper.b2,
                        bc1: hyper.bc1,
                        bc2: hyper.bc2,
                        eps: hyper.eps,
                        lr: hyper.lr,
                        decay: hyper.decay,
                        scale: hyper.scale,
                    };
                    crate::ops::cuda::adamw_step(&slot.var, mv, g.as_ref(), h)?;
                    continue;
                }
                Moments::Host { m, v } => (m, v),
            };
            let g = g.as_ref().map(|g| g.contiguous()).transpose()?;
            let guard = g.as_ref().map(|g| g.storage_and_layout());
            let grad = match &guard {
                Some((storage, layout)) => Some(f32_data(storage, layout)?),
                None => None,
            };
            let op = AdamWStep {
                hyper,
                grad,
                moments: std::sync::Mutex::new((m, v)),
            };
            slot.var.as_tensor().inplace_op1(&op)?;
        }
        Ok(())
    }
}

/// The portable update of one parameter in f32 tensor ops (torch's formula, as the fused one);
/// returns the new (m, v).
fn portable_update(
    var: &Var,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    h: Hyper,
) -> Result<(Tensor, Tensor)> {
    let shape = var.shape().clone();
    let g = match g {
        Some(g) => g.reshape(m.shape())?,
        None => m.zeros_like()?,
    };
    let g = if h.scale < 1.0 {
        g.affine(h.scale, 0.0)?
    } else {
        g
    };
    let m = (m.affine(h.b1, 0.0)? + g.affine(1.0 - h.b1, 0.0)?)?;
    let v = (v.affine(h.b2, 0.0)? + g.sqr()?.affine(1.0 - h.b2, 0.0)?)?;
    let denom = (v.affine(1.0 / h.bc2, 0.0)?.sqrt()? + h.eps)?;
    let step = (m.affine(h.lr / h.bc1, 0.0)? / denom)?.reshape(&shape)?;
    let p = (var.as_tensor().detach().affine(h.decay, 0.0)? - step)?;
    var.set(&p)?;
    Ok((m, v))
}

/// The contiguous f32 data of a CPU storage.
fn f32_data<'a>(
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let who = "optimizer: a gradient";
    crate::ops::contiguous_f32(crate::ops::cpu_storage(s, who)?, l, who)
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
    /// The gradients' clip coefficient (1 = unclipped).
    scale: f64,
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
                adamw_mv(p, m, v, g, h)
            });
        Ok(())
    }
}

/// One chunk of the update, for whichever gradient form; compiled per instruction set (the
/// baseline build would run this f64 arithmetic two lanes wide).
#[inline(always)]
fn adamw_impl(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Option<&[f32]>, h: Hyper) {
    let n = p.len();
    let (m, v) = (&mut m[..n], &mut v[..n]);
    match g.map(|g| &g[..n]) {
        Some(g) if h.scale < 1.0 => {
            adamw_chunk(p, m, v, |i| (g[i] as f64 * h.scale) as f32 as f64, &h)
        }
        Some(g) => adamw_chunk(p, m, v, |i| g[i] as f64, &h),
        None => adamw_chunk(p, m, v, |_| 0.0, &h),
    }
}

crate::ops::simd::multiversion! {
    fn adamw_mv => adamw_impl(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Option<&[f32]>, h: Hyper) -> ()
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

/// Adds a micro-batch's gradients to the step's (in micro-batch order: deterministic). An
/// in-place gradient buffer (`ops::grad`) is handed out as the same tensor each time and has
/// already summed the micro-batches itself, so it is kept, not added to itself.
pub fn accumulate(acc: &mut [Option<Tensor>], grads: Vec<Option<Tensor>>) -> Result<()> {
    for (a, g) in acc.iter_mut().zip(grads) {
        *a = match (a.take(), g) {
            (Some(a), Some(g)) if a.id() == g.id() => Some(a),
            (Some(a), Some(g)) => Some((a + g)?),
            (a, g) => a.or(g),
        };
    }
    Ok(())
}

/// The global L2 norm of the gradients and torch's clip_grad_norm_ coefficient for `max_norm`:
/// max_norm / (norm + 1e-6), never above 1 (pass it to [`AdamW::update`]).
pub fn clip_coef(grads: &[Option<Tensor>], max_norm: f64, kernels: Kernels) -> Result<(f64, f64)> {
    use rayon::prelude::*;
    // Partial sums over fixed chunks, added in order: deterministic whatever the thread count.
    let mut sq = 0.0;
    for g in grads.iter().flatten() {
        if kernels == Kernels::Cuda {
            sq += crate::ops::cuda::sum_squares(g)?;
            continue;
        }
        if kernels == Kernels::Portable {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            continue;
        }
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        let data = f32_data(&storage, layout)?;
        let partial: Vec<f64> = data.par_chunks(CHUNK).map(sum_squares_mv).collect();
        sq += partial.iter().sum::<f64>();
    }
    let norm = sq.sqrt();
    Ok((norm, (max_norm / (norm + 1e-6)).min(1.0)))
}

crate::ops::simd::multiversion! {
    fn sum_squares_mv => sum_squares(x: &[f32]) -> f64
}

/// Σ x² in f64, in 16 independent lanes added in a fixed order (a single running sum is one
/// long dependency chain: ~4x slower than memory here).
#[inline(always)]
fn sum_squares(x: &[f32]) -> f64 {
    const L: usize = 16;
    let mut acc = [0f64; L];
    let blocks = x.chunks_exact(L);
    let tail = blocks.remainder();
    for b in blocks {
        for (a, &v) in acc.iter_mut().zip(b) {
            *a += v as f64 * v as f64;
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| v as f64 * v as f64).sum::<f64>()
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
    fn sum_of_squares_in_lanes_matches_a_plain_sum() {
        for n in [0usize, 1, 15, 16, 17, 1000, 4099] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5)
                .collect();
            let plain: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let lanes = sum_squares_mv(&x);
            assert!((lanes - plain).abs() <= 1e-14 * plain.max(1e-300), "n={n}");
        }
    }

    #[test]
    fn clip_coefficient_is_torchs() -> Result<()> {
        let t = |v: &[f32]| Some(Tensor::new(v, &candle_core::Device::Cpu).unwrap());
        for k in [Kernels::Fused, Kernels::Portable, Kernels::Cuda] {
            let (n, coef) = clip_coef(&[t(&[3.0, 0.0]), None, t(&[4.0])], 1.0, k)?;
            assert!((n - 5.0).abs() < 1e-9);
            assert!((coef - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
            assert_eq!(clip_coef(&[t(&[0.1])], 1.0, k)?.1, 1.0, "never above 1");
        }
        Ok(())
    }
}
