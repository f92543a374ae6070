//! LayerNorm and RMSNorm over the last dimension as fused ops with backward. Why: the composed
//! versions are ~9 small elementwise tensors forward and twice as many backward per call (and
//! candle's own fused norms have no backward at all). One pass per row here (the statistics of eight rows summed side by side, each row in its own order), f64 inside; the
//! weight and bias gradients are summed per block of rows and the blocks added in order, so the
//! result does not depend on the thread count. On CUDA storage the same ops run the kernels of
//! src/ops/cuda/norm.cu (`ops::cuda`), same arithmetic.

use super::simd::multiversion;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task.
const BLOCK: usize = 16;

#[derive(Clone, Copy)]
struct Norm {
    /// LayerNorm subtracts the mean (and has a bias); RMSNorm does not.
    center: bool,
    eps: f64,
}

/// LayerNorm over the last dimension (biased variance, as torch).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = Norm { center: true, eps };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) · weight (Llama, Qwen).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = Norm { center: false, eps };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// Rows whose statistics are summed together: independent chains for the CPU to overlap (one
/// row's f64 sum is a chain of dependent adds, bound by their latency).
const GROUP: usize = 8;

/// (mean, 1/std) of each of the R rows of `x` (row r at r·d): every row summed in order from
/// the first element, as `Iterator::sum` does (from −0.0), whatever R is, so grouping rows does
/// not change a bit.
#[inline(always)]
fn stats_rows<const R: usize>(x: &[f32], d: usize, n: &Norm) -> [(f64, f64); R] {
    let x = &x[..R * d];
    let mut mean = [0f64; R];
    if n.center {
        let mut s = [-0f64; R];
        for i in 0..d {
            for r in 0..R {
                s[r] += x[r * d + i] as f64;
            }
        }
        for r in 0..R {
            mean[r] = s[r] / d as f64;
        }
    }
    let mut v = [-0f64; R];
    for i in 0..d {
        for r in 0..R {
            let t = x[r * d + i] as f64 - mean[r];
            v[r] += t * t;
        }
    }
    std::array::from_fn(|r| (mean[r], 1.0 / (v[r] / d as f64 + n.eps).sqrt()))
}

/// [`stats_rows`] for the rows of `x` (at most [`GROUP`]).
#[inline(always)]
fn stats_group(x: &[f32], d: usize, n: &Norm) -> [(f64, f64); GROUP] {
    let rows = x.len() / d;
    if rows == GROUP {
        return stats_rows::<GROUP>(x, d, n);
    }
    let mut st = [(0.0, 0.0); GROUP];
    for (r, st) in st.iter_mut().enumerate().take(rows) {
        *st = stats_rows::<1>(&x[r * d..], d, n)[0];
    }
    st
}

#[inline(always)]
fn forward_impl(n: Norm, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
    let d = w.len();
    for (xg, yg) in x.chunks(GROUP * d).zip(y.chunks_mut(GROUP * d)) {
        let st = stats_group(xg, d, &n);
        for ((x, y), &(mean, rstd)) in xg.chunks_exact(d).zip(yg.chunks_exact_mut(d)).zip(&st) {
            for i in 0..d {
                let v = (x[i] as f64 - mean) * rstd * w[i] as f64;
                y[i] = (v + b.map_or(0.0, |b| b[i] as f64)) as f32;
            }
        }
    }
}

/// dx for a block of rows; dw and db (f64, length d each) accumulate the block's share (row
/// by row in order, for each element).
#[inline(always)]
fn backward_impl(
    n: Norm,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f64],
    db: &mut [f64],
) {
    let d = w.len();
    let groups = x
        .chunks(GROUP * d)
        .zip(dy.chunks(GROUP * d))
        .zip(dx.chunks_mut(GROUP * d));
    for ((xg, dyg), dxg) in groups {
        let rows = xg.len() / d;
        let st = stats_group(xg, d, &n);
        // With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), where
        // the mean(g) term only exists when the mean was subtracted.
        let (mut sg, mut sgx) = ([0f64; GROUP], [0f64; GROUP]);
        for i in 0..d {
            for r in 0..rows {
                let (mean, rstd) = st[r];
                let xh = (xg[r * d + i] as f64 - mean) * rstd;
                let g = dyg[r * d + i] as f64 * w[i] as f64;
                sg[r] += g;
                sgx[r] += g * xh;
                dw[i] += dyg[r * d + i] as f64 * xh;
                db[i] += dyg[r * d + i] as f64;
            }
        }
        for r in 0..rows {
            let (mean, rstd) = st[r];
            let (mg, mgx) = (
                if n.center { sg[r] / d as f64 } else { 0.0 },
                sgx[r] / d as f64,
            );
            let (x, dy) = (&xg[r * d..(r + 1) * d], &dyg[r * d..(r + 1) * d]);
            for i in 0..d {
                let xh = (x[i] as f64 - mean) * rstd;
                let g = dy[i] as f64 * w[i] as f64;
                dxg[r * d + i] = (rstd * (g - mg - xh * mgx)) as f32;
            }
        }
    }
}

multiversion! {
    fn forward_mv => forward_impl(n: Norm, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) -> ()
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn backward_mv => backward_impl(n: Norm, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f64], db: &mut [f64]) -> ()
}

impl Norm {
    fn forward(
        &self,
        x: &[f32],
        lx: &Layout,
        w: &[f32],
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = w.len();
        if d == 0 || lx.dims().last() != Some(&d) || b.is_some_and(|b| b.len() != d) {
            candle_core::bail!("norm: input {:?} vs weight [{d}]", lx.dims());
        }
        let mut y = super::zeros_par(x.len());
        y.par_chunks_mut(BLOCK * d)
            .zip(x.par_chunks(BLOCK * d))
            .for_each(|(y, x)| forward_mv(*self, x, w, b, y));
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    /// (dx, dw, db) as one [rows + 2, d] tensor, split by the caller.
    fn backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        super::profile::time("norm.backward", x.device(), || self.backward_now(x, w, dy))
    }

    fn backward_now(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = w.elem_count();
        let rows = x.elem_count() / d;
        let all = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &dy.contiguous()?,
            &Backward(*self),
        )?;
        Ok((
            all.narrow(0, 0, rows)?.reshape(x.shape())?,
            all.narrow(0, rows, 1)?.reshape(w.shape())?,
            all.narrow(0, rows + 1, 1)?.reshape(d)?,
        ))
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "pocl-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, b) = (
            super::contiguous_f32(s2, l2, "norm weight")?,
            super::contiguous_f32(s3, l3, "norm bias")?,
        );
        self.forward(super::contiguous_f32(s1, l1, "norm input")?, l1, w, Some(b))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::norm_forward(true, self.eps, (s1, l1), (s2, l2), Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, dy)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "pocl-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(
            super::contiguous_f32(s1, l1, "norm input")?,
            l1,
            super::contiguous_f32(s2, l2, "norm weight")?,
            None,
        )
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::norm_forward(false, self.eps, (s1, l1), (s2, l2), None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct Backward(Norm);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "pocl-norm-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (
            super::contiguous_f32(s1, l1, "norm input")?,
            super::contiguous_f32(s2, l2, "norm weight")?,
            super::contiguous_f32(s3, l3, "norm gradient")?,
        );
        let d = w.len();
        if d == 0 || x.len() != dy.len() || x.len() % d != 0 {
            candle_core::bail!("norm backward: shapes do not fit");
        }
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, _) = out.split_at_mut(rows * d);
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(BLOCK * d)
            .zip(x.par_chunks(BLOCK * d).zip(dy.par_chunks(BLOCK * d)))
            .map(|(dx, (x, dy))| {
                let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
                backward_mv(self.0, x, w, dy, dx, &mut dw, &mut db);
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
        for (pw, pb) in &partial {
            for i in 0..d {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        for i in 0..d {
            out[rows * d + i] = dw[i] as f32;
            out[(rows + 1) * d + i] = db[i] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::norm_backward(self.0.center, self.0.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads_of(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        x: &Var,
        w: &Var,
        b: &Var,
        dy: &Tensor,
    ) -> Result<Vec<Vec<f32>>> {
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let g = (y.clone() * dy)?.sum_all()?.backward()?;
        let mut out = vec![y.flatten_all()?.to_vec1()?];
        for v in [x, w, b] {
            out.push(match g.get(v) {
                Some(t) => t.flatten_all()?.to_vec1()?,
                None => vec![],
            });
        }
        Ok(out)
    }

    /// Fused against the composition evaluated in f64 (candle autograd), values and all gradients.
    /// Eight rows summed side by side give each row the bits of the one-row sums (the per-row
    /// `Iterator::sum` the norms used before), for both norms, with an all −0.0 row.
    #[test]
    fn grouped_row_statistics_equal_one_row_at_a_time() {
        let d = 37;
        let mut x: Vec<f32> = (0..8 * d)
            .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 37.0)
            .collect();
        x[3 * d..4 * d].fill(-0.0);
        for center in [true, false] {
            let n = Norm { center, eps: 1e-5 };
            let grouped = stats_rows::<8>(&x, d, &n);
            for (r, &(mean, rstd)) in grouped.iter().enumerate() {
                let row = &x[r * d..(r + 1) * d];
                let want_mean = if center {
                    row.iter().map(|&v| v as f64).sum::<f64>() / d as f64
                } else {
                    0.0
                };
                let var = row
                    .iter()
                    .map(|&v| (v as f64 - want_mean).powi(2))
                    .sum::<f64>()
                    / d as f64;
                let want = (want_mean, 1.0 / (var + n.eps).sqrt());
                assert_eq!(
                    (mean.to_bits(), rstd.to_bits()),
                    (want.0.to_bits(), want.1.to_bits()),
                    "row {r}, center {center}"
                );
            }
        }
    }

    #[test]
    fn fused_norms_match_the_f64_composition() -> Result<()> {
        let dev = &Device::Cpu;
        let (rows, d) = (37, 48);
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (rows, d), dev)? + 0.7)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, d, dev)?)?;
        let dy = Tensor::randn(0f32, 1.0, (rows, d), dev)?;
        let to64 = |v: &Var| {
            Var::from_tensor(&v.as_tensor().to_dtype(candle_core::DType::F64).unwrap()).unwrap()
        };
        let (x64, w64, b64) = (to64(&x), to64(&w), to64(&b));
        let dy64 = dy.to_dtype(candle_core::DType::F64)?;
        for layer in [true, false] {
            let fused = grads_of(
                |x, w, b| {
                    if layer {
                        layer_norm(x, w, b, 1e-5)
                    } else {
                        rms_norm(x, w, 1e-6)
                    }
                },
                &x,
                &w,
                &b,
                &dy,
            )?;
            let eps = if layer { 1e-5 } else { 1e-6 };
            let y = crate::ops::portable::norm(
                x64.as_tensor(),
                w64.as_tensor(),
                layer.then_some(b64.as_tensor()),
                eps,
            )?;
            let g = (y.clone() * &dy64)?.sum_all()?.backward()?;
            let mut want = vec![y
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?];
            for v in [&x64, &w64, &b64] {
                want.push(match g.get(v) {
                    Some(t) => t
                        .flatten_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_vec1()?,
                    None => vec![],
                });
            }
            for (k, (a, e)) in fused.iter().zip(&want).enumerate() {
                assert_eq!(a.len(), e.len(), "layer {layer} part {k}");
                let scale = e.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(e).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
                assert!(err < 2e-6, "layer {layer} part {k}: relative error {err}");
            }
        }
        Ok(())
    }
}
