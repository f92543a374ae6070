//! pocl's CUDA kernels (`src/ops/cuda/*.cu`) as candle ops: AdamW, the gradient norm, the
//! attention softmax, the embedding gradient, and the launchers of the norms' and activations'
//! kernels (the `cuda_fwd`s of `ops::norm` and `ops::activation`);
//! the KD row kernel's op is `kd::rows`, beside the CPU loss it mirrors. Each op is a candle
//! custom op whose `cuda_fwd` (feature `cuda`) launches our kernel and whose `cpu_fwd` runs the
//! CPU arithmetic of the same op, so every caller (`train::optim` and the model ops under
//! [`super::Kernels::Cuda`]) runs and is tested on the CPU too, and a self-test can compare the
//! two sides op by op through the public functions below.
//!
//! Status: every kernel compiles to PTX and through ptxas for sm_90a and sm_80
//! (tools/check-cuda-kernels.sh, which `.ci/run` runs where the toolkit installs). The KD row,
//! AdamW, norm and softmax kernels passed `pocl doctor --device cuda` on an H200 (README,
//! "GPU"); the embedding-gradient and activation kernels (act.cu, embed.cu) have not yet run
//! on a GPU, only their host emulation in the tests. `Backend::new` keeps `portable` the
//! default on CUDA (`--kernels fused` opts in) until the set is measured faster.
//!
//! The PTX is made by build.rs with the toolkit's nvcc for `CUDA_COMPUTE_CAP` and embedded in
//! the binary; candle loads it once per device (`get_or_load_custom_func`).

use candle_core::{
    bail, CpuStorage, CustomOp1, DType, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor, Var,
};

/// The PTX of `src/ops/cuda/*.cu` (also `kd::rows`'s, whose op lives beside the KD loss).
#[cfg(feature = "cuda")]
pub(crate) mod ptx {
    pub const KD_ROWS: &str = include_str!(concat!(env!("OUT_DIR"), "/kd_rows.ptx"));
    pub const OPTIM: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
    pub const NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
    pub const SOFTMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));
    pub const EMBED: &str = include_str!(concat!(env!("OUT_DIR"), "/embed.ptx"));
    pub const ACT: &str = include_str!(concat!(env!("OUT_DIR"), "/act.ptx"));
}

/// A contiguous f32 CPU storage's data, mutable.
pub(crate) fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, who: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{who} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => bail!("{who} must be contiguous"),
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW and the gradient norm.

/// One AdamW update's constants (torch's formula, as `train::optim`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    pub b1: f64,
    pub b2: f64,
    /// Bias corrections 1 − β₁ᵗ, 1 − β₂ᵗ.
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub lr: f64,
    /// 1 − lr·weight_decay, or 1 for a parameter that is not decayed.
    pub decay: f64,
    /// The clip coefficient applied to the gradient (1 = unclipped).
    pub scale: f64,
}

/// m and v from the gradient, in place in one [2, n] buffer (m then v): `pocl_adamw_moments`.
struct AdamWMoments(AdamWHyper);

impl AdamWMoments {
    fn cpu(&self, mv: &mut CpuStorage, l: &Layout, g: Option<&[f32]>) -> Result<()> {
        let h = self.0;
        let mv = f32_mut(mv, l, "AdamW moments")?;
        let n = mv.len() / 2;
        let (m, v) = mv.split_at_mut(n);
        if g.is_some_and(|g| g.len() != n) {
            bail!("AdamW: the gradient does not match the moments' size");
        }
        for i in 0..n {
            let gi = match g {
                Some(g) if h.scale < 1.0 => (g[i] as f64 * h.scale) as f32 as f64,
                Some(g) => g[i] as f64,
                None => 0.0,
            };
            let mi = h.b1 * m[i] as f64 + (1.0 - h.b1) * gi;
            let vi = h.b2 * v[i] as f64 + (1.0 - h.b2) * gi * gi;
            m[i] = mi as f32;
            v[i] = vi as f32;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        mv: &mut candle_core::CudaStorage,
        l: &Layout,
        g: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let h = self.0;
        let dev = mv.device().clone();
        let (a, b) = contiguous(l, "AdamW moments")?;
        let n = ((b - a) / 2) as i64;
        let func = dev.get_or_load_custom_func("pocl_adamw_moments", "pocl_optim", ptx::OPTIM)?;
        let g_view = match g {
            Some((g, lg)) => {
                let (ga, gb) = contiguous(lg, "AdamW gradient")?;
                if (gb - ga) as i64 != n {
                    bail!("AdamW: the gradient does not match the moments' size");
                }
                Some(g.as_cuda_slice::<f32>()?.slice(ga..gb))
            }
            None => None,
        };
        let has_grad = i32::from(g_view.is_some());
        let mut mv_view = mv.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let dummy = dev.alloc_zeros::<f32>(1)?;
        let mut builder = func.builder();
        builder.arg(&mut mv_view);
        match &g_view {
            Some(gv) => builder.arg(gv),
            None => builder.arg(&dummy),
        };
        builder.arg(&n);
        builder.arg(&has_grad);
        builder.arg(&h.b1);
        builder.arg(&h.b2);
        builder.arg(&h.scale);
        // SAFETY: arguments in pocl_adamw_moments's order and types; mv holds 2n, g n floats.
        unsafe { builder.launch(flat_config(n as usize)) }.w()?;
        Ok(())
    }
}

impl InplaceOp1 for AdamWMoments {
    fn name(&self) -> &'static str {
        "pocl-adamw-moments"
    }
    fn cpu_fwd(&self, mv: &mut CpuStorage, l: &Layout) -> Result<()> {
        self.cpu(mv, l, None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, mv: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        self.cuda(mv, l, None)
    }
}

impl InplaceOp2 for AdamWMoments {
    fn name(&self) -> &'static str {
        "pocl-adamw-moments"
    }
    fn cpu_fwd(&self, mv: &mut CpuStorage, l: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let g = super::contiguous_f32(g, lg, "AdamW gradient")?;
        self.cpu(mv, l, Some(g))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        mv: &mut candle_core::CudaStorage,
        l: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        self.cuda(mv, l, Some((g, lg)))
    }
}

/// The parameter from the updated moments, in place: `pocl_adamw_apply`.
struct AdamWApply(AdamWHyper);

impl InplaceOp2 for AdamWApply {
    fn name(&self) -> &'static str {
        "pocl-adamw-apply"
    }
    fn cpu_fwd(&self, p: &mut CpuStorage, l: &Layout, mv: &CpuStorage, lm: &Layout) -> Result<()> {
        let h = self.0;
        let p = f32_mut(p, l, "AdamW parameter")?;
        let mv = super::contiguous_f32(mv, lm, "AdamW moments")?;
        let n = p.len();
        if mv.len() != 2 * n {
            bail!("AdamW: the moments do not match the parameter's size");
        }
        let (m, v) = mv.split_at(n);
        for i in 0..n {
            let denom = (v[i] as f64 / h.bc2).sqrt() + h.eps;
            p[i] = (p[i] as f64 * h.decay - h.lr * (m[i] as f64 / h.bc1) / denom) as f32;
        }
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        l: &Layout,
        mv: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let h = self.0;
        let dev = p.device().clone();
        let (a, b) = contiguous(l, "AdamW parameter")?;
        let (ma, mb) = contiguous(lm, "AdamW moments")?;
        let n = (b - a) as i64;
        if (mb - ma) as i64 != 2 * n {
            bail!("AdamW: the moments do not match the parameter's size");
        }
        let func = dev.get_or_load_custom_func("pocl_adamw_apply", "pocl_optim", ptx::OPTIM)?;
        let mut p_view = p.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let mv_view = mv.as_cuda_slice::<f32>()?.slice(ma..mb);
        let mut builder = func.builder();
        builder.arg(&mut p_view);
        builder.arg(&mv_view);
        builder.arg(&n);
        builder.arg(&h.bc1);
        builder.arg(&h.bc2);
        builder.arg(&h.eps);
        builder.arg(&h.lr);
        builder.arg(&h.decay);
        // SAFETY: arguments in pocl_adamw_apply's order and types; p holds n, mv 2n floats.
        unsafe { builder.launch(flat_config(n as usize)) }.w()?;
        Ok(())
    }
}

/// One AdamW update of `param` with its moments `mv` ([2, n] f32 on the parameter's device: m
/// then v, updated in place) and gradient `grad` (None = zero): two kernels, the moments then
/// the parameter (see optim.cu for why two).
pub fn adamw_step(param: &Var, mv: &Tensor, grad: Option<&Tensor>, h: AdamWHyper) -> Result<()> {
    let n = param.elem_count();
    if mv.elem_count() != 2 * n {
        bail!(
            "AdamW: moments of {} elements for a parameter of {n}",
            mv.elem_count()
        );
    }
    let moments = AdamWMoments(h);
    match grad {
        Some(g) => mv.inplace_op2(&g.flatten_all()?.contiguous()?, &moments)?,
        None => mv.inplace_op1(&moments)?,
    }
    param.as_tensor().inplace_op2(mv, &AdamWApply(h))
}

/// Σ x² in f64 over a tensor of f32s: per-block partials of `pocl_sum_squares` on CUDA (a fixed
/// grid, added here in order: the same value on every run), per-chunk partials on the CPU.
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    let partials = x
        .to_dtype(DType::F32)?
        .flatten_all()?
        .contiguous()?
        .apply_op1_no_bwd(&SumSquares)?
        .to_vec1::<f64>()?;
    Ok(partials.iter().sum())
}

struct SumSquares;

/// Blocks of the sum-of-squares grid: fixed, so the partials (and their sum) never depend on
/// the device's size.
#[cfg(feature = "cuda")]
const SQ_BLOCKS: usize = 1024;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "pocl-sum-squares"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(s, l, "sum of squares")?;
        let p: Vec<f64> = x
            .chunks(1 << 16)
            .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum())
            .collect();
        let n = p.len();
        Ok((CpuStorage::F64(p), Shape::from(n)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let dev = s.device().clone();
        let (a, b) = contiguous(l, "sum of squares")?;
        let n = (b - a) as i64;
        let func = dev.get_or_load_custom_func("pocl_sum_squares", "pocl_optim", ptx::OPTIM)?;
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        let partial = dev.alloc_zeros::<f64>(SQ_BLOCKS)?;
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&n);
        builder.arg(&partial);
        let cfg = LaunchConfig {
            grid_dim: (SQ_BLOCKS as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments in pocl_sum_squares's order and types; partial holds one per block.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(partial, dev),
            Shape::from(SQ_BLOCKS),
        ))
    }
}

#[cfg(feature = "cuda")]
fn contiguous(l: &Layout, who: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{who} must be contiguous")))
}

/// A grid-stride launch over n elements.
#[cfg(feature = "cuda")]
fn flat_config(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 4096) as u32;
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm (the `cuda_fwd`s of `ops::norm`'s ops, whose `cpu_fwd` is the CPU kernel).

/// Threads per block of the row kernels of norm.cu.
#[cfg(feature = "cuda")]
const NORM_THREADS: u32 = 256;

/// y = norm(x)·w (+ b) over the last dimension of x (contiguous f32), `center` for LayerNorm.
#[cfg(feature = "cuda")]
pub(crate) fn norm_forward(
    center: bool,
    eps: f64,
    (x, lx): (&candle_core::CudaStorage, &Layout),
    (w, lw): (&candle_core::CudaStorage, &Layout),
    b: Option<(&candle_core::CudaStorage, &Layout)>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    let dev = x.device().clone();
    let (xa, xb) = contiguous(lx, "norm input")?;
    let (wa, wb) = contiguous(lw, "norm weight")?;
    let d = wb - wa;
    if d == 0 || lx.dims().last() != Some(&d) {
        bail!("norm: input {:?} vs weight [{d}]", lx.dims());
    }
    let rows = (xb - xa) / d;
    let y = dev.alloc_zeros::<f32>(rows * d)?;
    if rows > 0 {
        let func = dev.get_or_load_custom_func("pocl_norm_forward", "pocl_norm", ptx::NORM)?;
        let xv = x.as_cuda_slice::<f32>()?.slice(xa..xb);
        let wv = w.as_cuda_slice::<f32>()?.slice(wa..wb);
        let bv = match b {
            Some((b, lb)) => {
                let (ba, bb) = contiguous(lb, "norm bias")?;
                if bb - ba != d {
                    bail!("norm: bias does not match the weight [{d}]");
                }
                Some(b.as_cuda_slice::<f32>()?.slice(ba..bb))
            }
            None => None,
        };
        let (d_i, center_i, has_bias) = (d as i32, i32::from(center), i32::from(bv.is_some()));
        let mut builder = func.builder();
        builder.arg(&xv);
        builder.arg(&wv);
        match &bv {
            Some(bv) => builder.arg(bv),
            None => builder.arg(&wv), // never read (has_bias = 0)
        };
        builder.arg(&y);
        builder.arg(&d_i);
        builder.arg(&center_i);
        builder.arg(&has_bias);
        builder.arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments in pocl_norm_forward's order and types; x and y hold rows·d floats,
        // w and b d floats.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(y, dev),
        lx.shape().clone(),
    ))
}

/// The norm's backward: (dx; dw; db) as one [rows + 2, d] tensor, the CPU op's layout.
#[cfg(feature = "cuda")]
pub(crate) fn norm_backward(
    center: bool,
    eps: f64,
    (x, lx): (&candle_core::CudaStorage, &Layout),
    (w, lw): (&candle_core::CudaStorage, &Layout),
    (dy, ldy): (&candle_core::CudaStorage, &Layout),
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    let dev = x.device().clone();
    let (xa, xb) = contiguous(lx, "norm input")?;
    let (wa, wb) = contiguous(lw, "norm weight")?;
    let (ga, gb) = contiguous(ldy, "norm gradient")?;
    let d = wb - wa;
    if d == 0 || xb - xa != gb - ga || (xb - xa) % d != 0 {
        bail!("norm backward: shapes do not fit");
    }
    let rows = (xb - xa) / d;
    let mut out = dev.alloc_zeros::<f32>((rows + 2) * d)?;
    if rows > 0 {
        let stats = dev.alloc_zeros::<f64>(2 * rows)?;
        let xv = x.as_cuda_slice::<f32>()?.slice(xa..xb);
        let wv = w.as_cuda_slice::<f32>()?.slice(wa..wb);
        let gv = dy.as_cuda_slice::<f32>()?.slice(ga..gb);
        let (d_i, center_i, rows_i) = (d as i32, i32::from(center), rows as i64);
        {
            let func =
                dev.get_or_load_custom_func("pocl_norm_backward_rows", "pocl_norm", ptx::NORM)?;
            let mut dx = out.slice_mut(0..rows * d);
            let mut builder = func.builder();
            builder.arg(&xv);
            builder.arg(&wv);
            builder.arg(&gv);
            builder.arg(&mut dx);
            builder.arg(&stats);
            builder.arg(&d_i);
            builder.arg(&center_i);
            builder.arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (NORM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments in pocl_norm_backward_rows's order and types; x, dy and dx hold
            // rows·d floats, stats 2·rows doubles.
            unsafe { builder.launch(cfg) }.w()?;
        }
        let func =
            dev.get_or_load_custom_func("pocl_norm_backward_params", "pocl_norm", ptx::NORM)?;
        let mut builder = func.builder();
        builder.arg(&xv);
        builder.arg(&gv);
        builder.arg(&stats);
        builder.arg(&mut out);
        builder.arg(&rows_i);
        builder.arg(&d_i);
        // SAFETY: arguments in pocl_norm_backward_params's order and types; out holds
        // (rows + 2)·d floats.
        unsafe { builder.launch(flat_config(d)) }.w()?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((rows + 2, d)),
    ))
}

// ---------------------------------------------------------------------------------------------
// Linear layers.

/// y = x·Wᵀ + b: the portable product, except that a bf16 weight (a frozen bf16 teacher) is
/// multiplied in bf16 (cuBLAS bf16 on CUDA, accumulating in f32) with the input rounded to bf16,
/// as a PyTorch bf16 model computes, instead of widening the whole weight to f32 per product;
/// an f32 weight (f32 or bf16-mixed student) goes through `recompute::Linear` (the portable
/// product, with less kept for the backward). The output is f32 (as the portable one).
pub fn linear(w: &super::Weight, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (w, out_in) = match w {
        super::Weight::Bf16Tensor { w, out_in } => (w, out_in),
        super::Weight::F32 {
            w,
            out_in,
            bf16_mixed,
            ..
        } => {
            let op = super::recompute::Linear {
                out_in: *out_in,
                mixed: *bf16_mixed,
                act: None,
            };
            return op.apply(w, x, b);
        }
        _ => return super::portable::linear(w, x, b),
    };
    let w = if *out_in { w.t()? } else { w.clone() };
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let y = x
        .reshape(((), inp))?
        .to_dtype(DType::BF16)?
        .matmul(&w)?
        .to_dtype(DType::F32)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = y.dim(1)?;
    y.reshape(out)
}

/// act(x·Wᵀ + b): [`linear`] and its activation, as one `recompute::Linear` for an f32 weight,
/// which then keeps act's output only, not its input too.
pub fn linear_activate(
    w: &super::Weight,
    x: &Tensor,
    b: Option<&Tensor>,
    act: super::Activation,
) -> Result<Tensor> {
    match w {
        super::Weight::F32 {
            w,
            out_in,
            bf16_mixed,
            ..
        } => super::recompute::Linear {
            out_in: *out_in,
            mixed: *bf16_mixed,
            act: Some(act),
        }
        .apply(w, x, b),
        _ => super::activation::activate(&linear(w, x, b)?, act),
    }
}

// ---------------------------------------------------------------------------------------------
// Activations (the `cuda_fwd`s of `ops::activation`'s ops, whose `cpu_fwd` is the CPU kernel).

/// GELU-tanh (`kind` 0) or SiLU (1) of contiguous f32 x: y, or with `dy` the backward dx
/// (act.cu).
#[cfg(feature = "cuda")]
pub(crate) fn activation(
    kind: i32,
    (x, lx): (&candle_core::CudaStorage, &Layout),
    dy: Option<(&candle_core::CudaStorage, &Layout)>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    let dev = x.device().clone();
    let (xa, xb) = contiguous(lx, "activation input")?;
    let n = xb - xa;
    let dyv = match dy {
        Some((dy, ld)) => {
            let (da, db) = contiguous(ld, "activation gradient")?;
            if db - da != n {
                bail!("activation backward: {n} inputs, {} gradients", db - da);
            }
            Some(dy.as_cuda_slice::<f32>()?.slice(da..db))
        }
        None => None,
    };
    // SAFETY: the kernel writes all n elements before the storage is used.
    let out = unsafe { dev.alloc::<f32>(n)? };
    if n > 0 {
        let name = match dyv {
            Some(_) => "pocl_act_backward",
            None => "pocl_act_forward",
        };
        let func = dev.get_or_load_custom_func(name, "pocl_act", ptx::ACT)?;
        let xv = x.as_cuda_slice::<f32>()?.slice(xa..xb);
        let n_i = n as i64;
        let mut builder = func.builder();
        builder.arg(&xv);
        if let Some(dyv) = &dyv {
            builder.arg(dyv);
        }
        builder.arg(&out);
        builder.arg(&n_i);
        builder.arg(&kind);
        // SAFETY: arguments in pocl_act_forward's / pocl_act_backward's order and types; x, dy
        // and out hold n floats.
        unsafe { builder.launch(flat_config(n)) }.w()?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(out, dev),
        lx.shape().clone(),
    ))
}

// ---------------------------------------------------------------------------------------------
// The embedding.

/// Rows of an embedding W [vocab, d] for the ids (any shape) → [n, d]. A trainable one gets
/// [`embedding_grad`] as its backward instead of candle's index_add, whose CUDA kernel runs one
/// thread per column over all the tokens; others take the portable gather.
pub fn embed(w: &super::Weight, ids: &Tensor) -> Result<Tensor> {
    let super::Weight::F32 {
        w: table,
        out_in: true,
        ..
    } = w
    else {
        return super::portable::embed(w, ids);
    };
    if !table.track_op() {
        return super::portable::embed(w, ids);
    }
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?;
    // The backward groups the tokens by id on the host. Reading the ids back waits for the
    // device, but at the start of a forward (where the embeddings are) little is queued.
    let host: Vec<u32> = ids.to_vec1()?;
    let vocab = table.dim(0)?;
    if let Some(&j) = host.iter().find(|&&j| j as usize >= vocab) {
        bail!("token id {j} is outside the embedding ({vocab} rows)");
    }
    let rows = table.detach().index_select(&ids, 0)?;
    table.apply_op1(EmbedRows {
        out: super::recompute::Precomputed::new(rows)?,
        ids: host,
        vocab,
    })
}

/// dW [vocab, d] of an embedding from the gradient dy [n, d] of its rows for `ids` (n of them):
/// each id's rows summed in token order, as the CPU's index_add does (so to the bit).
pub fn embedding_grad(dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
    dy.contiguous()?
        .apply_op1_no_bwd(&EmbeddingGrad { ids, vocab })
}

/// The gathered rows, computed before the op is applied (candle's index_select).
struct EmbedRows {
    out: super::recompute::Precomputed,
    ids: Vec<u32>,
    vocab: usize,
}

impl CustomOp1 for EmbedRows {
    fn name(&self) -> &'static str {
        "pocl-embed"
    }
    super::recompute::precomputed_forward!(out; _a _la);
    fn bwd(&self, _w: &Tensor, _rows: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(embedding_grad(dy, &self.ids, self.vocab)?))
    }
}

struct EmbeddingGrad<'a> {
    ids: &'a [u32],
    vocab: usize,
}

impl CustomOp1 for EmbeddingGrad<'_> {
    fn name(&self) -> &'static str {
        "pocl-embedding-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        if n != self.ids.len() {
            bail!("embedding gradient: {n} rows for {} ids", self.ids.len());
        }
        let dy = super::contiguous_f32(s, l, "embedding gradient")?;
        let mut dw = vec![0f32; self.vocab * d];
        for (row, &j) in dy.chunks(d.max(1)).zip(self.ids) {
            let out = &mut dw[j as usize * d..(j as usize + 1) * d];
            out.iter_mut().zip(row).for_each(|(o, x)| *o += x);
        }
        Ok((CpuStorage::F32(dw), Shape::from((self.vocab, d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (n, d) = l.shape().dims2()?;
        if n != self.ids.len() {
            bail!("embedding gradient: {n} rows for {} ids", self.ids.len());
        }
        let dev = s.device().clone();
        let (a, b) = contiguous(l, "embedding gradient")?;
        let groups = TokensById::new(self.ids, self.vocab);
        let dw = dev.alloc_zeros::<f32>(self.vocab * d)?;
        if !groups.rows.is_empty() && d > 0 {
            let order = dev.clone_htod(&groups.order)?;
            let starts = dev.clone_htod(&groups.starts)?;
            let rows = dev.clone_htod(&groups.rows)?;
            let func =
                dev.get_or_load_custom_func("pocl_embedding_grad", "pocl_embed", ptx::EMBED)?;
            let dyv = s.as_cuda_slice::<f32>()?.slice(a..b);
            let d_u = d as u32;
            let mut builder = func.builder();
            builder.arg(&dyv);
            builder.arg(&order);
            builder.arg(&starts);
            builder.arg(&rows);
            builder.arg(&d_u);
            builder.arg(&dw);
            let cfg = LaunchConfig {
                grid_dim: (groups.rows.len() as u32, 1, 1),
                block_dim: (EMBED_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments in pocl_embedding_grad's order and types; dy holds n·d floats,
            // order n ids < n, starts rows + 1 offsets <= n, rows ids < vocab, dw vocab·d floats.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dw, dev),
            Shape::from((self.vocab, d)),
        ))
    }
}

/// Threads per block of the embedding gradient (over the d columns of one row).
#[cfg(feature = "cuda")]
const EMBED_THREADS: u32 = 256;

/// The tokens grouped by id, for `pocl_embedding_grad`: the used ids ascending (`rows`), and
/// for the r-th, its tokens `order[starts[r]..starts[r + 1]]` in increasing order.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct TokensById {
    rows: Vec<u32>,
    starts: Vec<u32>,
    order: Vec<u32>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl TokensById {
    /// A stable counting sort of the tokens by id (ids < vocab).
    fn new(ids: &[u32], vocab: usize) -> Self {
        let mut count = vec![0u32; vocab];
        for &j in ids {
            count[j as usize] += 1;
        }
        let rows: Vec<u32> = (0..vocab as u32)
            .filter(|&v| count[v as usize] > 0)
            .collect();
        let mut next = vec![0u32; vocab];
        let mut starts = Vec::with_capacity(rows.len() + 1);
        let mut at = 0u32;
        for &v in &rows {
            starts.push(at);
            next[v as usize] = at;
            at += count[v as usize];
        }
        starts.push(at);
        let mut order = vec![0u32; ids.len()];
        for (t, &j) in ids.iter().enumerate() {
            order[next[j as usize] as usize] = t as u32;
            next[j as usize] += 1;
        }
        TokensById {
            rows,
            starts,
            order,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The attention softmax.

/// Scaled dot-product attention (the portable composition, see `ops::portable::attention`) with
/// the scale, bias and softmax fused into [`attention_softmax`]: one op forward and one backward
/// instead of ~5 elementwise tensors each way over [b, h, tq, tk].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    super::portable::attention_with(q, k, v, |scores| attention_softmax(scores, bias, scale))
}

/// softmax(scores·scale + bias) over the last dimension, with backward; scores [b, h, tq, tk]
/// f32, bias [b, 1, tq, tk] (shared by the heads). The CPU side runs `ops::softmax`'s rows, CUDA
/// `pocl_softmax_forward` / `_backward` (softmax.cu).
pub fn attention_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, tq, tk) = scores.dims4()?;
    // One bias row per (batch, query), shared by the heads; a smaller bias is broadcast to it.
    let bias = bias.broadcast_as((b, 1, tq, tk))?;
    scores.contiguous()?.apply_op2(
        &bias.to_dtype(DType::F32)?.contiguous()?,
        AttnSoftmax {
            scale: scale as f32,
        },
    )
}

struct AttnSoftmax {
    scale: f32,
}

impl candle_core::CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "pocl-attention-softmax"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, h, tq, tk) = ls.shape().dims4()?;
        let s = super::contiguous_f32(s, ls, "attention scores")?;
        let bias = super::contiguous_f32(bias, lb, "attention bias")?;
        let mut p = s.to_vec();
        for (r, row) in p.chunks_mut(tk.max(1)).enumerate() {
            let br = (r / (h * tq)) * tq + r % tq;
            super::softmax::softmax_forward_row(row, &bias[br * tk..(br + 1) * tk], self.scale);
        }
        Ok((CpuStorage::F32(p), ls.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        ls: &Layout,
        bias: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (b, h, tq, tk) = ls.shape().dims4()?;
        let dev = s.device().clone();
        let (sa, sb) = contiguous(ls, "attention scores")?;
        let (ba, bb) = contiguous(lb, "attention bias")?;
        let rows = b * h * tq;
        let p = dev.alloc_zeros::<f32>(rows * tk)?;
        if rows > 0 && tk > 0 {
            let func =
                dev.get_or_load_custom_func("pocl_softmax_forward", "pocl_softmax", ptx::SOFTMAX)?;
            let sv = s.as_cuda_slice::<f32>()?.slice(sa..sb);
            let bv = bias.as_cuda_slice::<f32>()?.slice(ba..bb);
            let (tk_i, h_i, tq_i) = (tk as i32, h as i32, tq as i32);
            let mut builder = func.builder();
            builder.arg(&sv);
            builder.arg(&bv);
            builder.arg(&p);
            builder.arg(&tk_i);
            builder.arg(&h_i);
            builder.arg(&tq_i);
            builder.arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (ROW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments in pocl_softmax_forward's order and types; s and p hold rows·tk
            // floats, bias b·tq·tk.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(p, dev),
            ls.shape().clone(),
        ))
    }
    fn bwd(
        &self,
        _s: &Tensor,
        _bias: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = attention_softmax_backward(p, dp, self.scale as f64)?;
        Ok((Some(ds), None))
    }
}

/// The backward of [`attention_softmax`] from its probabilities p and their gradient dp:
/// ds = scale·p·(dp − Σ p·dp) per row (the bias gets no gradient: it is a mask).
pub(crate) fn attention_softmax_backward(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    let scale = scale as f32;
    p.contiguous()?
        .apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxBackward { scale })
}

/// [`attention_softmax_backward`]'s op.
struct SoftmaxBackward {
    scale: f32,
}

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "pocl-attention-softmax-backward"
    }
    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        dp: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tk = lp.dims().last().copied().unwrap_or(0).max(1);
        let p = super::contiguous_f32(p, lp, "attention probabilities")?;
        let mut ds = super::contiguous_f32(dp, ld, "attention gradient")?.to_vec();
        for (pr, dr) in p.chunks(tk).zip(ds.chunks_mut(tk)) {
            super::softmax::softmax_backward_row(pr, dr, self.scale);
        }
        Ok((CpuStorage::F32(ds), lp.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        lp: &Layout,
        dp: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let dev = p.device().clone();
        let (pa, pb) = contiguous(lp, "attention probabilities")?;
        let (da, db) = contiguous(ld, "attention gradient")?;
        let tk = lp.dims().last().copied().unwrap_or(0);
        if pb - pa != db - da {
            bail!("attention softmax backward: shapes do not fit");
        }
        let ds = dev.alloc_zeros::<f32>(pb - pa)?;
        if tk > 0 && pb > pa {
            let rows = (pb - pa) / tk;
            let func =
                dev.get_or_load_custom_func("pocl_softmax_backward", "pocl_softmax", ptx::SOFTMAX)?;
            let pv = p.as_cuda_slice::<f32>()?.slice(pa..pb);
            let dv = dp.as_cuda_slice::<f32>()?.slice(da..db);
            let tk_i = tk as i32;
            let mut builder = func.builder();
            builder.arg(&pv);
            builder.arg(&dv);
            builder.arg(&ds);
            builder.arg(&tk_i);
            builder.arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (ROW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments in pocl_softmax_backward's order and types; p, dp and ds hold
            // rows·tk floats.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(ds, dev),
            lp.shape().clone(),
        ))
    }
}

/// Threads per block of the softmax rows (tk is at most a few thousand).
#[cfg(feature = "cuda")]
const ROW_BLOCK: u32 = 128;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The tokens grouped by id: used ids ascending, each id's tokens in increasing order.
    #[test]
    fn tokens_group_by_id_in_token_order() {
        let g = TokensById::new(&[3, 0, 3, 5, 0, 3], 7);
        assert_eq!(g.rows, vec![0, 3, 5]);
        assert_eq!(g.starts, vec![0, 2, 5, 6]);
        assert_eq!(g.order, vec![1, 4, 0, 2, 5, 3]);
        let empty = TokensById::new(&[], 4);
        assert_eq!(
            (empty.rows.len(), empty.starts, empty.order.len()),
            (0, vec![0], 0)
        );
    }

    /// The embedding under the CUDA set: forward rows and dW (repeated ids, unused rows) equal
    /// to the portable gather and candle's index_add, to the bit.
    #[test]
    fn embedding_gradient_is_index_adds_to_the_bit() -> Result<()> {
        let dev = &Device::Cpu;
        let table = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 6), dev)?)?;
        let ids = Tensor::new(&[[4u32, 0, 4], [9, 4, 0]], dev)?;
        let r = Tensor::randn(0f32, 1.0, (6, 6), dev)?;
        let run = |cuda: bool| -> Result<(Vec<f32>, Vec<f32>)> {
            let w = super::super::Weight::out_in(table.as_tensor().clone());
            let rows = if cuda {
                embed(&w, &ids)?
            } else {
                super::super::portable::embed(&w, &ids)?
            };
            let g = (&rows * &r)?.sum_all()?.backward()?;
            let dw = g.get(table.as_tensor()).expect("a gradient");
            Ok((rows.flatten_all()?.to_vec1()?, dw.flatten_all()?.to_vec1()?))
        };
        assert_eq!(run(true)?, run(false)?);
        let out_of_range = embed(
            &super::super::Weight::out_in(table.as_tensor().clone()),
            &Tensor::new(&[11u32], dev)?,
        );
        assert!(out_of_range
            .unwrap_err()
            .to_string()
            .contains("token id 11"));
        Ok(())
    }

    /// A bf16 weight's product is computed in bf16 (within bf16 rounding of the f32 product);
    /// an f32 weight's is the portable one, exactly.
    #[test]
    fn bf16_linear_is_close_to_f32() -> Result<()> {
        let dev = &Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), dev)?;
        let w = Tensor::randn(0f32, 0.2, (40, 64), dev)?;
        let b = Tensor::randn(0f32, 0.2, 40, dev)?;
        let f32w = super::super::Weight::out_in(w.clone());
        let want = super::super::portable::linear(&f32w, &x, Some(&b))?;
        assert_eq!(
            linear(&f32w, &x, Some(&b))?
                .flatten_all()?
                .to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let bf = super::super::Weight::Bf16Tensor {
            w: w.to_dtype(DType::BF16)?,
            out_in: true,
        };
        let got = linear(&bf, &x, Some(&b))?;
        assert_eq!(got.dims(), &[2, 3, 40]);
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let top = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-2 * top, "{err} vs {top}");
        Ok(())
    }
}
