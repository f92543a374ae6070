//! `pocl doctor`: the build, then the self-test of `pocl::doctor`, one JSON line each, and a
//! summary line; a non-zero exit when any check fails.

use anyhow::{bail, Result};
use clap::Args;
use pocl::doctor::Doctor;
use std::io::Write;
use std::time::Instant;

#[derive(Args)]
pub struct DoctorArgs {
    /// The device and kernels under test [default: the CPU's fused kernels]; the reference is
    /// the CPU with the other kernel set.
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: DoctorArgs) -> Result<()> {
    // First, so that a device this build lacks is refused with its one line and nothing else.
    let doctor = Doctor::new(a.device.backend()?);
    emit(&doctor.build_info());
    let t0 = Instant::now();
    let checks = doctor.run(&mut |c| emit(&c.to_json(&doctor)));
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.name.as_str())
        .collect();
    emit(
        &serde_json::json!({"summary": {"target": doctor.target.label(), "reference": doctor.reference.label(),
            "checks": checks.len(), "failed": failed.len(), "failed_checks": failed,
            "seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0, "ok": failed.is_empty()}}),
    );
    if !failed.is_empty() {
        bail!(
            "{} of {} doctor checks failed: {}",
            failed.len(),
            checks.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Prints one JSON line. A closed pipe (`pocl doctor | head -1`) ends the output, not the
/// checks: the exit status still says whether they all passed.
fn emit(line: &serde_json::Value) {
    writeln!(std::io::stdout(), "{line}").ok();
}
