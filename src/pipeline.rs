//! The pipeline that `pocl train`, `pocl score`, `pocl eval` and the demo share: loading a model
//! for inference with its tokenizer and EOS ids, measuring difficulty with the student, and
//! running a recipe (measure when the curriculum needs it, then train every stage).

use crate::backend::Backend;
use crate::config::Recipe;
use crate::curriculum::fuse::Scored;
use crate::curriculum::measure;
use crate::model::config::ModelConfig;
use crate::model::context::Limits;
use crate::model::{CausalLm, Matrices};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{best_checkpoint, last_checkpoint, prepare_run_dir};
use crate::train::run_dir::{self, Inputs, SCORES_FILE};
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

/// The model in `dir`, frozen (forward only), with its matrices in `precision`, on `backend`:
/// for evaluation and decoding.
pub fn load_frozen(
    dir: &Path,
    precision: Precision,
    backend: &Backend,
) -> Result<Box<dyn CausalLm>> {
    crate::model::load_frozen_as(dir, frozen_matrices(precision), backend)
}

/// How a model for evaluation and decoding in `precision` keeps its matrices ([`load_frozen`]).
pub fn frozen_matrices(precision: Precision) -> Matrices {
    match precision {
        Precision::F32 => Matrices::F32,
        Precision::Bf16 => Matrices::Bf16,
    }
}

/// A distillation teacher (`model.teacher_dtype` = `precision`): frozen, its matrices packed
/// once for the fused CPU kernels in either precision ([`Matrices`]), so that its forward
/// passes of many rows never pay the gemm crate's per-call packing. The live teacher and the
/// teacher cache's builder both load it here, so their logits agree to the bit.
pub fn load_teacher(
    dir: &Path,
    precision: Precision,
    backend: &Backend,
) -> Result<Box<dyn CausalLm>> {
    crate::model::load_frozen_as(dir, teacher_matrices(precision), backend)
}

/// How a teacher in `precision` keeps its matrices ([`load_teacher`]).
pub fn teacher_matrices(precision: Precision) -> Matrices {
    match precision {
        Precision::F32 => Matrices::F32Packed,
        Precision::Bf16 => Matrices::Bf16,
    }
}

/// The width teacher and student logits are compared over (`kd::vocab::common_vocab` of their
/// tokenizers and configs), read from the two directories without loading any weights.
pub fn kd_vocab_of_dirs(teacher: &Path, student: &Path) -> Result<usize> {
    let vocab = |d: &Path| ModelConfig::from_dir(d).map(|c| c.vocab_size);
    crate::kd::vocab::common_vocab(
        &Tokenizer::from_dir(teacher, None)?,
        &Tokenizer::from_dir(student, None)?,
        vocab(teacher)?,
        vocab(student)?,
    )
    .with_context(|| {
        format!(
            "teacher {} vs student {}",
            teacher.display(),
            student.display()
        )
    })
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
    let cfg = recipe.curriculum.measure_config();
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

/// The vocabulary width the KD loss compares over (the teacher's and student's common ids; the
/// student's own for SFT). Fails, naming both directories, when the teacher's tokenizer does not
/// match the student's.
pub fn kd_vocab(recipe: &Recipe, student_vocab: usize) -> Result<usize> {
    if !recipe.objective.loss.needs_teacher() {
        return Ok(student_vocab);
    }
    let dir = recipe
        .model
        .teacher
        .as_ref()
        .context("model.teacher: required")?;
    kd_vocab_of_dirs(dir, &recipe.model.student)
}

/// The difficulty scores of a run: the recipe's `curriculum.scores`, else the run's own
/// scores.jsonl when it was measured from these very inputs and settings, else measured now
/// (and recorded in `inputs`).
fn scores_of(
    recipe: &Recipe,
    run_dir: &Path,
    inputs: &mut Inputs,
    backend: &Backend,
    tok: &Tokenizer,
    eos: &[u32],
    data: &Splits,
) -> Result<Vec<Scored>> {
    if let Some(path) = &recipe.curriculum.scores {
        if !path.is_file() {
            bail!(
                "curriculum.scores: {} does not exist (leave the key out to measure)",
                path.display()
            )
        }
        return measure::read_scores(path);
    }
    let own = run_dir.join(SCORES_FILE);
    let key = inputs.measurement_key(recipe);
    if own.is_file() {
        let fp = run_dir::fingerprint(&own)?;
        let recorded = run_dir::recorded(run_dir)?.unwrap_or_default();
        let same = recorded.measured_for.as_deref() == Some(key.as_str())
            && recorded.files.get(SCORES_FILE) == Some(&fp);
        if same {
            inputs.files.insert(SCORES_FILE.into(), fp);
            inputs.measured_for = Some(key);
            return measure::read_scores(&own);
        }
        eprintln!(
            "{}: measured from other data, model or settings; measuring again",
            own.display()
        );
    }
    let student = load_frozen(&recipe.model.student, Precision::F32, backend)?;
    let (s, _) = measure_difficulty(recipe, student.as_ref(), tok, eos, data, &own)?;
    inputs
        .files
        .insert(SCORES_FILE.into(), run_dir::fingerprint(&own)?);
    inputs.measured_for = Some(key);
    run_dir::record(run_dir, inputs)?;
    Ok(s)
}

/// Runs (or resumes) the recipe in `run_dir`: measures difficulty first when the curriculum needs
/// it and no scores are given (cached as RUN/scores.jsonl), then trains every stage.
///
/// Everything that can be refused is checked before any work: the recipe (when loaded), the
/// device, the tokenizers, the data, the run directory (a lock held for the whole run, debris of
/// killed processes removed, a resumed run's inputs unchanged since it started).
///
/// The student is loaded once, by the trainer. Only a measurement loads it a second time, frozen:
/// the measurer decodes through the kernels of a frozen model, and its scores must not depend on
/// whether training follows.
pub fn run_recipe(recipe: Recipe, run_dir: &Path, resume: bool) -> Result<()> {
    let created = !run_dir.exists();
    let result = run_recipe_in(recipe, run_dir, resume);
    if result.is_err() && created {
        // A run that failed before training wrote anything leaves no directory behind: only its
        // own bookkeeping (the lock file, the input hashes) can be there then, and the lock was
        // released when `run_recipe_in` returned.
        let bookkeeping = [run_dir::LOCK_FILE, run_dir::INPUTS_FILE];
        let only_bookkeeping = std::fs::read_dir(run_dir).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| bookkeeping.iter().any(|b| e.file_name() == *b))
        });
        if only_bookkeeping {
            for b in bookkeeping {
                std::fs::remove_file(run_dir.join(b)).ok();
            }
            std::fs::remove_dir(run_dir).ok();
        }
    }
    result
}

fn run_recipe_in(mut recipe: Recipe, run_dir: &Path, resume: bool) -> Result<()> {
    // The device first: a device this build or machine lacks fails before any work. Opened once,
    // so that every model of the run shares it.
    let backend = recipe.run.backend()?;
    let student_dir = recipe.model.student.clone();
    let config = ModelConfig::from_dir(&student_dir)?;
    let eos = eos_ids(&student_dir, &config.eos_token_ids);
    let tok = Tokenizer::from_dir(&student_dir, eos.first().copied())?;
    kd_vocab(&recipe, config.vocab_size)?;
    // Training sequences fit both models' positions (`model::context`).
    let mut positions = config.max_positions;
    if let Some(teacher) = recipe
        .model
        .teacher
        .as_ref()
        .filter(|_| recipe.objective.loss.needs_teacher())
    {
        positions = positions.min(ModelConfig::from_dir(teacher)?.max_positions);
    }
    let mut limits = Limits::new(positions);
    let r = &mut recipe;
    limits.sequences(
        ("data.max_prompt_len", &mut r.data.max_prompt_len),
        ("data.max_len", &mut r.data.max_len),
    );
    // Answers to the training prompts, where the recipe generates any.
    let prompt = r.data.max_prompt_len;
    if r.eval.dev_rouge_samples > 0 {
        limits.new_tokens("eval.max_new_tokens", prompt, &mut r.eval.max_new_tokens);
    }
    if r.objective.loss.on_policy() {
        limits.new_tokens("gkd.max_new_tokens", prompt, &mut r.gkd.max_new_tokens);
    }
    if r.curriculum.kind.needs_scores() && r.curriculum.scores.is_none() {
        let score = &mut r.curriculum.score_max_new_tokens;
        limits.new_tokens("curriculum.score_max_new_tokens", prompt, score);
    }
    limits.notice();
    let data = Splits::load(&recipe, &tok)?;
    eprintln!(
        "data: {} training and {} dev examples",
        data.train.len(),
        data.dev.len()
    );
    let stages = recipe.curriculum.stages;
    if recipe.curriculum.kind.uses_buckets() && stages > data.train.len() {
        bail!(
            "curriculum.stages: {stages} stages need at least {stages} training samples, but {} gives {}",
            recipe.data.train.display(),
            data.train.len()
        );
    }
    if !resume {
        run_dir::check_is_run_dir(run_dir)?;
    }
    let _lock = run_dir::lock(run_dir)?;
    run_dir::clean_debris(run_dir)?;
    prepare_run_dir(run_dir, resume)?;
    let mut inputs = Inputs::of(&recipe)?;
    if resume {
        let own = run_dir.join(SCORES_FILE);
        if own.is_file() {
            inputs
                .files
                .insert(SCORES_FILE.into(), run_dir::fingerprint(&own)?);
        }
        run_dir::check_unchanged(run_dir, &inputs)?;
    }
    let scores = if recipe.curriculum.kind.needs_scores() {
        Some(scores_of(
            &recipe,
            run_dir,
            &mut inputs,
            &backend,
            &tok,
            &eos,
            &data,
        )?)
    } else {
        None
    };
    if !resume {
        run_dir::record(run_dir, &inputs)?;
    }
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
