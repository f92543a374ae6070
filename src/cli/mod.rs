//! Command-line interface: one file per subcommand, argument plumbing only.

pub mod kd_loss;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pocl", version, about = "Knowledge distillation of LLMs with the POCL curriculum")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the version and build facts.
    Info,
    /// Evaluate a KD loss (masked token mean of T²·D_T) and its gradient on safetensors logits.
    KdLoss(Box<kd_loss::Args>),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => {
            println!("pocl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::KdLoss(args) => kd_loss::run(*args),
    }
}
