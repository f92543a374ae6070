//! `pocl generate`: continue a prompt with a model.

use crate::model::generate::{generate, GenerationConfig};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use clap::Args;
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
    let model = if a.sampling.dtype == "bf16" {
        crate::model::load_frozen_bf16(&a.model, &crate::backend::Backend::cpu())?
    } else {
        crate::model::load_frozen(&a.model, &crate::backend::Backend::cpu())?
    };
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

/// EOS ids from config.json, plus those of generation_config.json (chat models often list more).
pub fn eos_ids(dir: &std::path::Path, from_config: &[u32]) -> Vec<u32> {
    let mut ids = from_config.to_vec();
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let extra: Vec<u32> = match v.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                None => vec![],
            };
            for e in extra {
                if !ids.contains(&e) {
                    ids.push(e);
                }
            }
        }
    }
    ids
}
