//! Building blocks shared by the model families: fused CPU ops with their backward (norms,
//! attention softmax, activations), linear layers (f32 gemm, streamed matmul for decoding, bf16
//! for frozen models), attention.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `layer_norm` have no backward pass: gradients
//! through them would be silently dropped, so they are not used; ours have one, and the model
//! tests check that every parameter receives a gradient.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod gemm;
pub mod grad;
pub mod linear;
pub mod norm;
pub mod simd;
pub mod softmax;

pub use linear::Weight;
pub use norm::{layer_norm, rms_norm};

use crate::model::config::Activation;
use candle_core::{DType, Device, Result, Tensor, D};

/// Softmax over the last dimension. The max is detached: softmax is shift-invariant, so the
/// gradient is unchanged and we avoid differentiating through `max`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
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

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh => activation::apply(x, activation::Kind::GeluTanh),
        Activation::GeluErf => x.gelu_erf(),
        Activation::Relu => x.relu(),
        Activation::Silu => activation::apply(x, activation::Kind::Silu),
    }
}

/// Large negative instead of -inf: a fully masked row (a left-padding query) then gets a uniform,
/// finite distribution rather than NaN, which would poison the gradients.
pub const MASKED: f32 = -1e9;

/// Additive attention bias [b, 1, q, k] for `q` new queries over `k` keys, where the new tokens are
/// the last `q` of the `k` (a KV cache holds the first k − q). `key_mask` [b, k] is 1 for real
/// tokens and 0 for padding.
pub fn attention_bias(key_mask: &Tensor, q: usize) -> Result<Tensor> {
    let (b, k) = key_mask.dims2()?;
    let past = k - q;
    let causal: Vec<f32> = (0..q)
        .flat_map(|i| (0..k).map(move |j| if j <= past + i { 0.0 } else { MASKED }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, q, k), &Device::Cpu)?;
    let keys =
        ((key_mask.to_dtype(DType::F32)? - 1.0)? * (-MASKED as f64))?.reshape((b, 1, 1, k))?;
    causal.broadcast_add(&keys)?.clamp(MASKED, 0.0)
}

/// Scaled dot-product attention. q [b, h, tq, d]; k, v [b, h_kv, tk, d] (grouped-query attention
/// shares each kv head among h / h_kv query heads); bias [b, 1, tq, tk]. Returns [b, tq, h·d].
/// On the CPU in f32 the fused op of [`attention`](mod@attention), elsewhere the composition.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(q) && f32_cpu(k) && f32_cpu(v) && f32_cpu(bias) {
        return attention::attention(q, k, v, bias, scale);
    }
    attention_composed(q, k, v, bias, scale)
}

/// Self-attention from a fused projection qkv [b, t, 3·h·d] (q, k and v side by side, `heads`
/// heads each, as GPT-2's `c_attn`); bias [b, 1, t, t]. Returns [b, t, h·d]. On the CPU in f32
/// the fused op reads the heads in place ([`attention::attention_qkv`]).
pub fn attention_qkv(qkv: &Tensor, heads: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        return attention::attention_qkv(&qkv.contiguous()?, heads, bias, scale);
    }
    let (b, t, w) = qkv.dims3()?;
    let part = |j: usize| {
        qkv.narrow(D::Minus1, j * w / 3, w / 3)?
            .reshape((b, t, heads, w / 3 / heads))?
            .transpose(1, 2)
    };
    attention_composed(&part(0)?, &part(1)?, &part(2)?, bias, scale)
}

/// [`attention`] composed of candle ops, for other devices and dtypes.
fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let (k, v) = if h_kv == h {
        (k.clone(), v.clone())
    } else {
        (repeat_kv(k, h / h_kv)?, repeat_kv(v, h / h_kv)?)
    };
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = softmax_last_dim(&(scores * scale)?.broadcast_add(bias)?)?;
    let out = probs.matmul(&v.contiguous()?)?; // [b, h, tq, d]
    out.transpose(1, 2)?.reshape((b, tq, h * d))
}

/// [b, h_kv, t, d] -> [b, h_kv·n, t, d], each kv head repeated n times in place (as transformers).
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, h_kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h_kv, n, t, d))?
        .reshape((b, h_kv * n, t, d))
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
