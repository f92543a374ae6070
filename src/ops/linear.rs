//! Linear layers, y = x·Wᵀ + b, whatever form W takes: f32 in either layout (trainable or frozen;
//! the packed gemm, or a streamed matmul for the few rows of decoding), or bf16 packed once for a
//! frozen model (the teacher), which computes on AMX tiles where the CPU has them.

use super::bf16::PackedBf16;
use super::gemm;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// A linear layer's (or a tied embedding's) weight as a model computes with it.
#[derive(Clone)]
pub enum Weight {
    /// f32; `out_in`: torch `nn.Linear` layout [out, in], else GPT-2's Conv1D [in, out].
    F32 { w: Tensor, out_in: bool },
    /// A frozen model's matrix in bf16 (RNE), packed once; no f32 copy is kept.
    Bf16(Arc<PackedBf16>),
}

impl Weight {
    /// An f32 weight in torch `nn.Linear` layout [out, in] (also an embedding [vocab, d]).
    pub fn out_in(w: Tensor) -> Self {
        Weight::F32 { w, out_in: true }
    }

    /// An f32 weight in GPT-2 Conv1D layout [in, out].
    pub fn in_out(w: Tensor) -> Self {
        Weight::F32 { w, out_in: false }
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
            Weight::F32 { w, out_in: true } => w.dims2()?,
            Weight::F32 { w, out_in: false } => {
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
            Weight::F32 { w, out_in } => {
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
            Weight::F32 { w, out_in: true } => w.index_select(&ids, 0),
            Weight::F32 { w, out_in: false } => w.t()?.index_select(&ids, 0),
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
