//! The distillation engine end to end on the built-in benchmark with tiny models: the POCL
//! schedule as recorded in metrics.jsonl, every divergence and GKD lowering its KD loss, a killed
//! run resumed to the same final weights, and bad recipes named by key.

use pocl::backend::Kernels;
use pocl::config::Recipe;
use pocl::data::synthetic::SynthConfig;
use pocl::data::{collate, Example};
use pocl::kd::{Divergence, Mix, Objective, Targets};
use pocl::model::init::{init, Shape};
use pocl::model::{self, Input};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Setup {
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A small benchmark and two random GPT-2s (teacher wider than student) in a fresh directory.
fn setup(tag: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("pocl-train-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let cfg = SynthConfig {
        n_train: 96,
        n_dev: 16,
        n_test: 16,
        vocab_size: 400,
        ..SynthConfig::default()
    };
    pocl::data::synthetic::write_benchmark(&dir.join("data"), &cfg).unwrap();
    let shape = |hidden, layers| Shape {
        hidden,
        layers,
        heads: 2,
        kv_heads: 2,
        intermediate: 0,
        max_positions: 128,
    };
    init(
        "gpt2",
        &shape(32, 2),
        &dir.join("data"),
        &dir.join("teacher"),
        1,
    )
    .unwrap();
    init(
        "gpt2",
        &shape(16, 1),
        &dir.join("data"),
        &dir.join("student"),
        2,
    )
    .unwrap();
    Setup { dir }
}

fn recipe(s: &Setup, extra: &str) -> PathBuf {
    let text = format!(
        r#"seed = 3
[model]
teacher = "teacher"
student = "student"
[data]
train = "data/train.jsonl"
dev = "data/dev.jsonl"
max_prompt_len = 64
max_len = 96
[curriculum]
epochs_per_stage = 1
score_max_new_tokens = 8
score_batch_size = 32
[optim]
lr = 3e-3
batch_size = 16
micro_batch_size = 8
[eval]
dev_rouge_samples = 4
max_new_tokens = 8
[gkd]
max_new_tokens = 12
{extra}"#
    );
    let p = s.dir.join(format!("recipe-{}.toml", text.len()));
    std::fs::write(&p, text).unwrap();
    p
}

fn run(recipe: &Path, out: &Path, sets: &[&str]) {
    let r = Recipe::load(
        recipe,
        &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    pocl::pipeline::run_recipe(r, out, false).unwrap();
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn pocl_runs_every_stage_with_the_papers_schedule() {
    let s = setup("stages");
    let out = s.dir.join("run");
    run(&recipe(&s, ""), &out, &[]);
    let m = metrics(&out);
    let stages: Vec<&serde_json::Value> = m.iter().filter(|r| r["type"] == "stage").collect();
    assert_eq!(stages.len(), 4, "four stages");
    let n = 96;
    let active: Vec<u64> = stages
        .iter()
        .map(|r| r["active_samples"].as_u64().unwrap())
        .collect();
    assert_eq!(
        active,
        vec![n / 4, n / 2, 3 * n / 4, n],
        "buckets 0..=s are active"
    );
    for (st, (t, a)) in
        stages
            .iter()
            .zip([(1.0, 0.7), (4.0 / 3.0, 0.8), (5.0 / 3.0, 0.9), (2.0, 1.0)])
    {
        assert!((st["temperature"].as_f64().unwrap() - t).abs() < 1e-9);
        assert!((st["kd_weight"].as_f64().unwrap() - a).abs() < 1e-9);
    }
    // Every training step runs at its stage's temperature, over ceil(active / 16) steps.
    for (i, st) in stages.iter().enumerate() {
        let steps: Vec<&serde_json::Value> = m
            .iter()
            .filter(|r| r["type"] == "step" && r["stage"] == i)
            .collect();
        assert_eq!(steps.len() as u64, active[i].div_ceil(16));
        assert!(steps
            .iter()
            .all(|r| r["temperature"] == st["temperature"] && r["kd_weight"] == st["kd_weight"]));
    }
    assert_eq!(
        m.iter().filter(|r| r["type"] == "eval").count(),
        4,
        "one dev evaluation per epoch"
    );
    let scores = std::fs::read_to_string(out.join("scores.jsonl")).unwrap();
    assert_eq!(
        scores.lines().count(),
        n as usize,
        "every sample scored once"
    );
    assert!(out.join("checkpoints/last/model.safetensors").is_file());
    assert!(out.join("checkpoints/best/model.safetensors").is_file());
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/last/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (st["stage"].as_u64(), st["done"].as_bool()),
        (Some(4), Some(true))
    );
}

/// Mean per-token divergence of the student in `dir` from the teacher over the training set.
fn kd_loss(s: &Setup, student_dir: &Path, div: Divergence) -> f64 {
    let teacher =
        model::load_frozen(&s.dir.join("teacher"), &pocl::backend::Backend::cpu()).unwrap();
    let student = model::load_frozen(student_dir, &pocl::backend::Backend::cpu()).unwrap();
    let tok = pocl::tokenizer::Tokenizer::from_dir(&s.dir.join("student"), None).unwrap();
    let samples = pocl::data::load_jsonl(&s.dir.join("data/train.jsonl"), Default::default())
        .unwrap()
        .samples;
    let opts = pocl::data::EncodeOptions {
        max_prompt_len: 64,
        max_len: 96,
        ..Default::default()
    };
    let ex: Vec<Example> = pocl::data::encode_samples(&tok, &samples, &opts)
        .unwrap()
        .examples;
    let b = collate(&ex.iter().collect::<Vec<_>>(), 0).unwrap();
    let input = Input {
        ids: &b.input_ids,
        positions: &b.position_ids,
        key_mask: &b.attention_mask,
    };
    let t = teacher.logits(&input, None).unwrap();
    let st = student.logits(&input, None).unwrap();
    let obj = Objective::new(div);
    let out = obj
        .loss(
            Some(&t),
            &st,
            Targets {
                labels: &b.labels,
                mask: &b.loss_mask,
                denominator: b.response_tokens() as f64,
            },
            Mix {
                temperature: 1.0,
                kd_weight: 1.0,
            },
        )
        .unwrap();
    out.kd
}

#[test]
fn every_divergence_and_gkd_lowers_its_kd_loss() {
    let s = setup("losses");
    // The last run distils from the teacher in bf16 (model.teacher_dtype); the KD loss is still
    // measured against the f32 teacher.
    let runs = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "gkd"]
        .map(|l| (l, "f32"))
        .into_iter()
        .chain([("fkl", "bf16")]);
    for (loss, dtype) in runs {
        let out = s.dir.join(format!("run-{loss}-{dtype}"));
        let sets = [
            format!("objective.loss={loss}"),
            format!("model.teacher_dtype={dtype}"),
            "curriculum.kind=none".into(),
            "optim.epochs=4".into(),
            "eval.dev_rouge_samples=0".into(),
        ];
        run(
            &recipe(&s, ""),
            &out,
            &sets.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let div = match loss {
            "gkd" => Divergence::parse("jsd", None, None).unwrap(),
            l => Divergence::parse(l, None, None).unwrap(),
        };
        let before = kd_loss(&s, &s.dir.join("student"), div);
        let after = kd_loss(&s, &out.join("checkpoints/last"), div);
        assert!(
            after < 0.9 * before,
            "{loss} ({dtype} teacher): KD loss {before} -> {after}"
        );
        if loss == "gkd" {
            let m = metrics(&out);
            assert!(
                m.iter().any(|r| r["on_policy"] == true),
                "gkd: some batches are student-generated"
            );
            assert!(
                m.iter().any(|r| r["on_policy"] == false),
                "gkd: some batches are the data's"
            );
        }
    }
}

fn trainer_step(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("checkpoints/last/trainer_state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["global_step"].as_u64()
}

#[test]
fn killed_and_resumed_run_ends_with_identical_weights() {
    killed_and_resumed_run(Kernels::Fused);
}

#[test]
fn killed_and_resumed_run_ends_with_identical_weights_on_portable_kernels() {
    killed_and_resumed_run(Kernels::Portable);
}

fn killed_and_resumed_run(kernels: Kernels) {
    let s = setup(&format!("resume-{kernels}"));
    // GKD exercises the RNG state and replay buffer; checkpoints after every step.
    let r = recipe(&s, "[checkpoint]\nevery_steps = 1\n");
    let k = format!("run.kernels={kernels}");
    let sets = [
        "objective.loss=gkd",
        "gkd.replay=8",
        "curriculum.epochs_per_stage=2",
        "optim.batch_size=8",
        &k,
    ];
    let whole = s.dir.join("whole");
    run(&r, &whole, &sets);

    let bin = env!("CARGO_BIN_EXE_pocl");
    let cut = s.dir.join("cut");
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        r.display().to_string(),
        "--out".into(),
        cut.display().to_string(),
    ];
    for x in sets {
        args.extend(["--set".to_string(), x.to_string()]);
    }
    let mut child = Command::new(bin)
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut killed_at = None;
    for _ in 0..20_000 {
        if let Some(step) = trainer_step(&cut).filter(|&st| st >= 3) {
            child.kill().unwrap();
            killed_at = Some(step);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.wait().unwrap();
    let total = trainer_step(&whole).unwrap();
    let killed_at = killed_at.expect("the run wrote checkpoints");
    assert!(
        trainer_step(&cut).unwrap() < total,
        "killed before the end (at step {killed_at} of {total})"
    );
    let status = Command::new(bin)
        .args(["train", "--resume", "--out", &cut.display().to_string()])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let a = std::fs::read(whole.join("checkpoints/last/model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("checkpoints/last/model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's"
    );
    let strip = |m: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        m.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("elapsed_s");
                r
            })
            .collect()
    };
    assert_eq!(
        strip(metrics(&whole)),
        strip(metrics(&cut)),
        "metrics.jsonl identical apart from timings"
    );
}

#[test]
fn bad_recipes_name_the_key() {
    let s = setup("bad");
    let bin = env!("CARGO_BIN_EXE_pocl");
    let r = recipe(&s, "");
    for (set, key) in [
        ("curriculum.stages=0", "curriculum.stages"),
        ("curriculum.t_end=-1", "curriculum.t_end"),
        ("optim.warmup=3", "warmup"),
        ("objective.loss=kl", "fkl"),
        ("model.teacher_dtype=f16", "model.teacher_dtype"),
    ] {
        let out = Command::new(bin)
            .args([
                "train",
                "--config",
                &r.display().to_string(),
                "--out",
                &s.dir.join("x").display().to_string(),
                "--set",
                set,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(key) && !err.contains("panicked"),
            "{set}: {err}"
        );
    }
    // A second run into the same directory is refused rather than mixed with the first.
    let out = s.dir.join("twice");
    run(
        &r,
        &out,
        &[
            "curriculum.kind=none",
            "optim.epochs=1",
            "eval.dev_rouge_samples=0",
        ],
    );
    let again = Command::new(bin)
        .args([
            "train",
            "--config",
            &r.display().to_string(),
            "--out",
            &out.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
}

#[test]
fn plateau_advances_early_and_one_schedule_can_span_all_stages() {
    let s = setup("plateau");
    let r = recipe(&s, "");
    // Gradients clipped to a norm of 1e-30 fall far below AdamW's epsilon, so no weight moves
    // visibly and the dev loss never improves after the first evaluation: with patience 1 every
    // stage then stops after one epoch without improvement.
    let out = s.dir.join("plateau");
    run(
        &r,
        &out,
        &[
            "curriculum.epochs_per_stage=3",
            "curriculum.patience=1",
            "optim.clip=1e-30",
            "optim.weight_decay=0",
            "eval.dev_rouge_samples=0",
        ],
    );
    let m = metrics(&out);
    let evals: Vec<u64> = (0..4)
        .map(|st| {
            m.iter()
                .filter(|r| r["type"] == "eval" && r["stage"] == st)
                .count() as u64
        })
        .collect();
    assert_eq!(
        evals,
        vec![2, 1, 1, 1],
        "stage 1: improve then stall; later stages: stall at once"
    );

    // restart_optimizer = false: one cosine schedule over all stages, so the learning rate never
    // goes back up; with restarts it jumps back to lr at every stage start.
    let lrs = |run: &Path| -> Vec<f64> {
        metrics(run)
            .iter()
            .filter(|r| r["type"] == "step")
            .map(|r| r["lr"].as_f64().unwrap())
            .collect()
    };
    let one = s.dir.join("one-schedule");
    run(
        &r,
        &one,
        &[
            "curriculum.restart_optimizer=false",
            "eval.dev_rouge_samples=0",
        ],
    );
    let l = lrs(&one);
    assert!(l.windows(2).all(|w| w[1] <= w[0]), "{l:?}");
    let restart = s.dir.join("restart");
    run(&r, &restart, &["eval.dev_rouge_samples=0"]);
    let l = lrs(&restart);
    assert_eq!(
        l.windows(2).filter(|w| w[1] > w[0]).count(),
        3,
        "three restarts: {l:?}"
    );
}

/// A step's gradient does not depend on how the batch is split into micro-batches: the loss
/// and gradient norm of every step agree between micro-batches of 16 (the whole batch), 8 and
/// 4. The student's matrices accumulate their gradients in place across micro-batches
/// (`ops::grad`); adding a buffer to itself, or losing a micro-batch, would change the norm.
#[test]
fn micro_batches_sum_to_the_step_gradient() {
    let s = setup("micro");
    let steps = |micro: usize| {
        let out = s.dir.join(format!("run-{micro}"));
        let micro = format!("optim.micro_batch_size={micro}");
        let sets = ["curriculum.kind=none", "optim.epochs=1", micro.as_str()];
        run(&recipe(&s, ""), &out, &sets);
        metrics(&out)
            .into_iter()
            .filter(|r| r["type"] == "step")
            .map(|r| {
                (
                    r["loss"].as_f64().unwrap(),
                    r["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let whole = steps(16);
    assert_eq!(whole.len(), 96 / 16);
    for micro in [8, 4] {
        let split = steps(micro);
        assert_eq!(split.len(), whole.len());
        for (i, ((l1, g1), (l2, g2))) in whole.iter().zip(&split).enumerate() {
            // Step 0 differs only by summation order; later steps also by the weights it made.
            let tol = if i == 0 { 1e-5 } else { 1e-3 };
            assert!(
                (l1 - l2).abs() <= tol * l1.abs(),
                "step {i}: loss {l1} vs {l2} ({micro})"
            );
            assert!(
                (g1 - g2).abs() <= tol * g1.abs(),
                "step {i}: norm {g1} vs {g2} ({micro})"
            );
        }
    }
}

/// 20+ optimiser steps of plain KD (FKL at T = 1, JSD at T = 2) give the same loss at every step
/// with the fused and the portable kernels (1e-4 relative): the two paths train alike, not only
/// compute one gradient alike.
#[test]
fn fused_and_portable_kernels_train_alike() {
    let s = setup("kernels");
    let r = recipe(&s, "");
    for (loss, t) in [("fkl", "1"), ("jsd", "2")] {
        let steps = |kernels: Kernels| -> Vec<f64> {
            let out = s.dir.join(format!("run-{loss}-{kernels}"));
            let k = format!("run.kernels={kernels}");
            let l = format!("objective.loss={loss}");
            let t = format!("objective.temperature={t}");
            let sets = [
                "curriculum.kind=none",
                "optim.epochs=2",
                "optim.batch_size=8",
                &k,
                &l,
                &t,
            ];
            run(&r, &out, &sets);
            metrics(&out)
                .iter()
                .filter(|m| m["type"] == "step")
                .map(|m| m["loss"].as_f64().unwrap())
                .collect()
        };
        let (fused, portable) = (steps(Kernels::Fused), steps(Kernels::Portable));
        assert!(fused.len() >= 20, "{loss}: {} steps", fused.len());
        assert_eq!(fused.len(), portable.len(), "{loss}: step count");
        for (i, (a, b)) in fused.iter().zip(&portable).enumerate() {
            let rel = (a - b).abs() / a.abs();
            assert!(
                rel < 1e-4,
                "{loss} step {i}: fused {a} vs portable {b} (rel {rel})"
            );
        }
    }
}

/// A bf16-mixed student (`model.student_precision`) trains as the f32 one does: every step's
/// loss within 5e-3 relative over 24 steps of FKL (measured here: 3.3e-4; bf16 products move
/// each step's weights by ~2^-9 of the update, and lr 3e-3 keeps the runs together), yet not
/// identical (the mixed path is in effect); its run directory saves the resolved precision
/// (the f32 run's default included) and f32 checkpoints.
#[test]
fn a_bf16_mixed_student_tracks_the_f32_run_and_saves_f32() {
    let s = setup("mixed");
    let r = recipe(&s, "");
    let steps = |sets: &[&str], tag: &str| -> (Vec<f64>, PathBuf) {
        let out = s.dir.join(format!("run-{tag}"));
        let mut all = vec![
            "curriculum.kind=none",
            "optim.epochs=2",
            "optim.batch_size=8",
        ];
        all.extend_from_slice(sets);
        run(&r, &out, &all);
        let losses = metrics(&out)
            .iter()
            .filter(|m| m["type"] == "step")
            .map(|m| m["loss"].as_f64().unwrap())
            .collect();
        (losses, out)
    };
    let (f32_losses, f32_run) = steps(&[], "f32");
    let (mixed, mixed_run) = steps(&["model.student_precision=bf16-mixed"], "mixed");
    assert!(f32_losses.len() >= 20, "{} steps", f32_losses.len());
    assert_eq!(f32_losses.len(), mixed.len());
    let mut worst = 0f64;
    for (i, (a, b)) in f32_losses.iter().zip(&mixed).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(
            rel < 5e-3,
            "step {i}: f32 {a} vs bf16-mixed {b} (rel {rel})"
        );
        worst = worst.max(rel);
    }
    eprintln!("bf16-mixed vs f32 losses: worst relative {worst:e}");
    assert!(worst > 0.0, "bf16-mixed computed exactly as f32");
    for (run, want) in [(&f32_run, "f32"), (&mixed_run, "bf16-mixed")] {
        let saved = Recipe::load(&run.join("recipe.toml"), &[]).unwrap();
        assert_eq!(
            saved
                .model
                .student_precision
                .map(|p| p.to_string())
                .as_deref(),
            Some(want),
            "{}",
            run.display()
        );
    }
    let mut checked = 0;
    for entry in walk(&mixed_run) {
        if entry.file_name().is_some_and(|n| n == "model.safetensors") {
            let bytes = std::fs::read(&entry).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, t) in st.tensors() {
                assert_eq!(
                    t.dtype(),
                    safetensors::Dtype::F32,
                    "{}: {name}",
                    entry.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no checkpoint in {}", mixed_run.display());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
