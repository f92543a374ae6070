//! `pocl score`: the POCL difficulty measurer on its own (ROUGE-L of the student's greedy answers,
//! teacher-forced CE, ranks, RRF and buckets), e.g. to inspect or reuse across runs.

use anyhow::Result;
use clap::Args;
use pocl::curriculum::fuse::Metric;
use pocl::curriculum::measure::{self, MeasureConfig};
use pocl::data::{EncodeOptions, Format, LoadOptions, Template};
use std::path::PathBuf;

#[derive(Args)]
pub struct ScoreArgs {
    /// Student model directory (the checkpoint training starts from).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data (JSONL: Dolly, Alpaca or processed).
    #[arg(long)]
    pub data: PathBuf,
    /// Output scores (JSONL, easiest first).
    #[arg(long)]
    pub out: PathBuf,
    /// Force the data format (dolly, alpaca, processed) instead of detecting it.
    #[arg(long)]
    pub format: Option<Format>,
    #[arg(long, default_value = "alpaca")]
    pub template: Template,
    /// With `--template chat`: a system message before each instruction (the recipe's
    /// `data.system`).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_prompt_len: usize,
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// rouge, ce or both (reciprocal rank fusion).
    #[arg(long, default_value = "both")]
    pub metric: Metric,
    #[arg(long, default_value_t = 60.0)]
    pub rrf_k: f64,
    #[arg(long, default_value_t = 4)]
    pub buckets: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Skip malformed records instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    pocl::output::refuse_input_as_output(
        "--out",
        &a.out,
        &[("--data", &a.data), ("--model", &a.model)],
    )?;
    let cfg = MeasureConfig {
        max_new_tokens: a.max_new_tokens,
        no_repeat_ngram: 6,
        batch_size: a.batch_size,
        metric: a.metric,
        rrf_k: a.rrf_k,
        buckets: a.buckets,
    };
    cfg.validate(&|field| format!("--{}", field.replace('_', "-")))?;
    let model = pocl::model::load_frozen(&a.model, &a.device.backend()?)?;
    let eos_ids = pocl::pipeline::eos_ids(&a.model, &model.config().eos_token_ids);
    let tok = pocl::tokenizer::Tokenizer::from_dir(&a.model, eos_ids.first().copied())?;
    let mut samples = pocl::train::splits::read_samples(
        &a.data,
        LoadOptions {
            format: a.format,
            skip_bad: a.skip_bad,
        },
    )?;
    pocl::data::chat::prepare(
        &mut samples,
        a.template,
        a.system.as_deref(),
        &a.model,
        &a.data,
    )?;
    // Sequences and answers fit the model's positions (one notice line when lowered).
    let (mut max_prompt_len, mut max_len, mut max_new) =
        (a.max_prompt_len, a.max_len, cfg.max_new_tokens);
    let mut limits = pocl::model::context::Limits::new(model.config().max_positions);
    limits.sequences(
        ("--max-prompt-len", &mut max_prompt_len),
        ("--max-len", &mut max_len),
    );
    limits.new_tokens("--max-new-tokens", max_prompt_len, &mut max_new);
    limits.notice();
    let cfg = MeasureConfig {
        max_new_tokens: max_new,
        ..cfg
    };
    let eo = EncodeOptions {
        template: a.template,
        max_prompt_len,
        max_len,
    };
    let (examples, refs) =
        pocl::train::splits::encode(&tok, &samples, &eo, &a.data.display().to_string())?;
    let pad = pocl::pipeline::pad_id(model.config(), &eos_ids);
    let t0 = std::time::Instant::now();
    let scores = measure::measure(model.as_ref(), &tok, &examples, &refs, &eos_ids, pad, &cfg)?;
    measure::write_scores(&a.out, &scores)?;
    eprintln!(
        "scored {} samples in {:.1}s -> {}",
        scores.len(),
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
