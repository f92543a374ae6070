//! Command-line interface: one file per subcommand, argument plumbing only.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod bench;
pub mod cache_fidelity;
pub mod cache_teacher;
pub mod convert;
pub mod data;
pub mod demo;
pub mod device;
pub mod doctor;
pub mod eval;
pub mod forward;
pub mod generate;
pub mod generate_data;
pub mod init;
pub mod kd_loss;
pub mod rouge;
pub mod sampling;
pub mod score;
pub mod tokenize;
pub mod train;

#[derive(Parser)]
#[command(
    name = "pocl",
    version,
    about = "Knowledge distillation of LLMs with the POCL curriculum"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The paper's experiment on the built-in benchmark: KD with and without POCL, report.md.
    Demo(demo::DemoArgs),
    /// Run the teacher once over a data file and store its top-K targets (a teacher cache).
    CacheTeacher(cache_teacher::CacheTeacherArgs),
    /// Run a distillation recipe (all curriculum stages) into a run directory.
    Train(train::TrainArgs),
    /// Measure sample difficulty with the student (POCL's ROUGE-L + CE rank fusion).
    Score(score::ScoreArgs),
    /// Instruction data: the built-in benchmark, file checks.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// ROUGE-L F1 x100 (identical to rouge-score with the Porter stemmer) of predictions vs references.
    Rouge(rouge::RougeArgs),
    /// Standard speed workloads (as ../shared/bench/peer_torch.py): kd-step, generate.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Encode a text with a model's tokenizer: {"ids": [...], "decoded": "..."}.
    Tokenize(tokenize::TokenizeArgs),
    /// Write the logits of one token sequence to a safetensors file.
    Forward(forward::ForwardArgs),
    /// Multi-seed ROUGE-L evaluation on test sets (the paper's protocol): table and results.json.
    Eval(eval::EvalArgs),
    /// SeqKD data: a teacher's answers to the training prompts, written as Dolly JSONL.
    GenerateData(generate_data::GenerateDataArgs),
    /// Continue a prompt (greedy or sampled).
    Generate(generate::GenerateArgs),
    /// Create a randomly initialised model for a tokenizer.
    Init(init::InitArgs),
    /// Self-test: the build, then every op, the KD loss, AdamW, a KD run and generation on a
    /// device against the CPU (one JSON line each); exits non-zero on any failure.
    Doctor(doctor::DoctorArgs),
    /// Rewrite a checkpoint as f32 single-file HF layout (as training saves it).
    Convert(convert::ConvertArgs),
    /// A KD loss (masked token mean of T²·D_T) and its gradient on safetensors logits.
    KdLoss(Box<kd_loss::Args>),
}

pub fn run(cli: Cli) -> Result<()> {
    // The bf16 kernel is chosen once, here at start-up (an unknown or unrunnable
    // POCL_BF16_KERNEL is a user error, reported before any work starts).
    pocl::ops::bf16::selected_kernel()?;
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Train(a) => train::run(a),
        Command::CacheTeacher(a) => cache_teacher::run(a),
        Command::Score(a) => score::run(a),
        Command::Data(cmd) => data::run(cmd),
        Command::Rouge(a) => rouge::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Eval(a) => eval::run(a),
        Command::GenerateData(a) => generate_data::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Init(a) => init::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Convert(a) => convert::run(a),
        Command::KdLoss(a) => kd_loss::run(*a),
    }
}
