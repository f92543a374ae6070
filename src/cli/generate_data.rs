//! `pocl generate-data`: the SeqKD baseline's training data. A teacher answers every training
//! prompt; its answers replace the reference responses (SFT on the result is SeqKD).
//!
//! Defaults follow the reference pipeline (MiniLLM's `generate_data_seqkd.sh`, whose output
//! DistiLLM's `process_pseudo_data_seqkd.sh` reads from `gen/.../t1.0-l512`): sampling at
//! temperature 1, top-k 0, top-p 1, no n-gram ban, 512 − 256 = 256 new tokens, prompts cut to
//! 256 tokens, seed 10. `--greedy` gives deterministic, seed-free answers instead.

use super::eval::load_samples;
use anyhow::{bail, Result};
use clap::Args;
use pocl::data::format::write_dolly_jsonl;
use pocl::data::seqkd::{teacher_data, TeacherData};
use pocl::eval::evaluate::{generate_prepared_with_progress, prepare_prompts, Decoding};
use pocl::pipeline::load_model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct GenerateDataArgs {
    /// Teacher model directory (HF layout, with its tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data (JSONL: Dolly, Alpaca or processed).
    #[arg(long)]
    pub data: PathBuf,
    /// Output Dolly-format JSONL (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: super::sampling::SamplingArgs,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
    /// Each sample's RNG is derived from (seed, sample id), so answers do not depend on batching.
    #[arg(long, default_value_t = 10)]
    pub seed: u64,
    /// Forbid repeating n-grams of this size (0 = off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram: usize,
    #[command(flatten)]
    pub prompts: super::sampling::PromptArgs,
}

pub fn run(a: GenerateDataArgs) -> Result<()> {
    pocl::output::refuse_input_as_output(
        "--out",
        &a.out,
        &[("--data", &a.data), ("--model", &a.model)],
    )?;
    let sampling = a.sampling.resolve(true)?;
    if a.prompts.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    let mut samples = load_samples(&a.data, a.prompts.format, a.prompts.limit)?;
    if let Some(s) = samples.iter().find(|s| !s.messages.is_empty()) {
        bail!(
            "{}:{}: conversation records cannot be written as Dolly data; give instruction data",
            a.data.display(),
            s.id
        );
    }
    if samples.iter().any(|s| s.prompt.is_some()) {
        // A Dolly record cannot hold a pre-rendered prompt: training would re-render a different one.
        bail!(
            "{}: processed records (pre-rendered prompts) cannot be written as Dolly data; \
             give instruction/context data (Dolly or Alpaca)",
            a.data.display()
        );
    }
    // With the chat template the prompts are rendered now; the Dolly records keep the instruction.
    pocl::data::chat::prepare(
        &mut samples,
        a.prompts.template,
        a.prompts.system.as_deref(),
        &a.model,
        &a.data,
    )?;
    let (model, tok, eos_ids) = load_model(&a.model, a.sampling.dtype, &a.device.backend()?)?;
    let dec = Decoding {
        sampling,
        max_new_tokens: a.max_new_tokens,
        no_repeat_ngram: a.no_repeat_ngram,
        template: a.prompts.template,
        max_prompt_len: a.prompts.max_prompt_len,
        batch_size: a.prompts.batch_size,
        eos_ids: eos_ids.clone(),
    };
    let start = Instant::now();
    let prompts = prepare_prompts(model.as_ref(), &tok, &samples, &dec)?;
    let ids: Vec<u64> = samples.iter().map(|s| s.id).collect();
    let mut bar = pocl::progress::Progress::new("teacher answers", ids.len());
    let answers = generate_prepared_with_progress(
        model.as_ref(),
        &tok,
        &prompts,
        &ids,
        &dec,
        a.seed,
        &mut |done| bar.set(done, ""),
    )?;
    let TeacherData {
        samples: out,
        empty,
        unfinished,
        tokens,
    } = teacher_data(&samples, &answers, &eos_ids);
    if out.is_empty() {
        bail!(
            "the teacher's answers are all empty ({} samples); nothing written",
            samples.len()
        );
    }
    write_dolly_jsonl(&a.out, &out)?;
    println!(
        "{}: {} samples from {} ({:.1} s); mean answer {:.1} tokens; {} stopped at --max-new-tokens without EOS",
        a.out.display(),
        out.len(),
        a.data.display(),
        start.elapsed().as_secs_f64(),
        tokens as f64 / out.len() as f64,
        unfinished
    );
    if !empty.is_empty() {
        let shown: Vec<String> = empty.iter().take(10).map(|i| i.to_string()).collect();
        println!(
            "dropped {} empty answer(s): sample id(s) {}{}",
            empty.len(),
            shown.join(", "),
            if empty.len() > 10 { ", ..." } else { "" }
        );
    }
    Ok(())
}
