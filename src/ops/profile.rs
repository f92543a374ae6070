//! Time per model op, for `pocl bench kd-step --profile`: when enabled, every [`super::Kernels`]
//! call (the forward ops), the backward of pocl's own CPU ops and the parts of the fused KD head
//! wait for their device before and after, and their wall time is added to the op's total.
//! This serialises a GPU's queue (and costs a little on the CPU), so a profiled step is slower
//! than a plain one: it says where the time goes, not how long a step takes. What candle's
//! autograd does between our ops (and the backward of candle's own ops) is not split.

use candle_core::{Device, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (seconds, calls) by op name.
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Starts (or stops) timing ops, and clears the totals.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    TOTALS.lock().unwrap().clear();
}

/// The totals since [`enable`]: op name → (seconds, calls).
pub fn totals() -> BTreeMap<&'static str, (f64, u64)> {
    TOTALS.lock().unwrap().clone()
}

/// Runs `f`, timing it as `op` on `device` when profiling is on.
pub(crate) fn time<T>(
    op: &'static str,
    device: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().unwrap();
    let e = totals.entry(op).or_insert((0.0, 0));
    e.0 += dt;
    e.1 += 1;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_timed_only_when_enabled() {
        // Other tests may run ops while this one has profiling on: only this test's names are
        // checked.
        let dev = &Device::Cpu;
        enable(false);
        time("test.off", dev, || Ok(())).unwrap();
        assert!(!totals().contains_key("test.off"));
        enable(true);
        for _ in 0..3 {
            time("test.on", dev, || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(())
            })
            .unwrap();
        }
        let (secs, calls) = totals()["test.on"];
        enable(false);
        assert_eq!(calls, 3);
        assert!(secs >= 0.006, "{secs}");
        assert!(!totals().contains_key("test.on"));
    }
}
