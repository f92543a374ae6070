//! `pocl forward`: the logits of one sequence, for checking a conversion against transformers.

use anyhow::{Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct ForwardArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// Output safetensors file; receives the f32 tensor `logits` [len, vocab].
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let model = pocl::model::load_frozen(&a.model, &a.device.backend()?)?;
    check_ids(&a.ids, model.config().vocab_size)?;
    let positions = model.config().max_positions;
    if a.ids.len() > positions {
        anyhow::bail!(
            "--ids: {} tokens do not fit the model's {positions} positions ({}/config.json)",
            a.ids.len(),
            a.model.display()
        );
    }
    let logits = pocl::model::forward_ids(model.as_ref(), &a.ids)
        .with_context(|| format!("forward pass of {}", a.model.display()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let logits = logits.to_device(&candle_core::Device::Cpu)?;
    let bytes = safetensors::serialize([("logits", &logits)], Some(meta))?;
    pocl::write_atomic(&a.output, &bytes)
}

/// Token ids must index the vocabulary; caught before the model would fail obscurely.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!("token id {bad} is out of range for a vocabulary of {vocab}");
    }
    Ok(())
}
