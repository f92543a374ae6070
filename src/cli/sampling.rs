//! The decoding and prompt flags shared by `generate`, `eval` and `generate-data`.

use anyhow::{bail, Result};
use clap::Args;
use pocl::data::{Format, Template};
use pocl::model::generate::Sampling;
use pocl::pipeline::Precision;

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Argmax decoding.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sampling temperature (default 1).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// 0 disables top-k (default 0).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// 1 disables top-p (default 1).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// The model's matrices in "f32" (exact; the default) or "bf16" (converted once: ~2.5x
    /// faster decoding on CPUs with AMX, at bf16's precision, so answers can differ slightly).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
}

impl SamplingArgs {
    /// The decoding asked for. Without any flag: sampling at T = 1 when `sample_by_default`
    /// (the evaluation protocol, SeqKD data), else greedy (`pocl generate`).
    pub fn resolve(&self, sample_by_default: bool) -> Result<Sampling> {
        let any = self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        if self.greedy || !(any || sample_by_default) {
            return Ok(Sampling::Greedy);
        }
        let temperature = self.temperature.unwrap_or(1.0);
        let top_p = self.top_p.unwrap_or(1.0);
        // Written so that NaN is rejected too.
        let positive = temperature > 0.0;
        if !positive {
            bail!("--temperature must be > 0 (use --greedy for argmax decoding)");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        Ok(Sampling::Sample {
            temperature,
            top_k: self.top_k.unwrap_or(0),
            top_p,
        })
    }
}

/// How prompts are read and batched for `eval` and `generate-data`.
#[derive(Args, Clone, Debug)]
pub struct PromptArgs {
    /// Prompts generated together (answers do not depend on it).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Prompt template: alpaca, plain or chat (the model's own).
    #[arg(long, default_value = "alpaca")]
    pub template: Template,
    /// With `--template chat`: a system message before each instruction (as the recipe's
    /// `data.system`), replacing the template's default one if it has one.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_prompt_len: usize,
    /// Force the data format: dolly, alpaca or processed (default: detected per file).
    #[arg(long)]
    pub format: Option<Format>,
    /// Use only the first N samples of each file.
    #[arg(long)]
    pub limit: Option<usize>,
}
