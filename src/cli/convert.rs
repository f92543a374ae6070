//! `pocl convert`: rewrite a checkpoint as a canonical pocl/HF directory (f32, one
//! model.safetensors, HF key names, tokenizer files copied). This is exactly how training saves
//! checkpoints, so it doubles as a check that a model survives pocl's load/save. With `--gguf`,
//! a llama.cpp / Ollama GGUF file becomes such a directory (weights dequantized to f32, the
//! tokenizer, chat template and special tokens from its metadata).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source model directory (HF layout; sharded, f16/bf16 and hub-style keys accepted).
    #[arg(long, required_unless_present = "gguf", conflicts_with = "gguf")]
    pub model: Option<PathBuf>,
    /// Source GGUF file (architectures llama, qwen2, qwen3).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
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
    if let Some(gguf) = &a.gguf {
        pocl::model::gguf::convert(gguf, &a.out)?;
        eprintln!("wrote {} (from {})", a.out.display(), gguf.display());
        return Ok(());
    }
    let src = a.model.expect("clap requires --model without --gguf");
    // Conversion only reads and rewrites weights: the CPU.
    let model = pocl::model::load_frozen(&src, &pocl::backend::Backend::cpu())?;
    pocl::model::save(model.as_ref(), &a.out, Some(&src))?;
    let n = model.params().num_elements();
    eprintln!("wrote {} ({} parameters, f32)", a.out.display(), n);
    Ok(())
}
