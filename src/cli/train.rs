//! `pocl train`: one command runs a whole distillation (every curriculum stage) into a run
//! directory, or continues an interrupted one with `--resume`.

use crate::config::Recipe;
use crate::curriculum::measure::{self, MeasureConfig};
use crate::train::splits::Splits;
use crate::train::trainer::Trainer;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// Recipe (TOML); not needed with --resume, which reuses the run's own recipe.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a recipe value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run directory (default: the recipe's `out`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in the run directory from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (recipe, run_dir) = resolve(&a)?;
    train(recipe, &run_dir, a.resume)
}

fn resolve(a: &TrainArgs) -> Result<(Recipe, PathBuf)> {
    if a.resume {
        let Some(dir) = a.out.clone().or_else(|| {
            a.config
                .as_ref()
                .and_then(|c| Recipe::load(c, &a.sets).ok())
                .and_then(|r| r.out)
        }) else {
            bail!("--resume needs the run directory (--out DIR)");
        };
        // The run's own recipe, exactly as it started, so the resumed run is the same run.
        return Ok((Recipe::load(&dir.join("recipe.toml"), &[])?, dir));
    }
    let Some(config) = &a.config else {
        bail!("give --config RECIPE.toml (or --resume --out RUN_DIR)")
    };
    let recipe = Recipe::load(config, &a.sets)?;
    let Some(dir) = a.out.clone().or_else(|| recipe.out.clone()) else {
        bail!(
            "{}: no run directory: set `out` in the recipe or pass --out",
            config.display()
        );
    };
    Ok((recipe, dir))
}

/// Runs (or resumes) the recipe in `run_dir`, measuring difficulty first when the curriculum
/// needs it and no scores are given (cached as RUN/scores.jsonl).
pub fn train(recipe: Recipe, run_dir: &std::path::Path, resume: bool) -> Result<()> {
    let student_dir = recipe.model.student.clone();
    let student = crate::model::load_frozen(&student_dir, &crate::backend::Backend::cpu())?;
    let eos_ids = super::generate::eos_ids(&student_dir, &student.config().eos_token_ids);
    let tok = crate::tokenizer::Tokenizer::from_dir(&student_dir, eos_ids.first().copied())?;
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
                let (s, _) = measure_difficulty(
                    &recipe,
                    student.as_ref(),
                    &tok,
                    &eos_ids,
                    &data,
                    &run_dir.join("scores.jsonl"),
                )?;
                Some(s)
            }
        }
    } else {
        None
    };
    drop(student);
    let mut trainer = Trainer::new(recipe, run_dir, resume, data, scores)?;
    trainer.run()?;
    eprintln!(
        "done: {} (last), {} (best dev ROUGE-L {})",
        crate::train::trainer::last_checkpoint(run_dir).display(),
        crate::train::trainer::best_checkpoint(run_dir).display(),
        trainer
            .state
            .best_dev_rouge
            .map(|r| format!("{r:.2}"))
            .unwrap_or("n/a".into())
    );
    Ok(())
}

/// Scores `data.train` with `student` as the recipe's curriculum section says, writes the scores
/// to `out` and returns them with the seconds the measurement took.
pub fn measure_difficulty(
    recipe: &Recipe,
    student: &dyn crate::model::CausalLm,
    tok: &crate::tokenizer::Tokenizer,
    eos_ids: &[u32],
    data: &Splits,
    out: &std::path::Path,
) -> Result<(Vec<crate::curriculum::fuse::Scored>, f64)> {
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
    let pad = student
        .config()
        .pad_token_id
        .or(eos_ids.first().copied())
        .unwrap_or(0);
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
