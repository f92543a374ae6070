//! Ops whose backward recomputes its intermediates from the op's inputs, for the student under
//! the CUDA kernel set (activation checkpointing, one op at a time).
//!
//! candle's autograd keeps every tensor of a composition alive until the backward pass, since
//! each result holds its inputs. The attention composition keeps copies of q, k and v and the
//! [b, h, t, t] scores and probabilities; the bf16-mixed linear keeps its casts and concatenations.
//! On the large workload that was ~1.5 GB per GPT-2 layer, most of the student's memory.
//!
//! Here the forward runs as detached tensor ops and the op hands its result to candle's graph,
//! which then holds only the op's inputs and output. The backward recomputes the rest:
//! - attention: one more q·kᵀ product and softmax;
//! - the mixed linear: the bf16 casts.
//!
//! The backward then runs the same candle ops, on the same layouts and in the same order, that
//! candle's autograd runs for the composition, so the gradients are the composition's to the
//! bit (tests below). An input that needs no gradient (a frozen teacher) skips the op.

use super::Activation;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Scaled dot-product attention as [`super::cuda::attention`] computes it (q [b, h, tq, d];
/// k, v [b, h_kv, tk, d]; bias [b, 1, tq, tk]; returns [b, tq, h·d]), keeping only q, k, v and
/// the output for the backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let out = super::cuda::attention(&q.detach(), &k.detach(), &v.detach(), bias, scale)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        Attention {
            bias: bias.detach(),
            scale,
            out: Precomputed::new(out)?,
        },
    )
}

/// [`attention`] from a fused projection qkv [b, t, 3·h·d] (GPT-2's `c_attn`), keeping only
/// qkv and the output: split into q, k and v in the op, not before it, since splitting copies
/// them (a reshape of a strided view) and the graph would keep the copies.
pub fn attention_qkv(qkv: &Tensor, heads: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let detached = qkv.detach();
    let (q, k, v) = super::portable::split_qkv(&detached, heads)?;
    let out = super::cuda::attention(&q, &k, &v, bias, scale)?;
    if !qkv.track_op() {
        return Ok(out);
    }
    let op = Attention {
        bias: bias.detach(),
        scale,
        out: Precomputed::new(out)?,
    };
    qkv.apply_op1(AttentionQkv { heads, op })
}

/// A trainable f32 weight's linear layer y = x·Wᵀ + b, as [`super::portable::linear`] computes
/// it or, for a bf16-mixed student, [`super::portable::linear_bf16_mixed`], and optionally its
/// activation act(y) (an MLP's first half).
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    /// W is [out, in] (torch `nn.Linear`), else [in, out] (GPT-2's Conv1D).
    pub out_in: bool,
    pub mixed: bool,
    pub act: Option<Activation>,
}

impl Linear {
    /// The layer on x [.., in], keeping only x, W, b and the output for the backward: not the
    /// product before the bias, nor the bf16 operands, nor the activation's input.
    pub fn apply(self, w: &Tensor, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let bd = b.map(Tensor::detach);
        let out = self.forward(&w.detach(), &x.detach(), bd.as_ref())?;
        let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
        if !tracked {
            return Ok(out);
        }
        let op = Recomputed {
            op: self,
            out: Precomputed::new(out)?,
        };
        match b {
            Some(b) => x.apply_op3(w, b, op),
            None => x.apply_op2(w, op),
        }
    }
}

/// A forward result computed before its op is applied, handed to candle once by the op's
/// forward (a copy of it: candle wants an owned storage; the original is dropped then).
pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(t: Tensor) -> Result<Self> {
        if t.dtype() != DType::F32 {
            bail!("a recomputed op's output must be f32, not {:?}", t.dtype());
        }
        Ok(Self(Mutex::new(Some(t))))
    }

    fn take(&self) -> Result<Tensor> {
        let taken = self.0.lock().ok().and_then(|mut t| t.take());
        taken.ok_or_else(|| candle_core::Error::Msg("a recomputed op ran its forward twice".into()))
    }

    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.take()?.contiguous()?;
        let (s, l) = t.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*s, l.contiguous_offsets()) else {
            bail!("a recomputed op's output is not on the CPU")
        };
        Ok((CpuStorage::F32(v[a..b].to_vec()), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let t = self.take()?.contiguous()?;
        let (s, l) = t.storage_and_layout();
        let (Storage::Cuda(s), Some((a, b))) = (&*s, l.contiguous_offsets()) else {
            bail!("a recomputed op's output is not on a CUDA device")
        };
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(a..b);
        // SAFETY: every element is written by the copy below before the storage is used.
        let mut dst = unsafe { dev.alloc::<f32>(b - a)? };
        dev.memcpy_dtod(&src, &mut dst)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            l.shape().clone(),
        ))
    }
}

/// The `cpu_fwd` and `cuda_fwd` of an op whose forward was computed before it was applied: both
/// hand over the [`Precomputed`] at `self.<path>`, whatever the inputs; one storage and layout
/// name per input.
macro_rules! precomputed_forward {
    ($($field:ident).+; $($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &CpuStorage, $l: &Layout),+
        ) -> Result<(CpuStorage, Shape)> {
            self.$($field).+.cpu()
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $($s: &candle_core::CudaStorage, $l: &Layout),+
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            self.$($field).+.cuda()
        }
    };
}
pub(crate) use precomputed_forward;

// ---------------------------------------------------------------------------------------------
// Attention.

struct Attention {
    bias: Tensor,
    scale: f64,
    out: Precomputed,
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "pocl-attention-recomputed"
    }
    precomputed_forward!(out; _a _la, _b _lb, _c _lc);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.grads(&q.detach(), &k.detach(), &v.detach(), dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl Attention {
    /// candle's autograd of `portable::attention_with` with the fused softmax, op for op: the
    /// probabilities recomputed, then the backward of out = (p·v)ᵀ, of the softmax and of
    /// s = q·kᵀ; grouped kv heads sum their query heads' gradients (`repeat_kv`'s backward).
    fn grads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, tq, d) = q.dims4()?;
        let (h_kv, tk) = (k.dim(1)?, k.dim(2)?);
        let (kr, vr) = if h_kv == h {
            (k.clone(), v.clone())
        } else {
            let n = h / h_kv;
            (
                super::portable::repeat_kv(k, n)?,
                super::portable::repeat_kv(v, n)?,
            )
        };
        // The forward's operands, laid out as attention_with made them.
        let qc = q.contiguous()?;
        let kt = kr.t()?.contiguous()?;
        let vc = vr.contiguous()?;
        let p = super::cuda::attention_softmax(&qc.matmul(&kt)?, &self.bias, self.scale)?;
        // Gradients reach each node contiguous (candle adds them onto zeros).
        let g = dout.reshape((b, tq, h, d))?.transpose(1, 2)?.contiguous()?;
        let dp = g.matmul(&vc.t()?)?;
        let dv = p.t()?.matmul(&g)?;
        drop(g);
        let ds = super::cuda::attention_softmax_backward(&p, &dp, self.scale)?;
        drop((p, dp));
        let dq = ds.matmul(&kt.t()?)?;
        let dk = qc.t()?.matmul(&ds)?.t()?.contiguous()?;
        if h_kv == h {
            return Ok((dq, dk, dv));
        }
        let unrepeat = |g: Tensor| -> Result<Tensor> {
            g.reshape((b, h_kv, h / h_kv, tk, d))?
                .sum_keepdim(2)?
                .reshape((b, h_kv, tk, d))
        };
        Ok((dq, unrepeat(dk)?, unrepeat(dv)?))
    }
}

/// [`Attention`] over the fused projection: its gradient is dq, dk and dv side by side.
struct AttentionQkv {
    heads: usize,
    op: Attention,
}

impl candle_core::CustomOp1 for AttentionQkv {
    fn name(&self) -> &'static str {
        "pocl-attention-qkv-recomputed"
    }
    precomputed_forward!(op.out; _a _la);
    fn bwd(&self, qkv: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let qkv = qkv.detach();
        let (q, k, v) = super::portable::split_qkv(&qkv, self.heads)?;
        let (dq, dk, dv) = self.op.grads(&q, &k, &v, dout)?;
        let (b, t, w) = qkv.dims3()?;
        let back = |g: Tensor| g.transpose(1, 2)?.reshape((b, t, w / 3));
        Ok(Some(Tensor::cat(&[back(dq)?, back(dk)?, back(dv)?], 2)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layers.

impl Linear {
    fn forward(&self, w: &Tensor, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let y = self.product(w, x, b)?;
        match self.act {
            Some(act) => super::activation::activate(&y, act),
            None => Ok(y),
        }
    }

    fn product(&self, w: &Tensor, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        if self.mixed {
            super::portable::linear_bf16_mixed(w, self.out_in, x, b)
        } else if self.out_in {
            super::portable::linear(&super::Weight::out_in(w.clone()), x, b)
        } else {
            super::portable::linear(&super::Weight::in_out(w.clone()), x, b)
        }
    }

    /// candle's autograd of the forward, op for op. The activation's input recomputed, then
    /// its backward. f32: the two products and the bias's sum
    /// over the rows. bf16-mixed: the upstream gradient rounded to bf16, the two bf16 products
    /// with the forward's (recomputed) operands, the concatenations' pieces cut out, each
    /// widened to f32.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let k = x.dim(x.rank() - 1)?;
        let (xa, wa) = if self.mixed {
            super::portable::mixed_operands(w, self.out_in, x, b)?
        } else {
            let wt = if self.out_in { w.t()? } else { w.clone() };
            (x.reshape(((), k))?, wt)
        };
        let (m, n) = (xa.dim(0)?, wa.dim(1)?);
        let dy = match self.act {
            // The activation's input: bf16-mixed's product from the operands just built (as
            // `linear_bf16_mixed` computes it), f32's as the forward did.
            Some(act) => {
                let y = if self.mixed {
                    super::portable::mixed_product(&xa, &wa, x.dims())?
                } else {
                    self.product(w, x, b)?
                };
                super::activation::backward(act, &y, dout)?
            }
            None => dout.clone(),
        };
        let dout = &dy;
        let mut g = dout.reshape((m, n))?.contiguous()?;
        if self.mixed {
            g = g.to_dtype(DType::BF16)?;
        }
        let dxa = g.matmul(&wa.t()?)?;
        let dwa = xa.t()?.matmul(&g)?;
        drop((xa, wa));
        let dx = dxa.narrow(1, 0, k)?.contiguous()?;
        let dx = dx.to_dtype(DType::F32)?.reshape(x.dims())?;
        let dw = dwa.narrow(0, 0, k)?.contiguous()?;
        let dw = if self.out_in {
            dw.t()?.contiguous()?
        } else {
            dw
        };
        let db = match (b, self.mixed) {
            (None, _) => None,
            (Some(_), true) => Some(dwa.narrow(0, k, 1)?.contiguous()?.reshape(n)?),
            (Some(_), false) => Some(g.sum_keepdim(0)?.squeeze(0)?),
        };
        let db = db.map(|d| d.to_dtype(DType::F32)).transpose()?;
        Ok((dx, dw.to_dtype(DType::F32)?, db))
    }
}

/// A [`Linear`] whose forward was computed before the op was applied.
struct Recomputed {
    op: Linear,
    out: Precomputed,
}

impl candle_core::CustomOp2 for Recomputed {
    fn name(&self) -> &'static str {
        "pocl-linear-recomputed"
    }
    precomputed_forward!(out; _a _la, _b _lb);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.op.grads(&x.detach(), &w.detach(), None, dout)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl candle_core::CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        "pocl-linear-recomputed"
    }
    precomputed_forward!(out; _a _la, _b _lb, _c _lc);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let b = b.detach();
        let (dx, dw, db) = self.op.grads(&x.detach(), &w.detach(), Some(&b), dout)?;
        Ok((Some(dx), Some(dw), db))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Weight;
    use super::*;
    use candle_core::{Device, Var};

    fn randn(seed: u64, shape: &[usize]) -> Result<Tensor> {
        Ok(crate::ops::test_values(seed, shape))
    }

    /// The values (compared with ==: equal to the bit, but for the sign of zero, which candle's
    /// gradient sums onto zeros do not keep).
    fn bits(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The output and every input's gradient of `f` under a random upstream gradient.
    fn run(
        vars: &[Var],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&inputs)?;
        let r = randn(99, out.dims())?;
        let grads = (&out * &r)?.sum_all()?.backward()?;
        let g = vars
            .iter()
            .map(|v| bits(grads.get(v.as_tensor()).expect("a gradient")))
            .collect();
        Ok((bits(&out), g))
    }

    /// The recomputing attention against the composition it replaces (candle's autograd of the
    /// CUDA kernel set's attention): output and gradients to the bit, with the fused qkv views
    /// of GPT-2, grouped kv heads, padding and a query block after a cache.
    #[test]
    fn attention_gradients_are_the_compositions_to_the_bit() -> Result<()> {
        // (batch, heads, kv heads, queries, keys, head dim)
        for (b, h, h_kv, tq, tk, d) in [(2, 4, 4, 7, 7, 8), (2, 6, 2, 5, 9, 16), (1, 3, 1, 1, 6, 4)]
        {
            let q = Var::from_tensor(&randn(1, &[b, h, tq, d])?)?;
            let k = Var::from_tensor(&randn(2, &[b, h_kv, tk, d])?)?;
            let v = Var::from_tensor(&randn(3, &[b, h_kv, tk, d])?)?;
            let mut mask = vec![1u32; b * tk];
            mask[0] = 0; // left padding in the first row
            let mask = Tensor::from_vec(mask, (b, tk), &Device::Cpu)?;
            let bias = crate::ops::attention_bias(&mask, tq)?;
            let scale = 1.0 / (d as f64).sqrt();
            let vars = [q, k, v];
            let want = run(&vars, &|t| {
                super::super::cuda::attention(&t[0], &t[1], &t[2], &bias, scale)
            })?;
            let got = run(&vars, &|t| attention(&t[0], &t[1], &t[2], &bias, scale))?;
            assert_eq!(got, want, "shape {:?}", (b, h, h_kv, tq, tk, d));
        }
        // GPT-2's fused projection, against the composition on its split views.
        let (b, t, h, d) = (2, 6, 3, 4);
        let qkv = Var::from_tensor(&randn(4, &[b, t, 3 * h * d])?)?;
        let bias = crate::ops::attention_bias(&Tensor::ones((b, t), DType::U32, &Device::Cpu)?, t)?;
        let bias = &bias;
        let f = |recompute: bool| {
            move |x: &[Tensor]| -> Result<Tensor> {
                let (q, k, v) = super::super::portable::split_qkv(&x[0], h)?;
                if recompute {
                    attention_qkv(&x[0], h, bias, 0.5)
                } else {
                    super::super::cuda::attention(&q, &k, &v, bias, 0.5)
                }
            }
        };
        let vars = [qkv];
        assert_eq!(run(&vars, &f(true))?, run(&vars, &f(false))?);
        Ok(())
    }

    /// The recomputing linear against `portable::linear`'s and `portable::linear_bf16_mixed`'s
    /// autograd: output and dx, dW, db to the bit, with and without a bias, for both weight
    /// layouts.
    #[test]
    fn linear_gradients_are_the_compositions_to_the_bit() -> Result<()> {
        for mixed in [true, false] {
            for (out_in, bias) in [(true, true), (false, true), (true, false), (false, false)] {
                let (k, n) = (24, 40);
                let x = Var::from_tensor(&randn(5, &[2, 3, k])?)?;
                let shape = if out_in { [n, k] } else { [k, n] };
                let w = Var::from_tensor(&randn(6, &shape)?)?;
                let b = Var::from_tensor(&randn(7, &[n])?)?;
                let vars: Vec<Var> = if bias { vec![x, w, b] } else { vec![x, w] };
                let want = run(&vars, &|t| {
                    let (w, x, b) = (t[1].clone(), &t[0], t.get(2));
                    match (mixed, out_in) {
                        (true, _) => super::super::portable::linear_bf16_mixed(&w, out_in, x, b),
                        (false, true) => super::super::portable::linear(&Weight::out_in(w), x, b),
                        (false, false) => super::super::portable::linear(&Weight::in_out(w), x, b),
                    }
                })?;
                let op = Linear {
                    out_in,
                    mixed,
                    act: None,
                };
                let got = run(&vars, &|t| op.apply(&t[1], &t[0], t.get(2)))?;
                assert_eq!(got, want, "mixed {mixed}, out_in {out_in}, bias {bias}");
            }
        }
        Ok(())
    }

    /// The layer with its activation against `activation::activate` after the composition:
    /// every activation's derivative as its autograd computes it (pocl's op or candle's).
    #[test]
    fn activation_gradients_are_the_compositions_to_the_bit() -> Result<()> {
        let acts = [
            Activation::GeluTanh,
            Activation::GeluErf,
            Activation::Relu,
            Activation::Silu,
        ];
        for (act, mixed) in acts.into_iter().flat_map(|a| [(a, false), (a, true)]) {
            let x = Var::from_tensor(&(randn(8, &[3, 16])? * 6.0)?)?;
            let w = Var::from_tensor(&randn(9, &[16, 20])?)?;
            let b = Var::from_tensor(&randn(10, &[20])?)?;
            let vars = [x, w, b];
            let want = run(&vars, &|t| {
                let y = if mixed {
                    super::super::portable::linear_bf16_mixed(&t[1], false, &t[0], Some(&t[2]))?
                } else {
                    super::super::portable::linear(
                        &Weight::in_out(t[1].clone()),
                        &t[0],
                        Some(&t[2]),
                    )?
                };
                super::super::activation::activate(&y, act)
            })?;
            let op = Linear {
                out_in: false,
                mixed,
                act: Some(act),
            };
            let got = run(&vars, &|t| op.apply(&t[1], &t[0], Some(&t[2])))?;
            assert_eq!(got, want, "{act:?}, mixed {mixed}");
        }
        Ok(())
    }

    /// Without a tracked input (a frozen teacher) the op is not applied: the forward alone.
    #[test]
    fn untracked_inputs_skip_the_op() -> Result<()> {
        let q = randn(1, &[1, 2, 3, 4])?;
        let bias = crate::ops::attention_bias(&Tensor::ones((1, 3), DType::U32, &Device::Cpu)?, 3)?;
        let out = attention(&q, &q, &q, &bias, 0.5)?;
        assert!(!out.track_op());
        let want = super::super::cuda::attention(&q, &q, &q, &bias, 0.5)?;
        assert_eq!(bits(&out), bits(&want));
        Ok(())
    }
}
