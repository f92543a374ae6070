//! `pocl convert`: rewrite a checkpoint as a canonical pocl/HF directory (f32, one
//! model.safetensors, HF key names, tokenizer files copied). This is exactly how training saves
//! checkpoints, so it doubles as a check that a model survives pocl's load/save.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source model directory (HF layout; sharded, f16/bf16 and hub-style keys accepted).
    #[arg(long)]
    pub model: PathBuf,
    /// Destination directory (refused if it exists and is not empty, unless --force; then
    /// replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace what is at --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    pocl::output::check_new_dir("--out", &a.out, a.force)?;
    // Conversion only reads and rewrites weights: the CPU.
    let model = pocl::model::load_frozen(&a.model, &pocl::backend::Backend::cpu())?;
    pocl::model::save(model.as_ref(), &a.out, Some(&a.model))?;
    let n = model.params().num_elements();
    eprintln!("wrote {} ({} parameters, f32)", a.out.display(), n);
    Ok(())
}
