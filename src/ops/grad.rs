//! Parameter gradients that fused ops write in place, as torch's `.grad`.
//!
//! candle's backward pass sums every gradient into a fresh tensor (zeros, then add), and its
//! embedding backward copies the whole [vocab, d] gradient once more (`index_add`): for a tied
//! embedding that is three model-sized buffers in freshly mapped memory per step. A trainable
//! model's matrices therefore each own a [`GradBuffer`], allocated once: the fused lm head writes
//! dL/dW straight into it and the embedding lookup adds its rows there, and neither hands the
//! weight's gradient to candle. `Params::grads` reads these buffers next to candle's store, and
//! `Params::zero_grad` starts the next step (the next write overwrites, no zeroing pass).

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Where a buffer stands within an optimiser step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Holds nothing of this step: the next write overwrites.
    Stale,
    /// Written by a forward pass whose backward has not run yet (the fused head computes its
    /// weight gradient in the forward pass); reading it now would be an error.
    Pending,
    /// Holds this step's gradient so far.
    Ready,
}

/// One parameter's gradient buffer (see the module docs).
pub struct GradBuffer {
    shape: Shape,
    state: Mutex<(Phase, Option<Tensor>)>,
}

impl GradBuffer {
    pub fn new(shape: &Shape) -> Self {
        GradBuffer {
            shape: shape.clone(),
            state: Mutex::new((Phase::Stale, None)),
        }
    }

    /// Runs `f(buffer, overwrite)` on the buffer from a forward pass: `overwrite` is true when
    /// the buffer holds nothing of this step yet (write, do not add). The write stays pending
    /// until [`GradBuffer::confirm`] (called by the op's backward).
    pub fn write_pending(&self, f: impl FnOnce(&mut [f32], bool) -> Result<()>) -> Result<()> {
        self.write(true, f)
    }

    /// Runs `f(buffer, overwrite)` from a backward pass.
    pub fn write_now(&self, f: impl FnOnce(&mut [f32], bool) -> Result<()>) -> Result<()> {
        self.write(false, f)
    }

    fn write(&self, pending: bool, f: impl FnOnce(&mut [f32], bool) -> Result<()>) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        let (phase, buf) = &mut *state;
        if pending && *phase == Phase::Pending {
            candle_core::bail!(
                "a parameter gradient was computed by a forward pass whose backward never ran \
                 (detach the weights of a forward pass that is not differentiated)"
            )
        }
        if buf.is_none() {
            *buf = Some(Tensor::zeros(
                &self.shape,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?);
        }
        let overwrite = *phase == Phase::Stale;
        let op = Mutate(Mutex::new(Some(move |data: &mut [f32]| f(data, overwrite))));
        buf.as_ref().unwrap().inplace_op1(&op)?;
        *phase = match (*phase, pending) {
            (_, true) | (Phase::Pending, false) => Phase::Pending,
            _ => Phase::Ready,
        };
        Ok(())
    }

    /// The backward pass of a forward-time write has run.
    pub fn confirm(&self) {
        let mut state = self.state.lock().unwrap();
        if state.0 == Phase::Pending {
            state.0 = Phase::Ready;
        }
    }

    /// This step's gradient (shares the buffer: no copy), or None if nothing was written.
    pub fn grad(&self) -> Result<Option<Tensor>> {
        let state = self.state.lock().unwrap();
        match state.0 {
            Phase::Stale => Ok(None),
            Phase::Ready => Ok(state.1.clone()),
            Phase::Pending => candle_core::bail!(
                "a parameter gradient was read before the backward pass of the forward pass \
                 that wrote it"
            ),
        }
    }

    /// Starts the next step: the buffer keeps its memory, the next write overwrites it.
    pub fn zero(&self) {
        self.state.lock().unwrap().0 = Phase::Stale;
    }
}

/// Runs a closure once on a contiguous f32 tensor's data, in place.
struct Mutate<F>(Mutex<Option<F>>);

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for Mutate<F> {
    fn name(&self) -> &'static str {
        "pocl-grad-buffer"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("gradient buffer: not f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gradient buffer: not contiguous")
        };
        match self.0.lock().unwrap().take() {
            Some(f) => f(&mut v[a..b]),
            None => candle_core::bail!("gradient buffer: write run twice"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_overwrite_accumulate_and_guard_pending_reads() -> Result<()> {
        let g = GradBuffer::new(&Shape::from((2,)));
        assert!(g.grad()?.is_none(), "nothing written yet");
        let put = |x: f32| {
            move |b: &mut [f32], overwrite: bool| {
                for e in b.iter_mut() {
                    *e = if overwrite { x } else { *e + x };
                }
                Ok(())
            }
        };
        g.write_pending(put(1.0))?;
        assert!(g.grad().is_err(), "a pending write cannot be read");
        assert!(
            g.write_pending(put(1.0)).is_err(),
            "a second forward-time write before the backward is refused"
        );
        g.write_now(put(2.0))?; // the embedding's rows, in the same backward pass
        g.confirm();
        assert_eq!(g.grad()?.unwrap().to_vec1::<f32>()?, [3.0, 3.0]);
        g.write_pending(put(0.5))?; // the next micro-batch adds
        g.confirm();
        let t = g.grad()?.unwrap();
        assert_eq!(t.to_vec1::<f32>()?, [3.5, 3.5]);
        g.zero();
        assert!(g.grad()?.is_none());
        g.write_now(put(7.0))?; // the next step overwrites, in the same memory
        assert_eq!(t.to_vec1::<f32>()?, [7.0, 7.0]);
        Ok(())
    }
}
