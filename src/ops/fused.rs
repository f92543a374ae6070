//! The fused kernels: how each op of the model vocabulary is computed on the CPU by pocl's own
//! kernels (f32, or packed once for a frozen model). One function per op; the arithmetic lives
//! in the kernel modules named in each. Inputs are CPU tensors: [`crate::backend::Backend`]
//! never pairs these kernels with another device, so nothing here checks one.

use super::attention as att;
use super::gemm;
use super::linear::{Embed, Linear, PackedMatmul};
use super::norm;
use super::Weight;
use candle_core::{bail, DType, Result, Tensor};

/// y = x·Wᵀ + b for x [.., in] ([`super::linear`]): the fused linear op with its backward; a
/// streamed matmul for the few rows of decoding; the bf16 kernel for a packed frozen matrix.
pub fn linear(w: &Weight, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (rows, inp) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let x2 = x.reshape((rows, inp))?;
    let y = match w {
        // torch.autocast's arithmetic is a composition of candle ops (bf16 products; slower
        // than the f32 gemm on the CPU, see README): one implementation for every kernel set.
        Weight::F32 {
            bf16_mixed: true, ..
        } => return super::portable::linear(w, x, b),
        Weight::F32 {
            w, out_in, grad, ..
        } => {
            // Few rows (decoding) and nothing to differentiate: stream the weight instead of
            // having the gemm pack all of it for a handful of rows.
            if rows <= gemm::SKINNY_ROWS && !x.track_op() && !w.track_op() {
                let y = x2
                    .contiguous()?
                    .apply_op2_no_bwd(&w.contiguous()?, &gemm::Skinny { out_in: *out_in })?;
                match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            } else {
                let op = Linear {
                    out_in: *out_in,
                    grad: grad.clone(),
                };
                let (x2, w) = (x2.contiguous()?, w.contiguous()?);
                match b {
                    Some(b) => x2.apply_op3(&w, &b.contiguous()?, op)?,
                    None => x2.apply_op2(&w, op)?,
                }
            }
        }
        Weight::Packed(p) => {
            // The bias is added inside the op (one pass over the output instead of two).
            let bias = b
                .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()?;
            x2.to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(&PackedMatmul(p.clone(), bias))?
        }
        Weight::Bf16Tensor { .. } => {
            bail!("a bf16 tensor weight belongs to the portable kernels")
        }
    };
    let mut out = dims;
    *out.last_mut().unwrap() = y.dim(1)?;
    y.reshape(out)
}

/// Rows of W as [out, in] for the ids (any shape) → [n, in]. A trainable embedding adds its
/// gradient rows into its in-place buffer ([`super::grad`]); a packed one is unpacked.
pub fn embed(w: &Weight, ids: &Tensor) -> Result<Tensor> {
    let ids = ids.flatten_all()?;
    match w {
        Weight::F32 {
            w,
            out_in: true,
            grad: Some(g),
            ..
        } if w.track_op() => {
            let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            w.apply_op1(Embed {
                ids,
                grad: g.clone(),
            })
        }
        Weight::F32 {
            w, out_in: true, ..
        } => w.index_select(&ids, 0),
        Weight::F32 {
            w, out_in: false, ..
        } => w.t()?.index_select(&ids, 0),
        Weight::Packed(p) => {
            let k = p.k();
            let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let mut out = vec![0f32; ids.len() * k];
            for (row, &j) in out.chunks_mut(k.max(1)).zip(&ids) {
                if j as usize >= p.n_out() {
                    bail!("token id {j} is outside the embedding ({} rows)", p.n_out());
                }
                p.row(j as usize, row);
            }
            Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
        }
        Weight::Bf16Tensor { .. } => {
            bail!("a bf16 tensor weight belongs to the portable kernels")
        }
    }
}

/// LayerNorm over the last dimension ([`super::norm`]).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    norm::layer_norm(x, weight, bias, eps)
}

/// RMSNorm over the last dimension ([`super::norm`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    norm::rms_norm(x, weight, eps)
}

/// Scaled dot-product attention ([`super::attention`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    att::attention(q, k, v, bias, scale)
}

/// Self-attention with the heads read in place from a fused qkv projection.
pub fn attention_qkv(qkv: &Tensor, heads: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    att::attention_qkv(&qkv.contiguous()?, heads, bias, scale)
}
