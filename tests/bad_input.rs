//! The bad-input suite: each case is a named command line over a workspace of good and broken
//! inputs. Every case must exit with status 1 and one line `error: ...` naming the file, line,
//! key or tensor at fault (never a panic or an internal message), and leave every file of the
//! workspace as it was (no output, no temporary debris, nothing overwritten).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod inputs;
use inputs::{fixture, model_copy, pocl_in, sft_recipe, write_tensor};

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
                out.insert(p, Vec::new());
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Every one of these must appear in the error line.
    needles: Vec<String>,
}

/// The workspace: good and broken models, data, recipes and logits.
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("pocl-bad-input-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let w = Workspace { dir };
        let d = &w.dir;
        model_copy(&d.join("good"), |_| {}, None);
        model_copy(
            &d.join("nan"),
            |_| {},
            Some(("transformer.h.1.mlp.c_fc.weight", &|v| v[70] = f32::NAN)),
        );
        model_copy(
            &d.join("inf"),
            |_| {},
            Some(("transformer.ln_f.weight", &|v| v[3] = f32::NEG_INFINITY)),
        );
        model_copy(
            &d.join("eps0"),
            |c| c["layer_norm_epsilon"] = 0.0.into(),
            None,
        );
        model_copy(
            &d.join("epsneg"),
            |c| c["layer_norm_epsilon"] = (-1e-5).into(),
            None,
        );
        model_copy(&d.join("pos0"), |c| c["n_positions"] = 0.into(), None);
        model_copy(&d.join("eos"), |c| c["eos_token_id"] = 5000.into(), None);
        // The model's 601 ids with the data fixture's 401-token tokenizer.
        model_copy(&d.join("smalltok"), |_| {}, None);
        std::fs::copy(
            fixture("data/tokenizer.json"),
            d.join("smalltok/tokenizer.json"),
        )
        .unwrap();
        std::fs::copy(fixture("data/dolly.jsonl"), d.join("train.jsonl")).unwrap();
        std::fs::write(d.join("a-file"), "a regular file\n").unwrap();
        std::fs::write(d.join("scores-existing.jsonl"), "keep me\n").unwrap();
        let recipe = |name: &str, extra: &str| {
            let text = format!(
                "out = \"run-{name}\"\n[model]\nteacher = \"good\"\nstudent = \"good\"\n\
                 [data]\ntrain = \"train.jsonl\"\ndev = \"train.jsonl\"\n{extra}"
            );
            std::fs::write(d.join(format!("{name}.toml")), text).unwrap();
        };
        recipe("wd", "[optim]\nweight_decay = -0.01\n");
        recipe("clip", "[optim]\nclip = -1.0\n");
        recipe("rrf0", "[curriculum]\nrrf_k = 0.0\n");
        recipe("rrfnan", "[curriculum]\nrrf_k = nan\n");
        recipe("scorenew", "[curriculum]\nscore_max_new_tokens = 0\n");
        recipe(
            "gkdnew",
            "[objective]\nloss = \"gkd\"\n[gkd]\nmax_new_tokens = 0\n",
        );
        recipe("lrnan", "[optim]\nlr_min = nan\n");
        recipe("evalnew", "[eval]\nmax_new_tokens = 0\n");
        recipe("stages", "[curriculum]\nstages = 10\n");
        sft_recipe(d, "sft.toml", "good", "train.jsonl", "");
        // Logits [3 tokens, 5 vocab]; the student's row 2 holds a NaN, the teacher's row 1 +Inf.
        let good: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut nan = good.clone();
        nan[12] = f32::NAN;
        let mut inf = good.clone();
        inf[6] = f32::INFINITY;
        write_tensor(&d.join("t.safetensors"), "logits", &[3, 5], &good);
        write_tensor(&d.join("s-nan.safetensors"), "logits", &[3, 5], &nan);
        write_tensor(&d.join("t-inf.safetensors"), "logits", &[3, 5], &inf);
        write_tensor(
            &d.join("mask-nan.safetensors"),
            "mask",
            &[3],
            &[1.0, f32::NAN, 1.0],
        );
        w
    }
}

fn cases(w: &Workspace) -> Vec<Case> {
    let p = |rel: &str| w.path(rel);
    let case = |name, args: &[&str], needles: &[&str]| Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        needles: needles.iter().map(|s| s.to_string()).collect(),
    };
    let data = p("train.jsonl");
    let mut v = vec![];
    // Non-finite weights: every command that loads the model names the tensor and the file.
    let nan_file = p("nan/model.safetensors");
    let nan_tensor = "transformer.h.1.mlp.c_fc.weight";
    for (name, cmd) in [
        ("nan weights: generate", "generate"),
        ("nan weights: score", "score"),
        ("nan weights: eval", "eval"),
        ("nan weights: forward", "forward"),
    ] {
        let mut args = vec![cmd.to_string(), "--model".into(), p("nan")];
        match cmd {
            "generate" => args.extend(["--prompt".into(), "hello".into()]),
            "score" => args.extend(["--data".into(), data.clone(), "--out".into(), p("s.jsonl")]),
            "eval" => args.extend(["--data".into(), data.clone(), "--out".into(), p("ev")]),
            _ => args.extend(["--ids".into(), "1,2".into(), "--output".into(), p("l.st")]),
        }
        v.push(Case {
            name,
            args,
            needles: vec![nan_file.clone(), nan_tensor.into(), "non-finite".into()],
        });
    }
    v.push(case(
        "inf weights: generate",
        &["generate", "--model", &p("inf"), "--prompt", "hi"],
        &[
            &p("inf/model.safetensors"),
            "transformer.ln_f.weight",
            "-inf",
        ],
    ));
    let nan_recipe = sft_recipe(&w.dir, "nan.toml", "nan", "train.jsonl", "");
    let nan_recipe = nan_recipe.to_str().unwrap();
    v.push(case(
        "nan weights: train",
        &["train", "--config", nan_recipe],
        &[&nan_file, nan_tensor],
    ));
    // Non-finite logits and masks given to kd-loss: the file, the tensor and the row.
    v.push(case(
        "kd-loss: nan student logit",
        &[
            "kd-loss",
            "--teacher",
            &p("t.safetensors"),
            "--student",
            &p("s-nan.safetensors"),
            "--loss",
            "fkl",
            "--output",
            &p("g.safetensors"),
        ],
        &[&p("s-nan.safetensors"), "'logits' row 2", "NaN"],
    ));
    v.push(case(
        "kd-loss: inf teacher logit",
        &[
            "kd-loss",
            "--teacher",
            &p("t-inf.safetensors"),
            "--student",
            &p("t.safetensors"),
            "--loss",
            "jsd",
        ],
        &[&p("t-inf.safetensors"), "'logits' row 1", "inf"],
    ));
    v.push(case(
        "kd-loss: nan mask",
        &[
            "kd-loss",
            "--teacher",
            &p("t.safetensors"),
            "--student",
            &p("t.safetensors"),
            "--mask",
            &p("mask-nan.safetensors"),
            "--loss",
            "fkl",
        ],
        &[&p("mask-nan.safetensors"), "'mask' row 1"],
    ));
    // Impossible model configurations: the file and the key.
    for (name, dir, key) in [
        ("config: layer_norm_epsilon 0", "eps0", "layer_norm_epsilon"),
        (
            "config: layer_norm_epsilon < 0",
            "epsneg",
            "layer_norm_epsilon",
        ),
        ("config: n_positions 0", "pos0", "n_positions"),
        (
            "config: eos_token_id beyond the vocabulary",
            "eos",
            "eos_token_id",
        ),
    ] {
        v.push(case(
            name,
            &["generate", "--model", &p(dir), "--prompt", "hi"],
            &[&p(&format!("{dir}/config.json")), key],
        ));
    }
    v.push(case(
        "tokenizer smaller than the vocabulary: generate",
        &[
            "generate",
            "--model",
            &p("smalltok"),
            "--prompt",
            "the red fox",
            "--greedy",
            "--max-new-tokens",
            "40",
        ],
        &[&p("smalltok/tokenizer.json"), "has no entry"],
    ));
    // Impossible recipe values: the recipe file and the key.
    for (name, file, key) in [
        ("recipe: negative weight decay", "wd", "optim.weight_decay"),
        ("recipe: negative clip", "clip", "optim.clip"),
        ("recipe: rrf_k 0", "rrf0", "curriculum.rrf_k"),
        ("recipe: rrf_k nan", "rrfnan", "curriculum.rrf_k"),
        (
            "recipe: zero new tokens for scoring",
            "scorenew",
            "curriculum.score_max_new_tokens",
        ),
        (
            "recipe: zero new tokens for gkd",
            "gkdnew",
            "gkd.max_new_tokens",
        ),
        ("recipe: lr_min nan", "lrnan", "optim.lr"),
        (
            "recipe: zero new tokens for dev ROUGE-L",
            "evalnew",
            "eval.max_new_tokens",
        ),
        (
            "recipe: more stages than samples",
            "stages",
            "curriculum.stages",
        ),
    ] {
        let f = p(&format!("{file}.toml"));
        v.push(case(name, &["train", "--config", &f], &[key]));
        if file != "stages" {
            // Checked while reading the recipe: the message starts with its path.
            v.last_mut().unwrap().needles.push(f);
        }
    }
    // Impossible flags.
    for (name, extra, flag) in [
        ("score: --rrf-k 0", ["--rrf-k", "0"], "--rrf-k"),
        ("score: --rrf-k nan", ["--rrf-k", "NaN"], "--rrf-k"),
        (
            "score: --max-new-tokens 0",
            ["--max-new-tokens", "0"],
            "--max-new-tokens",
        ),
        ("score: --buckets 0", ["--buckets", "0"], "--buckets"),
    ] {
        let model = p("good");
        let out = p("scores-existing.jsonl");
        let mut a: Vec<&str> = vec!["score", "--model", &model, "--data", &data, "--out", &out];
        a.extend(extra);
        v.push(case(name, &a, &[flag]));
    }
    // NaN decoding and loss settings.
    let good = p("good");
    let t = p("t.safetensors");
    for (name, loss, flag) in [
        ("kd-loss: --temperature nan", "fkl", "--temperature"),
        ("kd-loss: --alpha nan", "skl", "--alpha"),
    ] {
        let args = [
            "kd-loss",
            "--teacher",
            &t,
            "--student",
            &t,
            "--loss",
            loss,
            flag,
            "nan",
        ];
        v.push(case(name, &args, &[&flag[2..]]));
    }
    for (name, cmd, flag) in [
        ("generate: --temperature nan", "generate", "--temperature"),
        ("generate: --top-p nan", "generate", "--top-p"),
        ("eval: --temperature nan", "eval", "--temperature"),
    ] {
        let input = if cmd == "eval" {
            ["--data", &data]
        } else {
            ["--prompt", "hi"]
        };
        let args = [cmd, "--model", &good, input[0], input[1], flag, "nan"];
        v.push(case(name, &args, &[flag]));
    }
    v.push(case(
        "init: --hidden 100000 (would abort allocating)",
        &[
            "init",
            "--tokenizer",
            &p("good"),
            "--out",
            &p("huge"),
            "--hidden",
            "100000",
        ],
        &["--hidden", "GB"],
    ));
    v.push(case(
        "forward: more ids than positions",
        &[
            "forward",
            "--model",
            &p("good"),
            "--ids",
            &vec!["1"; 65].join(","),
            "--output",
            &p("l.st"),
        ],
        &["--ids", "64 positions", &p("good")],
    ));
    // OS errors name the path.
    v.push(case(
        "os: score --out under a regular file",
        &[
            "score",
            "--model",
            &p("good"),
            "--data",
            &data,
            "--out",
            &p("a-file/s.jsonl"),
            "--max-new-tokens",
            "4",
        ],
        &[&p("a-file/s.jsonl"), "is a file, not a directory"],
    ));
    v.push(case(
        "os: init --out under a regular file",
        &[
            "init",
            "--tokenizer",
            &p("good"),
            "--out",
            &p("a-file/m"),
            "--hidden",
            "16",
            "--heads",
            "2",
        ],
        &[&p("a-file"), "is a file, not a directory"],
    ));
    v.push(case(
        "os: eval --out under a regular file",
        &[
            "eval",
            "--model",
            &p("good"),
            "--data",
            &data,
            "--out",
            &p("a-file/ev"),
            "--max-new-tokens",
            "4",
            "--seeds",
            "1",
        ],
        &[&p("a-file/ev"), "is a file, not a directory"],
    ));
    v.push(case(
        "os: train out under a regular file",
        &[
            "train",
            "--config",
            &p("sft.toml"),
            "--out",
            &p("a-file/run"),
        ],
        &[&p("a-file/run"), "is a file, not a directory"],
    ));
    v
}

#[test]
fn every_bad_input_fails_with_one_clear_line_and_changes_nothing() {
    let w = Workspace::new();
    let cases = cases(&w);
    let before = snapshot(&w.dir);
    let mut failures = vec![];
    for c in &cases {
        let (code, _, err) = pocl_in(&w.dir, &c.args);
        // Notices may precede the error; the error itself is one line, and the last.
        let lines: Vec<&str> = err.trim_end().lines().collect();
        let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error: ")).collect();
        let last = lines.last().copied().unwrap_or("");
        let problem = if code != 1 {
            Some(format!("exit status {code}"))
        } else if errors.len() != 1 || !last.starts_with("error: ") {
            Some("not exactly one final error line".into())
        } else if err.contains("panicked") || err.contains("invalid index") {
            Some("a panic or an internal message".into())
        } else {
            c.needles
                .iter()
                .find(|n| !last.contains(n.as_str()))
                .map(|n| format!("the error does not name {n:?}"))
        };
        let after = snapshot(&w.dir);
        if after != before {
            let changed: Vec<String> = after
                .keys()
                .chain(before.keys())
                .filter(|k| after.get(*k) != before.get(*k))
                .map(|k| k.display().to_string())
                .collect();
            failures.push(format!("{}: changed {changed:?}", c.name));
            return_to(&w.dir, &before);
        }
        if let Some(p) = problem {
            failures.push(format!("{}: {p}\n  {}", c.name, err.trim_end()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // README.md, "Reliability: inputs", states this count.
    assert_eq!(cases.len(), CASES, "update CASES and the README's count");
    std::fs::remove_dir_all(&w.dir).ok();
}

/// Puts the workspace back as `snapshot` saw it, so one failing case does not fail the next.
fn return_to(dir: &Path, snap: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, _) in snapshot(dir) {
        if !snap.contains_key(&p) {
            std::fs::remove_dir_all(&p)
                .or_else(|_| std::fs::remove_file(&p))
                .ok();
        }
    }
    for (p, bytes) in snap {
        if !p.is_dir() {
            std::fs::write(p, bytes).ok();
        }
    }
}

/// The number of cases above, as README.md states it.
const CASES: usize = 38;
