//! The distillation trainer: setup and the loop. One process runs every stage of the
//! curriculum, resumably.
//!
//! Per stage: the active buckets, temperature and KD weight come from `curriculum::schedule`;
//! the optimiser and cosine schedule restart unless told otherwise. Per batch: one optimiser
//! step ([`super::step`]; GKD first answers the prompts with the student). Per epoch: dev loss
//! and dev ROUGE-L ([`super::dev`]), best checkpoint by dev ROUGE-L. Every record goes to
//! metrics.jsonl ([`super::metrics`]); checkpoints ([`super::checkpoint`]) make a killed run
//! resumable with the same result.

use super::checkpoint::{self, best_checkpoint, last_checkpoint, RngState};
use super::optim::{AdamW, AdamWConfig, LrSchedule};
use super::{dev, metrics, step};
use crate::config::Recipe;
use crate::curriculum::fuse::Scored;
use crate::data::Example;
use crate::kd::{Mix, Objective};
use crate::model::generate::{generate, GenerationConfig, Sampling};
use crate::model::{self, CausalLm};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where training stands; saved in every checkpoint so `--resume` continues exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub stage: usize,
    pub epoch: usize,
    /// Batches of the current epoch already trained.
    pub batch_in_epoch: usize,
    /// This epoch's order of training-set positions (empty until the epoch starts).
    pub order: Vec<usize>,
    pub global_step: u64,
    pub stage_step: u64,
    /// Whether the current stage's optimiser has been created (restarts happen once per stage).
    pub stage_started: bool,
    pub rng: Option<RngState>,
    pub best_dev_rouge: Option<f64>,
    pub best_dev_loss: Option<f64>,
    pub evals_without_improvement: usize,
    /// GKD replay buffer: student-generated (prompt, response) pairs.
    pub replay: Vec<(Vec<u32>, Vec<u32>)>,
    pub train_seconds: f64,
    /// Lines of metrics.jsonl written up to this state (a resumed run drops any later ones).
    pub metrics_lines: usize,
    pub done: bool,
}

/// Everything a run needs, loaded once.
pub struct Trainer {
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    student: Box<dyn CausalLm>,
    teacher: Option<Box<dyn CausalLm>>,
    /// Read instead of running the teacher (`model.teacher_cache`).
    teacher_cache: Option<crate::cache::TeacherCache>,
    /// Stage temperatures at which the live teacher replaces the cache (its measured error
    /// there exceeds `model.teacher_cache_max_error`).
    live_temperatures: Vec<f64>,
    tokenizer: Tokenizer,
    objective: Objective,
    /// On-policy (GKD) probability λ; 0 for off-policy losses.
    on_policy: f64,
    kd_vocab: usize,
    pad_id: u32,
    eos_ids: Vec<u32>,
    train: Vec<Example>,
    dev: Vec<Example>,
    dev_references: Vec<Vec<String>>,
    /// Bucket of each training position (0 when the kind uses no buckets).
    bucket: Vec<usize>,
    opt: AdamW,
    pub state: TrainState,
    rng: ChaCha8Rng,
    started: Instant,
}

/// The objective and on-policy probability λ (0 unless the loss is on-policy) of a recipe.
pub fn objective_of(recipe: &Recipe) -> Result<(Objective, f64)> {
    let o = &recipe.objective;
    let divergence = o
        .loss
        .divergence(o.alpha, o.beta)
        .context("objective.loss")?;
    let on_policy = if o.loss.on_policy() {
        recipe.gkd.lambda
    } else {
        0.0
    };
    Ok((
        Objective {
            divergence,
            t2: o.t2,
            kernels: crate::ops::Kernels::Fused,
        },
        on_policy,
    ))
}

/// The schedule temperatures at which a run asks the live teacher instead of its cache: those
/// where the cache's measured error for the run's loss exceeds `model.teacher_cache_max_error`.
/// Says (stderr) where the error exceeds the 2% target, and what it does about it.
fn cache_live_temperatures(
    recipe: &Recipe,
    cache: &crate::cache::TeacherCache,
) -> Result<Vec<f64>> {
    use crate::cache::FIDELITY_TARGET;
    let o = &recipe.objective;
    let name = o.loss.divergence(o.alpha, o.beta)?.name();
    let max = recipe.model.teacher_cache_max_error;
    let (mut live, mut off) = (vec![], vec![]);
    for t in crate::cache::schedule_temperatures(recipe) {
        let Some(err) = cache.fidelity_at(name, t) else {
            if max.is_some() {
                bail!("model.teacher_cache_max_error: the cache has no measured error for {name} at T = {t} (built without a student, or by an older pocl); rebuild it with pocl cache-teacher --config");
            }
            eprintln!("teacher cache: no measured error for {name} at T = {t}");
            continue;
        };
        if max.is_some_and(|m| err > m) {
            live.push(t);
        }
        if err > FIDELITY_TARGET {
            off.push(format!("{:.1}% at T = {t:.3}", 100.0 * err));
        }
    }
    if let (Some(f), false) = (cache.fidelity(), off.is_empty()) {
        eprintln!(
            "teacher cache: {name}'s cached loss is off the full-vocabulary loss by {} (measured when built, {} samples, student {}; target {}%); {}",
            off.join(", "),
            f.samples,
            f.student,
            100.0 * FIDELITY_TARGET,
            match (max, live.is_empty()) {
                (None, _) => format!("set model.teacher_cache_max_error = {FIDELITY_TARGET} to run such stages on the live teacher"),
                (Some(m), true) => format!("every stage reads the cache (model.teacher_cache_max_error = {m})"),
                (Some(m), false) => format!("the stages at T = {live:?} ask the live teacher (model.teacher_cache_max_error = {m})"),
            }
        );
    }
    Ok(live)
}

impl Trainer {
    /// Prepares a run in `run_dir`, or continues the one there when `resume` is set.
    pub fn new(
        mut recipe: Recipe,
        backend: &crate::backend::Backend,
        run_dir: &Path,
        resume: bool,
        data: super::splits::Splits,
        scores: Option<Vec<Scored>>,
    ) -> Result<Self> {
        // The caller has readied and locked `run_dir` (`pipeline::run_recipe`).
        let last = last_checkpoint(run_dir);
        let student_dir = if resume {
            last.clone()
        } else {
            recipe.model.student.clone()
        };
        // Resolved once (the device's default when unset) and saved so in the run's recipe, so
        // a resumed run computes as it started, whatever device it resumes on.
        let precision = backend.student_precision(recipe.model.student_precision);
        recipe.model.student_precision = Some(precision);
        let student = model::load_student(&student_dir, backend, precision)?;
        let (mut objective, on_policy) = objective_of(&recipe)?;
        objective.kernels = backend.kernels;
        let eos_ids =
            crate::pipeline::eos_ids(&recipe.model.student, &student.config().eos_token_ids);
        let tokenizer = Tokenizer::from_dir(&recipe.model.student, eos_ids.first().copied())?;
        let kd_vocab = crate::pipeline::kd_vocab(&recipe, student.config().vocab_size)?;
        let cache_dir = recipe
            .model
            .teacher_cache
            .clone()
            .filter(|_| recipe.objective.loss.needs_teacher());
        let teacher_cache = match &cache_dir {
            Some(d) => Some(
                crate::cache::open_or_build(&recipe, d, kd_vocab, backend)
                    .context("model.teacher_cache")?,
            ),
            None => None,
        };
        let live_temperatures = match &teacher_cache {
            Some(c) => cache_live_temperatures(&recipe, c)?,
            None => vec![],
        };
        // With a teacher cache the teacher's weights are loaded only for on-policy batches (the
        // student's own samples, which no cache can hold) and for the stages the cache does not
        // serve faithfully enough (`model.teacher_cache_max_error`).
        let teacher = match &recipe.model.teacher {
            Some(dir)
                if recipe.objective.loss.needs_teacher()
                    && (cache_dir.is_none()
                        || on_policy > 0.0
                        || !live_temperatures.is_empty()) =>
            {
                Some(crate::pipeline::load_teacher(
                    dir,
                    recipe.model.teacher_dtype,
                    backend,
                )?)
            }
            _ => None,
        };
        let pad_id = crate::pipeline::pad_id(student.config(), &eos_ids);
        let bucket = bucket_positions(&recipe, &data.train, scores.as_deref())?;
        let opt = AdamW::new(
            student.params().iter(),
            adamw_config(&recipe),
            backend.kernels,
        )?;
        let mut state = TrainState::default();
        let mut rng = ChaCha8Rng::seed_from_u64(recipe.seed);
        let mut opt = opt;
        if resume {
            state = checkpoint::load_state(&last)?;
            checkpoint::load_optimizer(&last, &mut opt)?;
            if let Some(r) = &state.rng {
                rng = r.restore()?;
            }
        }
        // The recipe as it runs (on resume: with the overrides a resumed run may take).
        let resolved = toml::to_string_pretty(&recipe)?;
        crate::write_atomic(&run_dir.join("recipe.toml"), resolved.as_bytes())?;
        // Lines after the checkpoint resumed from, or of a run killed before its first one.
        metrics::truncate(run_dir, state.metrics_lines)?;
        Ok(Trainer {
            run_dir: run_dir.to_path_buf(),
            student,
            teacher,
            teacher_cache,
            live_temperatures,
            tokenizer,
            objective,
            on_policy,
            kd_vocab,
            pad_id,
            eos_ids,
            dev_references: data.dev_references,
            train: data.train,
            dev: data.dev,
            bucket,
            opt,
            state,
            rng,
            started: Instant::now(),
            recipe,
        })
    }

    pub fn student(&self) -> &dyn CausalLm {
        self.student.as_ref()
    }

    /// Runs (or continues) every stage; returns when training is complete.
    pub fn run(&mut self) -> Result<()> {
        let schedule = self.recipe.schedule();
        let epochs = self.recipe.epochs_of_stage();
        let bs = self.recipe.optim.batch_size;
        while self.state.stage < schedule.stages {
            let st = schedule.stage(self.state.stage);
            let active: Vec<usize> = (0..self.train.len())
                .filter(|&i| st.last_bucket.is_none_or(|b| self.bucket[i] <= b))
                .collect();
            if active.is_empty() {
                bail!("stage {} has no training samples", st.index + 1);
            }
            let steps_per_epoch = active.len().div_ceil(bs);
            if !self.state.stage_started {
                if self.recipe.curriculum.restart_optimizer || self.state.stage == 0 {
                    self.opt = AdamW::new(
                        self.student.params().iter(),
                        adamw_config(&self.recipe),
                        self.objective.kernels,
                    )?;
                    self.state.stage_step = 0;
                }
                self.state.stage_started = true;
                self.log(serde_json::json!({"type": "stage", "stage": st.index, "step": self.state.global_step,
                    "active_samples": active.len(), "temperature": st.mix.temperature, "kd_weight": st.mix.kd_weight,
                    "last_bucket": st.last_bucket, "steps_per_epoch": steps_per_epoch}))?;
            }
            let lr = self.lr_schedule(steps_per_epoch as u64 * epochs as u64);
            let stage_steps = steps_per_epoch * epochs;
            let label = format!("stage {}/{}", st.index + 1, schedule.stages);
            let mut bar = crate::progress::Progress::new(label, stage_steps);
            let already = self.state.epoch * steps_per_epoch + self.state.batch_in_epoch;
            if already > 0 {
                bar.advance(already, "(resumed)");
            }
            while self.state.epoch < epochs {
                if self.state.order.is_empty() {
                    let mut order = active.clone();
                    order.shuffle(&mut self.rng);
                    self.state.order = order;
                }
                while self.state.batch_in_epoch < steps_per_epoch {
                    let b = self.state.batch_in_epoch;
                    let batch: Vec<usize> =
                        self.state.order[b * bs..((b + 1) * bs).min(active.len())].to_vec();
                    let step_lr = lr.at(if self.recipe.curriculum.restart_optimizer {
                        self.state.stage_step
                    } else {
                        self.state.global_step
                    });
                    let m = self.step(&batch, st.mix, step_lr)?;
                    self.state.batch_in_epoch += 1;
                    self.state.global_step += 1;
                    self.state.stage_step += 1;
                    let elapsed = self.state.train_seconds + self.started.elapsed().as_secs_f64();
                    let status = format!(
                        "epoch {}/{epochs} loss {:.4} T {:.2} a {:.2}",
                        self.state.epoch + 1,
                        m["loss"].as_f64().unwrap_or(f64::NAN),
                        st.mix.temperature,
                        st.mix.kd_weight
                    );
                    bar.advance(1, &status);
                    let mut rec = m;
                    rec["type"] = "step".into();
                    rec["stage"] = st.index.into();
                    rec["epoch"] = self.state.epoch.into();
                    rec["step"] = self.state.global_step.into();
                    rec["lr"] = step_lr.into();
                    rec["temperature"] = st.mix.temperature.into();
                    rec["kd_weight"] = st.mix.kd_weight.into();
                    rec["elapsed_s"] = elapsed.into();
                    self.log(rec)?;
                    let every = self.recipe.checkpoint.every_steps;
                    if every > 0 && self.state.global_step.is_multiple_of(every) {
                        self.save_checkpoint()?;
                    }
                }
                let improved = self.evaluate_dev(st.index)?;
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                self.state.order.clear();
                let patience = self.recipe.curriculum.patience;
                if patience > 0 && !improved {
                    self.state.evals_without_improvement += 1;
                    if self.state.evals_without_improvement >= patience && self.state.epoch < epochs
                    {
                        eprintln!(
                            "stage {}: dev loss stalled for {patience} evaluations, advancing",
                            st.index + 1
                        );
                        break;
                    }
                } else {
                    self.state.evals_without_improvement = 0;
                }
            }
            self.state.stage += 1;
            self.state.epoch = 0;
            self.state.batch_in_epoch = 0;
            self.state.order.clear();
            self.state.stage_started = false;
            self.state.evals_without_improvement = 0;
            self.state.done = self.state.stage == schedule.stages;
            self.save_checkpoint()?;
        }
        Ok(())
    }

    fn lr_schedule(&self, stage_steps: u64) -> LrSchedule {
        let o = &self.recipe.optim;
        let total = if self.recipe.curriculum.restart_optimizer {
            stage_steps
        } else {
            // One schedule over all stages: the sum of every stage's steps.
            let schedule = self.recipe.schedule();
            (0..schedule.stages)
                .map(|s| {
                    let st = schedule.stage(s);
                    let n = (0..self.train.len())
                        .filter(|&i| st.last_bucket.is_none_or(|b| self.bucket[i] <= b))
                        .count();
                    n.div_ceil(o.batch_size) as u64 * self.recipe.epochs_of_stage() as u64
                })
                .sum()
        };
        LrSchedule {
            lr: o.lr,
            lr_min: o.lr_min,
            warmup: o.warmup_steps,
            total,
        }
    }

    /// One optimiser step on the training positions `batch`; returns the step's metrics.
    fn step(&mut self, batch: &[usize], mix: Mix, lr: f64) -> Result<serde_json::Value> {
        let on_policy = self.on_policy > 0.0 && self.rng.random::<f64>() < self.on_policy;
        let examples: Vec<Example> = if on_policy {
            self.student_examples(batch)?
        } else {
            batch.iter().map(|&i| self.train[i].clone()).collect()
        };
        let micro = step::collate_micro_batches(
            &examples,
            self.recipe.optim.micro_batch_size,
            self.pad_id,
            &self.student.backend().device,
        )?;
        // The cache holds the teacher on the data's responses only: on-policy batches (GKD)
        // ask the live teacher, data batches read the cache and leave the teacher idle, except
        // at temperatures where the cache is not faithful enough.
        let live_t = self.live_temperatures.contains(&mix.temperature);
        let cache = (!on_policy && !live_t)
            .then_some(self.teacher_cache.as_ref())
            .flatten()
            .map(|c| c as &dyn crate::cache::SparseTeacher);
        let models = step::Models {
            student: self.student.as_ref(),
            teacher: self.teacher.as_deref().filter(|_| cache.is_none()),
            sparse_teacher: cache,
            objective: self.objective,
            kd_vocab: self.kd_vocab,
        };
        let clip = self.recipe.optim.clip;
        let out = step::optimizer_step(&models, &mut self.opt, &micro, mix, lr, clip, &mut |_| {})
            .with_context(|| format!("step {}", self.state.global_step + 1))?;
        Ok(
            serde_json::json!({"loss": out.loss, "ce": out.ce, "kd": out.kd, "grad_norm": out.grad_norm,
            "tokens": out.tokens, "samples": batch.len(), "on_policy": on_policy,
            "cached": cache.is_some()}),
        )
    }

    /// GKD: the batch's prompts answered by the student (temperature 1, top-p 1), optionally
    /// mixed with earlier generations from the replay buffer.
    fn student_examples(&mut self, batch: &[usize]) -> Result<Vec<Example>> {
        let cap = self.recipe.gkd.replay;
        if cap > 0 && self.state.replay.len() >= batch.len() && self.rng.random::<f64>() < 0.5 {
            let picks: Vec<usize> = (0..batch.len())
                .map(|_| self.rng.random_range(0..self.state.replay.len()))
                .collect();
            return Ok(picks
                .iter()
                .map(|&k| {
                    let (p, r) = &self.state.replay[k];
                    Example {
                        id: u64::MAX,
                        prompt_ids: p.clone(),
                        response_ids: r.clone(),
                    }
                })
                .collect());
        }
        let prompts: Vec<Vec<u32>> = batch
            .iter()
            .map(|&i| self.train[i].prompt_ids.clone())
            .collect();
        let max_len = self.recipe.data.max_len;
        let room = prompts
            .iter()
            .map(|p| max_len.saturating_sub(p.len()))
            .min()
            .unwrap_or(0);
        let cfg = GenerationConfig {
            max_new_tokens: self.recipe.gkd.max_new_tokens.min(room).max(1),
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            no_repeat_ngram: 0,
            eos_ids: self.eos_ids.clone(),
            seed: self.rng.random(),
        };
        let responses = generate(self.student.as_ref(), &prompts, &cfg)?;
        let mut out = Vec::with_capacity(batch.len());
        for ((&i, p), r) in batch.iter().zip(prompts).zip(responses) {
            if cap > 0 {
                if self.state.replay.len() >= cap {
                    self.state.replay.remove(0);
                }
                self.state.replay.push((p.clone(), r.clone()));
            }
            out.push(Example {
                id: self.train[i].id,
                prompt_ids: p,
                response_ids: r,
            });
        }
        Ok(out)
    }

    /// Dev loss (response CE) and dev ROUGE-L; saves the best checkpoint. Returns whether the
    /// dev loss improved.
    fn evaluate_dev(&mut self, stage: usize) -> Result<bool> {
        if self.dev.is_empty() {
            return Ok(true);
        }
        let dev_loss = dev::dev_loss(
            self.student.as_ref(),
            self.objective,
            self.kd_vocab,
            &self.dev,
            self.recipe.optim.micro_batch_size,
            self.pad_id,
        )?;
        let dev_rouge = dev::dev_rouge(
            self.student.as_ref(),
            &self.tokenizer,
            &self.dev,
            &self.dev_references,
            &self.recipe,
            &self.eos_ids,
        )?;
        let improved = self.state.best_dev_loss.is_none_or(|b| dev_loss < b);
        if improved {
            self.state.best_dev_loss = Some(dev_loss);
        }
        let best = match (dev_rouge, self.state.best_dev_rouge) {
            (Some(r), Some(b)) => r > b,
            (Some(_), None) => true,
            (None, _) => improved,
        };
        self.log(serde_json::json!({"type": "eval", "stage": stage, "epoch": self.state.epoch, "step": self.state.global_step,
            "dev_loss": dev_loss, "dev_rouge": dev_rouge, "best": best}))?;
        eprintln!(
            "stage {} epoch {}: dev loss {dev_loss:.4}{}{}",
            stage + 1,
            self.state.epoch + 1,
            dev_rouge
                .map(|r| format!(", dev ROUGE-L {r:.2}"))
                .unwrap_or_default(),
            if best { " (best)" } else { "" }
        );
        if best {
            if let Some(r) = dev_rouge {
                self.state.best_dev_rouge = Some(r);
            }
            model::save(
                self.student.as_ref(),
                &best_checkpoint(&self.run_dir),
                Some(&self.recipe.model.student),
            )?;
        }
        Ok(improved)
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        self.state.rng = Some(RngState::of(&self.rng));
        self.state.train_seconds += self.started.elapsed().as_secs_f64();
        self.started = Instant::now();
        checkpoint::save(
            &last_checkpoint(&self.run_dir),
            self.student.as_ref(),
            &self.recipe.model.student,
            &self.opt,
            &self.state,
        )
    }

    fn log(&mut self, record: serde_json::Value) -> Result<()> {
        self.state.metrics_lines += 1;
        metrics::append(&self.run_dir, &record)
    }
}

fn adamw_config(r: &Recipe) -> AdamWConfig {
    AdamWConfig {
        lr: r.optim.lr,
        weight_decay: r.optim.weight_decay,
        ..Default::default()
    }
}

/// The bucket of every training position under the recipe's curriculum kind: by measured
/// difficulty (pocl, baby-step; reversed for anti), by a seeded random order (random-order), or 0.
fn bucket_positions(
    recipe: &Recipe,
    train: &[Example],
    scores: Option<&[Scored]>,
) -> Result<Vec<usize>> {
    use crate::curriculum::fuse::bucket_of;
    use crate::curriculum::schedule::Kind;
    let kind = recipe.curriculum.kind;
    let n = train.len();
    let buckets = recipe.curriculum.stages;
    let mut bucket = vec![0; n];
    let order: Vec<usize> = match kind {
        Kind::None | Kind::TemperatureOnly => return Ok(bucket),
        Kind::RandomOrder => {
            let mut o: Vec<usize> = (0..n).collect();
            o.shuffle(&mut ChaCha8Rng::seed_from_u64(recipe.seed ^ 0x5eed));
            o
        }
        Kind::Pocl | Kind::BabyStep | Kind::Anti => {
            let scores = scores.context("this curriculum needs difficulty scores")?;
            let pos: std::collections::HashMap<u64, usize> =
                train.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
            let mut o = Vec::with_capacity(n);
            for s in scores {
                if let Some(&i) = pos.get(&s.id) {
                    o.push(i);
                }
            }
            if o.len() != n {
                bail!(
                    "the difficulty scores cover {} of {n} training samples (stale scores file?)",
                    o.len()
                );
            }
            if kind == Kind::Anti {
                o.reverse();
            }
            o
        }
    };
    for (rank, &i) in order.iter().enumerate() {
        bucket[i] = bucket_of(rank, n, buckets);
    }
    Ok(bucket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curriculum::fuse::{fuse, Metric};
    use crate::curriculum::schedule::Kind;

    fn examples(n: u64) -> Vec<Example> {
        (0..n)
            .map(|id| Example {
                id: 100 + id,
                prompt_ids: vec![1],
                response_ids: vec![2],
            })
            .collect()
    }

    #[test]
    fn buckets_follow_the_curriculum_kind() {
        let train = examples(8);
        // Difficulty rises with the id: ROUGE falls, CE grows.
        let raw: Vec<(u64, f64, f64)> = train
            .iter()
            .map(|e| (e.id, 100.0 - e.id as f64, e.id as f64))
            .collect();
        let scores = fuse(&raw, Metric::Both, 60.0, 4);
        let mut r = Recipe::default();
        r.curriculum.stages = 4;
        r.curriculum.kind = Kind::Pocl;
        assert_eq!(
            bucket_positions(&r, &train, Some(&scores)).unwrap(),
            vec![0, 0, 1, 1, 2, 2, 3, 3]
        );
        r.curriculum.kind = Kind::Anti;
        assert_eq!(
            bucket_positions(&r, &train, Some(&scores)).unwrap(),
            vec![3, 3, 2, 2, 1, 1, 0, 0]
        );
        r.curriculum.kind = Kind::RandomOrder;
        let b = bucket_positions(&r, &train, None).unwrap();
        let mut sorted = b.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 0, 1, 1, 2, 2, 3, 3], "equal buckets");
        assert_ne!(b, vec![0, 0, 1, 1, 2, 2, 3, 3], "not the difficulty order");
        r.curriculum.kind = Kind::None;
        assert_eq!(bucket_positions(&r, &train, None).unwrap(), vec![0; 8]);
        // Scores that do not cover the data (a stale file) are refused.
        r.curriculum.kind = Kind::Pocl;
        assert!(bucket_positions(&r, &examples(9), Some(&scores)).is_err());
    }
}
