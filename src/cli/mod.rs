//! Command-line interface: one file per subcommand, argument plumbing only.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod data;
pub mod rouge;

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
    /// ROUGE-L F1 x100 (identical to rouge-score with the Porter stemmer) of predictions vs references.
    Rouge(rouge::RougeArgs),
    /// Instruction data: the built-in benchmark, file checks.
    #[command(subcommand)]
    Data(data::DataCommand),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => {
            println!("pocl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Rouge(args) => rouge::run(args),
        Command::Data(cmd) => data::run(cmd),
    }
}
