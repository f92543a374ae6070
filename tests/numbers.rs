//! Numbers that must never be silently wrong (issue 16) and the context length (issue 14, item
//! 5), through the `pocl` binary on the tiny GPT-2 fixture (64 positions): long prompts are fitted
//! with one notice line, and activations that overflow to NaN stop a command with a message
//! naming where, instead of a ranking, a ROUGE or a loss computed from garbage.

mod inputs;
use inputs::{fixture, model_copy, pocl_in, sft_recipe, tmpdir};
use std::path::{Path, PathBuf};

fn pocl(args: &[&str]) -> (i32, String, String) {
    pocl_in(Path::new("."), args)
}

fn notices(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("notice: ")).collect()
}

/// Dolly records whose prompts are far longer than the model's 64 positions (~300 tokens).
fn long_prompts(dir: &Path) -> PathBuf {
    let p = dir.join("long.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| {
            let words: Vec<String> = (0..150).map(|j| format!("w{}", (i * 7 + j) % 40)).collect();
            serde_json::json!({"instruction": words.join(" "), "context": "",
                "response": format!("the answer is {i}")})
            .to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn gpt2() -> String {
    fixture("models/gpt2").display().to_string()
}

/// The case, scaled to the fixture: `pocl score` with 256-token prompts on a model of
/// 64 positions failed with "index-select invalid index". Now the sequences and answers are
/// lowered, announced once, and every sample is scored.
#[test]
fn score_fits_the_context_with_one_notice() {
    let d = tmpdir("score");
    let data = long_prompts(&d);
    let out = d.join("scores.jsonl");
    let (code, _, err) = pocl(&[
        "score",
        "--model",
        &gpt2(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(notices(&err).len(), 1, "{err}");
    assert!(
        err.contains("64 positions")
            && err.contains("--max-len 512 -> 64")
            && err.contains("--max-new-tokens 256 -> 33"),
        "{err}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let ces: Vec<f64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["ce"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(ces.len(), 4);
    assert!(ces.iter().all(|c| c.is_finite() && *c > 0.0), "{ces:?}");
    std::fs::remove_dir_all(&d).ok();
}

/// Generation keeps each prompt's last tokens and stops answers at the last position: `generate`
/// and `eval` succeed with one notice, and the answer is as long as the positions allow.
#[test]
fn generate_and_eval_fit_the_context() {
    let d = tmpdir("gen");
    let prompt: Vec<String> = (0..100).map(|j| format!("w{}", j % 40)).collect();
    let (code, out, err) = pocl(&[
        "generate",
        "--model",
        &gpt2(),
        "--prompt",
        &prompt.join(" "),
        "--max-new-tokens",
        "40",
        "--greedy",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(notices(&err).len(), 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // The ~200-token prompt keeps its last 32 tokens (half the positions) and the answer gets
    // the other 33 positions (the last new token needs none), unless EOS comes first.
    let ids = v["ids"].as_array().unwrap();
    assert!(ids.len() == 33 || ids.last() == Some(&600.into()), "{v}");
    let data = long_prompts(&d);
    let (code, _, err) = pocl(&[
        "eval",
        "--model",
        &gpt2(),
        "--data",
        data.to_str().unwrap(),
        "--seeds",
        "1",
        "--max-new-tokens",
        "40",
        "--out",
        d.join("ev").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(notices(&err).len(), 1, "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// Training sequences longer than the positions are cut to them (one notice naming the keys).
#[test]
fn training_fits_the_context() {
    let d = tmpdir("train");
    let data = long_prompts(&d);
    let data = data.display().to_string();
    let extra = "[eval]\ndev_rouge_samples = 2\n";
    let recipe = sft_recipe(&d, "r.toml", &gpt2(), &data, extra);
    let (code, _, err) = pocl(&["train", "--config", recipe.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let n = notices(&err);
    assert_eq!(n.len(), 1, "{err}");
    assert!(
        n[0].contains("data.max_len 512 -> 64") && n[0].contains("eval.max_new_tokens 256 -> 33"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// Finite weights whose activations overflow (the final norm's shift at f32::MAX: the logits
/// sum products of it and overflow): no command turns that into a number.
#[test]
fn overflowing_activations_are_refused_where_they_appear() {
    let d = tmpdir("overflow");
    let both = d.join("both");
    model_copy(
        &both,
        |_| {},
        Some(("transformer.ln_f.bias", &|v| v.fill(f32::MAX))),
    );
    let model = both.to_str().unwrap();
    let data = fixture("data/dolly.jsonl");
    let data = data.to_str().unwrap();

    let (code, _, err) = pocl(&[
        "generate", "--model", model, "--prompt", "hello", "--greedy",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("logits are not finite") && err.contains("prompt 0"),
        "{err}"
    );

    let out = d.join("s.jsonl");
    let (code, _, err) = pocl(&[
        "score",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
        "--metric",
        "ce",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("sample ") && err.contains("cross-entropy is"),
        "{err}"
    );
    assert!(!out.exists(), "no scores are written");

    let (code, _, err) = pocl(&[
        "eval",
        "--model",
        model,
        "--data",
        data,
        "--seeds",
        "1",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("logits are not finite"), "{err}");

    // Training: the fused head refuses the non-finite logits, naming the step and the row (the
    // step's own guard, for what gets past it, is tested in train::step).
    let recipe = sft_recipe(&d, "r.toml", model, data, "[eval]\ndev_rouge_samples = 0\n");
    let (code, _, err) = pocl(&["train", "--config", recipe.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("error: step 1: row ") && last.contains("no finite maximum logit"),
        "{err}"
    );
    assert!(
        !d.join("run/checkpoints/last").exists(),
        "a failed first step leaves no checkpoint"
    );
    std::fs::remove_dir_all(&d).ok();
}
