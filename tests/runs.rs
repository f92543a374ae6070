//! Run directories through the `pocl` binary, one test per class of issue 16 ("Runs and their
//! directories"): resume of a recipe with `../` paths from another working directory, inputs
//! changed under a run (and stale cached scores), two runs into one directory, debris of killed
//! processes, outputs that would overwrite inputs or models, `--resume --set`, and validation
//! before any work. Every refusal is one `error:` line naming the path or key, and leaves the
//! files that were there unchanged.

use pocl::data::synthetic::SynthConfig;
use pocl::model::init::{init, Shape};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Setup {
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A benchmark (its data and BPE tokenizer) in `dir/data`, and a random one-layer GPT-2 of width
/// `hidden` for each (name, hidden, seed) of `models`.
fn benchmark_and_models(dir: &Path, cfg: &SynthConfig, models: &[(&str, usize, u64)]) {
    pocl::data::synthetic::write_benchmark(&dir.join("data"), cfg).unwrap();
    for &(name, hidden, seed) in models {
        let shape = Shape {
            hidden,
            layers: 1,
            heads: 2,
            kv_heads: 2,
            intermediate: 0,
            max_positions: 128,
        };
        init("gpt2", &shape, &dir.join("data"), &dir.join(name), seed).unwrap();
    }
}

/// The README's layout: `data/`, `models/{teacher,student}`, and `exp/recipe.toml` naming them
/// with `../` paths and writing its run to `../runs/r`.
fn setup(tag: &str, extra: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("pocl-runs-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let cfg = SynthConfig {
        n_train: 32,
        n_dev: 8,
        n_test: 8,
        vocab_size: 300,
        ..SynthConfig::default()
    };
    benchmark_and_models(
        &dir,
        &cfg,
        &[("models/teacher", 32, 1), ("models/student", 16, 2)],
    );
    std::fs::create_dir_all(dir.join("exp")).unwrap();
    let recipe = format!(
        r#"seed = 3
out = "../runs/r"
[model]
teacher = "../models/teacher"
student = "../models/student"
[data]
train = "../data/train.jsonl"
dev = "../data/dev.jsonl"
max_prompt_len = 64
max_len = 96
[curriculum]
stages = 2
epochs_per_stage = 1
score_max_new_tokens = 4
score_batch_size = 32
[optim]
lr = 3e-3
batch_size = 16
micro_batch_size = 16
[eval]
dev_rouge_samples = 0
[checkpoint]
every_steps = 1
{extra}"#
    );
    std::fs::write(dir.join("exp/recipe.toml"), recipe).unwrap();
    Setup { dir }
}

fn pocl(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pocl"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn succeeds(o: &Output) {
    assert!(o.status.success(), "pocl failed: {}", stderr(o));
}

/// A refusal: exit code 1, one `error:` line containing every one of `needles`, no panic.
fn refused(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected {n:?} in: {}", lines[0]);
    }
    lines[0].to_string()
}

/// Every regular file under `dir` with its contents (to prove a refusal changed nothing).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with(".lock") {
                // (The lock file records whichever pid last held the directory.)
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Asserts that no file changed between two snapshots, naming the first that did.
fn unchanged(before: &BTreeMap<PathBuf, Vec<u8>>, after: &BTreeMap<PathBuf, Vec<u8>>) {
    let keys: Vec<&PathBuf> = before.keys().chain(after.keys()).collect();
    for k in keys {
        assert!(before.get(k) == after.get(k), "{} changed", k.display());
    }
}

fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad metrics line {l:?}: {e}")))
        .collect()
}

#[test]
fn a_recipe_with_relative_paths_resumes_from_another_directory() {
    let s = setup("relative", "");
    succeeds(&pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]));
    let run = s.dir.join("runs/r");
    assert!(run.join("checkpoints/last/model.safetensors").is_file());
    // The stored recipe names the inputs absolutely, so it means the same from anywhere.
    let stored = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(!stored.contains("\"../"), "{stored}");
    // Resume from another working directory, by a relative run directory.
    std::fs::create_dir_all(s.dir.join("elsewhere")).unwrap();
    let o = pocl(
        &s.dir.join("elsewhere"),
        &["train", "--resume", "--out", "../runs/r"],
    );
    succeeds(&o);
    assert!(stderr(&o).contains("done:"), "{}", stderr(&o));
}

#[test]
fn inputs_changed_under_a_run_are_refused_and_stale_scores_are_remeasured() {
    let s = setup("changed", "");
    succeeds(&pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]));
    let run = s.dir.join("runs/r");
    let train = s.dir.join("data/train.jsonl");
    let original = std::fs::read_to_string(&train).unwrap();
    // The training file shrinks between a kill and --resume.
    let shrunk: String = original
        .lines()
        .take(20)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&train, &shrunk).unwrap();
    let before = snapshot(&run);
    let o = pocl(&s.dir, &["train", "--resume", "--out", "runs/r"]);
    refused(&o, &["data.train", "train.jsonl", "changed"]);
    unchanged(&before, &snapshot(&run));
    // A model changes: refused naming it.
    std::fs::write(&train, &original).unwrap();
    let cfg = s.dir.join("models/teacher/generation_config.json");
    std::fs::write(&cfg, "{}").unwrap();
    let o = pocl(&s.dir, &["train", "--resume", "--out", "runs/r"]);
    refused(&o, &["model.teacher", "teacher"]);
    std::fs::remove_file(&cfg).unwrap();
    // The cached scores are edited: refused naming them.
    let scores = run.join("scores.jsonl");
    let text = std::fs::read_to_string(&scores).unwrap();
    std::fs::write(&scores, text.lines().rev().collect::<Vec<_>>().join("\n")).unwrap();
    let o = pocl(&s.dir, &["train", "--resume", "--out", "runs/r"]);
    refused(&o, &["scores.jsonl"]);
    std::fs::write(&scores, &text).unwrap();
    succeeds(&pocl(&s.dir, &["train", "--resume", "--out", "runs/r"]));

    // An earlier run failed after measuring (no checkpoint); the data then changes: the new
    // run measures again instead of reusing scores of other data.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(&train, &shrunk).unwrap();
    let o = pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]);
    succeeds(&o);
    assert!(stderr(&o).contains("measuring again"), "{}", stderr(&o));
    let n = std::fs::read_to_string(&scores).unwrap().lines().count();
    assert_eq!(n, 20, "the scores are of the new data");
    // With the same inputs, a restarted run reuses them.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let o = pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]);
    succeeds(&o);
    assert!(!stderr(&o).contains("measuring"), "{}", stderr(&o));
}

#[test]
fn two_runs_into_one_directory_never_mix() {
    let s = setup("lock", "");
    let run = s.dir.join("runs/r");
    // A run that holds the directory: the second one is refused naming its pid.
    let held = pocl::train::run_dir::lock(&run).unwrap();
    let o = pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]);
    let pid = std::process::id().to_string();
    refused(&o, &["runs/r", "another pocl run", &pid]);
    assert!(!run.join("metrics.jsonl").exists());
    drop(held);
    // A lock file left by a killed holder (its pid inside, no flock) does not block.
    std::fs::write(run.join(".lock"), "999999999").unwrap();
    // Two runs started together: exactly one trains, the other is refused, and the metrics
    // are whole JSON lines of one run.
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_pocl"))
            .args(["train", "--config", "exp/recipe.toml"])
            .current_dir(&s.dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    assert_eq!(
        outs.iter().filter(|o| o.status.success()).count(),
        1,
        "{}\n---\n{}",
        stderr(&outs[0]),
        stderr(&outs[1])
    );
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    let line = refused(loser, &["runs/r"]);
    assert!(
        line.contains("another pocl run") || line.contains("already holds a run"),
        "{line}"
    );
    let m = metric_lines(&run);
    assert_eq!(m.iter().filter(|r| r["type"] == "stage").count(), 2);
}

#[test]
fn debris_of_killed_processes_is_removed_at_start() {
    let s = setup("debris", "");
    let run = s.dir.join("runs/r");
    // A run killed before its first checkpoint: metrics lines, no checkpoint.
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"type\":\"stage\",\"stale\":true}\n{\"type\":\"step\",\"st",
    )
    .unwrap();
    // A run killed during a checkpoint write, and a failed atomic write (dead pids); a
    // temporary of a live process (pid 1) is not ours to remove.
    let dead = run.join("checkpoints/.last.tmp999999999");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    std::fs::write(run.join(".metrics.jsonl.tmp999999998"), "x").unwrap();
    std::fs::write(run.join(".recipe.toml.tmp1"), "x").unwrap();
    let o = pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]);
    succeeds(&o);
    assert!(!dead.exists(), "the half-written checkpoint is removed");
    assert!(!run.join(".metrics.jsonl.tmp999999998").exists());
    assert!(
        run.join(".recipe.toml.tmp1").exists(),
        "a live pid's file is kept"
    );
    let m = metric_lines(&run);
    assert!(
        m.iter().all(|r| r.get("stale").is_none()),
        "stale lines dropped"
    );
    assert_eq!(m[0]["type"], "stage");
    assert_eq!(m[0]["step"], 0);
    let names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn outputs_never_overwrite_inputs_or_models_unasked() {
    let s = setup("overwrite", "");
    let before = snapshot(&s.dir);
    let train = s.dir.join("data/train.jsonl");
    // --out equal to the input, by another spelling of its path.
    let o = pocl(
        &s.dir,
        &[
            "score",
            "--model",
            "models/student",
            "--data",
            "data/train.jsonl",
            "--out",
            "./data/../data/train.jsonl",
        ],
    );
    refused(&o, &["--out", "--data"]);
    // init / convert onto an existing model directory or a regular file.
    let init_args = |out: &str| {
        vec![
            "init".to_string(),
            "--tokenizer".into(),
            "data".into(),
            "--out".into(),
            out.to_string(),
            "--hidden".into(),
            "16".into(),
            "--layers".into(),
            "1".into(),
            "--heads".into(),
            "2".into(),
        ]
    };
    let args = init_args("models/student");
    let o = pocl(&s.dir, &args.iter().map(|a| a.as_str()).collect::<Vec<_>>());
    refused(&o, &["models/student", "--force"]);
    let args = init_args("data/train.jsonl");
    let o = pocl(&s.dir, &args.iter().map(|a| a.as_str()).collect::<Vec<_>>());
    refused(&o, &["data/train.jsonl", "is a file"]);
    let o = pocl(
        &s.dir,
        &[
            "convert",
            "--model",
            "models/student",
            "--out",
            "models/teacher",
        ],
    );
    refused(&o, &["models/teacher", "--force"]);
    // A run directory that is not one: the recipe's folder, a model, an empty `out`, a file.
    for (flag, value, needles) in [
        ("--set", "out=.", ["exp", "is the recipe's own directory"]),
        (
            "--out",
            "models/student",
            ["models/student", "not a run directory"],
        ),
        ("--set", "out=", ["out: empty", ""]),
        (
            "--out",
            "data/train.jsonl",
            ["data/train.jsonl", "is a file"],
        ),
    ] {
        let o = pocl(
            &s.dir,
            &["train", "--config", "exp/recipe.toml", flag, value],
        );
        refused(&o, &needles);
    }
    unchanged(&before, &snapshot(&s.dir));
    assert!(train.is_file());
    // --force replaces a model directory on purpose.
    let mut args = init_args("models/student");
    args.push("--force".into());
    succeeds(&pocl(
        &s.dir,
        &args.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
    ));
}

#[test]
fn resume_applies_safe_overrides_and_refuses_the_rest() {
    let s = setup("resume-set", "");
    succeeds(&pocl(&s.dir, &["train", "--config", "exp/recipe.toml"]));
    let run = s.dir.join("runs/r");
    let before = snapshot(&run);
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", "--resume", "--out", "runs/r"];
        args.extend(extra);
        pocl(&s.dir, &args)
    };
    let o = resume(&["--set", "optim.lr=1"]);
    refused(&o, &["--set optim.lr", "cannot change on --resume"]);
    unchanged(&before, &snapshot(&run));
    // A safe key is applied (and validated: a bad value is refused by its key).
    refused(&resume(&["--set", "eval.top_p=0"]), &["eval.top_p"]);
    succeeds(&resume(&[
        "--set",
        "checkpoint.every_steps=0",
        "--set",
        "eval.dev_rouge_samples=2",
        "--kernels",
        "fused",
    ]));
    let stored = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(
        stored.contains("dev_rouge_samples = 2") && stored.contains("every_steps = 0"),
        "the applied overrides are recorded: {stored}"
    );
}

#[test]
fn bad_recipes_fail_before_any_work() {
    let s = setup("validate", "");
    let run = s.dir.join("runs/r");
    let train = |sets: &[&str]| {
        let mut args = vec!["train", "--config", "exp/recipe.toml"];
        for x in sets {
            args.extend(["--set", x]);
        }
        pocl(&s.dir, &args)
    };
    refused(&train(&["objective.loss=kl"]), &["objective.loss"]);
    refused(&train(&["eval.temperature=0"]), &["eval.temperature"]);
    refused(&train(&["eval.top_p=1.5"]), &["eval.top_p"]);
    refused(
        &train(&["eval.max_new_tokens=0", "eval.dev_rouge_samples=2"]),
        &["eval.max_new_tokens"],
    );
    assert!(!run.exists(), "nothing written");
    // A teacher whose tokenizer is another one: refused before the difficulty measurement.
    let other = s.dir.join("other");
    let cfg = SynthConfig {
        n_train: 8,
        n_dev: 2,
        n_test: 2,
        vocab_size: 350,
        seed: 99,
    };
    benchmark_and_models(&other, &cfg, &[("teacher", 16, 1)]);
    let o = train(&["model.teacher=\"../other/teacher\""]);
    refused(&o, &["teacher", "other/teacher"]);
    assert!(!stderr(&o).contains("measuring"), "{}", stderr(&o));
    assert!(!run.exists(), "nothing written");
}

#[test]
fn a_failed_write_leaves_no_temporary_behind() {
    let s = setup("failed-write", "");
    let temporaries = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp"))
            .collect()
    };
    // A file written over a directory: the rename fails.
    std::fs::create_dir_all(s.dir.join("out/target")).unwrap();
    assert!(pocl::write_atomic(&s.dir.join("out/target"), b"x").is_err());
    assert_eq!(temporaries(&s.dir.join("out")), Vec::<String>::new());
    // A model save whose extra file cannot be written.
    let model = pocl::model::load_frozen(
        &s.dir.join("models/student"),
        &pocl::backend::Backend::cpu(),
    )
    .unwrap();
    let saved = pocl::model::save_with(
        model.as_ref(),
        &s.dir.join("out/model"),
        None,
        &[("no/such/dir", vec![1])],
    );
    assert!(saved.is_err());
    assert_eq!(temporaries(&s.dir.join("out")), Vec::<String>::new());
    assert!(!s.dir.join("out/model").exists());
}
