//! Linear layers, y = x·Wᵀ + b, whatever form W takes: f32 in either layout (trainable or frozen;
//! the packed gemm, or a streamed matmul for the few rows of decoding), or bf16 packed once for a
//! frozen model (the teacher), which computes on AMX tiles where the CPU has them.

use super::bf16::PackedBf16;
use super::gemm;
use super::grad::GradBuffer;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// A linear layer's (or a tied embedding's) weight as a model computes with it.
#[derive(Clone)]
pub enum Weight {
    /// f32; `out_in`: torch `nn.Linear` layout [out, in], else GPT-2's Conv1D [in, out].
    /// `grad`: a trainable model's in-place gradient buffer (see [`super::grad`]), shared by
    /// every use of the matrix (a tied embedding and lm head write into the same one).
    F32 {
        w: Tensor,
        out_in: bool,
        grad: Option<Arc<GradBuffer>>,
    },
    /// A frozen model's matrix in bf16 (RNE), packed once; no f32 copy is kept.
    Bf16(Arc<PackedBf16>),
}

impl Weight {
    /// An f32 weight in torch `nn.Linear` layout [out, in] (also an embedding [vocab, d]).
    pub fn out_in(w: Tensor) -> Self {
        Weight::F32 {
            w,
            out_in: true,
            grad: None,
        }
    }

    /// An f32 weight in GPT-2 Conv1D layout [in, out].
    pub fn in_out(w: Tensor) -> Self {
        Weight::F32 {
            w,
            out_in: false,
            grad: None,
        }
    }

    /// A trainable weight with its own in-place gradient buffer (`Params::weight` makes these).
    pub fn trainable(w: Tensor, out_in: bool, grad: Arc<GradBuffer>) -> Self {
        Weight::F32 {
            w,
            out_in,
            grad: Some(grad),
        }
    }

    /// The same weight cut from autograd: for forward passes nobody differentiates (the dev
    /// loss), so that the fused head does not compute a gradient for it.
    pub fn detach(&self) -> Self {
        match self {
            Weight::F32 { w, out_in, .. } => Weight::F32 {
                w: w.detach(),
                out_in: *out_in,
                grad: None,
            },
            Weight::Bf16(p) => Weight::Bf16(p.clone()),
        }
    }

    /// The in-place gradient buffer, if the weight has one and is tracked by autograd.
    pub fn grad_buffer(&self) -> Option<&Arc<GradBuffer>> {
        match self {
            Weight::F32 {
                w, grad: Some(g), ..
            } if w.track_op() => Some(g),
            _ => None,
        }
    }

    /// Converts a frozen f32 weight to packed bf16 (the caller drops the f32 tensor).
    pub fn to_bf16(w: &Tensor, out_in: bool) -> Result<Self> {
        let (r, c) = w.dims2()?;
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Weight::Bf16(Arc::new(if out_in {
            PackedBf16::from_out_in(&data, r, c)
        } else {
            PackedBf16::from_in_out(&data, r, c)
        })))
    }

    /// The f32 tensor, if this weight is f32 (trainable weights always are).
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Weight::F32 { w, .. } => Some(w),
            Weight::Bf16(_) => None,
        }
    }

    /// (out, in) features.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::F32 {
                w, out_in: true, ..
            } => w.dims2()?,
            Weight::F32 {
                w, out_in: false, ..
            } => {
                let (i, o) = w.dims2()?;
                (o, i)
            }
            Weight::Bf16(p) => (p.n_out(), p.k()),
        })
    }

    /// y = x·Wᵀ + b for x [.., in].
    pub fn forward(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inp) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let x2 = x.reshape((rows, inp))?;
        let y = match self {
            Weight::F32 { w, out_in, .. } => {
                // Few rows (decoding) and nothing to differentiate: stream the weight instead of
                // having the gemm pack all of it for a handful of rows.
                let skinny = rows <= gemm::SKINNY_ROWS
                    && x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && w.dtype() == DType::F32
                    && !x.track_op()
                    && !w.track_op();
                if skinny {
                    x2.contiguous()?
                        .apply_op2_no_bwd(&w.contiguous()?, &gemm::Skinny { out_in: *out_in })?
                } else if *out_in {
                    x2.matmul(&w.t()?)?
                } else {
                    x2.matmul(w)?
                }
            }
            Weight::Bf16(p) => {
                // The bias is added inside the op (one pass over the output instead of two).
                let bias = b
                    .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                    .transpose()?;
                let y = x2
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&Bf16Matmul(p.clone(), bias))?;
                let mut out = dims;
                *out.last_mut().unwrap() = y.dim(1)?;
                return y.reshape(out);
            }
        };
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }

    /// Rows of W as [out, in] for the ids (any shape) → [n, in]: the lookup of an embedding that
    /// may be stored packed as the tied lm head.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?;
        match self {
            Weight::F32 {
                w,
                out_in: true,
                grad: Some(g),
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
            Weight::Bf16(p) => {
                let k = p.k();
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * k];
                for (row, &j) in out.chunks_mut(k.max(1)).zip(&ids) {
                    if j as usize >= p.n_out() {
                        candle_core::bail!(
                            "token id {j} is outside the embedding ({} rows)",
                            p.n_out()
                        );
                    }
                    p.row(j as usize, row);
                }
                Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
            }
        }
    }
}

/// The rows `ids` of a trainable [vocab, d] matrix whose gradient lives in a [`GradBuffer`]:
/// the backward pass adds each row's gradient into the buffer in id order (candle's
/// `index_add` order, so the sums are the same to the bit) instead of building a fresh
/// [vocab, d] gradient for candle to add.
struct Embed {
    ids: Vec<u32>,
    grad: Arc<GradBuffer>,
}

impl CustomOp1 for Embed {
    fn name(&self) -> &'static str {
        "pocl-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (v, d) = l.shape().dims2()?;
        let w = super::contiguous_f32(s, l, "embedding")?;
        let mut out = vec![0f32; self.ids.len() * d];
        for (row, &j) in out.chunks_mut(d.max(1)).zip(&self.ids) {
            if j as usize >= v {
                candle_core::bail!("token id {j} is outside the embedding ({v} rows)");
            }
            let j = j as usize;
            row.copy_from_slice(&w[j * d..(j + 1) * d]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), d))))
    }

    fn bwd(&self, _w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let (guard, layout) = g.storage_and_layout();
        let who = "embedding gradient";
        let g = super::contiguous_f32(super::cpu_storage(&guard, who)?, layout, who)?;
        self.grad.write_now(|buf, overwrite| {
            if overwrite {
                buf.fill(0.0);
            }
            let d = g.len() / self.ids.len().max(1);
            for (row, &j) in g.chunks(d.max(1)).zip(&self.ids) {
                let j = j as usize;
                for (b, &x) in buf[j * d..(j + 1) * d].iter_mut().zip(row) {
                    *b += x;
                }
            }
            Ok(())
        })?;
        // The weight's gradient is in the buffer; candle gets none to add.
        Ok(None)
    }
}

/// x [m, k] f32 → x·Wᵀ (+ bias) [m, n] with the packed bf16 W (forward only: frozen models).
struct Bf16Matmul(Arc<PackedBf16>, Option<Vec<f32>>);

impl CustomOp1 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "pocl-bf16-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("bf16 matmul: the input must be f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("bf16 matmul: the input must be contiguous")
        };
        let (m, k) = l.shape().dims2()?;
        let p = &self.0;
        if k != p.k() {
            candle_core::bail!(
                "bf16 matmul: input [{m}, {k}] vs weight [{}, {}]",
                p.n_out(),
                p.k()
            );
        }
        let n = p.n_out();
        let mut y = vec![0f32; m * n];
        p.matmul(&x[a..b], m, &mut y, n);
        if let Some(bias) = &self.1 {
            if bias.len() != n {
                candle_core::bail!("bf16 matmul: bias of {} for {n} outputs", bias.len());
            }
            for row in y.chunks_mut(n.max(1)) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}
