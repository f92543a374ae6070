//! `pocl rouge`: ROUGE-L (rouge-score compatible) of predictions against references.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RougeArgs {
    /// JSONL file, one JSON string per line.
    #[arg(long)]
    pub predictions: PathBuf,
    /// JSONL file, one JSON string or array of strings (several references) per line.
    #[arg(long)]
    pub references: PathBuf,
    /// Print {"rougeL": mean, "exact_match": rate, "scores": [per-sample]} instead of the mean.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: RougeArgs) -> Result<()> {
    let preds = pocl::eval::rouge::read_predictions(&args.predictions)?;
    let refs = pocl::eval::rouge::read_references(&args.references)?;
    if preds.len() != refs.len() {
        anyhow::bail!(
            "{} has {} lines but {} has {}: one line per sample in both",
            args.predictions.display(),
            preds.len(),
            args.references.display(),
            refs.len()
        );
    }
    let scores = pocl::eval::score_corpus(&preds, &refs)?;
    if args.json {
        println!("{}", serde_json::to_string(&scores)?);
    } else {
        println!("{:.4}", scores.rouge_l);
    }
    Ok(())
}
