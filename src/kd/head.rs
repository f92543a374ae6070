//! The lm head fused with the loss: teacher and student logits are made, consumed by
//! [`loss_rows`] and differentiated chunk by chunk of token rows, so no [tokens, vocab] tensor of
//! logits, nor of their gradient, ever exists (for GPT-2 with 512 tokens each is 103 MB, and
//! the unfused step held six of them).
//!
//! Per chunk of counted rows (mask ≠ 0; prompt and padding rows cost nothing, not even their
//! logits): student logits = h·Wᵀ, teacher logits likewise, the fused divergence kernel writes
//! dL/dlogits into a chunk buffer, and that gradient goes straight back through the head:
//! dL/dh = g·W for the chunk's rows and dL/dW += gᵀ·h. candle's backward then only hands the two
//! finished gradients on; a trainable student's dL/dW goes straight into the weight's in-place
//! gradient buffer (`ops::grad`) instead, confirmed by the backward pass.

use super::kernel::{gradient_buffer, loss_rows, LossSpec, RowLoss, Rows};
use crate::ops::bf16::PackedBf16;
use crate::ops::gemm::{matmul, View};
use crate::ops::grad::GradBuffer;
use crate::ops::Weight;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// A model's final hidden states and output head, as the fused loss takes them.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    /// Hidden states after the final norm, [N, d] or [B, T, d].
    pub hidden: &'a Tensor,
    /// The lm-head weight [V, d] (the tied token embedding for GPT-2 and small Qwen); f32 for
    /// the student, f32 or packed bf16 for the teacher.
    pub weight: &'a Weight,
}

/// Token rows per chunk: each chunk buffer ([rows, vocab] f32) stays near 24 MB, below the
/// allocator's mmap threshold, so the buffers are recycled from the heap instead of paying
/// page faults on every call, and large enough that the head matmuls run near full speed.
fn chunk_rows(vocab: usize, active: usize) -> usize {
    let max = ((31 << 20) / (4 * vocab.max(1))).clamp(16, 4096);
    let chunks = active.div_ceil(max).max(1);
    active.div_ceil(chunks).max(1)
}

/// The candle op on (student hidden [N, d], student head [V, d]); the teacher's hidden states
/// and head are captured (they get no gradient).
pub(crate) struct FusedHeadOp {
    pub spec: LossSpec,
    pub weights: Vec<f32>,
    pub labels: Option<Vec<u32>>,
    /// The vocabulary prefix both models share (the logits' width).
    pub vocab: usize,
    /// Teacher hidden [N, dt] (contiguous f32) and head [Vt, dt].
    pub teacher: Option<(Tensor, Weight)>,
    pub want_grad: bool,
    /// The student head's in-place gradient buffer: dL/dW is written there (pending until the
    /// backward pass) instead of into a fresh tensor for candle.
    pub grad_buffer: Option<Arc<GradBuffer>>,
    /// dL/dhidden [N, d] and dL/dW [V, d] (None when it went to `grad_buffer`), made in the
    /// forward pass.
    grads: Mutex<Option<(Tensor, Option<Tensor>)>>,
    /// (Σ w·CE, Σ w·D) for logging.
    pub parts: Arc<Mutex<(f64, f64)>>,
}

impl FusedHeadOp {
    pub fn new(
        spec: LossSpec,
        weights: Vec<f32>,
        labels: Option<Vec<u32>>,
        vocab: usize,
        teacher: Option<(Tensor, Weight)>,
        want_grad: bool,
        grad_buffer: Option<Arc<GradBuffer>>,
    ) -> Self {
        FusedHeadOp {
            spec,
            weights,
            labels,
            vocab,
            teacher,
            want_grad,
            grad_buffer,
            grads: Mutex::new(None),
            parts: Arc::new(Mutex::new((0.0, 0.0))),
        }
    }
}

/// The teacher's head as the chunk loop reads it: f32 data [Vt, dt], or packed bf16.
enum TeacherHead<'a> {
    F32(&'a [f32], usize, usize),
    Bf16(std::sync::Arc<PackedBf16>),
}

impl TeacherHead<'_> {
    /// (Vt, dt)
    fn dims(&self) -> (usize, usize) {
        match self {
            TeacherHead::F32(_, v, d) => (*v, *d),
            TeacherHead::Bf16(p) => (p.n_out(), p.k()),
        }
    }
}

/// A contiguous 2-D f32 CPU tensor's data and dims.
fn matrix<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    who: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (r, c) = l.shape().dims2()?;
    Ok((
        crate::ops::contiguous_f32(s, l, &format!("kd head: {who}"))?,
        r,
        c,
    ))
}

/// Copies rows `rows` of the row-major [_, d] matrix `src` into the front of `dst`.
fn gather(src: &[f32], d: usize, rows: &[usize], dst: &mut [f32]) {
    for (k, &i) in rows.iter().enumerate() {
        dst[k * d..(k + 1) * d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
}

impl FusedHeadOp {
    fn run(
        &self,
        (hs, n, ds): (&[f32], usize, usize),
        (ws, vs, ws_d): (&[f32], usize, usize),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = self.vocab;
        if ws_d != ds || v > vs || v == 0 || self.weights.len() != n {
            candle_core::bail!(
                "kd head: student hidden [{n}, {ds}], head [{vs}, {ws_d}], vocab {v}, {} mask rows",
                self.weights.len()
            );
        }
        // The teacher's storages stay read-locked for the whole call.
        let teacher_guards = self.teacher.as_ref().map(|(h, w)| {
            let (gh, lh) = h.storage_and_layout();
            let w = match w {
                Weight::F32 { w, .. } => {
                    let (gw, lw) = w.storage_and_layout();
                    Ok((gw, lw.clone()))
                }
                Weight::Bf16(p) => Err(p.clone()),
            };
            (gh, lh.clone(), w)
        });
        let teacher = match &teacher_guards {
            Some((gh, lh, w)) => {
                let Storage::Cpu(sh) = &**gh else {
                    candle_core::bail!("kd head: the teacher must be on the CPU")
                };
                let (th, tn, dt) = matrix(sh, lh, "teacher hidden")?;
                let head = match w {
                    Ok((gw, lw)) => {
                        let Storage::Cpu(sw) = &**gw else {
                            candle_core::bail!("kd head: the teacher must be on the CPU")
                        };
                        let (tw, tv, tw_d) = matrix(sw, lw, "teacher head")?;
                        TeacherHead::F32(tw, tv, tw_d)
                    }
                    Err(p) => TeacherHead::Bf16(p.clone()),
                };
                let (tv, tw_d) = head.dims();
                if tn != n || tw_d != dt || v > tv {
                    candle_core::bail!(
                        "kd head: teacher hidden [{tn}, {dt}] and head [{tv}, {tw_d}] do not fit \
                         student rows {n} and vocab {v}"
                    );
                }
                Some((th, dt, head))
            }
            None => None,
        };

        let active: Vec<usize> = (0..n).filter(|&i| self.weights[i] != 0.0).collect();
        let c = chunk_rows(v, active.len());
        let mut out = vec![RowLoss::default(); n];
        // The teacher's chunk logits have its full head width (the bf16 kernel writes all of it).
        let tv = teacher.as_ref().map_or(0, |(_, _, h)| h.dims().0);
        let (mut s_logits, mut t_logits) = (vec![0f32; c * v], vec![0f32; c * tv]);
        let mut g = vec![0f32; if self.want_grad { c * v } else { 0 }];
        let (mut hs_c, mut gh_c) = (vec![0f32; c * ds], vec![0f32; c * ds]);
        let mut ht_c = vec![0f32; teacher.as_ref().map_or(0, |(_, dt, _)| c * dt)];
        let mut grad_h = vec![0f32; if self.want_grad { n * ds } else { 0 }];
        let s_head = View::rows(&ws[..v * ds], v, ds, ds);
        // The chunk loop; dL/dW goes to `grad_w` ([Vs, d]), added to what it holds unless
        // `overwrite_w`.
        let mut chunks = |grad_w: &mut [f32], overwrite_w: bool| -> candle_core::Result<()> {
            if overwrite_w {
                // Rows beyond the compared vocabulary get no gradient, and nothing at all when no
                // row is counted.
                let from = if active.is_empty() { 0 } else { v * ds };
                grad_w[from..].fill(0.0);
            }
            for (ci, rows) in active.chunks(c).enumerate() {
                let r = rows.len();
                gather(hs, ds, rows, &mut hs_c);
                let h_rows = View::rows(&hs_c[..r * ds], r, ds, ds);
                matmul(h_rows, s_head.t(), &mut s_logits, v, false);
                let t_rows = match &teacher {
                    Some((th, dt, head)) => {
                        let dt = *dt;
                        gather(th, dt, rows, &mut ht_c);
                        let h = &ht_c[..r * dt];
                        match head {
                            TeacherHead::F32(tw, _, _) => matmul(
                                View::rows(h, r, dt, dt),
                                View::rows(&tw[..v * dt], v, dt, dt).t(),
                                &mut t_logits,
                                tv,
                                false,
                            ),
                            TeacherHead::Bf16(p) => p.matmul(h, r, &mut t_logits, tv),
                        }
                        Some(Rows {
                            data: &t_logits[..(r - 1) * tv + v],
                            rows: r,
                            width: v,
                            stride: tv,
                        })
                    }
                    None => None,
                };
                let weights: Vec<f32> = rows.iter().map(|&i| self.weights[i]).collect();
                let labels: Option<Vec<u32>> = self
                    .labels
                    .as_ref()
                    .map(|l| rows.iter().map(|&i| l[i]).collect());
                let mut out_c = vec![RowLoss::default(); r];
                let grad = if self.want_grad {
                    g[..r * v].fill(0.0);
                    Some(&mut g[..r * v])
                } else {
                    None
                };
                loss_rows(
                    &self.spec,
                    t_rows,
                    Rows::contiguous(&s_logits[..r * v], v),
                    labels.as_deref(),
                    &weights,
                    grad,
                    &mut out_c,
                )
                .map_err(candle_core::Error::wrap)?;
                for (&i, o) in rows.iter().zip(out_c) {
                    out[i] = o;
                }
                if self.want_grad {
                    let g_rows = View::rows(&g[..r * v], r, v, v);
                    matmul(g_rows, s_head, &mut gh_c, ds, false);
                    for (k, &i) in rows.iter().enumerate() {
                        grad_h[i * ds..(i + 1) * ds].copy_from_slice(&gh_c[k * ds..(k + 1) * ds]);
                    }
                    matmul(
                        g_rows.t(),
                        h_rows,
                        &mut grad_w[..v * ds],
                        ds,
                        ci > 0 || !overwrite_w,
                    );
                }
            }
            Ok(())
        };
        let grad_w = match (&self.grad_buffer, self.want_grad) {
            (Some(buffer), true) => {
                buffer.write_pending(|buf, overwrite| chunks(buf, overwrite))?;
                None
            }
            (None, true) => {
                let mut grad_w = gradient_buffer(vs * ds);
                chunks(&mut grad_w, true)?;
                Some(grad_w)
            }
            (_, false) => {
                chunks(&mut [], false)?;
                None
            }
        };

        // Sequential sum over per-row values: deterministic whatever the thread schedule.
        let (mut ce, mut kd) = (0.0, 0.0);
        for (r, &wi) in out.iter().zip(&self.weights) {
            if wi != 0.0 {
                ce += wi as f64 * r.ce;
                kd += wi as f64 * r.kd;
            }
        }
        *self.parts.lock().unwrap() = (ce, kd);
        if self.want_grad {
            let dev = &candle_core::Device::Cpu;
            *self.grads.lock().unwrap() = Some((
                Tensor::from_vec(grad_h, (n, ds), dev)?,
                grad_w
                    .map(|g| Tensor::from_vec(g, (vs, ds), dev))
                    .transpose()?,
            ));
        }
        let total = self.spec.ce_coef * ce + self.spec.kd_coef * kd;
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }
}

impl CustomOp2 for FusedHeadOp {
    fn name(&self) -> &'static str {
        "pocl-fused-head-loss"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(
            matrix(h, lh, "student hidden")?,
            matrix(w, lw, "student head")?,
        )
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not cloned: the op lives as long as the graph, and dL/dW is model-sized.
        let Some((gh, gw)) = self.grads.lock().unwrap().take() else {
            candle_core::bail!(
                "kd head: backward through a loss computed without gradient tracking, or a \
                 second backward through the same loss"
            )
        };
        let scale = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        if let Some(buffer) = &self.grad_buffer {
            if scale != 1.0 {
                candle_core::bail!(
                    "kd head: a trainable head's gradient is written in place, so the loss must \
                     be back-propagated as it is (not scaled, got upstream gradient {scale})"
                )
            }
            buffer.confirm();
        }
        // The upstream gradient of a loss is exactly 1: skip two model-sized multiplies.
        if scale == 1.0 {
            Ok((Some(gh), gw))
        } else {
            Ok((
                Some((gh * scale as f64)?),
                gw.map(|g| g * scale as f64).transpose()?,
            ))
        }
    }
}

/// Hidden states [.., d] as a contiguous [N, d] f32 tensor (free when already so).
pub(crate) fn flat_hidden(h: &Tensor, who: &str) -> Result<Tensor> {
    let dims = h.dims();
    if dims.len() < 2 {
        bail!("{who} hidden states must be [tokens, d] or [batch, seq, d], got {dims:?}");
    }
    let d = dims[dims.len() - 1];
    Ok(h.to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .reshape((h.elem_count() / d.max(1), d))?)
}
