//! `pocl demo`: the whole method on the built-in benchmark, offline (see `demo.rs`).

use anyhow::{bail, Result};
use clap::Args;
use pocl::demo::{Demo, Plan, Size};
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Output directory (data, models, runs, evaluations, report.md).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// A small version that finishes in a few minutes.
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// All seven methods of the paper, 3 training seeds, 5 generation seeds.
    #[arg(long)]
    pub full: bool,
    /// Number of training seeds (default: 1 quick, 2 default, 3 full).
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Redo every phase instead of reusing what an earlier demo in --out produced.
    #[arg(long)]
    pub fresh: bool,
    /// Train the KD runs on one teacher cache built once (pocl cache-teacher; GKD's samples
    /// still ask the live teacher), reporting the time saved against live-teacher runs already in --out.
    #[arg(long)]
    pub teacher_cache: bool,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: DemoArgs) -> Result<()> {
    if a.seeds == Some(0) {
        bail!("--seeds must be at least 1");
    }
    let size = if a.quick {
        Size::Quick
    } else if a.full {
        Size::Full
    } else {
        Size::Default
    };
    Demo {
        out: a.out,
        plan: Plan::new(size, a.seeds),
        fresh: a.fresh,
        teacher_cache: a.teacher_cache,
        run: pocl::config::RunSection {
            device: a.device.device.unwrap_or_default(),
            kernels: a.device.kernels,
        },
    }
    .run()
}
