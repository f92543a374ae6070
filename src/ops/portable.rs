//! The portable kernels: how each op of the model vocabulary is computed from candle tensor ops
//! alone, so it runs on any candle device (CPU, CUDA) and every gradient comes from candle's own
//! backward. candle-nn's fused softmax and norms are not used: they have no backward pass.
//! This is the first GPU path and the fused CPU kernels' test oracle; it materialises more
//! temporaries than the fused kernels and is slower on the CPU.

use super::{Activation, Weight};
use candle_core::{bail, DType, Result, Tensor, D};

/// y = x·Wᵀ + b for x [.., in]; a bf16 weight is widened to the input's dtype first; a
/// bf16-mixed student's weight multiplies as [`linear_bf16_mixed`] says.
pub fn linear(w: &Weight, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (w, out_in) = match w {
        Weight::F32 {
            w,
            out_in,
            bf16_mixed: true,
            ..
        } => return linear_bf16_mixed(w, *out_in, x, b),
        Weight::F32 { w, out_in, .. } => (w.clone(), *out_in),
        Weight::Bf16Tensor { w, out_in } => (w.to_dtype(x.dtype())?, *out_in),
        Weight::Packed(_) => bail!("a packed weight belongs to the fused CPU kernels"),
    };
    let w = if out_in { w.t()? } else { w };
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let y = x.reshape(((), inp))?.matmul(&w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = y.dim(1)?;
    y.reshape(out)
}

/// A linear layer of a bf16-mixed student, as torch.autocast(dtype=bfloat16) computes one: x,
/// the f32 master W and the bias rounded to bf16 (RNE), x·W + b accumulated in f32 and rounded
/// once to bf16 (candle widens to the f32 gemm on the CPU; cuBLAS bf16 with f32 compute on
/// CUDA), read as f32. The bias joins the product as a row of W times a column of ones in x
/// (7 zero columns keep k a multiple of 8 for the tensor cores): adding it after the product's
/// rounding would round twice, one bf16 rounding per layer away from torch. Backward through
/// candle's autograd: the upstream gradient rounded to bf16, dx = g·W, dW = gᵀ·x and db = Σ g
/// as bf16 products, each widened to f32 into the master's gradient (torch's ToCopyBackward).
pub fn linear_bf16_mixed(
    w: &Tensor,
    out_in: bool,
    x: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let (x2, w2) = mixed_operands(w, out_in, x, b)?;
    mixed_product(&x2, &w2, x.dims())
}

/// The bf16 product of [`mixed_operands`], widened to f32 and shaped as x with `x_dims`.
pub(crate) fn mixed_product(x2: &Tensor, w2: &Tensor, x_dims: &[usize]) -> Result<Tensor> {
    let y = x2.matmul(w2)?.to_dtype(DType::F32)?;
    let mut out = x_dims.to_vec();
    *out.last_mut().unwrap() = y.dim(1)?;
    y.reshape(out)
}

/// The bf16 operands of [`linear_bf16_mixed`]'s one product: x as [m, k] and W as [k, n], with
/// the bias row and the ones column (and 7 zero rows and columns) when there is a bias.
pub(crate) fn mixed_operands(
    w: &Tensor,
    out_in: bool,
    x: &Tensor,
    b: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let w = w.to_dtype(DType::BF16)?;
    let w = if out_in { w.t()? } else { w }; // [k, n]
    let inp = x.dim(x.rank() - 1)?;
    let x = x.reshape(((), inp))?.to_dtype(DType::BF16)?; // [m, k]
    Ok(match b {
        Some(b) => {
            let (m, n, dev) = (x.dim(0)?, w.dim(1)?, x.device());
            let ones = Tensor::ones((m, 1), DType::BF16, dev)?;
            let x = Tensor::cat(&[&x, &ones, &Tensor::zeros((m, 7), DType::BF16, dev)?], 1)?;
            let bias = b.to_dtype(DType::BF16)?.reshape((1, n))?;
            let w = Tensor::cat(&[&w, &bias, &Tensor::zeros((7, n), DType::BF16, dev)?], 0)?;
            (x, w)
        }
        None => (x, w),
    })
}

/// Rows of W as [out, in] for the ids (any shape) → [n, in]; candle's `index_select`, whose
/// backward adds the rows' gradients into a fresh [vocab, d] tensor.
pub fn embed(w: &Weight, ids: &Tensor) -> Result<Tensor> {
    let ids = ids.flatten_all()?;
    match w {
        Weight::F32 {
            w, out_in: true, ..
        } => w.index_select(&ids, 0),
        Weight::F32 {
            w, out_in: false, ..
        } => w.t()?.index_select(&ids, 0),
        Weight::Bf16Tensor { w, out_in: true } => w.index_select(&ids, 0)?.to_dtype(DType::F32),
        Weight::Bf16Tensor { w, out_in: false } => {
            w.t()?.index_select(&ids, 0)?.to_dtype(DType::F32)
        }
        Weight::Packed(_) => bail!("a packed weight belongs to the fused CPU kernels"),
    }
}

/// LayerNorm (with `bias`; biased variance, as torch) or RMSNorm (without) over the last
/// dimension, composed of differentiable candle ops.
pub fn norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let xc = match bias {
        Some(_) => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
        None => x.clone(),
    };
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// candle's activations (each has a backward).
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh => x.gelu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
    }
}

/// Softmax over the last dimension. The max is detached: softmax is shift-invariant, so the
/// gradient is unchanged and we avoid differentiating through `max`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Scaled dot-product attention. q [b, h, tq, d]; k, v [b, h_kv, tk, d] (grouped-query
/// attention shares each kv head among h / h_kv query heads); bias [b, 1, tq, tk].
/// Returns [b, tq, h·d].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, |scores| {
        softmax_last_dim(&(scores * scale)?.broadcast_add(bias)?)
    })
}

/// [`attention`] with the probabilities made from the raw scores q·kᵀ [b, h, tq, tk] by
/// `probs` (the scale, the bias and the softmax): the CUDA kernel set passes its fused softmax.
pub(crate) fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let (k, v) = if h_kv == h {
        (k.clone(), v.clone())
    } else {
        (repeat_kv(k, h / h_kv)?, repeat_kv(v, h / h_kv)?)
    };
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = probs(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?; // [b, h, tq, d]
    out.transpose(1, 2)?.reshape((b, tq, h * d))
}

/// Self-attention from a fused projection qkv [b, t, 3·h·d] (q, k and v side by side, `heads`
/// heads each, as GPT-2's `c_attn`); bias [b, 1, t, t]. Returns [b, t, h·d].
pub fn attention_qkv(qkv: &Tensor, heads: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = split_qkv(qkv, heads)?;
    attention(&q, &k, &v, bias, scale)
}

/// q, k, v [b, h, t, d] as views of a fused projection qkv [b, t, 3·h·d].
pub(crate) fn split_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, w) = qkv.dims3()?;
    let part = |j: usize| {
        qkv.narrow(D::Minus1, j * w / 3, w / 3)?
            .reshape((b, t, heads, w / 3 / heads))?
            .transpose(1, 2)
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// [b, h_kv, t, d] -> [b, h_kv·n, t, d], each kv head repeated n times in place (as transformers).
pub(crate) fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, h_kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h_kv, n, t, d))?
        .reshape((b, h_kv * n, t, d))
}
