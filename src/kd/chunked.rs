//! The lm head fused with the KD loss for [`Kernels::Cuda`](crate::ops::Kernels::Cuda): the same
//! contract as the CPU's [`super::head`] (loss from hidden states and heads, no [tokens, vocab]
//! logits for all tokens at once), written with candle tensor ops so it runs on any device:
//! per chunk of counted token rows, the student's and the teacher's logits are one matmul each
//! (cuBLAS on CUDA) into chunk-sized tensors, the row op [`super::rows::KdRows`] (our CUDA
//! kernel; the CPU kernel on the CPU) writes dL/dlogits over the student's chunk, and two
//! more matmuls give dL/dh for the chunk and add gᵀ·h into dL/dW. Peak extra memory: two
//! [chunk, vocab] f32 buffers, plus dL/dW.
//!
//! The gradients exist after the forward pass (that is the fusion); they are handed to candle's
//! autograd through a surrogate: loss = total + S − detach(S) with S = Σ h·dL/dh + Σ W·dL/dW,
//! whose value is `total` (S − S is exactly 0) and whose gradients are dL/dh and dL/dW. Unlike
//! the CPU op it needs no custom backward, and a scaled upstream gradient scales them correctly.

use super::head::{flat_hidden, Head};
use super::kernel::{LossSpec, RowLoss};
use super::rows::KdRows;
use crate::ops::Weight;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Bytes of one [chunk, vocab] f32 logits buffer (student and teacher have one each): 256 MB is
/// ~1300 GPT-2 rows, large enough for cuBLAS to run at full speed, small next to a GPU's memory.
pub const CHUNK_BYTES: usize = 256 << 20;

/// The loss Σ_r w_r (ce_coef·CE_r + kd_coef·D_r) from the heads; returns it (differentiable
/// w.r.t. the student's hidden states and head weight) and the detached (Σ w·CE, Σ w·D).
pub(crate) fn head_loss(
    spec: &LossSpec,
    teacher: Option<Head>,
    student: Head,
    vocab: usize,
    weights: Vec<f32>,
    labels: Vec<u32>,
    chunk_bytes: usize,
) -> Result<(Tensor, (f64, f64))> {
    let Weight::F32 {
        w, out_in: true, ..
    } = student.weight
    else {
        bail!("the student's lm head must be an f32 [vocab, d] matrix (a trainable model)")
    };
    let h = flat_hidden(student.hidden, "student")?;
    let (n, d) = h.dims2()?;
    let (vs, wd) = w.dims2()?;
    if wd != d || vocab > vs || vocab == 0 || weights.len() != n || labels.len() != n {
        bail!(
            "kd head: student hidden [{n}, {d}], head [{vs}, {wd}], vocab {vocab}, {} mask rows",
            weights.len()
        );
    }
    let dev = h.device().clone();
    let want_grad = h.track_op() || w.track_op();
    // The head's rows of the compared vocabulary (a prefix: a contiguous view, no copy).
    let w_v = w.detach().narrow(0, 0, vocab)?;
    let teacher = match teacher {
        Some(t) => {
            let th = flat_hidden(t.hidden, "teacher")?.detach();
            let (tn, _) = th.dims2()?;
            // A bf16 teacher's logits are a bf16 product (cuBLAS bf16 on CUDA) read as f32.
            let tw = match t.weight {
                Weight::F32 {
                    w, out_in: true, ..
                } => w.detach().narrow(0, 0, vocab)?,
                Weight::Bf16Tensor { w, out_in: true } => w.narrow(0, 0, vocab)?,
                Weight::Packed(_) => {
                    bail!("a packed teacher head belongs to the fused CPU kernels")
                }
                _ => bail!("the teacher's lm head must be [vocab, d]"),
            };
            if tn != n || tw.dim(1)? != th.dim(1)? {
                bail!(
                    "kd head: teacher hidden {:?} and head {:?} do not fit {n} student rows",
                    th.dims(),
                    tw.dims()
                );
            }
            Some((th, tw))
        }
        None => None,
    };

    let active: Vec<u32> = (0..n as u32)
        .filter(|&i| weights[i as usize] != 0.0)
        .collect();
    let rows = (chunk_bytes / (4 * vocab)).max(1);
    let mut out = vec![RowLoss::default(); n];
    let mut grad_h: Vec<Tensor> = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    for chunk in active.chunks(rows) {
        let idx = Tensor::new(chunk, &dev)?;
        let hc = h.detach().index_select(&idx, 0)?;
        let logits = hc.matmul(&w_v.t()?)?.contiguous()?;
        let t_logits = match &teacher {
            Some((th, tw)) => {
                let x = th.index_select(&idx, 0)?.to_dtype(tw.dtype())?;
                Some(x.matmul(&tw.t()?)?.to_dtype(DType::F32)?.contiguous()?)
            }
            None => None,
        };
        let op = KdRows::new(
            *spec,
            chunk.iter().map(|&i| weights[i as usize]).collect(),
            Some(chunk.iter().map(|&i| labels[i as usize]).collect()),
            want_grad,
        );
        match &t_logits {
            Some(t) => logits.inplace_op2(t, &op)?,
            None => logits.inplace_op1(&op)?,
        }
        for (&i, r) in chunk.iter().zip(op.out.lock().unwrap().iter()) {
            out[i as usize] = *r;
        }
        if want_grad {
            // `logits` now holds dL/dlogits for the chunk.
            grad_h.push(logits.matmul(&w_v)?);
            let gw = logits.t()?.matmul(&hc)?;
            grad_w = Some(match grad_w {
                Some(acc) => (acc + gw)?,
                None => gw,
            });
        }
    }

    // Sequential sum over rows in order: deterministic, as the CPU op's.
    let (mut ce, mut kd) = (0.0, 0.0);
    for (r, &wi) in out.iter().zip(&weights) {
        if wi != 0.0 {
            ce += wi as f64 * r.ce;
            kd += wi as f64 * r.kd;
        }
    }
    let total = spec.ce_coef * ce + spec.kd_coef * kd;
    let value = Tensor::new(total as f32, &dev)?;
    if !want_grad || active.is_empty() {
        return Ok((value, (ce, kd)));
    }
    let idx = Tensor::new(active.as_slice(), &dev)?;
    let gh =
        Tensor::zeros((n, d), DType::F32, &dev)?.index_add(&idx, &Tensor::cat(&grad_h, 0)?, 0)?;
    let mut gw = grad_w.expect("at least one chunk");
    if vocab < vs {
        // Head rows beyond the compared vocabulary get no gradient.
        gw = Tensor::cat(&[gw, Tensor::zeros((vs - vocab, d), DType::F32, &dev)?], 0)?;
    }
    let w = w.to_dtype(DType::F32)?;
    let s = ((&h * &gh)?.sum_all()? + (&w * &gw)?.sum_all()?)?;
    Ok(((value + (&s - s.detach())?)?, (ce, kd)))
}

/// The loss of materialised logits by the row op (the `apply` of [`super`] for
/// [`Kernels::Cuda`](crate::ops::Kernels::Cuda)): same value and gradient as the CPU op, with
/// the gradient handed to autograd through the surrogate of the module docs.
pub(crate) fn logits_loss(
    spec: &LossSpec,
    teacher: Option<&Tensor>,
    student: &Tensor,
    weights: Vec<f32>,
    labels: Option<Vec<u32>>,
) -> Result<(Tensor, (f64, f64))> {
    let (g, rows) = super::rows::kd_rows(spec, teacher, student, weights.clone(), labels)?;
    let (mut ce, mut kd) = (0.0, 0.0);
    for (r, &wi) in rows.iter().zip(&weights) {
        if wi != 0.0 {
            ce += wi as f64 * r.ce;
            kd += wi as f64 * r.kd;
        }
    }
    let total = spec.ce_coef * ce + spec.kd_coef * kd;
    let value = Tensor::new(total as f32, student.device())?.to_dtype(student.dtype())?;
    if !student.track_op() {
        return Ok((value, (ce, kd)));
    }
    let s = (student * g.to_dtype(student.dtype())?)?.sum_all()?;
    Ok(((value + (&s - s.detach())?)?, (ce, kd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kd::{Divergence, Mix, Objective, Targets};
    use crate::ops::Kernels;
    use candle_core::{Device, Var};

    fn rnd(seed: u64, len: usize, scale: f32) -> Vec<f32> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let top = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / top
    }

    /// The chunked head (a narrowed vocabulary, masked rows) against the CPU's fused head and
    /// the f64 composition, for every divergence: loss, CE and KD parts, dL/dh and dL/dW.
    #[test]
    fn chunked_head_matches_the_fused_cpu_head() -> Result<()> {
        let dev = &Device::Cpu;
        let (b, t, ds, dt, vs, vt, v) = (2, 9, 7, 5, 45, 47, 41);
        let n = b * t;
        let h = Var::from_vec(rnd(1, n * ds, 3.0), (b, t, ds), dev)?;
        let w = Var::from_vec(rnd(2, vs * ds, 3.0), (vs, ds), dev)?;
        let th = Tensor::from_vec(rnd(3, n * dt, 3.0), (b, t, dt), dev)?;
        let tw = Weight::out_in(Tensor::from_vec(rnd(4, vt * dt, 3.0), (vt, dt), dev)?);
        let mask: Vec<u32> = (0..n as u32).map(|i| u32::from(i % 4 != 0)).collect();
        let mask = Tensor::from_vec(mask, (b, t), dev)?;
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let labels = Tensor::from_vec(labels, (b, t), dev)?;
        let targets = Targets {
            labels: &labels,
            mask: &mask,
            denominator: 11.0,
        };
        let mix = Mix {
            temperature: 2.0,
            kd_weight: 0.7,
        };
        for div in [
            Divergence::Fkl,
            Divergence::Rkl,
            Divergence::Jsd { beta: 0.1 },
            Divergence::Tvd,
            Divergence::Skl { alpha: 0.1 },
            Divergence::Srkl { alpha: 0.2 },
        ] {
            let run = |kernels: Kernels| -> Result<(f64, f64, f64, Tensor, Tensor)> {
                let wt = Weight::out_in(w.as_tensor().clone());
                let obj = Objective {
                    divergence: div,
                    t2: true,
                    kernels,
                };
                let teacher = Head {
                    hidden: &th,
                    weight: &tw,
                };
                let student = Head {
                    hidden: h.as_tensor(),
                    weight: &wt,
                };
                let out = obj.loss_from_heads(Some(teacher), student, v, targets, mix)?;
                let g = out.loss.backward()?;
                Ok((
                    out.loss.to_scalar::<f32>()? as f64,
                    out.ce,
                    out.kd,
                    g.get(h.as_tensor()).unwrap().clone(),
                    g.get(w.as_tensor()).unwrap().clone(),
                ))
            };
            // The f64 composition is the oracle; the fused CPU head is what CUDA must match.
            let b = run(Kernels::Cuda)?;
            for (k, a) in [
                (Kernels::Portable, run(Kernels::Portable)?),
                (Kernels::Fused, run(Kernels::Fused)?),
            ] {
                let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * x.abs().max(1e-3);
                assert!(close(a.0, b.0), "{div} vs {k:?}: loss {} vs {}", a.0, b.0);
                assert!(close(a.1, b.1) && close(a.2, b.2), "{div} vs {k:?}: parts");
                assert!(max_rel(&a.3, &b.3) < 1e-5, "{div} vs {k:?}: dL/dh");
                assert!(max_rel(&a.4, &b.4) < 1e-5, "{div} vs {k:?}: dL/dW");
            }
        }
        Ok(())
    }

    /// Chunks of 1, 3 and all rows give the same loss and gradients.
    #[test]
    fn chunk_size_does_not_change_the_result() -> Result<()> {
        let dev = &Device::Cpu;
        let (n, d, v) = (13, 6, 29);
        let h = Var::from_vec(rnd(5, n * d, 2.0), (n, d), dev)?;
        let w = Var::from_vec(rnd(6, v * d, 2.0), (v, d), dev)?;
        let th = Tensor::from_vec(rnd(7, n * d, 2.0), (n, d), dev)?;
        let tw = Weight::out_in(Tensor::from_vec(rnd(8, v * d, 2.0), (v, d), dev)?);
        let weights: Vec<f32> = (0..n).map(|i| [1.0, 0.0, 0.5][i % 3]).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 5) % v as u32).collect();
        let spec = LossSpec {
            divergence: Some(Divergence::Jsd { beta: 0.3 }),
            inv_temperature: 0.5,
            ce_coef: 0.2,
            kd_coef: 0.9,
        };
        let wt = Weight::out_in(w.as_tensor().clone());
        let run = |rows: usize| -> Result<(f32, Tensor, Tensor)> {
            let (loss, _) = head_loss(
                &spec,
                Some(Head {
                    hidden: &th,
                    weight: &tw,
                }),
                Head {
                    hidden: h.as_tensor(),
                    weight: &wt,
                },
                v,
                weights.clone(),
                labels.clone(),
                rows * 4 * v,
            )?;
            let g = loss.backward()?;
            Ok((
                loss.to_scalar::<f32>()?,
                g.get(h.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            ))
        };
        let all = run(n)?;
        for rows in [1, 3] {
            let c = run(rows)?;
            assert!((all.0 - c.0).abs() <= 1e-6 * all.0.abs(), "{rows}: loss");
            assert!(max_rel(&all.1, &c.1) < 1e-6, "{rows}: dL/dh");
            assert!(max_rel(&all.2, &c.2) < 1e-6, "{rows}: dL/dW");
        }
        Ok(())
    }

    /// The row op on materialised logits (`kd::apply` under Kernels::Cuda) against the fused op.
    #[test]
    fn logits_loss_matches_the_fused_op() -> Result<()> {
        let dev = &Device::Cpu;
        let (n, v) = (10, 33);
        let s = Var::from_vec(rnd(9, n * v, 8.0), (n, v), dev)?;
        let t = Tensor::from_vec(rnd(10, n * v, 8.0), (n, v), dev)?;
        let mask = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, dev)?;
        let labels = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), n, dev)?;
        let targets = Targets {
            labels: &labels,
            mask: &mask,
            denominator: 7.0,
        };
        let mix = Mix {
            temperature: 1.5,
            kd_weight: 0.4,
        };
        let run = |kernels| -> Result<(f32, Tensor)> {
            let obj = Objective {
                divergence: Divergence::Srkl { alpha: 0.1 },
                t2: true,
                kernels,
            };
            let out = obj.loss(Some(&t), s.as_tensor(), targets, mix)?;
            let g = out.loss.backward()?;
            Ok((out.loss.to_scalar()?, g.get(s.as_tensor()).unwrap().clone()))
        };
        let (a, b) = (run(Kernels::Fused)?, run(Kernels::Cuda)?);
        assert!((a.0 - b.0).abs() <= 1e-6 * a.0.abs());
        assert!(max_rel(&a.1, &b.1) < 1e-6);
        Ok(())
    }
}
