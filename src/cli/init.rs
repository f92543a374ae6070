//! `pocl init`: a new, randomly initialised model directory (HF layout) for a tokenizer.

use anyhow::Result;
use clap::Args;
use pocl::model::init::{init, Shape};
use std::path::PathBuf;

#[derive(Args)]
pub struct InitArgs {
    /// gpt2, opt, llama, qwen2 or qwen3.
    #[arg(long, default_value = "gpt2")]
    pub family: String,
    /// Directory holding the tokenizer.json the model is for.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// New model directory (refused if it exists and is not empty, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace what is at --out.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads (Llama family); default = heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// MLP width (default: the family's usual multiple of hidden).
    #[arg(long, default_value_t = 0)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 512)]
    pub max_positions: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: InitArgs) -> Result<()> {
    pocl::output::check_new_dir("--out", &a.out, a.force)?;
    pocl::output::refuse_input_as_output("--out", &a.out, &[("--tokenizer", &a.tokenizer)])?;
    let shape = Shape {
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        intermediate: a.intermediate,
        max_positions: a.max_positions,
    };
    let m = init(&a.family, &shape, &a.tokenizer, &a.out, a.seed)?;
    eprintln!(
        "wrote {} ({} parameters)",
        a.out.display(),
        m.params().num_elements()
    );
    Ok(())
}
