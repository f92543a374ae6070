//! Fused, vectorised activations with their backward: GELU (tanh approximation, GPT-2) and SiLU
//! (Llama, Qwen). candle's own versions call libm's `tanhf` / `expf` per element and build the
//! backward from ~8 elementwise tensors (pow, tanh, mul, add...); here forward and backward are
//! one pass each, in f32 with the branch-free `exp_f32` of `ops::fastmath` (≤ 2 ulp) so the loops
//! vectorise 16 lanes wide (compiled per instruction set, see [`super::simd`]). The ops' CUDA
//! sides run the same formulas (src/ops/cuda/act.cu, CUDA's expf).

use super::fastmath::exp_f32;
use super::simd::multiversion;
use super::Activation;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), transformers' `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    /// x·σ(x).
    Silu,
}

impl Kind {
    /// The kind's number in src/ops/cuda/act.cu.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn code(self) -> i32 {
        match self {
            Kind::GeluTanh => 0,
            Kind::Silu => 1,
        }
    }
}

/// Applies the activation (differentiable).
pub fn apply(x: &Tensor, kind: Kind) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(kind))
}

/// The model's activation: pocl's op for GELU-tanh and SiLU (CPU kernels; CUDA kernels in
/// src/ops/cuda/act.cu), candle's own for the rest.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh => apply(x, Kind::GeluTanh),
        Activation::Silu => apply(x, Kind::Silu),
        Activation::GeluErf => x.gelu_erf(),
        Activation::Relu => x.relu(),
    }
}

/// dL/dx of y = [`activate`](x) from x and dL/dy: what its autograd computes (pocl's backward
/// op, or the derivative candle's autograd builds, the same tensor ops in the same order), for
/// a caller that recomputes x rather than keep the graph (`ops::recompute`).
pub(crate) fn backward(act: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let d = match act {
        Activation::GeluTanh => {
            return x.apply_op2_no_bwd(&dy.contiguous()?, &Backward(Kind::GeluTanh))
        }
        Activation::Silu => return x.apply_op2_no_bwd(&dy.contiguous()?, &Backward(Kind::Silu)),
        Activation::GeluErf => {
            let neg_half_square = (x.sqr()?.neg()? / 2.)?;
            let scaled_exp = ((0.398942 * neg_half_square.exp()?)? * x)?;
            let erf_half = (0.5 * (x / 2f64.sqrt())?.erf()?)?;
            ((0.5 + scaled_exp)? + erf_half)?
        }
        Activation::Relu => x.ge(&x.zeros_like()?)?.to_dtype(x.dtype())?,
    };
    dy * d
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044715;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// σ(x) = 1/(1 + e^{−x}), clamped where σ saturates in f32.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x.clamp(-80.0, 80.0)))
}

#[inline(always)]
fn forward_impl(kind: Kind, x: &[f32], y: &mut [f32]) {
    let n = y.len();
    let x = &x[..n];
    match kind {
        Kind::GeluTanh => {
            // 0.5·(1 + tanh u) = σ(2u): no cancellation in the negative tail (f32 would lose
            // all digits of 1 + tanh u there).
            for i in 0..n {
                let v = x[i];
                y[i] = v * sigmoid(2.0 * SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
            }
        }
        Kind::Silu => {
            for i in 0..n {
                let v = x[i];
                y[i] = v * sigmoid(v);
            }
        }
    }
}

/// dx = dy · f'(x).
#[inline(always)]
fn backward_impl(kind: Kind, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let n = dx.len();
    let (x, dy) = (&x[..n], &dy[..n]);
    match kind {
        Kind::GeluTanh => {
            // With s = σ(2u) = 0.5·(1 + tanh u): f' = s + 2·v·s·(1 − s)·du/dv.
            for i in 0..n {
                let v = x[i];
                let s = sigmoid(2.0 * SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
                dx[i] = dy[i] * (s + 2.0 * v * s * (1.0 - s) * du);
            }
        }
        Kind::Silu => {
            for i in 0..n {
                let v = x[i];
                let s = sigmoid(v);
                dx[i] = dy[i] * s * (1.0 + v * (1.0 - s));
            }
        }
    }
}

multiversion! {
    fn forward_mv => forward_impl(kind: Kind, x: &[f32], y: &mut [f32]) -> ()
}

multiversion! {
    fn backward_mv => backward_impl(kind: Kind, x: &[f32], dy: &[f32], dx: &mut [f32]) -> ()
}

struct Forward(Kind);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "pocl-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(s, l, "activation input")?;
        let mut y = super::zeros_par(x.len());
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| forward_mv(self.0, x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::activation(self.0.code(), (s, l), None)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        super::profile::time("activate.backward", arg.device(), || {
            let x = arg.contiguous()?;
            Ok(Some(x.apply_op2_no_bwd(
                &grad_res.contiguous()?,
                &Backward(self.0),
            )?))
        })
    }
}

struct Backward(Kind);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "pocl-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (
            super::contiguous_f32(s1, l1, "activation input")?,
            super::contiguous_f32(s2, l2, "activation gradient")?,
        );
        if x.len() != dy.len() {
            candle_core::bail!(
                "activation backward: {} inputs, {} gradients",
                x.len(),
                dy.len()
            );
        }
        let mut dx = super::zeros_par(x.len());
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(dx, (x, dy))| backward_mv(self.0, x, dy, dx));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::activation(self.0.code(), (s1, l1), Some((s2, l2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against float64 closed forms, and the gradient against central differences of the f64
    /// forward, on values from −12 to 12 (both tails and the bend).
    #[test]
    fn forward_and_gradient_match_f64() -> Result<()> {
        let xs: Vec<f32> = (0..2401).map(|i| (i as f32 - 1200.0) / 100.0).collect();
        let f64_fwd = |k: Kind, v: f64| match k {
            Kind::GeluTanh => {
                let (c, a) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
                0.5 * v * (1.0 + (c * (v + a * v * v * v)).tanh())
            }
            Kind::Silu => v / (1.0 + (-v).exp()),
        };
        for kind in [Kind::GeluTanh, Kind::Silu] {
            let x = Var::from_vec(xs.clone(), xs.len(), &Device::Cpu)?;
            let y = apply(x.as_tensor(), kind)?;
            // Weight each output differently so the gradient check sees dy ≠ 1.
            let w: Vec<f32> = (0..xs.len()).map(|i| 1.0 + (i % 7) as f32 / 7.0).collect();
            let wt = Tensor::from_vec(w.clone(), xs.len(), &Device::Cpu)?;
            let g = (y.clone() * wt)?.sum_all()?.backward()?;
            let (y, g) = (y.to_vec1::<f32>()?, g.get(&x).unwrap().to_vec1::<f32>()?);
            for (i, &v) in xs.iter().enumerate() {
                let v = v as f64;
                let want = f64_fwd(kind, v);
                assert!(
                    (y[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{kind:?} f({v})"
                );
                let h = 1e-5;
                let d = (f64_fwd(kind, v + h) - f64_fwd(kind, v - h)) / (2.0 * h) * w[i] as f64;
                assert!(
                    (g[i] as f64 - d).abs() <= 1e-5 * d.abs().max(1e-2),
                    "{kind:?} f'({v}): {} vs {d}",
                    g[i]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn matches_candle_on_a_matrix() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (37, 129), &Device::Cpu)?;
        for (kind, reference) in [(Kind::GeluTanh, x.gelu()?), (Kind::Silu, x.silu()?)] {
            let d = (apply(&x, kind)? - reference)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 2e-6, "{kind:?}: {d}");
        }
        Ok(())
    }
}
