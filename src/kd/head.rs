//! The lm head fused with the loss: teacher and student logits are made, consumed by
//! [`loss_rows`] and differentiated pass by pass of token rows, so no [tokens, vocab] tensor of
//! logits, nor of their gradient, ever exists for all tokens at once (for GPT-2 with 512 tokens
//! each is 103 MB, and the unfused step held six of them).
//!
//! Only counted rows (mask ≠ 0) are computed; prompt and padding rows cost nothing, not even
//! their logits. Per pass of up to ~96 MB of logits: student logits = h·Wᵀ in one product, then
//! per chunk of up to ~31 MB the teacher's logits and the fused divergence kernel, which writes
//! dL/dlogits over the student's logits; the gradient then goes straight back through the head:
//! dL/dh = g·W for the pass's rows and dL/dW += gᵀ·h chunk by chunk. candle's backward only
//! hands the finished gradients on; a trainable student's dL/dW goes straight into the weight's
//! in-place gradient buffer (`ops::grad`) instead, confirmed by the backward pass.

use super::kernel::{gradient_buffer, loss_rows, loss_rows_in_place, LossSpec, RowLoss, Rows};
use super::sparse::{sparse_loss_rows, SparseTargets};
use crate::ops::bf16::Packed;
use crate::ops::gemm::{matmul, View};
use crate::ops::grad::GradBuffer;
use crate::ops::Weight;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex, MutexGuard};

/// A model's final hidden states and output head, as the fused loss takes them.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    /// Hidden states after the final norm, [N, d] or [B, T, d].
    pub hidden: &'a Tensor,
    /// The lm-head weight [V, d] (the tied token embedding for GPT-2 and small Qwen); f32 for
    /// the student, f32 or packed (bf16 or f32) for the teacher.
    pub weight: &'a Weight,
}

/// Counted rows per pass over the student head: the pass buffer ([rows, vocab] f32, the logits
/// and then their gradient in place) holds up to ~96 MB. Why large: the gemm repacks the whole
/// [vocab, d] head weight for every logits product, so one pass of 384 rows instead of three
/// of 128 saves two repacks of 103 MB for GPT-2 (and runs the dL/dh product at its best).
const PASS_BYTES: usize = 96 << 20;

/// Rows per sub-chunk of a pass (the teacher's logits, the dL/dW product): each chunk buffer
/// stays under ~31 MB, below the allocator's mmap threshold, so it is recycled from the heap
/// instead of paying page faults on every call; dL/dW is also fastest in chunks of this size.
const CHUNK_BYTES: usize = 31 << 20;

/// Rows per part when `n` rows of `vocab` f32 logits are split into equal parts of at most
/// `bytes` (at least 16 rows, or `min_rows` in tests).
fn split_rows(n: usize, vocab: usize, bytes: usize, min_rows: usize) -> usize {
    let max = (bytes / (4 * vocab.max(1))).clamp(min_rows, 4096);
    n.div_ceil(n.div_ceil(max).max(1)).max(1)
}

/// The pass buffer, kept across calls: at ~77 MB for GPT-2 it is above the allocator's mmap
/// threshold, so a fresh one would be new pages (19k page faults) on every step.
static PASS_BUFFER: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// The teacher's chunk logits (~26 MB for GPT-2), kept across calls too: fewer large heap
/// allocations per step leave the heap less fragmented (measured: 1480 -> 1439 MiB peak RSS in the
/// kd-step bench) and skip a memset the teacher's product would overwrite anyway.
static TEACHER_BUFFER: Mutex<Vec<f32>> = Mutex::new(Vec::new());

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
    /// Or a sparse teacher (top-K + rest), one row per counted row in order.
    pub sparse: Option<Arc<SparseTargets>>,
    pub want_grad: bool,
    /// The student head's in-place gradient buffer: dL/dW is written there (pending until the
    /// backward pass) instead of into a fresh tensor for candle.
    pub grad_buffer: Option<Arc<GradBuffer>>,
    /// dL/dhidden [N, d] and dL/dW [V, d] (None when it went to `grad_buffer`), made in the
    /// forward pass.
    grads: Mutex<Option<(Tensor, Option<Tensor>)>>,
    /// (Σ w·CE, Σ w·D) for logging.
    pub parts: Arc<Mutex<(f64, f64)>>,
    /// (pass, chunk) budgets in bytes and the smallest part in rows; tests shrink them.
    budgets: (usize, usize, usize),
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
            sparse: None,
            want_grad,
            grad_buffer,
            grads: Mutex::new(None),
            parts: Arc::new(Mutex::new((0.0, 0.0))),
            budgets: (PASS_BYTES, CHUNK_BYTES, 16),
        }
    }
}

/// A kept buffer (`shared`: the lock on a static one), or `own` when another thread holds it in
/// the middle of a call (tests run in parallel), grown to at least `len`.
fn grown<'a>(
    shared: &'a mut Option<MutexGuard<'static, Vec<f32>>>,
    own: &'a mut Vec<f32>,
    len: usize,
) -> &'a mut Vec<f32> {
    let b = match shared.as_deref_mut() {
        Some(b) => b,
        None => own,
    };
    if b.len() < len {
        b.resize(len, 0.0);
    }
    b
}

/// [`crate::ops::profile::time`] on the CPU, where this op runs.
fn time(op: &'static str, f: impl FnOnce() -> candle_core::Result<()>) -> candle_core::Result<()> {
    crate::ops::profile::time(op, &candle_core::Device::Cpu, f)
}

/// The teacher's head as the chunk loop reads it: f32 data [Vt, dt], or packed (bf16 or f32).
enum TeacherHead<'a> {
    F32(&'a [f32], usize, usize),
    Packed(std::sync::Arc<Packed>),
}

impl TeacherHead<'_> {
    /// (Vt, dt)
    fn dims(&self) -> (usize, usize) {
        match self {
            TeacherHead::F32(_, v, d) => (*v, *d),
            TeacherHead::Packed(p) => (p.n_out(), p.k()),
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
                // A bf16 tensor is refused below, where its data is read as f32.
                Weight::F32 { w, .. } | Weight::Bf16Tensor { w, .. } => {
                    let (gw, lw) = w.storage_and_layout();
                    Ok((gw, lw.clone()))
                }
                Weight::Packed(p) => Err(p.clone()),
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
                    Err(p) => TeacherHead::Packed(p.clone()),
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
        let (pass_bytes, chunk_bytes, min_rows) = self.budgets;
        let p = split_rows(active.len(), v, pass_bytes, min_rows);
        let c = split_rows(p, v, chunk_bytes, min_rows);
        let mut out = vec![RowLoss::default(); n];
        // The teacher's chunk logits have its full head width (the packed kernels write all of it).
        let tv = teacher.as_ref().map_or(0, |(_, _, h)| h.dims().0);
        let (mut shared_t, mut own_t) = (TEACHER_BUFFER.try_lock().ok(), Vec::new());
        let t_logits = grown(&mut shared_t, &mut own_t, c * tv);
        let (mut hs_p, mut gh_p) = (vec![0f32; p * ds], vec![0f32; p * ds]);
        let mut ht_c = vec![0f32; teacher.as_ref().map_or(0, |(_, dt, _)| c * dt)];
        let mut grad_h = vec![0f32; if self.want_grad { n * ds } else { 0 }];
        let (mut shared, mut own) = (PASS_BUFFER.try_lock().ok(), Vec::new());
        let sg = grown(&mut shared, &mut own, p * v);
        let s_head = View::rows(&ws[..v * ds], v, ds, ds);
        // The passes; dL/dW goes to `grad_w` ([Vs, d]), added to what it holds unless
        // `overwrite_w`.
        let mut passes = |grad_w: &mut [f32], overwrite_w: bool| -> candle_core::Result<()> {
            if overwrite_w {
                // Rows beyond the compared vocabulary get no gradient, and nothing at all when no
                // row is counted.
                let from = if active.is_empty() { 0 } else { v * ds };
                grad_w[from..].fill(0.0);
            }
            let mut first_w = overwrite_w;
            for (pi, pass) in active.chunks(p).enumerate() {
                let rp = pass.len();
                gather(hs, ds, pass, &mut hs_p);
                time("head.student_logits", || {
                    matmul(
                        View::rows(&hs_p[..rp * ds], rp, ds, ds),
                        s_head.t(),
                        &mut sg[..rp * v],
                        v,
                        false,
                    );
                    Ok(())
                })?;
                for (ci, rows) in pass.chunks(c).enumerate() {
                    let (r, o) = (rows.len(), ci * c);
                    let t_rows = match &teacher {
                        Some((th, dt, head)) => {
                            let dt = *dt;
                            gather(th, dt, rows, &mut ht_c);
                            let h = &ht_c[..r * dt];
                            time("head.teacher_logits", || {
                                match head {
                                    TeacherHead::F32(tw, _, _) => matmul(
                                        View::rows(h, r, dt, dt),
                                        View::rows(&tw[..v * dt], v, dt, dt).t(),
                                        t_logits.as_mut_slice(),
                                        tv,
                                        false,
                                    ),
                                    TeacherHead::Packed(p) => p.matmul(h, r, t_logits, tv),
                                }
                                Ok(())
                            })?;
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
                    let logits = &mut sg[o * v..(o + r) * v];
                    let (spec, labels) = (&self.spec, labels.as_deref());
                    time("head.loss", || {
                        if let Some(sp) = &self.sparse {
                            // Row k of this chunk is counted row pi·p + o + k of the batch.
                            let first = pi * p + o;
                            let g = self.want_grad;
                            sparse_loss_rows(
                                spec, sp, first, logits, v, labels, &weights, &mut out_c, g,
                            )
                        } else if self.want_grad {
                            // The gradient replaces the logits.
                            let w = &weights;
                            loss_rows_in_place(spec, t_rows, logits, v, labels, w, &mut out_c)
                        } else {
                            let s_rows = Rows::contiguous(logits, v);
                            loss_rows(spec, t_rows, s_rows, labels, &weights, None, &mut out_c)
                        }
                        .map_err(candle_core::Error::wrap)
                    })?;
                    for (&i, o) in rows.iter().zip(out_c) {
                        out[i] = o;
                    }
                }
                if self.want_grad {
                    let g_pass = View::rows(&sg[..rp * v], rp, v, v);
                    time("head.grad_hidden", || {
                        matmul(g_pass, s_head, &mut gh_p, ds, false);
                        Ok(())
                    })?;
                    for (k, &i) in pass.iter().enumerate() {
                        grad_h[i * ds..(i + 1) * ds].copy_from_slice(&gh_p[k * ds..(k + 1) * ds]);
                    }
                    for (ci, rows) in pass.chunks(c).enumerate() {
                        let (r, o) = (rows.len(), ci * c);
                        let g_rows = View::rows(&sg[o * v..(o + r) * v], r, v, v);
                        let h_rows = View::rows(&hs_p[o * ds..(o + r) * ds], r, ds, ds);
                        time("head.grad_weight", || {
                            matmul(g_rows.t(), h_rows, &mut grad_w[..v * ds], ds, !first_w);
                            Ok(())
                        })?;
                        first_w = false;
                    }
                }
            }
            Ok(())
        };
        let grad_w = match (&self.grad_buffer, self.want_grad) {
            (Some(buffer), true) => {
                buffer.write_pending(|buf, overwrite| passes(buf, overwrite))?;
                None
            }
            (None, true) => {
                let mut grad_w = gradient_buffer(vs * ds);
                passes(&mut grad_w, true)?;
                Some(grad_w)
            }
            (_, false) => {
                passes(&mut [], false)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Several passes of several chunks (tiny budgets) against one pass of one chunk: loss,
    /// parts and both gradients, with a teacher, masked rows, the in-place buffer overwritten
    /// and then accumulated into.
    #[test]
    fn passes_and_chunks_split_the_same_sums() -> candle_core::Result<()> {
        let dev = &Device::Cpu;
        let (n, ds, dt, v) = (23, 6, 5, 41);
        let rnd = |seed: u64, len: usize| -> Vec<f32> {
            let mut x = seed;
            (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
                })
                .collect()
        };
        let (hs, ws) = (rnd(1, n * ds), rnd(2, v * ds));
        let th = Tensor::from_vec(rnd(3, n * dt), (n, dt), dev)?;
        let tw = Tensor::from_vec(rnd(4, v * dt), (v, dt), dev)?;
        let weights: Vec<f32> = (0..n).map(|i| [0.0, 1.0, 0.5][i % 3]).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let spec = LossSpec {
            divergence: Some(super::super::Divergence::Fkl),
            inv_temperature: 0.5,
            ce_coef: 0.3,
            kd_coef: 0.7,
        };
        let run = |budgets: (usize, usize, usize), buffer: &Arc<GradBuffer>| {
            let mut op = FusedHeadOp::new(
                spec,
                weights.clone(),
                Some(labels.clone()),
                v,
                Some((th.clone(), Weight::out_in(tw.clone()))),
                true,
                Some(buffer.clone()),
            );
            op.budgets = budgets;
            let (loss, _) = op.run((&hs, n, ds), (&ws, v, ds)).unwrap();
            buffer.confirm();
            let CpuStorage::F32(loss) = loss else {
                panic!()
            };
            let (gh, _) = op.grads.lock().unwrap().take().unwrap();
            let parts = *op.parts.lock().unwrap();
            (
                loss[0],
                parts,
                gh.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        };
        let shape = Shape::from((v, ds));
        let (one, many) = (
            Arc::new(GradBuffer::new(&shape)),
            Arc::new(GradBuffer::new(&shape)),
        );
        let wide = (usize::MAX / 2, usize::MAX / 2, 1);
        // 4·41 bytes per row: passes of 4 rows (16 counted rows: 4 passes), chunks of 3.
        let tiny = (4 * 4 * v, 3 * 4 * v, 1);
        let max_abs = |a: &[f32]| a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let max_diff =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let mut first = Vec::new();
        for step in 0..3 {
            if step == 1 {
                // A new step: the stale sums must be overwritten, not added to.
                one.zero();
                many.zero();
            }
            let (a, b) = (run(wide, &one), run(tiny, &many));
            assert!(
                (a.0 - b.0).abs() <= 1e-6 * a.0.abs(),
                "loss {} vs {}",
                a.0,
                b.0
            );
            // The gemm may round a row's logits differently for another number of rows.
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs().max(1.0);
            assert!(
                close(a.1 .0, b.1 .0) && close(a.1 .1, b.1 .1),
                "{:?} vs {:?}",
                a.1,
                b.1
            );
            let (top, err) = (max_abs(&a.2), max_diff(&a.2, &b.2));
            assert!(
                err <= 1e-5 * top,
                "step {step}: dL/dh differs by {err} (top {top})"
            );
            let (ga, gb) = (one.grad()?.unwrap(), many.grad()?.unwrap());
            let (ga, gb) = (
                ga.flatten_all()?.to_vec1::<f32>()?,
                gb.flatten_all()?.to_vec1::<f32>()?,
            );
            let (top, err) = (max_abs(&ga), max_diff(&ga, &gb));
            assert!(
                err <= 1e-5 * top,
                "step {step}: dL/dW differs by {err} (top {top})"
            );
            // Same inputs every step: step 1 (after zero) repeats step 0, step 2 (a second
            // micro-batch, no zeroing) doubles it.
            let want: Vec<f32> = match step {
                0 => {
                    first = ga.clone();
                    ga.clone()
                }
                1 => first.clone(),
                _ => first.iter().map(|x| 2.0 * x).collect(),
            };
            let err = max_diff(&ga, &want);
            assert!(
                err <= 1e-6 * top,
                "step {step}: dL/dW is not the step's sum"
            );
        }
        Ok(())
    }
}
