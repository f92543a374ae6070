//! `pocl tokenize`: how a model's tokenizer splits a text.

use anyhow::Result;
use clap::Args;
use pocl::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(Args)]
pub struct TokenizeArgs {
    /// Model directory holding tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to encode (no special tokens are added).
    #[arg(long)]
    pub text: String,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let tok = Tokenizer::from_dir(&a.model, None)?;
    let ids = tok.encode(&a.text)?;
    let decoded = tok.decode(&ids, false)?;
    println!("{}", serde_json::json!({ "ids": ids, "decoded": decoded }));
    Ok(())
}
