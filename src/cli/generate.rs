//! `pocl generate`: continue a prompt with a model.

use anyhow::{bail, Result};
use clap::Args;
use pocl::model::generate::{generate, GenerationConfig};
use pocl::pipeline::{eos_ids, load_frozen};
use pocl::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (encoded without special tokens).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: super::sampling::SamplingArgs,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Forbid repeating n-grams of this size (0 = off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram: usize,
    /// Print {"ids": [...], "text": "..."} instead of the text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let model = load_frozen(&a.model, a.sampling.dtype, &a.device.backend()?)?;
    let cfg = model.config();
    let eos_ids = eos_ids(&a.model, &cfg.eos_token_ids);
    let tok = if a.prompt.is_some() || a.json || a.ids.is_none() {
        Some(Tokenizer::from_dir(&a.model, eos_ids.first().copied())?)
    } else {
        Tokenizer::from_dir(&a.model, None).ok()
    };
    let prompt = match (&a.prompt, &a.ids) {
        (Some(text), _) => tok.as_ref().expect("tokenizer loaded").encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --ids"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    super::forward::check_ids(&prompt, cfg.vocab_size)?;
    let sampling = a.sampling.resolve(false)?;
    let gc = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        no_repeat_ngram: a.no_repeat_ngram,
        eos_ids,
        seed: a.seed,
    };
    let new = generate(model.as_ref(), &[prompt], &gc)?.remove(0);
    let text = match &tok {
        Some(t) => t.decode(&new, true)?,
        None => String::new(),
    };
    if a.json {
        println!("{}", serde_json::json!({ "ids": new, "text": text }));
    } else {
        println!("{text}");
    }
    Ok(())
}
