//! `--device` and `--kernels`, shared by every command that runs a model.

use anyhow::Result;
use clap::Args;
use pocl::backend::{Backend, DeviceChoice, Kernels};

#[derive(Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Where the model computes: cpu, cuda (GPU 0) or cuda:N [default: cpu].
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceChoice>,
    /// fused (pocl's own kernels: the CPU's; on CUDA, pocl's CUDA kernels where they exist) or
    /// portable (candle tensor ops; any device) [default: fused on the CPU, portable on CUDA].
    #[arg(long, value_name = "KERNELS")]
    pub kernels: Option<Kernels>,
}

impl DeviceArgs {
    /// Opens the device with the kernels asked for.
    pub fn backend(&self) -> Result<Backend> {
        Backend::new(self.device.unwrap_or_default(), self.kernels)
    }

    /// The flags as recipe overrides (`--set run.device=...`), for commands that run recipes.
    pub fn as_sets(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(d) = self.device {
            sets.push(format!("run.device={d}"));
        }
        if let Some(k) = self.kernels {
            sets.push(format!("run.kernels={k}"));
        }
        sets
    }
}
