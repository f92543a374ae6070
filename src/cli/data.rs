//! `pocl data ...`: the built-in benchmark and data file checks.

use anyhow::Result;
use clap::{Args, Subcommand};
use pocl::data::synthetic::{write_benchmark, SynthConfig};
use pocl::data::{encode_samples, load_jsonl, EncodeOptions, Format, LoadOptions, Template};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Generate the built-in benchmark (Dolly-format JSONL splits + a trained BPE tokenizer.json).
    Synth(SynthArgs),
    /// Read a data file, report bad records, and (with --tokenizer) tokenization statistics.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub seed: u64,
    #[arg(long, default_value_t = 4000)]
    pub train: usize,
    #[arg(long, default_value_t = 200)]
    pub dev: usize,
    /// Size of each of the three test sets.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    #[arg(long, default_value_t = 1024)]
    pub vocab_size: usize,
}

#[derive(Args)]
pub struct CheckArgs {
    /// JSONL data file (Dolly, Alpaca or processed prompt/output).
    pub file: PathBuf,
    /// Force the format: dolly, alpaca or processed (default: detected).
    #[arg(long)]
    pub format: Option<Format>,
    /// Skip bad records instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad: bool,
    /// A tokenizer.json file or a directory holding one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prompt template: alpaca, plain or chat (the model's own).
    #[arg(long, default_value = "alpaca")]
    pub template: Template,
    /// With `--template chat`: a system message before each instruction (the recipe's
    /// `data.system`).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_prompt_len: usize,
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Synth(a) => {
            let cfg = SynthConfig {
                seed: a.seed,
                n_train: a.train,
                n_dev: a.dev,
                n_test: a.test,
                vocab_size: a.vocab_size,
            };
            let summary = write_benchmark(&a.out, &cfg)?;
            for (name, n) in &summary.files {
                let what = if name.ends_with(".json") {
                    "vocabulary size"
                } else {
                    "samples"
                };
                println!("{}: {n} {what}", a.out.join(name).display());
            }
            Ok(())
        }
        DataCommand::Check(a) => {
            let loaded = load_jsonl(
                &a.file,
                LoadOptions {
                    format: a.format,
                    skip_bad: a.skip_bad,
                },
            )?;
            println!(
                "{}: {} samples, format {}",
                a.file.display(),
                loaded.samples.len(),
                loaded.format
            );
            if let Some(s) = loaded.skipped_summary() {
                println!("{s}");
            }
            if let Some(t) = a.tokenizer {
                let tok = if t.is_dir() {
                    pocl::tokenizer::Tokenizer::from_dir(&t, None)?
                } else {
                    pocl::tokenizer::Tokenizer::from_file(&t, None)?
                };
                let opts = EncodeOptions {
                    template: a.template,
                    max_prompt_len: a.max_prompt_len,
                    max_len: a.max_len,
                };
                let mut samples = loaded.samples;
                pocl::data::chat::prepare(
                    &mut samples,
                    a.template,
                    a.system.as_deref(),
                    &t,
                    &a.file,
                )?;
                let enc = encode_samples(&tok, &samples, &opts)?;
                let n = enc.examples.len().max(1);
                let mean = |f: &dyn Fn(&pocl::data::Example) -> usize| {
                    enc.examples.iter().map(f).sum::<usize>() as f64 / n as f64
                };
                println!(
                    "{} examples; mean prompt {:.1} tokens, mean response {:.1} tokens (EOS included)",
                    enc.examples.len(),
                    mean(&|e| e.prompt_ids.len()),
                    mean(&|e| e.response_ids.len())
                );
                if let Some(s) = enc.summary() {
                    println!("{s}");
                }
            }
            Ok(())
        }
    }
}
