//! `pocl demo`: the paper's experiment end to end on the built-in benchmark, offline.
//!
//! Phases, each reused when an earlier demo in the same directory finished it (and resumed when
//! it was interrupted): benchmark data and tokenizer; "pretrained" base teacher and student
//! (language modelling on the benchmark's raw text, so the student can already answer a little,
//! as GPT-2 base can); the teacher fine-tuned (SFT); the SFT student baseline; the difficulty
//! scores of the base student (shared by every POCL run, as in the paper); KD with and without
//! POCL for each method and training seed; the evaluation protocol on the three test sets; and
//! report.md. Every training run goes through `pocl train`'s code path (`pipeline::run_recipe`) with
//! an ordinary recipe.

use crate::config::{Recipe, RunSection};
use crate::curriculum::schedule::Kind;
use crate::data::synthetic::{write_benchmark, SynthConfig};
use crate::data::{load_jsonl, Sample};
use crate::eval::evaluate::{evaluate, Decoding, EvalConfig, EvalReport};
use crate::kd::LossKind;
use crate::model::init::{init, Shape};
use crate::pipeline::{load_model, measure_difficulty, run_recipe, Precision};
use crate::train::checkpoint::last_checkpoint;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// A few minutes: exercised by CI.
    Quick,
    /// A representative subset within about 30 minutes on 2 CPU cores.
    Default,
    /// All seven methods of the paper, 3 seeds.
    Full,
}

/// Everything the demo's size decides.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub n_train: usize,
    pub n_dev: usize,
    pub n_test: usize,
    pub teacher: (usize, usize),
    pub student: (usize, usize),
    pub pretrain_epochs: usize,
    pub teacher_sft_epochs: usize,
    pub stages: usize,
    pub epochs_per_stage: usize,
    /// Baselines get the same number of sample visits as POCL: E·(S+1)/2 epochs, rounded.
    pub baseline_epochs: usize,
    pub methods: Vec<LossKind>,
    pub train_seeds: Vec<u64>,
    pub eval_seeds: Vec<u64>,
    pub max_new_tokens: usize,
    pub dev_rouge_samples: usize,
    pub lr: f64,
}

impl Plan {
    pub fn new(size: Size, seeds: Option<usize>) -> Self {
        use LossKind::*;
        let (n_train, n_test, teacher, student, pre, tsft, eps, methods, nseeds, eval_seeds): (
            _,
            _,
            _,
            _,
            _,
            _,
            _,
            &[LossKind],
            _,
            &[u64],
        ) = match size {
            Size::Quick => (240, 24, (64, 2), (32, 1), 1, 3, 1, &[Fkl], 1, &[10]),
            Size::Default => (
                1600,
                100,
                (128, 3),
                (64, 2),
                2,
                12,
                2,
                &[Fkl, Srkl, Gkd],
                2,
                &[10, 20],
            ),
            Size::Full => (
                1600,
                100,
                (128, 3),
                (64, 2),
                2,
                12,
                2,
                &[Fkl, Rkl, Jsd, Tvd, Skl, Srkl, Gkd],
                3,
                &[10, 20, 30, 40, 50],
            ),
        };
        let stages = 4;
        Plan {
            n_train,
            n_dev: n_test,
            n_test,
            teacher,
            student,
            pretrain_epochs: pre,
            teacher_sft_epochs: tsft,
            stages,
            epochs_per_stage: eps,
            baseline_epochs: (eps * (stages + 1)).div_ceil(2),
            methods: methods.to_vec(),
            train_seeds: (0..seeds.unwrap_or(nseeds) as u64)
                .map(|k| 10 + k)
                .collect(),
            eval_seeds: eval_seeds.to_vec(),
            max_new_tokens: 48,
            dev_rouge_samples: if size == Size::Quick { 8 } else { 50 },
            lr: 2e-3,
        }
    }
}

pub struct Demo {
    pub out: PathBuf,
    pub plan: Plan,
    /// Where every model of the demo computes (recipe section `run`).
    pub run: RunSection,
    /// Redo every phase instead of reusing an earlier demo's results.
    pub fresh: bool,
    /// Build one teacher cache (`crate::cache`) and train every KD run on it (run names end in
    /// `-cached`); GKD's on-policy batches still ask the live teacher.
    pub teacher_cache: bool,
}

/// Wall time of each run, for the report's compute column.
/// One of the demo's teacher caches (`--teacher-cache`): a directory under the output, and
/// whether it spends slots on a sampled rest.
struct DemoCache {
    dir: &'static str,
    sampled: bool,
}

/// A sampled rest for the forward-KL runs (the only divergence that uses it), the top K and a
/// rest bucket for the others.
const DEMO_CACHES: [DemoCache; 2] = [
    DemoCache {
        dir: "teacher-cache",
        sampled: false,
    },
    DemoCache {
        dir: "teacher-cache-fkl",
        sampled: true,
    },
];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timing {
    pub name: String,
    pub seconds: f64,
}

fn done(run: &Path) -> bool {
    let state = last_checkpoint(run).join(crate::train::checkpoint::STATE_FILE);
    std::fs::read_to_string(state)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["done"] == true)
}

fn phase(name: &str) {
    eprintln!("\n== {name}");
}

impl Demo {
    fn data(&self) -> PathBuf {
        self.out.join("data")
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.out.join("runs").join(name)
    }

    /// A recipe for one run of the demo.
    fn recipe(
        &self,
        teacher: Option<&Path>,
        student: &Path,
        loss: LossKind,
        kind: Kind,
        seed: u64,
    ) -> Recipe {
        let p = &self.plan;
        let mut r = Recipe {
            seed,
            ..Recipe::default()
        };
        r.model.teacher = teacher.map(Path::to_path_buf);
        r.model.student = student.to_path_buf();
        r.data.train = self.data().join("train.jsonl");
        r.data.dev = Some(self.data().join("dev.jsonl"));
        // The plain template: the Alpaca preamble would be two thirds of every benchmark sequence,
        // tripling the cost of a demo whose point is the curriculum, not the template.
        r.data.template = "plain".into();
        r.data.max_prompt_len = 96;
        r.data.max_len = 160;
        r.objective.loss = loss;
        r.curriculum.kind = kind;
        r.curriculum.stages = p.stages;
        r.curriculum.epochs_per_stage = p.epochs_per_stage;
        r.curriculum.scores = Some(self.out.join("scores.jsonl"));
        r.optim.lr = p.lr;
        r.optim.lr_min = p.lr / 100.0;
        r.optim.batch_size = 32;
        r.optim.micro_batch_size = 32;
        r.optim.epochs = p.baseline_epochs;
        r.eval.dev_rouge_samples = p.dev_rouge_samples;
        r.eval.max_new_tokens = p.max_new_tokens;
        r.gkd.max_new_tokens = p.max_new_tokens;
        r.curriculum.score_max_new_tokens = p.max_new_tokens;
        r.curriculum.score_batch_size = 32;
        r.run = self.run.clone();
        r
    }

    /// Runs a recipe into `runs/NAME` unless a finished run is there; resumes an unfinished one.
    fn train_once(&self, name: &str, recipe: Recipe) -> Result<PathBuf> {
        let dir = self.run_dir(name);
        if self.fresh && dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        if done(&dir) {
            eprintln!("{name}: reusing {}", dir.display());
        } else {
            recipe
                .validate()
                .with_context(|| format!("demo recipe {name}"))?;
            let resume = last_checkpoint(&dir)
                .join(crate::train::checkpoint::STATE_FILE)
                .is_file();
            eprintln!(
                "{name}: training{}",
                if resume { " (resuming)" } else { "" }
            );
            run_recipe(recipe, &dir, resume).with_context(|| format!("run {name}"))?;
        }
        Ok(last_checkpoint(&dir))
    }

    pub fn run(&self) -> Result<()> {
        let start = Instant::now();
        // The device first: one this build or machine lacks fails before anything is written.
        let backend = self.run.backend()?;
        crate::create_dir_all(&self.out)?;
        let p = &self.plan;
        // Finished phases are reused by name, so they must come from the same plan.
        let plan_path = self.out.join("plan.json");
        // A demo on another device or kernel set is another demo: its phases are not reused.
        let plan = if backend.label() == crate::backend::Backend::cpu().label() {
            serde_json::to_string_pretty(p)?
        } else {
            #[derive(Serialize)]
            struct OnBackend<'a> {
                #[serde(flatten)]
                plan: &'a Plan,
                backend: String,
            }
            serde_json::to_string_pretty(&OnBackend {
                plan: p,
                backend: backend.label(),
            })?
        };
        if !self.fresh && plan_path.is_file() && std::fs::read_to_string(&plan_path)? != plan {
            anyhow::bail!(
                "{} holds a demo with a different plan (size or seeds); use --fresh to redo it or choose another --out",
                self.out.display()
            );
        }
        crate::write_atomic(&plan_path, plan.as_bytes())?;

        phase("data: the built-in benchmark and its tokenizer");
        let data = self.data();
        if self.fresh || !data.join("tokenizer.json").is_file() {
            let cfg = SynthConfig {
                seed: 10,
                n_train: p.n_train,
                n_dev: p.n_dev,
                n_test: p.n_test,
                vocab_size: 1024,
            };
            write_benchmark(&data, &cfg)?;
        }
        self.write_pretraining_text()?;

        phase("base models: language-model pretraining on the benchmark's raw text");
        let mut bases = Vec::new();
        for (name, (hidden, layers), seed) in
            [("teacher", p.teacher, 1u64), ("student", p.student, 2)]
        {
            let init_dir = self.out.join("models").join(format!("{name}-init"));
            if self.fresh || !init_dir.join("model.safetensors").is_file() {
                let shape = Shape {
                    hidden,
                    layers,
                    heads: 4,
                    kv_heads: 4,
                    intermediate: 0,
                    max_positions: 256,
                };
                init("gpt2", &shape, &data, &init_dir, seed)?;
            }
            let mut r = self.recipe(None, &init_dir, LossKind::Sft, Kind::None, 10);
            r.data.train = data.join("pretrain.jsonl");
            r.data.format = "processed".into();
            r.data.dev = None; // pretraining needs no dev evaluation
            r.data.dev_size = 0;
            r.optim.epochs = p.pretrain_epochs;
            r.optim.lr = 3e-3;
            r.eval.dev_rouge_samples = 0;
            bases.push(self.train_once(&format!("pretrain-{name}"), r)?);
        }
        let (teacher_base, student_base) = (bases[0].clone(), bases[1].clone());

        phase("teacher: supervised fine-tuning");
        let mut r = self.recipe(None, &teacher_base, LossKind::Sft, Kind::None, 10);
        r.optim.epochs = p.teacher_sft_epochs;
        let teacher = self.train_once("teacher-sft", r)?;

        phase(
            "difficulty: the base student scores every training sample (shared by all POCL runs)",
        );
        let measure_seconds = self.measure(&student_base)?;

        let cache_seconds = if self.teacher_cache {
            phase("teacher cache: the teacher run once, shared by every KD run");
            Some(self.build_cache(&teacher, &student_base, &backend)?)
        } else {
            None
        };

        phase("baselines and distillation runs");
        let mut runs: Vec<(String, LossKind, bool, u64)> = Vec::new(); // (run name, method, pocl, seed)
                                                                       // GKD reads the cache for its data batches; its samples still ask the live teacher.
        let cached = |m: LossKind| self.teacher_cache && m.needs_teacher();
        for &seed in &p.train_seeds {
            runs.push((format!("sft-s{seed}"), LossKind::Sft, false, seed));
            for &m in &p.methods {
                let tag = if cached(m) { "-cached" } else { "" };
                runs.push((format!("{m}-s{seed}{tag}"), m, false, seed));
                runs.push((format!("{m}-pocl-s{seed}{tag}"), m, true, seed));
            }
        }
        for (name, method, pocl, seed) in &runs {
            let kind = if *pocl { Kind::Pocl } else { Kind::None };
            let t = method.needs_teacher().then_some(teacher.as_path());
            let mut r = self.recipe(t, &student_base, *method, kind, *seed);
            if cached(*method) {
                r.model.teacher_cache = Some(self.cache_for(*method));
            }
            self.train_once(name, r)?;
        }
        let cache_line = cache_seconds.map(|s| self.cache_summary(s, &runs));

        phase("evaluation: the paper's protocol on the three test sets");
        let sets = self.test_sets()?;
        let mut results: Vec<(String, EvalReport)> = vec![(
            "teacher".into(),
            self.eval_once("teacher", &teacher, &sets)?,
        )];
        for (name, ..) in &runs {
            let model = last_checkpoint(&self.run_dir(name));
            results.push((name.clone(), self.eval_once(name, &model, &sets)?));
        }

        phase("report");
        let mut report = crate::report::demo_report(self, &runs, &results, measure_seconds)?;
        if let Some(line) = cache_line {
            report.push_str(&format!("\n{line}\n"));
        }
        crate::write_atomic(&self.out.join("report.md"), report.as_bytes())?;
        eprintln!(
            "\n{}\nwrote {} in {:.0}s",
            report,
            self.out.join("report.md").display(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The teacher cache a method's runs read ([`DemoCache`]).
    fn cache_for(&self, method: LossKind) -> PathBuf {
        let sampled = method == LossKind::Fkl;
        let c = DEMO_CACHES
            .iter()
            .find(|c| c.sampled == sampled)
            .expect("both kinds listed");
        self.out.join(c.dir)
    }

    /// Builds the demo's teacher caches (K = 64, every temperature of the POCL schedule and of
    /// the fixed-temperature baselines; see [`Self::cache_for`]); returns the seconds they took
    /// (little when they were already built).
    fn build_cache(
        &self,
        teacher: &Path,
        student: &Path,
        backend: &crate::backend::Backend,
    ) -> Result<f64> {
        let r = self.recipe(Some(teacher), student, LossKind::Fkl, Kind::Pocl, 10);
        let mut temps = crate::cache::schedule_temperatures(&r);
        let baseline = self.recipe(Some(teacher), student, LossKind::Fkl, Kind::None, 10);
        for t in crate::cache::schedule_temperatures(&baseline) {
            if !temps.contains(&t) {
                temps.push(t);
            }
        }
        let vocab = crate::pipeline::kd_vocab_of_dirs(teacher, student)?;
        let started = Instant::now();
        let k = crate::cache::DEFAULT_TOP_K.min(vocab);
        let per_shard = crate::cache::DEFAULT_EXAMPLES_PER_SHARD;
        for c in &DEMO_CACHES {
            let slots = crate::cache::Slots {
                top_k: k,
                sampled: if c.sampled {
                    crate::cache::DEFAULT_SAMPLED_REST.min(k - 1)
                } else {
                    0
                },
                temperatures: Some(temps.clone()),
            };
            let dir = self.out.join(c.dir);
            crate::cache::build_for_recipe(&r, &dir, vocab, slots, per_shard, backend)?;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// One line for the report: the cache's cost, the cached runs' training time and, when an
    /// earlier demo in the same directory trained the same runs live, theirs.
    fn cache_summary(&self, build_seconds: f64, runs: &[(String, LossKind, bool, u64)]) -> String {
        let seconds = |name: &str| -> Option<f64> {
            let state =
                last_checkpoint(&self.run_dir(name)).join(crate::train::checkpoint::STATE_FILE);
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(state).ok()?).ok()?;
            v["train_seconds"].as_f64()
        };
        let cached: Vec<&str> = runs
            .iter()
            .map(|r| r.0.as_str())
            .filter(|n| n.ends_with("-cached"))
            .collect();
        let on_cache: f64 = cached.iter().filter_map(|n| seconds(n)).sum();
        let live: Option<f64> = cached
            .iter()
            .map(|n| seconds(n.trim_end_matches("-cached")))
            .sum();
        let mut line = format!(
            "Teacher caches (a sampled rest for FKL, the top K + a rest bucket for the others): built once in {build_seconds:.1} s and read by {} runs, which trained in {on_cache:.1} s",
            cached.len()
        );
        if let Some(live) = live {
            line.push_str(&format!(
                "; the same runs with the live teacher took {live:.1} s: {:.1} s saved including the build",
                live - on_cache - build_seconds
            ));
        }
        line.push('.');
        for c in &DEMO_CACHES {
            let Ok(Some(f)) = crate::cache::read_fidelity(&self.out.join(c.dir)) else {
                continue;
            };
            // A sampled rest serves forward KL only: its other errors are the bucket's.
            let errs: Vec<String> = (f.relative_error.iter())
                .filter(|(d, _)| !c.sampled || d.as_str() == "fkl")
                .map(|(d, e)| {
                    let (lo, hi) = e
                        .iter()
                        .fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
                    format!("{d} {:.1}-{:.1}%", 100.0 * lo, 100.0 * hi)
                })
                .collect();
            line.push_str(&format!(
                " Relative error of the {} cache's loss against the full vocabulary over the cached temperatures ({} samples, the base student): {}.",
                if c.sampled { "FKL" } else { "bucket" },
                f.samples,
                errs.join(", "),
            ));
        }
        line.push_str(&format!(
            " The target is {}% (README, \"Teacher cache\").",
            100.0 * crate::cache::FIDELITY_TARGET
        ));
        line
    }

    /// The benchmark's training text without the prompt template, as one processed-format record
    /// per sample with an empty prompt: the loss then covers every token (language modelling).
    fn write_pretraining_text(&self) -> Result<()> {
        let path = self.data().join("pretrain.jsonl");
        if path.is_file() && !self.fresh {
            return Ok(());
        }
        let samples = load_jsonl(&self.data().join("train.jsonl"), Default::default())?.samples;
        let mut text = String::new();
        for s in samples {
            let body = [
                s.instruction.as_str(),
                s.input.as_str(),
                s.response.as_str(),
            ]
            .iter()
            .filter(|x| !x.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
            text += &serde_json::json!({"prompt": "", "output": body}).to_string();
            text.push('\n');
        }
        crate::write_atomic(&path, text.as_bytes())
    }

    /// Scores the training set with the base student once; returns the seconds it took.
    fn measure(&self, student: &Path) -> Result<f64> {
        let path = self.out.join("scores.jsonl");
        let timing = self.out.join("scores.time.json");
        if !self.fresh && path.is_file() && timing.is_file() {
            eprintln!("reusing {}", path.display());
            let t: Timing = serde_json::from_str(&std::fs::read_to_string(&timing)?)?;
            return Ok(t.seconds);
        }
        let r = self.recipe(None, student, LossKind::Sft, Kind::Pocl, 10);
        let (model, tok, eos) = load_model(student, Precision::F32, &self.run.backend()?)?;
        let data = crate::train::splits::Splits::load(&r, &tok)?;
        let (_, seconds) = measure_difficulty(&r, model.as_ref(), &tok, &eos, &data, &path)?;
        let t = Timing {
            name: "difficulty measurer".into(),
            seconds,
        };
        crate::write_atomic(&timing, serde_json::to_string(&t)?.as_bytes())?;
        Ok(seconds)
    }

    fn test_sets(&self) -> Result<Vec<(String, Vec<Sample>)>> {
        ["test_id", "test_long", "test_phrasing"]
            .iter()
            .map(|n| {
                Ok((
                    n.to_string(),
                    load_jsonl(&self.data().join(format!("{n}.jsonl")), Default::default())?
                        .samples,
                ))
            })
            .collect()
    }

    fn eval_once(
        &self,
        name: &str,
        model_dir: &Path,
        sets: &[(String, Vec<Sample>)],
    ) -> Result<EvalReport> {
        let dir = self.out.join("eval").join(name);
        let results = dir.join("results.json");
        if !self.fresh && results.is_file() {
            return Ok(serde_json::from_str(&std::fs::read_to_string(&results)?)?);
        }
        let (model, tok, eos) = load_model(model_dir, Precision::F32, &self.run.backend()?)?;
        let mut decoding = Decoding::paper();
        decoding.max_new_tokens = self.plan.max_new_tokens;
        decoding.max_prompt_len = 96;
        decoding.template = crate::data::Template::Plain;
        decoding.batch_size = 32;
        decoding.eos_ids = eos;
        let cfg = EvalConfig {
            seeds: self.plan.eval_seeds.clone(),
            decoding,
            model: Some(name.into()),
            verbose: false,
        };
        eprintln!("evaluating {name}");
        evaluate(model.as_ref(), &tok, sets, &cfg, Some(&dir))
    }
}
