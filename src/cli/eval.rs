//! `pocl eval`: the paper's multi-seed ROUGE-L evaluation of a model on test sets.

use anyhow::{bail, Context, Result};
use clap::Args;
use pocl::data::{load_jsonl, Format, LoadOptions, Sample};
use pocl::eval::evaluate::{evaluate, Decoding, EvalConfig};
use pocl::pipeline::load_model;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory (HF layout, with its tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Test sets (JSONL: Dolly, Alpaca or processed); each is named after its file stem.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Generation seeds; the reported std is over these (ddof = 1).
    #[arg(long, value_delimiter = ',', default_value = "10,20,30,40,50")]
    pub seeds: Vec<u64>,
    /// Write answers/<set>/seed<S>.jsonl and results.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: super::sampling::SamplingArgs,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
    /// Forbid repeating n-grams of this size (0 = off).
    #[arg(long, default_value_t = 6)]
    pub no_repeat_ngram: usize,
    #[command(flatten)]
    pub prompts: super::sampling::PromptArgs,
    /// Print results.json's content instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Loads a data file's samples (bad records are errors), keeping the first `limit`.
pub fn load_samples(
    path: &Path,
    format: Option<Format>,
    limit: Option<usize>,
) -> Result<Vec<Sample>> {
    let mut samples = load_jsonl(
        path,
        LoadOptions {
            format,
            skip_bad: false,
        },
    )?
    .samples;
    if let Some(n) = limit {
        samples.truncate(n);
    }
    Ok(samples)
}

pub fn run(a: EvalArgs) -> Result<()> {
    let sampling = a.sampling.resolve(true)?;
    if a.prompts.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    // Data first: a bad path fails before the (slow) model load.
    let mut sets = Vec::with_capacity(a.data.len());
    for path in &a.data {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .with_context(|| format!("{}: not a file name", path.display()))?;
        let mut samples = load_samples(path, a.prompts.format, a.prompts.limit)?;
        pocl::data::chat::prepare(
            &mut samples,
            a.prompts.template,
            a.prompts.system.as_deref(),
            &a.model,
            path,
        )?;
        sets.push((name, samples));
    }
    let (model, tok, eos_ids) = load_model(&a.model, a.sampling.dtype, &a.device.backend()?)?;
    let cfg = EvalConfig {
        seeds: a.seeds,
        decoding: Decoding {
            sampling,
            max_new_tokens: a.max_new_tokens,
            no_repeat_ngram: a.no_repeat_ngram,
            template: a.prompts.template,
            max_prompt_len: a.prompts.max_prompt_len,
            batch_size: a.prompts.batch_size,
            eos_ids,
        },
        model: Some(a.model.display().to_string()),
        verbose: true,
    };
    let report = evaluate(model.as_ref(), &tok, &sets, &cfg, a.out.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
        if let Some(o) = &a.out {
            println!("results: {}", o.join("results.json").display());
        }
    }
    Ok(())
}
