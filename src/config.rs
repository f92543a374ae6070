//! Training recipes: TOML files whose defaults are the paper's (POCL.md §3), with
//! `--set section.key=value` overrides. Unknown keys and impossible values are errors that name
//! the key.

use crate::backend::{Backend, DeviceChoice, Kernels, StudentPrecision};
use crate::curriculum::fuse::Metric;
use crate::curriculum::measure::MeasureConfig;
use crate::curriculum::schedule::{Kind, Schedule};
use crate::kd::LossKind;
use crate::pipeline::Precision;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Seed of every random choice (data order, sampling, initialisation of buffers).
    pub seed: u64,
    /// Run directory (relative to the recipe); `pocl train --out` overrides it.
    pub out: Option<PathBuf>,
    pub model: ModelSection,
    pub data: DataSection,
    pub objective: ObjectiveSection,
    pub curriculum: CurriculumSection,
    pub optim: OptimSection,
    pub eval: EvalSection,
    pub gkd: GkdSection,
    pub checkpoint: CheckpointSection,
    pub run: RunSection,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Teacher directory (HF layout); not needed for SFT (kd_weight 0 everywhere).
    pub teacher: Option<PathBuf>,
    /// Student directory (HF layout): training starts from it, and the measurer scores with it.
    pub student: PathBuf,
    /// "f32", or "bf16": the teacher's matrices converted once to bf16 (AMX tiles where the CPU
    /// has them; half the teacher's memory).
    pub teacher_dtype: Precision,
    /// How the student's linear layers compute: "f32", or "bf16-mixed" (torch.autocast's
    /// bf16 products; weights, optimiser, loss and checkpoints stay f32). Unset: the device's
    /// default (`Backend::student_precision`: f32 on the CPU, bf16-mixed on a GPU); a run's
    /// saved recipe holds the resolved value.
    pub student_precision: Option<StudentPrecision>,
    /// Teacher cache directory (`pocl cache-teacher`): training reads the teacher's top-K
    /// targets there instead of running the teacher; built first when missing. With an
    /// on-policy loss (gkd) the data batches read it and the student's samples still ask the
    /// live teacher.
    pub teacher_cache: Option<PathBuf>,
    /// With a teacher cache: the stages at whose temperature the cache's measured relative
    /// error for this run's loss exceeds this value ask the live teacher instead (e.g. 0.02).
    /// Unset: every stage reads the cache, and the run says where its error exceeds 2%.
    pub teacher_cache_max_error: Option<f64>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            teacher: None,
            student: PathBuf::new(),
            teacher_dtype: Precision::F32,
            student_precision: None,
            teacher_cache: None,
            teacher_cache_max_error: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub train: PathBuf,
    /// Dev file; without it, `dev_size` samples are split off the training file (seeded).
    pub dev: Option<PathBuf>,
    pub dev_size: usize,
    /// "auto", "dolly", "alpaca", "processed", "messages" or "sharegpt".
    pub format: String,
    /// "alpaca", "plain" or "chat" (the student's own chat template).
    pub template: String,
    /// With template "chat": a system message before the user turn of instruction records
    /// (conversation records keep their own).
    pub system: Option<String>,
    pub max_prompt_len: usize,
    pub max_len: usize,
    /// Skip malformed records (and report how many) instead of failing.
    pub skip_bad: bool,
}

impl DataSection {
    /// `system` for identity keys (caches, resumed measurements): empty when unset, so that keys
    /// written before the field existed stay valid.
    pub fn system_key(&self) -> String {
        self.system
            .as_ref()
            .map(|s| format!(" system={s:?}"))
            .unwrap_or_default()
    }
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: PathBuf::new(),
            dev: None,
            dev_size: 500,
            format: "auto".into(),
            template: "alpaca".into(),
            system: None,
            max_prompt_len: 256,
            max_len: 512,
            skip_bad: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSection {
    /// fkl, rkl, jsd, tvd, skl, srkl, or gkd (on-policy jsd), or sft (no teacher).
    pub loss: LossKind,
    /// skl / srkl mixing α.
    pub alpha: f64,
    /// jsd mixing β.
    pub beta: f64,
    /// Multiply the divergence by T² (for every divergence).
    pub t2: bool,
    /// Temperature and KD weight of the kinds with fixed values (none, baby-step).
    pub temperature: f64,
    pub kd_weight: f64,
}

impl Default for ObjectiveSection {
    fn default() -> Self {
        ObjectiveSection {
            loss: LossKind::Fkl,
            alpha: 0.1,
            beta: 0.1,
            t2: true,
            temperature: 1.0,
            kd_weight: 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurriculumSection {
    pub kind: Kind,
    pub stages: usize,
    /// Epochs per stage (kinds with stages); `optim.epochs` is used by `none`.
    pub epochs_per_stage: usize,
    /// Advance early when the dev loss has not improved for this many evaluations (0 = fixed epochs).
    pub patience: usize,
    pub t_start: f64,
    pub t_end: f64,
    pub a_start: f64,
    pub a_end: f64,
    /// Fresh optimiser and cosine schedule at each stage (the paper); false keeps one across stages.
    pub restart_optimizer: bool,
    /// Precomputed difficulty scores (from `pocl score`); measured and cached in the run when absent.
    pub scores: Option<PathBuf>,
    pub metric: Metric,
    pub rrf_k: f64,
    pub score_max_new_tokens: usize,
    pub score_batch_size: usize,
}

impl Default for CurriculumSection {
    fn default() -> Self {
        CurriculumSection {
            kind: Kind::Pocl,
            stages: 4,
            epochs_per_stage: 8,
            patience: 0,
            t_start: 1.0,
            t_end: 2.0,
            a_start: 0.7,
            a_end: 1.0,
            restart_optimizer: true,
            scores: None,
            metric: Metric::Both,
            rrf_k: 60.0,
            score_max_new_tokens: 256,
            score_batch_size: 16,
        }
    }
}

impl CurriculumSection {
    /// The difficulty measurer's settings (one bucket per stage).
    pub fn measure_config(&self) -> MeasureConfig {
        MeasureConfig {
            max_new_tokens: self.score_max_new_tokens,
            no_repeat_ngram: 6,
            batch_size: self.score_batch_size,
            metric: self.metric,
            rrf_k: self.rrf_k,
            buckets: self.stages,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    pub lr_min: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
    /// Sequences per optimiser step.
    pub batch_size: usize,
    /// Sequences per forward/backward pass; batch_size / micro_batch_size steps are accumulated.
    pub micro_batch_size: usize,
    /// Epochs of the `none` kind (the paper's baselines: 20).
    pub epochs: usize,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 1e-4,
            lr_min: 1e-7,
            warmup_steps: 0,
            weight_decay: 0.01,
            clip: 1.0,
            batch_size: 64,
            micro_batch_size: 8,
            epochs: 20,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Dev samples scored by generation after each epoch (0 = dev loss only).
    pub dev_rouge_samples: usize,
    pub max_new_tokens: usize,
    /// Decoding of the dev evaluation, identical to the final evaluation protocol by default.
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub no_repeat_ngram: usize,
    pub greedy: bool,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            dev_rouge_samples: 200,
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            no_repeat_ngram: 6,
            greedy: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GkdSection {
    /// Probability that a batch's responses are sampled from the student (on-policy).
    pub lambda: f64,
    /// Replay buffer capacity for student-generated samples (0 = none).
    pub replay: usize,
    pub max_new_tokens: usize,
}

impl Default for GkdSection {
    fn default() -> Self {
        GkdSection {
            lambda: 0.5,
            replay: 1000,
            max_new_tokens: 256,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save a resumable checkpoint every N optimiser steps (0 = only at stage ends).
    pub every_steps: u64,
}

/// Where the run computes (see `backend`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// "cpu" (the default), "cuda" or "cuda:N".
    pub device: DeviceChoice,
    /// "fused" or "portable"; unset: fused on the CPU, portable elsewhere.
    pub kernels: Option<Kernels>,
}

impl RunSection {
    /// Opens the device with the kernels (the error names the key).
    pub fn backend(&self) -> Result<Backend> {
        Backend::new(self.device, self.kernels).context("run.device / run.kernels")
    }
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            seed: 10,
            out: None,
            model: ModelSection::default(),
            data: DataSection::default(),
            objective: ObjectiveSection::default(),
            curriculum: CurriculumSection::default(),
            optim: OptimSection::default(),
            eval: EvalSection::default(),
            gkd: GkdSection::default(),
            checkpoint: CheckpointSection::default(),
            run: RunSection::default(),
        }
    }
}

/// Parses `value` of a `--set` as TOML (numbers, booleans, quoted strings, arrays), falling back
/// to a bare string so `--set objective.loss=rkl` works unquoted.
fn parse_value(s: &str) -> toml::Value {
    let doc = format!("v = {s}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(s.into())),
        Err(_) => toml::Value::String(s.to_string()),
    }
}

/// A recipe deserialisation error on one line, led by the key it is about ("objective.loss:
/// unknown loss ...", "optim: unknown field ..."). toml puts the key on a line of its own.
fn keyed_message(e: &toml::de::Error) -> String {
    let text = e.to_string();
    let message = e.message().trim();
    match text.trim_end().lines().last() {
        Some(last) if last.starts_with("in `") && last.ends_with('`') => {
            format!("{}: {message}", &last[4..last.len() - 1])
        }
        _ => message.to_string(),
    }
}

/// Whether `--set KEY=...` may change a run on `--resume`: keys that change how the run is
/// evaluated, checkpointed or computed, never what it computes.
pub fn resumable_key(key: &str) -> bool {
    let key = key.trim();
    key.starts_with("eval.")
        || key.starts_with("checkpoint.")
        || key == "run.device"
        || key == "run.kernels"
}

impl Recipe {
    /// The recipe of the run in `run_dir` (its recipe.toml) with `overrides` of the keys a
    /// resumed run may change ([`resumable_key`]); any other key is refused by name.
    pub fn load_for_resume(run_dir: &Path, overrides: &[String]) -> Result<Self> {
        for o in overrides {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
            if !resumable_key(key) {
                bail!(
                    "--set {}: cannot change on --resume (only eval.*, checkpoint.*, run.device, run.kernels); start a new run to change it",
                    key.trim()
                );
            }
        }
        Recipe::load(&run_dir.join("recipe.toml"), overrides)
    }

    /// Reads a recipe, applies `section.key=value` overrides, resolves relative paths against
    /// the recipe's directory, and validates it.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| anyhow!("--set {o}: expected section.key=value"))?;
            let mut node = &mut table;
            let parts: Vec<&str> = key.trim().split('.').collect();
            for p in &parts[..parts.len() - 1] {
                node = node
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| anyhow!("--set {o}: \"{p}\" is not a section"))?;
            }
            node.insert(
                parts[parts.len() - 1].to_string(),
                parse_value(value.trim()),
            );
        }
        let mut r: Recipe = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow!("{}: {}", path.display(), keyed_message(&e)))?;
        // Absolute, so that the resolved recipe a run directory keeps (and `--resume` reads
        // from another directory) names the same files.
        let base = std::path::absolute(path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let resolve = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut r.model.student);
        r.model.teacher.iter_mut().for_each(resolve);
        r.model.teacher_cache.iter_mut().for_each(resolve);
        resolve(&mut r.data.train);
        r.data.dev.iter_mut().for_each(resolve);
        r.curriculum.scores.iter_mut().for_each(resolve);
        r.out.iter_mut().for_each(resolve);
        r.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(r)
    }

    // `!(x > 0.0)` is deliberate: it also rejects NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let c = &self.curriculum;
        let o = &self.optim;
        if self.model.student.as_os_str().is_empty() {
            bail!("model.student: required");
        }
        if self.data.train.as_os_str().is_empty() {
            bail!("data.train: required");
        }
        if self.out.as_ref().is_some_and(|o| o.as_os_str().is_empty()) {
            bail!("out: empty; give the run directory");
        }
        let e = &self.eval;
        let positive = e.temperature > 0.0 && e.temperature.is_finite();
        if !e.greedy && !positive {
            bail!(
                "eval.temperature: must be > 0 (got {}); or set eval.greedy = true",
                e.temperature
            );
        }
        if !(e.top_p > 0.0 && e.top_p <= 1.0) {
            bail!("eval.top_p: must be in (0, 1] (got {})", e.top_p);
        }
        if e.dev_rouge_samples > 0 && e.max_new_tokens == 0 {
            bail!("eval.max_new_tokens: must be at least 1 when eval.dev_rouge_samples > 0");
        }
        if let Some(m) = self.model.teacher_cache_max_error {
            if !(m >= 0.0 && m.is_finite()) {
                bail!(
                    "model.teacher_cache_max_error: must be a finite relative error >= 0 (got {m})"
                );
            }
        }
        if self.objective.loss.needs_teacher() && self.model.teacher.is_none() {
            bail!("model.teacher: required for loss \"{}\" (use objective.loss = \"sft\" to train without one)", self.objective.loss);
        }
        if c.stages == 0 {
            bail!("curriculum.stages: must be at least 1");
        }
        if c.kind != Kind::None && c.epochs_per_stage == 0 {
            bail!("curriculum.epochs_per_stage: must be at least 1");
        }
        for (k, t) in [
            ("curriculum.t_start", c.t_start),
            ("curriculum.t_end", c.t_end),
            ("objective.temperature", self.objective.temperature),
        ] {
            if !(t > 0.0 && t.is_finite()) {
                bail!("{k}: the temperature must be > 0 (got {t})");
            }
        }
        for (k, a) in [
            ("curriculum.a_start", c.a_start),
            ("curriculum.a_end", c.a_end),
            ("objective.kd_weight", self.objective.kd_weight),
        ] {
            if !(0.0..=1.0).contains(&a) {
                bail!("{k}: the KD weight must be in [0, 1] (got {a})");
            }
        }
        for (k, x) in [
            ("objective.alpha", self.objective.alpha),
            ("objective.beta", self.objective.beta),
            ("gkd.lambda", self.gkd.lambda),
        ] {
            if !(0.0..=1.0).contains(&x) {
                bail!("{k}: must be in [0, 1] (got {x})");
            }
        }
        if c.kind.needs_scores() && c.scores.is_none() {
            c.measure_config().validate(&|field| {
                match field {
                    "max_new_tokens" => "curriculum.score_max_new_tokens",
                    "batch_size" => "curriculum.score_batch_size",
                    "buckets" => "curriculum.stages",
                    _ => "curriculum.rrf_k",
                }
                .to_string()
            })?;
        }
        for (k, x) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.clip", o.clip),
        ] {
            if !(x >= 0.0 && x.is_finite()) {
                bail!("{k}: must be a finite number >= 0 (got {x}; 0 turns it off)");
            }
        }
        if self.objective.loss.on_policy() && self.gkd.lambda > 0.0 && self.gkd.max_new_tokens == 0
        {
            bail!("gkd.max_new_tokens: must be at least 1 for on-policy loss \"{}\" (the student's answers are its training data)", self.objective.loss);
        }
        if self.eval.dev_rouge_samples > 0 && self.eval.max_new_tokens == 0 {
            bail!("eval.max_new_tokens: must be at least 1 when eval.dev_rouge_samples > 0 (set that to 0 for dev loss only)");
        }
        if o.batch_size == 0
            || o.micro_batch_size == 0
            || !o.batch_size.is_multiple_of(o.micro_batch_size)
        {
            bail!(
                "optim.batch_size: must be a positive multiple of optim.micro_batch_size ({} / {})",
                o.batch_size,
                o.micro_batch_size
            );
        }
        if !(o.lr > 0.0 && o.lr.is_finite() && o.lr_min >= 0.0 && o.lr_min <= o.lr) {
            bail!("optim.lr: need lr > 0 and 0 <= lr_min <= lr");
        }
        if c.kind == Kind::None && o.epochs == 0 {
            bail!("optim.epochs: must be at least 1");
        }
        if self.data.max_prompt_len == 0 || self.data.max_len <= self.data.max_prompt_len {
            bail!("data.max_len: must exceed data.max_prompt_len");
        }
        Ok(())
    }

    /// The stage schedule this recipe asks for.
    pub fn schedule(&self) -> Schedule {
        let c = &self.curriculum;
        let fixed = !c.kind.rises();
        // SFT is the objective with KD weight 0 at every stage: no teacher term at all.
        let sft = !self.objective.loss.needs_teacher();
        let (a_start, a_end) = match (sft, fixed) {
            (true, _) => (0.0, 0.0),
            (false, true) => (self.objective.kd_weight, self.objective.kd_weight),
            (false, false) => (c.a_start, c.a_end),
        };
        Schedule {
            kind: c.kind,
            stages: if c.kind == Kind::None { 1 } else { c.stages },
            t_start: if fixed {
                self.objective.temperature
            } else {
                c.t_start
            },
            t_end: c.t_end,
            a_start,
            a_end,
        }
    }

    /// Epochs of stage `s`.
    pub fn epochs_of_stage(&self) -> usize {
        if self.curriculum.kind == Kind::None {
            self.optim.epochs
        } else {
            self.curriculum.epochs_per_stage
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        // Tests run in parallel threads: every call gets its own file.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("pocl-recipe-{}-{k}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    const BASE: &str =
        "[model]\nteacher = \"t\"\nstudent = \"s\"\n[data]\ntrain = \"train.jsonl\"\n";

    #[test]
    fn defaults_are_the_papers() {
        let p = write(BASE);
        let r = Recipe::load(&p, &[]).unwrap();
        assert_eq!(
            (r.curriculum.stages, r.curriculum.epochs_per_stage, r.seed),
            (4, 8, 10)
        );
        assert_eq!(
            (r.optim.lr, r.optim.lr_min, r.optim.batch_size, r.optim.clip),
            (1e-4, 1e-7, 64, 1.0)
        );
        assert_eq!(r.curriculum.kind, Kind::Pocl);
        assert_eq!(
            r.model.student,
            p.parent().unwrap().join("s"),
            "paths are relative to the recipe"
        );
    }

    #[test]
    fn overrides_apply_and_bad_keys_are_named() {
        let p = write(BASE);
        let r = Recipe::load(
            &p,
            &[
                "objective.loss=rkl".into(),
                "curriculum.stages=2".into(),
                "curriculum.kind=\"anti\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (r.objective.loss, r.curriculum.stages, r.curriculum.kind),
            (LossKind::Rkl, 2, Kind::Anti)
        );
        let e = Recipe::load(&p, &["curriculum.stages=0".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("curriculum.stages"), "{e:#}");
        let e = Recipe::load(&p, &["curriculum.t_start=0".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("curriculum.t_start"), "{e:#}");
        let e = Recipe::load(&p, &["optim.learning_rate=1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("learning_rate"), "{e:#}");
        let e = Recipe::load(
            &write(&format!("{BASE}[curriculum]\nkind = \"sideways\"\n")),
            &[],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("sideways"), "{e:#}");
        // Typed choices: the error names the key and lists the choices, on one line.
        let e = Recipe::load(&p, &["objective.loss=kl".into()]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("objective.loss: unknown loss \"kl\"; choose one of fkl, rkl")
                && !msg.contains('\n'),
            "{msg}"
        );
        let e = Recipe::load(&p, &["model.teacher_dtype=f16".into()]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("model.teacher_dtype: unknown variant `f16`, expected `f32` or `bf16`"),
            "{msg}"
        );
        let e = Recipe::load(&p, &["model.student_precision=bf16".into()]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("model.student_precision: unknown student precision \"bf16\": expected f32 or bf16-mixed")
                && !msg.contains('\n'),
            "{msg}"
        );
        // The spellings recipes use load, and a resolved recipe writes them back unchanged.
        assert_eq!(Recipe::load(&p, &[]).unwrap().model.student_precision, None);
        let r = Recipe::load(
            &p,
            &[
                "objective.loss=gkd".into(),
                "model.teacher_dtype=bf16".into(),
                "model.student_precision=bf16-mixed".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                r.objective.loss,
                r.model.teacher_dtype,
                r.model.student_precision
            ),
            (
                LossKind::Gkd,
                Precision::Bf16,
                Some(StudentPrecision::Bf16Mixed)
            )
        );
        let text = toml::to_string_pretty(&r).unwrap();
        assert!(
            text.contains("teacher_dtype = \"bf16\"")
                && text.contains("loss = \"gkd\"")
                && text.contains("student_precision = \"bf16-mixed\""),
            "{text}"
        );
    }
}

#[cfg(test)]
mod shipped_recipes {
    use super::*;

    /// The recipes in configs/ parse, validate and keep their paths relative to the file.
    #[test]
    fn example_recipes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for name in [
            "gpt2-dolly-pocl.toml",
            "qwen-pocl.toml",
            "smollm2-135m-pocl.toml",
        ] {
            let r = Recipe::load(&dir.join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(r.model.student.starts_with(&dir), "{name}");
            assert_eq!(r.curriculum.kind, Kind::Pocl);
        }
    }
}
