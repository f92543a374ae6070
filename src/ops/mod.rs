//! The model ops, the boundary between the model code and how it is computed: linear layers,
//! the embedding, norms, activations and attention (and, in `kd` and `train::optim`, the lm head
//! fused with the KD loss and AdamW). Model code calls them through [`Kernels`], whose methods
//! below are the one place where the kernel choice is applied; each implementation is one file:
//! [`fused`] (pocl's CPU kernels, in the modules it names), [`portable`] (candle tensor ops,
//! any device) and, for [`Kernels::Cuda`], [`cuda`] (pocl's CUDA kernels: the KD head's row
//! kernel, AdamW, the gradient norm, the norms through [`norm`]'s ops, the attention softmax)
//! with the portable ops for everything else.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `layer_norm` have no backward pass: gradients
//! through them would be silently dropped, so they are not used; ours have one, and the model
//! tests check that every parameter receives a gradient.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod cuda;
pub mod fastmath;
pub mod fused;
pub mod gemm;
pub mod grad;
pub mod linear;
pub mod norm;
pub mod portable;
pub mod profile;
pub mod recompute;
pub mod simd;
pub mod softmax;

pub use crate::backend::Kernels;

/// A model's MLP activation (config.json's `activation_function` / `hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// exact erf GELU (`gelu`).
    GeluErf,
    Relu,
    Silu,
}
pub use linear::Weight;
pub use portable::softmax_last_dim;

use candle_core::{DType, Device, Result, Tensor};

impl Kernels {
    /// y = x·Wᵀ + b for x [.., in], whatever form W takes.
    pub fn linear(self, w: &Weight, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        profile::time("linear", x.device(), || match self {
            Kernels::Fused => fused::linear(w, x, b),
            Kernels::Portable => portable::linear(w, x, b),
            Kernels::Cuda => cuda::linear(w, x, b),
        })
    }

    /// Rows of the [vocab, d] matrix W for the ids (any shape) → [n, d].
    pub fn embed(self, w: &Weight, ids: &Tensor) -> Result<Tensor> {
        profile::time("embed", ids.device(), || match self {
            Kernels::Fused => fused::embed(w, ids),
            Kernels::Portable => portable::embed(w, ids),
            Kernels::Cuda => cuda::embed(w, ids),
        })
    }

    /// LayerNorm over the last dimension (biased variance, as torch).
    pub fn layer_norm(self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        profile::time("layer_norm", x.device(), || {
            match self {
                Kernels::Fused => fused::layer_norm(x, w, b, eps),
                // The CPU's norm op, whose cuda_fwd runs pocl's norm kernels on CUDA storage.
                Kernels::Cuda => norm::layer_norm(x, w, b, eps),
                Kernels::Portable => portable::norm(x, w, Some(b), eps),
            }
        })
    }

    /// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) · weight (Llama, Qwen).
    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        profile::time("rms_norm", x.device(), || match self {
            Kernels::Fused => fused::rms_norm(x, w, eps),
            Kernels::Cuda => norm::rms_norm(x, w, eps),
            Kernels::Portable => portable::norm(x, w, None, eps),
        })
    }

    /// act(x·Wᵀ + b): an MLP's first half.
    pub fn linear_activate(
        self,
        w: &Weight,
        x: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
    ) -> Result<Tensor> {
        match self {
            Kernels::Fused | Kernels::Portable => self.activate(&self.linear(w, x, b)?, act),
            Kernels::Cuda => profile::time("linear_activate", x.device(), || {
                cuda::linear_activate(w, x, b, act)
            }),
        }
    }

    pub fn activate(self, x: &Tensor, act: Activation) -> Result<Tensor> {
        profile::time("activate", x.device(), || match self {
            // pocl's op for GELU-tanh and SiLU (its CPU or CUDA kernel), candle's for the rest.
            Kernels::Fused | Kernels::Cuda => activation::activate(x, act),
            Kernels::Portable => portable::activate(x, act),
        })
    }

    /// Scaled dot-product attention. q [b, h, tq, d]; k, v [b, h_kv, tk, d] (grouped-query
    /// attention shares each kv head among h / h_kv query heads); bias [b, 1, tq, tk] from
    /// [`attention_bias`]. Returns [b, tq, h·d].
    pub fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        profile::time("attention", q.device(), || match self {
            Kernels::Fused => fused::attention(q, k, v, bias, scale),
            Kernels::Portable => portable::attention(q, k, v, bias, scale),
            Kernels::Cuda => recompute::attention(q, k, v, bias, scale),
        })
    }

    /// Self-attention from a fused projection qkv [b, t, 3·h·d] (q, k and v side by side,
    /// `heads` heads each, as GPT-2's `c_attn`); bias [b, 1, t, t]. Returns [b, t, h·d].
    pub fn attention_qkv(
        self,
        qkv: &Tensor,
        heads: usize,
        bias: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        profile::time("attention", qkv.device(), || match self {
            Kernels::Fused => fused::attention_qkv(qkv, heads, bias, scale),
            Kernels::Portable => portable::attention_qkv(qkv, heads, bias, scale),
            Kernels::Cuda => recompute::attention_qkv(qkv, heads, bias, scale),
        })
    }
}

/// The data of a contiguous f32 CPU tensor, for the fused ops; `who` names it in errors.
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    who: &str,
) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!("{who} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{who} must be contiguous"),
    }
}

/// A zeroed f32 buffer for an op's output, written by the whole pool: `vec![0.0; n]` is a
/// memset on the calling thread while the pool's threads wait (a few percent of a training step
/// over all the ops' outputs).
pub(crate) fn zeros_par(len: usize) -> Vec<f32> {
    use rayon::iter::ParallelExtend;
    // Below ~1 MB the memset is shorter than waking the pool (decoding's per-token outputs).
    if len < 1 << 18 {
        return vec![0f32; len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len));
    v
}

/// The CPU storage behind a tensor's storage guard.
pub(crate) fn cpu_storage<'a>(
    s: &'a candle_core::Storage,
    who: &str,
) -> Result<&'a candle_core::CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{who} must be on the CPU"),
    }
}

/// Large negative instead of -inf: a fully masked row (a left-padding query) then gets a uniform,
/// finite distribution rather than NaN, which would poison the gradients.
pub const MASKED: f32 = -1e9;

/// Additive attention bias [b, 1, q, k] for `q` new queries over `k` keys, where the new tokens are
/// the last `q` of the `k` (a KV cache holds the first k − q). `key_mask` [b, k] is 1 for real
/// tokens and 0 for padding. Made on the mask's device.
pub fn attention_bias(key_mask: &Tensor, q: usize) -> Result<Tensor> {
    let (b, k) = key_mask.dims2()?;
    let past = k - q;
    let causal: Vec<f32> = (0..q)
        .flat_map(|i| (0..k).map(move |j| if j <= past + i { 0.0 } else { MASKED }))
        .collect();
    let causal =
        Tensor::from_vec(causal, (1, 1, q, k), &Device::Cpu)?.to_device(key_mask.device())?;
    let keys =
        ((key_mask.to_dtype(DType::F32)? - 1.0)? * (-MASKED as f64))?.reshape((b, 1, 1, k))?;
    causal.broadcast_add(&keys)?.clamp(MASKED, 0.0)
}

/// Position ids from an attention mask [b, t]: the count of real tokens before each one, so left
/// padding does not shift positions (padding positions get 0).
pub fn positions_from_mask(mask: &[Vec<u32>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let mut n = 0u32;
            row.iter()
                .map(|&m| {
                    n += u32::from(m > 0);
                    n.saturating_sub(1)
                })
                .collect()
        })
        .collect()
}

/// Deterministic values in [-0.5, 0.5) from a linear congruential generator, for the ops' tests.
#[cfg(test)]
pub(crate) fn test_values(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_padding() {
        let p = positions_from_mask(&[vec![0, 0, 1, 1, 1], vec![1, 1, 1, 0, 0]]);
        assert_eq!(p, vec![vec![0, 0, 0, 1, 2], vec![0, 1, 2, 2, 2]]);
    }

    #[test]
    fn softmax_has_a_gradient() -> Result<()> {
        let x = candle_core::Var::new(&[[1f32, 2.0, 3.0]], &Device::Cpu)?;
        let y = softmax_last_dim(x.as_tensor())?;
        let loss = y.narrow(1, 0, 1)?.sum_all()?;
        let g = loss.backward()?;
        let g = g.get(x.as_tensor()).expect("gradient").to_vec2::<f32>()?;
        let p: Vec<f32> = {
            let e: Vec<f32> = [1f32, 2.0, 3.0].iter().map(|v| (v - 3.0).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        // d p0 / d x_j = p0 (δ0j − p_j)
        for j in 0..3 {
            let want = p[0] * (if j == 0 { 1.0 } else { 0.0 } - p[j]);
            assert!((g[0][j] - want).abs() < 1e-6, "{j}: {} vs {want}", g[0][j]);
        }
        Ok(())
    }

    #[test]
    fn bias_masks_future_and_padding() -> Result<()> {
        let mask = Tensor::new(&[[0u32, 1, 1]], &Device::Cpu)?;
        let b = attention_bias(&mask, 3)?
            .reshape((3, 3))?
            .to_vec2::<f32>()?;
        assert_eq!(b[2], vec![MASKED, 0.0, 0.0]);
        assert_eq!(b[1], vec![MASKED, 0.0, MASKED]);
        assert_eq!(b[0], vec![MASKED, MASKED, MASKED]);
        Ok(())
    }
}
