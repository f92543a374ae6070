//! Linear layers, y = x·Wᵀ + b, whatever form W takes: f32 in either layout (trainable or frozen;
//! the packed gemm, or a streamed matmul for the few rows of decoding), or packed once for a
//! frozen model (the teacher): bf16, which computes on AMX tiles where the CPU has them, or f32.

use super::bf16::{Element, Packed};
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
    /// `bf16_mixed`: a bf16-mixed student's matrix, f32 but multiplied as torch.autocast does
    /// (`super::portable::linear_bf16_mixed`, on every kernel set); never the embedding / lm
    /// head, and never with a gradient buffer.
    F32 {
        w: Tensor,
        out_in: bool,
        grad: Option<Arc<GradBuffer>>,
        bf16_mixed: bool,
    },
    /// A frozen model's matrix packed once for the fused CPU kernels, in bf16 (RNE) or f32
    /// ([`Element`]); no f32 tensor is kept.
    Packed(Arc<Packed>),
    /// A frozen model's matrix in bf16 (RNE) as a candle tensor on any device, in the layout
    /// `out_in` says: the portable kernels' form of a bf16 teacher.
    Bf16Tensor { w: Tensor, out_in: bool },
}

impl Weight {
    /// An f32 weight in torch `nn.Linear` layout [out, in] (also an embedding [vocab, d]).
    pub fn out_in(w: Tensor) -> Self {
        Weight::F32 {
            w,
            out_in: true,
            grad: None,
            bf16_mixed: false,
        }
    }

    /// An f32 weight in GPT-2 Conv1D layout [in, out].
    pub fn in_out(w: Tensor) -> Self {
        Weight::F32 {
            w,
            out_in: false,
            grad: None,
            bf16_mixed: false,
        }
    }

    /// A trainable weight with its own in-place gradient buffer (`Params::weight` makes these).
    pub fn trainable(w: Tensor, out_in: bool, grad: Arc<GradBuffer>) -> Self {
        Weight::F32 {
            w,
            out_in,
            grad: Some(grad),
            bf16_mixed: false,
        }
    }

    /// A trainable weight of a bf16-mixed student (see [`Weight::F32`]'s `bf16_mixed`).
    pub fn bf16_mixed(w: Tensor, out_in: bool) -> Self {
        Weight::F32 {
            w,
            out_in,
            grad: None,
            bf16_mixed: true,
        }
    }

    /// The same weight cut from autograd: for forward passes nobody differentiates (the dev
    /// loss), so that the fused head does not compute a gradient for it.
    pub fn detach(&self) -> Self {
        match self {
            Weight::F32 {
                w,
                out_in,
                bf16_mixed,
                ..
            } => Weight::F32 {
                w: w.detach(),
                out_in: *out_in,
                grad: None,
                bf16_mixed: *bf16_mixed,
            },
            Weight::Packed(p) => Weight::Packed(p.clone()),
            Weight::Bf16Tensor { w, out_in } => Weight::Bf16Tensor {
                w: w.detach(),
                out_in: *out_in,
            },
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

    /// Packs a frozen f32 weight once as `element` (the caller drops the f32 tensor).
    pub fn to_packed(w: &Tensor, out_in: bool, element: Element) -> Result<Self> {
        let (r, c) = w.dims2()?;
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Weight::Packed(Arc::new(if out_in {
            Packed::out_in(&data, r, c, element)
        } else {
            Packed::in_out(&data, r, c, element)
        })))
    }

    /// A frozen f32 weight as a bf16 tensor on its device (the portable kernels' bf16 form).
    pub fn to_bf16_tensor(w: &Tensor, out_in: bool) -> Result<Self> {
        Ok(Weight::Bf16Tensor {
            w: w.to_dtype(DType::BF16)?.detach(),
            out_in,
        })
    }

    /// The f32 tensor, if this weight is f32 (trainable weights always are).
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Weight::F32 { w, .. } => Some(w),
            Weight::Packed(_) | Weight::Bf16Tensor { .. } => None,
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
            Weight::Packed(p) => (p.n_out(), p.k()),
            Weight::Bf16Tensor { w, out_in: true } => w.dims2()?,
            Weight::Bf16Tensor { w, out_in: false } => {
                let (i, o) = w.dims2()?;
                (o, i)
            }
        })
    }
}

/// y = x·Wᵀ + b on the CPU as one op with its backward: the bias initialises the output that
/// the gemm adds into, and the backward makes dx = g·W, dW (into the weight's gradient buffer
/// when it has one) and db = Σ rows of g in one call, where candle's composition records a
/// matmul, a broadcast, an add and two reshapes, each with its own zeros + add of a gradient.
pub(super) struct Linear {
    pub out_in: bool,
    pub grad: Option<Arc<GradBuffer>>,
}

/// (data, rows, cols) of a contiguous 2-D f32 operand.
fn operand<'a>(s: &'a CpuStorage, l: &Layout, who: &str) -> Result<(&'a [f32], usize, usize)> {
    let (r, c) = l.shape().dims2()?;
    Ok((super::contiguous_f32(s, l, who)?, r, c))
}

impl Linear {
    /// W as the right operand [k, n] of x·W.
    fn rhs<'a>(&self, w: &'a [f32], k: usize, n: usize) -> gemm::View<'a> {
        if self.out_in {
            gemm::View::rows(w, n, k, k).t()
        } else {
            gemm::View::rows(w, k, n, n)
        }
    }

    fn fwd(
        &self,
        (x, m, k): (&[f32], usize, usize),
        (w, wr, wc): (&[f32], usize, usize),
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, wk) = if self.out_in { (wr, wc) } else { (wc, wr) };
        if wk != k || b.is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "linear: input [{m}, {k}] does not fit weight [{wr}, {wc}] (bias {:?})",
                b.map(|b| b.len())
            );
        }
        let mut y = super::zeros_par(m * n);
        if let Some(b) = b {
            use rayon::prelude::*;
            y.par_chunks_mut(n.max(1))
                .for_each(|r| r.copy_from_slice(b));
        }
        gemm::matmul(
            gemm::View::rows(x, m, k, k),
            self.rhs(w, k, n),
            &mut y,
            n,
            b.is_some(),
        );
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// (dx, dW, db) for the tracked operands; dW goes into the gradient buffer when there is one.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = &candle_core::Device::Cpu;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (g, m, n) = operand(super::cpu_storage(&gs, "linear")?, gl, "linear gradient")?;
        let (xs, xl) = x.storage_and_layout();
        let (xd, _, k) = operand(super::cpu_storage(&xs, "linear")?, xl, "linear input")?;
        let (ws, wl) = w.storage_and_layout();
        let (wd, wr, wc) = operand(super::cpu_storage(&ws, "linear")?, wl, "linear weight")?;
        let g_rows = gemm::View::rows(g, m, n, n);
        let x_rows = gemm::View::rows(xd, m, k, k);
        let dx = if x.track_op() {
            let mut dx = super::zeros_par(m * k);
            // Conv1D: dx = g·Wᵀ through the f32 kernel on W [k, n] packed for this call, as the
            // gemm crate multiplies that column-major operand at 60-80% of its row-major speed
            // (benches/student_gemm.rs); measured in the kd-step bench's profile, packing
            // included: the student's linear backward 0.26-0.30 -> 0.23-0.24 s. (nn.Linear's W
            // is a row-major operand already.) From 32 rows: packing costs k·n, the product
            // m·k·n, and decoding-sized products are not worth it (a guess, not measured).
            if !self.out_in && Packed::f32_preferred() && m >= 32 {
                Packed::out_in(wd, k, n, Element::F32).matmul(g, m, &mut dx, k);
            } else {
                gemm::matmul(g_rows, self.rhs(wd, k, n).t(), &mut dx, k, false);
            }
            Some(Tensor::from_vec(dx, (m, k), dev)?)
        } else {
            None
        };
        // dW = gᵀ·x in [out, in] layout, xᵀ·g in [in, out].
        let dw_into = |dst: &mut [f32], accumulate: bool| {
            if self.out_in {
                gemm::matmul(g_rows.t(), x_rows, dst, k, accumulate)
            } else {
                gemm::matmul(x_rows.t(), g_rows, dst, n, accumulate)
            }
        };
        let dw = match (&self.grad, w.track_op()) {
            (Some(buffer), true) => {
                buffer.write_now(|buf, overwrite| {
                    dw_into(buf, !overwrite);
                    Ok(())
                })?;
                None
            }
            (None, true) => {
                let mut dw = super::zeros_par(wr * wc);
                dw_into(&mut dw, false);
                Some(Tensor::from_vec(dw, (wr, wc), dev)?)
            }
            (_, false) => None,
        };
        let db = match b {
            Some(b) if b.track_op() => {
                let mut db = vec![0f32; n];
                // Rows added in order, columns in parallel blocks: the same sums whatever the
                // thread count.
                use rayon::prelude::*;
                db.par_chunks_mut(256).enumerate().for_each(|(c, out)| {
                    let j0 = c * 256;
                    for row in g.chunks(n.max(1)) {
                        for (o, &v) in out.iter_mut().zip(&row[j0..]) {
                            *o += v;
                        }
                    }
                });
                Some(Tensor::from_vec(db, n, dev)?)
            }
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl candle_core::CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "pocl-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(
            operand(xs, xl, "linear input")?,
            operand(ws, wl, "linear weight")?,
            None,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = super::profile::time("linear.backward", x.device(), || {
            self.backward(x, w, None, g)
        })?;
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "pocl-linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(
            operand(xs, xl, "linear input")?,
            operand(ws, wl, "linear weight")?,
            Some(super::contiguous_f32(bs, bl, "linear bias")?),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::profile::time("linear.backward", x.device(), || {
            self.backward(x, w, Some(b), g)
        })
    }
}

/// The rows `ids` of a trainable [vocab, d] matrix whose gradient lives in a [`GradBuffer`]:
/// the backward pass adds each row's gradient into the buffer in id order (candle's
/// `index_add` order, so the sums are the same to the bit) instead of building a fresh
/// [vocab, d] gradient for candle to add.
pub(super) struct Embed {
    pub ids: Vec<u32>,
    pub grad: Arc<GradBuffer>,
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

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        super::profile::time("embed.backward", w.device(), || self.backward(grad_res))
    }
}

impl Embed {
    fn backward(&self, grad_res: &Tensor) -> Result<Option<Tensor>> {
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

/// x [m, k] f32 → x·Wᵀ (+ bias) [m, n] with a packed W, bf16 or f32 (forward only: frozen models).
pub(super) struct PackedMatmul(pub Arc<Packed>, pub Option<Vec<f32>>);

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "pocl-packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("packed matmul: the input must be f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("packed matmul: the input must be contiguous")
        };
        let (m, k) = l.shape().dims2()?;
        let p = &self.0;
        if k != p.k() {
            candle_core::bail!(
                "packed matmul: input [{m}, {k}] vs weight [{}, {}]",
                p.n_out(),
                p.k()
            );
        }
        let n = p.n_out();
        let mut y = super::zeros_par(m * n);
        match &self.1 {
            Some(bias) if bias.len() != n => {
                candle_core::bail!("packed matmul: bias of {} for {n} outputs", bias.len())
            }
            Some(bias) => p.matmul_bias(&x[a..b], m, &mut y, n, bias),
            None => p.matmul(&x[a..b], m, &mut y, n),
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::ops::test_values as rand;

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max(0).unwrap();
        diff.to_scalar::<f64>().unwrap() / scale.max(1e-300)
    }

    /// The fused linear op (forward and dx, dW, db) against candle's composition evaluated in
    /// f64 with its own autograd, in both weight layouts, with and without a bias and a
    /// gradient buffer, for a 3-D input.
    #[test]
    fn fused_linear_matches_an_f64_composition() -> Result<()> {
        let (b, t, k, n) = (3, 17, 40, 56);
        for out_in in [true, false] {
            for with_bias in [true, false] {
                for with_buffer in [true, false] {
                    let x = Var::from_tensor(&rand(1, &[b, t, k]))?;
                    let wshape = if out_in { [n, k] } else { [k, n] };
                    let w = Var::from_tensor(&rand(2, &wshape))?;
                    let bias = Var::from_tensor(&rand(3, &[n]))?;
                    let r = rand(4, &[b, t, n]);
                    let buffer = Arc::new(GradBuffer::new(w.shape()));
                    let weight = match (with_buffer, out_in) {
                        (true, _) => {
                            Weight::trainable(w.as_tensor().clone(), out_in, buffer.clone())
                        }
                        (false, true) => Weight::out_in(w.as_tensor().clone()),
                        (false, false) => Weight::in_out(w.as_tensor().clone()),
                    };
                    let y = super::super::fused::linear(
                        &weight,
                        x.as_tensor(),
                        with_bias.then(|| bias.as_tensor()),
                    )?;
                    let store = (&y * &r)?.sum_all()?.backward()?;

                    // The reference: f64 copies, candle's matmul / broadcast add and autograd.
                    let x64 = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
                    let w64 = Var::from_tensor(&w.to_dtype(DType::F64)?)?;
                    let b64 = Var::from_tensor(&bias.to_dtype(DType::F64)?)?;
                    let wt = if out_in {
                        w64.t()?
                    } else {
                        w64.as_tensor().clone()
                    };
                    let mut y64 = x64.broadcast_matmul(&wt)?;
                    if with_bias {
                        y64 = y64.broadcast_add(&b64)?;
                    }
                    let ref_store = (&y64 * r.to_dtype(DType::F64)?)?.sum_all()?.backward()?;

                    let case = format!("out_in {out_in}, bias {with_bias}, buffer {with_buffer}");
                    assert!(max_rel(&y, &y64) < 1e-6, "{case}: forward");
                    let dx = store.get(x.as_tensor()).unwrap();
                    assert!(
                        max_rel(dx, ref_store.get(&x64).unwrap()) < 1e-6,
                        "{case}: dx"
                    );
                    let dw = if with_buffer {
                        assert!(
                            store.get(w.as_tensor()).is_none(),
                            "{case}: dW went to candle"
                        );
                        buffer.grad()?.unwrap()
                    } else {
                        store.get(w.as_tensor()).unwrap().clone()
                    };
                    assert!(
                        max_rel(&dw, ref_store.get(&w64).unwrap()) < 1e-6,
                        "{case}: dW"
                    );
                    let db = store.get(bias.as_tensor());
                    if with_bias {
                        assert!(
                            max_rel(db.unwrap(), ref_store.get(&b64).unwrap()) < 1e-6,
                            "{case}: db"
                        );
                    } else {
                        assert!(db.is_none(), "{case}: no bias, no gradient");
                    }
                }
            }
        }
        Ok(())
    }
}
