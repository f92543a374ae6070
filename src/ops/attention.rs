//! Scaled dot-product attention as one op with its backward. Why: composed from candle ops it
//! copied q, k and v to contiguous tensors, ran two batched matmuls as b·h small gemms that each
//! fan out over the thread pool, and copied the output back to [b, t, h·d]; its backward was as
//! many ops again. Here each (batch, head) is one task on the pool: its gemms read the heads in
//! place through strides and write the output straight into [b, t, h·d]. The probabilities are
//! kept for the backward pass only when something will differentiate.
//!
//! Grouped-query attention (h query heads sharing h_kv key/value heads) is handled by indexing,
//! without repeating k and v; in the backward the gradients of a shared kv head are summed over
//! its query heads in order (deterministic).

use super::gemm::{matmul_serial, View};
use super::softmax::{softmax_backward_row, softmax_forward_row};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// q [b, h, tq, d]; k, v [b, h_kv, tk, d]; bias [b, 1, tq, tk]. Returns [b, tq, h·d].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let track = q.track_op() || k.track_op() || v.track_op();
    q.apply_op3(k, v, Attention::new(bias, scale, track, 0)?)
}

/// Self-attention straight from a fused projection qkv [b, t, 3·h·d] (GPT-2's `c_attn`: q, k
/// and v side by side, `heads` heads each). Returns [b, t, h·d]. The heads are read in place and
/// the backward pass returns one [b, t, 3·h·d] gradient; narrowing the three parts with candle
/// instead copies each one forward and builds a zero-padded [b, t, 3·h·d] gradient for each
/// backward.
pub fn attention_qkv(qkv: &Tensor, heads: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    qkv.apply_op1(Attention::new(bias, scale, qkv.track_op(), heads)?)
}

struct Attention {
    bias: Tensor,
    scale: f32,
    /// Keep the probabilities for the backward pass.
    keep: bool,
    probs: Mutex<Option<Vec<f32>>>,
    /// Heads of the fused-projection form (0 for separate q, k, v).
    packed_heads: usize,
}

/// A [b, h, t, d] operand read in place: element (b, h, i, j) at off + b·sb + h·sh + i·st + j.
#[derive(Clone, Copy)]
struct Heads<'a> {
    data: &'a [f32],
    off: usize,
    sb: usize,
    sh: usize,
    st: usize,
    dims: [usize; 4],
}

impl<'a> Heads<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, who: &str) -> Result<Self> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("attention: {who} must be f32")
        };
        let dims: [usize; 4] = l
            .dims()
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("attention: {who} must be 4-D")))?;
        let st = l.stride();
        if dims[3] > 1 && st[3] != 1 {
            candle_core::bail!("attention: {who} needs unit stride along the head dimension");
        }
        Ok(Heads {
            data,
            off: l.start_offset(),
            sb: st[0],
            sh: st[1],
            st: st[2],
            dims,
        })
    }

    /// Part `part` (0 q, 1 k, 2 v) of a contiguous fused projection [b, t, 3·h·d].
    fn packed(s: &'a CpuStorage, l: &Layout, h: usize, part: usize) -> Result<Self> {
        let data = super::contiguous_f32(s, l, "attention qkv")?;
        let (b, t, w) = l.shape().dims3()?;
        if h == 0 || w % (3 * h) != 0 {
            candle_core::bail!("attention: qkv [{b}, {t}, {w}] does not split into 3·{h} heads");
        }
        let d = w / (3 * h);
        Ok(Heads {
            data,
            off: part * h * d,
            sb: t * w,
            sh: d,
            st: w,
            dims: [b, h, t, d],
        })
    }

    /// The [t, d] matrix of (batch b, head h).
    fn at(&self, b: usize, h: usize) -> View<'a> {
        let [_, _, t, d] = self.dims;
        let start = self.off + b * self.sb + h * self.sh;
        let len = if t == 0 { 0 } else { (t - 1) * self.st + d };
        View::rows(&self.data[start..start + len], t, d, self.st)
    }
}

/// (b, h, h_kv, tq, tk, d), checked.
fn shapes(q: &Heads, k: &Heads, v: &Heads) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let [b, h, tq, d] = q.dims;
    let [kb, h_kv, tk, kd] = k.dims;
    if kb != b || kd != d || v.dims != k.dims || h_kv == 0 || h % h_kv != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims,
            k.dims,
            v.dims
        );
    }
    Ok((b, h, h_kv, tq, tk, d))
}

impl Attention {
    fn new(bias: &Tensor, scale: f64, keep: bool, packed_heads: usize) -> Result<Self> {
        Ok(Attention {
            bias: bias.contiguous()?.detach(),
            scale: scale as f32,
            keep,
            probs: Mutex::new(None),
            packed_heads,
        })
    }

    /// The output [b, tq, h·d].
    fn forward(&self, q: Heads, k: Heads, v: Heads) -> Result<(CpuStorage, Shape)> {
        let (b, h, h_kv, tq, tk, d) = shapes(&q, &k, &v)?;
        let (bias_guard, bias_layout) = self.bias.storage_and_layout();
        let bias_storage = super::cpu_storage(&bias_guard, "attention bias")?;
        let bias = super::contiguous_f32(bias_storage, bias_layout, "attention bias")?;
        if self.bias.dims() != [b, 1, tq, tk] {
            candle_core::bail!(
                "attention: bias {:?} for scores [{b}, {h}, {tq}, {tk}]",
                self.bias.dims()
            );
        }
        let group = h / h_kv;
        // One task per (batch, head): its probabilities p, then its output [tq, d].
        let head = |bh: usize, p: &mut [f32]| {
            let (bi, hi) = (bh / h, bh % h);
            let (qm, km, vm) = (q.at(bi, hi), k.at(bi, hi / group), v.at(bi, hi / group));
            matmul_serial(qm, km.t(), p, tk, false);
            let bias = &bias[bi * tq * tk..(bi + 1) * tq * tk];
            for (row, brow) in p.chunks_mut(tk).zip(bias.chunks(tk)) {
                softmax_forward_row(row, brow, self.scale);
            }
            let mut o = vec![0f32; tq * d];
            matmul_serial(View::rows(p, tq, tk, tk), vm, &mut o, d, false);
            o
        };
        let heads_out: Vec<Vec<f32>> = if self.keep {
            let mut probs = super::zeros_par(b * h * tq * tk);
            let o = probs
                .par_chunks_mut(tq * tk)
                .enumerate()
                .map(|(bh, p)| head(bh, p))
                .collect();
            *self.probs.lock().unwrap() = Some(probs);
            o
        } else {
            (0..b * h)
                .into_par_iter()
                .map(|bh| head(bh, &mut vec![0f32; tq * tk]))
                .collect()
        };
        // Rows of [b, tq, h·d] gathered from the heads, in parallel.
        let mut out = super::zeros_par(b * tq * h * d);
        out.par_chunks_mut((h * d).max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let (bi, i) = (row / tq, row % tq);
                for (hi, dst) in dst.chunks_mut(d.max(1)).enumerate() {
                    dst.copy_from_slice(&heads_out[bi * h + hi][i * d..(i + 1) * d]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, tq, h * d))))
    }

    /// (dq [b, h, tq, d], dk, dv [b, h_kv, tk, d]), contiguous, from dout [b, tq, h·d].
    fn backward(
        &self,
        qh: Heads,
        kh: Heads,
        vh: Heads,
        dout: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Some(probs) = self.probs.lock().unwrap().take() else {
            candle_core::bail!("attention: backward without saved probabilities")
        };
        let (b, h, h_kv, tq, tk, d) = shapes(&qh, &kh, &vh)?;
        let group = h / h_kv;
        let mut dq = super::zeros_par(b * h * tq * d);
        let mut dk = super::zeros_par(b * h_kv * tk * d);
        let mut dv = super::zeros_par(b * h_kv * tk * d);
        // One task per (batch, kv head); its query heads in order, so the sums into the shared
        // dK and dV are deterministic.
        dq.par_chunks_mut(group * tq * d)
            .zip(dk.par_chunks_mut(tk * d).zip(dv.par_chunks_mut(tk * d)))
            .enumerate()
            .for_each(|(bg, (dq, (dk, dv)))| {
                let (bi, gi) = (bg / h_kv, bg % h_kv);
                let (km, vm) = (kh.at(bi, gi), vh.at(bi, gi));
                let mut dp = vec![0f32; tq * tk];
                for j in 0..group {
                    let hi = gi * group + j;
                    let p = &probs[(bi * h + hi) * tq * tk..(bi * h + hi + 1) * tq * tk];
                    let p = View::rows(p, tq, tk, tk);
                    let qm = qh.at(bi, hi);
                    // dO of this head: columns hi·d.. of [b, tq, h·d].
                    let start = bi * tq * h * d + hi * d;
                    let len = if tq == 0 { 0 } else { (tq - 1) * h * d + d };
                    let dom = View::rows(&dout[start..start + len], tq, d, h * d);
                    matmul_serial(p.t(), dom, dv, d, true); // dV += Pᵀ·dO
                    matmul_serial(dom, vm.t(), &mut dp, tk, false); // dP = dO·Vᵀ
                    for (dpr, pr) in dp.chunks_mut(tk).zip(p.data.chunks(tk)) {
                        softmax_backward_row(pr, dpr, self.scale); // dS, in place
                    }
                    let ds = View::rows(&dp, tq, tk, tk);
                    matmul_serial(ds, km, &mut dq[j * tq * d..(j + 1) * tq * d], d, false); // dQ = dS·K
                    matmul_serial(ds.t(), qm, dk, d, true); // dK += dSᵀ·Q
                }
            });
        Ok((dq, dk, dv))
    }
}

/// Runs `f` on the contiguous data of an upstream gradient.
fn with_gradient<R>(g: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let g = g.contiguous()?;
    let (guard, layout) = g.storage_and_layout();
    let who = "attention gradient";
    f(super::contiguous_f32(
        super::cpu_storage(&guard, who)?,
        layout,
        who,
    )?)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "pocl-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(
            Heads::new(sq, lq, "q")?,
            Heads::new(sk, lk, "k")?,
            Heads::new(sv, lv, "v")?,
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gq, lq) = q.storage_and_layout();
        let (gk, lk) = k.storage_and_layout();
        let (gv, lv) = v.storage_and_layout();
        let who = "attention input";
        let (qh, kh, vh) = (
            Heads::new(super::cpu_storage(&gq, who)?, lq, "q")?,
            Heads::new(super::cpu_storage(&gk, who)?, lk, "k")?,
            Heads::new(super::cpu_storage(&gv, who)?, lv, "v")?,
        );
        let (dq, dk, dv) = super::profile::time("attention.backward", q.device(), || {
            with_gradient(grad, |dout| self.backward(qh, kh, vh, dout))
        })?;
        let dev = &candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, qh.dims.to_vec(), dev)?),
            Some(Tensor::from_vec(dk, kh.dims.to_vec(), dev)?),
            Some(Tensor::from_vec(dv, vh.dims.to_vec(), dev)?),
        ))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "pocl-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = self.packed_heads;
        self.forward(
            Heads::packed(s, l, h, 0)?,
            Heads::packed(s, l, h, 1)?,
            Heads::packed(s, l, h, 2)?,
        )
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (guard, layout) = qkv.storage_and_layout();
        let s = super::cpu_storage(&guard, "attention qkv")?;
        let h = self.packed_heads;
        let (qh, kh, vh) = (
            Heads::packed(s, layout, h, 0)?,
            Heads::packed(s, layout, h, 1)?,
            Heads::packed(s, layout, h, 2)?,
        );
        let [b, _, t, d] = qh.dims;
        let gather = || {
            with_gradient(grad, |dout| {
                let parts = self.backward(qh, kh, vh, dout)?;
                // Rows of [b, t, 3·h·d] gathered from the three [b, h, t, d] gradients, in parallel.
                let w = 3 * h * d;
                let mut dqkv = super::zeros_par(b * t * w);
                dqkv.par_chunks_mut(w.max(1))
                    .enumerate()
                    .for_each(|(row, dst)| {
                        let (bi, i) = (row / t, row % t);
                        for (part, src) in [&parts.0, &parts.1, &parts.2].into_iter().enumerate() {
                            for hi in 0..h {
                                let from = ((bi * h + hi) * t + i) * d;
                                let to = part * h * d + hi * d;
                                dst[to..to + d].copy_from_slice(&src[from..from + d]);
                            }
                        }
                    });
                Tensor::from_vec(dqkv, (b, t, w), &candle_core::Device::Cpu)
            })
        };
        super::profile::time("attention.backward", qkv.device(), gather).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Naive f64 attention over plain arrays: q [b, h, tq, d], k / v [b, h_kv, tk, d] (contiguous),
    /// bias [b, tq, tk] → o [b, tq, h·d].
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        bias: &[f64],
        (b, h, h_kv, tq, tk, d): (usize, usize, usize, usize, usize, usize),
        scale: f64,
    ) -> Vec<f64> {
        let mut o = vec![0.0; b * tq * h * d];
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / h_kv);
                for i in 0..tq {
                    let s: Vec<f64> = (0..tk)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|x| {
                                    q[((bi * h + hi) * tq + i) * d + x]
                                        * k[((bi * h_kv + g) * tk + j) * d + x]
                                })
                                .sum();
                            dot * scale + bias[(bi * tq + i) * tk + j]
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..d {
                        o[(bi * tq + i) * h * d + hi * d + x] = (0..tk)
                            .map(|j| e[j] / z * v[((bi * h_kv + g) * tk + j) * d + x])
                            .sum();
                    }
                }
            }
        }
        o
    }

    /// Output against the naive f64 attention, gradients against its central differences; with
    /// padding, a KV-cache shape (tk > tq), grouped-query heads and transposed (strided) inputs.
    #[test]
    fn matches_naive_f64_attention_and_its_differences() -> Result<()> {
        let dev = &Device::Cpu;
        for (h, h_kv, tq, tk) in [(4, 4, 6, 6), (4, 2, 3, 7), (6, 1, 5, 5)] {
            let (b, d, scale) = (2, 8, 0.35);
            let dims = (b, h, h_kv, tq, tk, d);
            // Heads as transposed views of [b, t, heads, d], as the models make them.
            let mk = |heads: usize, t: usize| -> Result<Var> {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, heads, d), dev)?)
            };
            let (q, k, v) = (mk(h, tq)?, mk(h_kv, tk)?, mk(h_kv, tk)?);
            let tr = |x: &Var| x.as_tensor().transpose(1, 2);
            // Batch 1 has key 1 masked out.
            let mask = Tensor::from_vec(
                (0..b * tk)
                    .map(|i| u32::from(!(i / tk == 1 && i % tk == 1)))
                    .collect::<Vec<_>>(),
                (b, tk),
                dev,
            )?;
            let bias = super::super::attention_bias(&mask, tq)?;
            let dy = Tensor::randn(0f32, 1.0, (b, tq, h * d), dev)?;
            let out = attention(&tr(&q)?, &tr(&k)?, &tr(&v)?, &bias, scale)?;
            let g = (out.clone() * &dy)?.sum_all()?.backward()?;

            let flat64 = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f64::from)
                    .collect())
            };
            let (qn, kn, vn) = (
                flat64(&tr(&q)?.contiguous()?)?,
                flat64(&tr(&k)?.contiguous()?)?,
                flat64(&tr(&v)?.contiguous()?)?,
            );
            let bn = flat64(&bias)?;
            let dyn_ = flat64(&dy)?;
            let want = naive(&qn, &kn, &vn, &bn, dims, scale);
            let got = flat64(&out)?;
            let top = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, e)| m.max((a - e).abs()));
            assert!(err < 1e-5 * top, "{dims:?}: output error {err}");

            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                naive(q, k, v, &bn, dims, scale)
                    .iter()
                    .zip(&dyn_)
                    .map(|(o, w)| o * w)
                    .sum()
            };
            for (which, var) in [(0, &q), (1, &k), (2, &v)] {
                let grad = flat64(&g.get(var).unwrap().transpose(1, 2)?.contiguous()?)?;
                let base = [&qn, &kn, &vn][which];
                let gtop = grad.iter().fold(1e-9f64, |m, x| m.max(x.abs()));
                for idx in (0..base.len()).step_by(7) {
                    let e = 1e-5;
                    let mut plus = [qn.clone(), kn.clone(), vn.clone()];
                    let mut minus = plus.clone();
                    plus[which][idx] += e;
                    minus[which][idx] -= e;
                    let fd = (loss(&plus[0], &plus[1], &plus[2])
                        - loss(&minus[0], &minus[1], &minus[2]))
                        / (2.0 * e);
                    assert!(
                        (grad[idx] - fd).abs() < 1e-4 * gtop,
                        "{dims:?}: d{} [{idx}] {} vs {fd}",
                        ["q", "k", "v"][which],
                        grad[idx]
                    );
                }
            }
        }
        Ok(())
    }

    /// The fused-projection form equals the three-tensor form on narrowed views of the same
    /// [b, t, 3·h·d] projection, output and gradient, to the bit (the same kernel, and the
    /// narrowed gradients only land in their columns).
    #[test]
    fn packed_qkv_equals_separate_heads() -> Result<()> {
        let dev = &Device::Cpu;
        let (b, t, h, d, scale) = (2, 5, 3, 4, 0.4);
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * h * d), dev)?)?;
        let mask = Tensor::from_vec(
            (0..b * t).map(|i| u32::from(i != 1)).collect::<Vec<_>>(),
            (b, t),
            dev,
        )?;
        let bias = super::super::attention_bias(&mask, t)?;
        let dy = Tensor::randn(0f32, 1.0, (b, t, h * d), dev)?;
        let packed = attention_qkv(qkv.as_tensor(), h, &bias, scale)?;
        let g_packed = (packed.clone() * &dy)?.sum_all()?.backward()?;
        let part = |j: usize| {
            qkv.as_tensor()
                .narrow(2, j * h * d, h * d)?
                .reshape((b, t, h, d))?
                .transpose(1, 2)
        };
        let separate = attention(&part(0)?, &part(1)?, &part(2)?, &bias, scale)?;
        let g_separate = (separate.clone() * &dy)?.sum_all()?.backward()?;
        let flat = |x: &Tensor| -> Result<Vec<f32>> { x.flatten_all()?.to_vec1::<f32>() };
        assert_eq!(flat(&packed)?, flat(&separate)?);
        assert_eq!(
            flat(g_packed.get(&qkv).unwrap())?,
            flat(g_separate.get(&qkv).unwrap())?
        );
        Ok(())
    }
}
