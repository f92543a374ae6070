//! The pipeline that `pocl train`, `pocl score`, `pocl eval` and the demo share: loading a model
//! for inference with its tokenizer and EOS ids, measuring difficulty with the student, and
//! running a recipe (measure when the curriculum needs it, then train every stage).

use crate::backend::Backend;
use crate::config::Recipe;
use crate::curriculum::fuse::Scored;
use crate::curriculum::measure::{self, MeasureConfig};
use crate::model::config::ModelConfig;
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{best_checkpoint, last_checkpoint};
use crate::train::splits::Splits;
use crate::train::trainer::Trainer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The precision of a frozen model's matrices (recipe key `model.teacher_dtype`, `--dtype`):
/// `f32`, exact (the matrices as stored, upcast to f32), or `bf16`, converted once to bf16 and
/// packed (AMX tiles where the CPU has them; half the memory, at bf16's precision; norms and
/// biases stay f32).
// (Plain comments on the variants: clap would turn doc comments into per-value help.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

/// The model in `dir`, frozen (forward only), with its matrices in `precision`, on `backend`.
pub fn load_frozen(
    dir: &Path,
    precision: Precision,
    backend: &Backend,
) -> Result<Box<dyn CausalLm>> {
    match precision {
        Precision::F32 => crate::model::load_frozen(dir, backend),
        Precision::Bf16 => crate::model::load_frozen_bf16(dir, backend),
    }
}

/// EOS ids from config.json, plus those of generation_config.json (chat models often list more).
pub fn eos_ids(dir: &Path, from_config: &[u32]) -> Vec<u32> {
    let mut ids = from_config.to_vec();
    // A .gguf path was converted when its config was read; an error shows there, not here.
    let dir = &crate::model::gguf::model_dir(dir).unwrap_or_else(|_| dir.to_path_buf());
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

/// The padding id of a model: its config's `pad_token_id`, else its first EOS id, else 0.
/// Padding never reaches a loss or an answer (masks exclude it); the id only has to be valid.
pub fn pad_id(config: &ModelConfig, eos_ids: &[u32]) -> u32 {
    config
        .pad_token_id
        .or(eos_ids.first().copied())
        .unwrap_or(0)
}

/// The model in `dir` for inference ([`load_frozen`] in `precision`), its tokenizer, and its EOS
/// ids ([`eos_ids`]); fails when the tokenizer does not fit the model.
pub fn load_model(
    dir: &Path,
    precision: Precision,
    backend: &Backend,
) -> Result<(Box<dyn CausalLm>, Tokenizer, Vec<u32>)> {
    let model = load_frozen(dir, precision, backend)?;
    let eos = eos_ids(dir, &model.config().eos_token_ids);
    let tok = Tokenizer::from_dir(dir, eos.first().copied())?;
    crate::eval::evaluate::check_tokenizer(model.as_ref(), &tok)
        .with_context(|| dir.display().to_string())?;
    Ok((model, tok, eos))
}

/// Scores `data.train` with `student` as the recipe's curriculum section says, writes the scores
/// to `out` and returns them with the seconds the measurement took.
pub fn measure_difficulty(
    recipe: &Recipe,
    student: &dyn CausalLm,
    tok: &Tokenizer,
    eos_ids: &[u32],
    data: &Splits,
    out: &Path,
) -> Result<(Vec<Scored>, f64)> {
    let c = &recipe.curriculum;
    let cfg = MeasureConfig {
        max_new_tokens: c.score_max_new_tokens,
        no_repeat_ngram: 6,
        batch_size: c.score_batch_size,
        metric: c.metric,
        rrf_k: c.rrf_k,
        buckets: c.stages,
    };
    eprintln!(
        "measuring the difficulty of {} samples with the student ...",
        data.train.len()
    );
    let t0 = std::time::Instant::now();
    let pad = pad_id(student.config(), eos_ids);
    let scores = measure::measure(
        student,
        tok,
        &data.train,
        &data.train_references,
        eos_ids,
        pad,
        &cfg,
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    measure::write_scores(out, &scores)?;
    eprintln!("difficulty measured in {seconds:.1}s -> {}", out.display());
    Ok((scores, seconds))
}

/// Runs (or resumes) the recipe in `run_dir`: measures difficulty first when the curriculum needs
/// it and no scores are given (cached as RUN/scores.jsonl), then trains every stage.
///
/// The student is loaded once, by the trainer. Only a measurement loads it a second time, frozen:
/// the measurer decodes through the kernels of a frozen model, and its scores must not depend on
/// whether training follows.
pub fn run_recipe(recipe: Recipe, run_dir: &Path, resume: bool) -> Result<()> {
    // The device first: a device this build or machine lacks fails before any work. Opened once,
    // so that every model of the run shares it.
    let backend = recipe.run.backend()?;
    let student_dir = recipe.model.student.clone();
    let config = ModelConfig::from_dir(&student_dir)?;
    let eos = eos_ids(&student_dir, &config.eos_token_ids);
    let tok = Tokenizer::from_dir(&student_dir, eos.first().copied())?;
    let data = Splits::load(&recipe, &tok)?;
    eprintln!(
        "data: {} training and {} dev examples",
        data.train.len(),
        data.dev.len()
    );
    std::fs::create_dir_all(run_dir)?;
    let scores = if recipe.curriculum.kind.needs_scores() {
        match &recipe.curriculum.scores {
            Some(path) if !path.is_file() => {
                bail!(
                    "curriculum.scores: {} does not exist (leave the key out to measure)",
                    path.display()
                )
            }
            Some(path) => Some(measure::read_scores(path)?),
            None if run_dir.join("scores.jsonl").is_file() => {
                Some(measure::read_scores(&run_dir.join("scores.jsonl"))?)
            }
            None => {
                let student = load_frozen(&student_dir, Precision::F32, &backend)?;
                let (s, _) = measure_difficulty(
                    &recipe,
                    student.as_ref(),
                    &tok,
                    &eos,
                    &data,
                    &run_dir.join("scores.jsonl"),
                )?;
                Some(s)
            }
        }
    } else {
        None
    };
    let mut trainer = Trainer::new(recipe, &backend, run_dir, resume, data, scores)?;
    trainer.run()?;
    eprintln!(
        "done: {} (last), {} (best dev ROUGE-L {})",
        last_checkpoint(run_dir).display(),
        best_checkpoint(run_dir).display(),
        trainer
            .state
            .best_dev_rouge
            .map(|r| format!("{r:.2}"))
            .unwrap_or("n/a".into())
    );
    Ok(())
}
