//! The attention softmax as one fused op with backward: softmax(scores·scale + bias) over the
//! last dimension, the bias [b, 1, q, k] (causal and padding mask) broadcast over the heads.
//! The composition it replaces was 7 tensors forward (scale, bias add, max, sub, exp, sum, div)
//! and about twice as many backward, per layer.

use super::simd::multiversion;
use crate::kd::fastmath::exp_f32;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// softmax(scores·scale + bias) over the last dimension; scores [b, h, q, k], bias [b, 1, q, k].
/// Differentiable w.r.t. `scores` (the bias is a constant mask).
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if !scores.device().is_cpu() || scores.dtype() != candle_core::DType::F32 {
        return super::softmax_last_dim(&(scores * scale)?.broadcast_add(bias)?);
    }
    let (b, _, q, k) = scores.dims4()?;
    if bias.dims() != [b, 1, q, k] {
        candle_core::bail!(
            "attention bias {:?} does not fit scores {:?}",
            bias.dims(),
            scores.dims()
        );
    }
    scores
        .contiguous()?
        .apply_op2(&bias.contiguous()?.detach(), Softmax { scale })
}

struct Softmax {
    scale: f64,
}

#[inline(always)]
fn forward_impl(s: &[f32], bias: &[f32], scale: f32, p: &mut [f32]) {
    let k = p.len();
    let (s, bias) = (&s[..k], &bias[..k]);
    let mut max = f32::NEG_INFINITY;
    for j in 0..k {
        let v = s[j] * scale + bias[j];
        p[j] = v;
        max = max.max(v);
    }
    let mut sum = 0f64;
    for v in p.iter_mut() {
        let e = crate::kd::fastmath::exp((*v - max) as f64);
        *v = e as f32;
        sum += e;
    }
    let inv = (1.0 / sum) as f32;
    p.iter_mut().for_each(|v| *v *= inv);
}

/// ds = scale · p · (dp − Σ p·dp).
#[inline(always)]
fn backward_impl(p: &[f32], dp: &[f32], scale: f32, ds: &mut [f32]) {
    let k = ds.len();
    let (p, dp) = (&p[..k], &dp[..k]);
    let dot: f64 = p.iter().zip(dp).map(|(&a, &b)| a as f64 * b as f64).sum();
    let dot = dot as f32;
    for j in 0..k {
        ds[j] = scale * p[j] * (dp[j] - dot);
    }
}

/// In place: row ← softmax(row·scale + bias) (the attention op's rows). f32 with the
/// vectorised `exp_f32` (masked scores give exactly 0) and 16 lanes of partial sums.
#[inline(always)]
fn forward_inplace_impl(row: &mut [f32], bias: &[f32], scale: f32) {
    const L: usize = 16;
    let k = row.len();
    let bias = &bias[..k];
    let mut max = f32::NEG_INFINITY;
    for j in 0..k {
        let v = row[j] * scale + bias[j];
        row[j] = v;
        max = max.max(v);
    }
    let mut acc = [0f32; L];
    let full = k / L * L;
    for c in row[..full].chunks_exact_mut(L) {
        for l in 0..L {
            let e = exp_f32(c[l] - max);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for v in &mut row[full..] {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// In place: dp ← scale · p · (dp − Σ p·dp).
#[inline(always)]
fn backward_inplace_impl(p: &[f32], dp: &mut [f32], scale: f32) {
    let k = dp.len();
    let p = &p[..k];
    let dot: f64 = p
        .iter()
        .zip(dp.iter())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let dot = dot as f32;
    for j in 0..k {
        dp[j] = scale * p[j] * (dp[j] - dot);
    }
}

multiversion! {
    pub(crate) fn softmax_forward_row => forward_inplace_impl(row: &mut [f32], bias: &[f32], scale: f32) -> ()
}

multiversion! {
    pub(crate) fn softmax_backward_row => backward_inplace_impl(p: &[f32], dp: &mut [f32], scale: f32) -> ()
}

multiversion! {
    fn forward_mv => forward_impl(s: &[f32], bias: &[f32], scale: f32, p: &mut [f32]) -> ()
}

multiversion! {
    fn backward_mv => backward_impl(p: &[f32], dp: &[f32], scale: f32, ds: &mut [f32]) -> ()
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "pocl-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, bias) = (
            super::contiguous_f32(s1, l1, "attention scores")?,
            super::contiguous_f32(s2, l2, "attention bias/gradient")?,
        );
        let (_, h, q, k) = l1.shape().dims4()?;
        let mut p = vec![0f32; s.len()];
        // One task per (batch, head) matrix of q rows; the bias matrix is the batch's.
        p.par_chunks_mut(q * k)
            .zip(s.par_chunks(q * k))
            .enumerate()
            .for_each(|(bh, (p, s))| {
                let bias = &bias[(bh / h) * q * k..(bh / h + 1) * q * k];
                for ((p, s), b) in p.chunks_mut(k).zip(s.chunks(k)).zip(bias.chunks(k)) {
                    forward_mv(s, b, self.scale as f32, p);
                }
            });
        Ok((CpuStorage::F32(p), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = res
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &Backward(self.scale))?;
        Ok((Some(ds), None))
    }
}

struct Backward(f64);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "pocl-attention-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, dp) = (
            super::contiguous_f32(s1, l1, "attention scores")?,
            super::contiguous_f32(s2, l2, "attention bias/gradient")?,
        );
        let k = *l1.dims().last().unwrap_or(&1);
        let mut ds = vec![0f32; p.len()];
        ds.par_chunks_mut(64 * k)
            .zip(p.par_chunks(64 * k).zip(dp.par_chunks(64 * k)))
            .for_each(|(ds, (p, dp))| {
                for ((ds, p), dp) in ds.chunks_mut(k).zip(p.chunks(k)).zip(dp.chunks(k)) {
                    backward_mv(p, dp, self.0 as f32, ds);
                }
            });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against the composed softmax in f64 with candle autograd: probabilities and the gradient
    /// w.r.t. the scores, with a causal + padding bias broadcast over heads.
    #[test]
    fn matches_the_f64_composition() -> Result<()> {
        let dev = &Device::Cpu;
        let (b, h, q, k) = (2, 3, 5, 7);
        let s = Var::from_tensor(&Tensor::randn(0f32, 3.0, (b, h, q, k), dev)?)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dev)?;
        let bias = super::super::attention_bias(&mask, q)?;
        let dy = Tensor::randn(0f32, 1.0, (b, h, q, k), dev)?;
        let p = scaled_masked_softmax(s.as_tensor(), &bias, 0.37)?;
        let g = (p.clone() * &dy)?.sum_all()?.backward()?;
        let g = g.get(&s).unwrap().flatten_all()?.to_vec1::<f32>()?;

        let f64 = candle_core::DType::F64;
        let s64 = Var::from_tensor(&s.as_tensor().to_dtype(f64)?)?;
        let p64 = super::super::softmax_last_dim(
            &(s64.as_tensor() * 0.37)?.broadcast_add(&bias.to_dtype(f64)?)?,
        )?;
        let g64 = (p64.clone() * dy.to_dtype(f64)?)?.sum_all()?.backward()?;
        let g64 = g64.get(&s64).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let p = p.flatten_all()?.to_vec1::<f32>()?;
        let p64 = p64.flatten_all()?.to_vec1::<f64>()?;
        for (a, e) in p.iter().zip(&p64) {
            assert!((*a as f64 - e).abs() < 1e-6, "{a} vs {e}");
        }
        let scale = g64.iter().fold(1e-9f64, |m, v| m.max(v.abs()));
        for (a, e) in g.iter().zip(&g64) {
            assert!((*a as f64 - e).abs() < 1e-6 * scale, "{a} vs {e}");
        }
        // Batch 1, head 0, query 0 sees keys 0..=2 of which 0 and 1 are padding: all on key 2.
        let row = &p[h * q * k..h * q * k + k];
        assert_eq!(row[..3], [0.0, 0.0, 1.0]);
        Ok(())
    }
}
