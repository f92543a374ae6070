//! ROUGE-L and the Porter stemmer against fixtures made by tools/make_rouge_fixtures.py with
//! Google's rouge-score and NLTK (see tests/fixtures/rouge/corpus.json for their versions).

use pocl::eval::{porter, rouge};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rouge")
        .join(name)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("cases.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn porter_matches_nltk_on_every_fixture_word() {
    let text = std::fs::read_to_string(fixture("porter.tsv")).unwrap();
    let mut bad = Vec::new();
    let mut n = 0;
    for line in text.lines() {
        let (word, want) = line.split_once('\t').unwrap();
        n += 1;
        let got = porter::stem(word);
        if got != want {
            bad.push(format!("{word}: got {got}, NLTK {want}"));
        }
    }
    assert!(n > 5000, "fixture too small: {n}");
    assert!(
        bad.is_empty(),
        "{} of {n} stems differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn tokens_and_scores_match_rouge_score() {
    let cases = cases();
    assert!(cases.len() >= 300);
    for (i, c) in cases.iter().enumerate() {
        let pred = c["prediction"].as_str().unwrap();
        let refs = strings(&c["references"]);
        assert_eq!(
            rouge::tokenize(pred, true),
            strings(&c["prediction_tokens"]),
            "case {i}: {pred:?}"
        );
        for (j, r) in refs.iter().enumerate() {
            assert_eq!(
                rouge::tokenize(r, true),
                strings(&c["reference_tokens"][j]),
                "case {i} ref {j}: {r:?}"
            );
            let want = c["fmeasures"][j].as_f64().unwrap();
            let got = rouge::rouge_l(r, pred);
            assert!(
                (got - want).abs() < 1e-9,
                "case {i} ref {j}: {got} vs {want}"
            );
        }
        let want = c["rougeL"].as_f64().unwrap();
        let got = 100.0 * rouge::rouge_l_multi(&refs, pred);
        assert!((got - want).abs() < 1e-9, "case {i}: {got} vs {want}");
        assert_eq!(
            rouge::exact_match(&refs, pred),
            c["exact_match"].as_bool().unwrap(),
            "case {i}: {pred:?} vs {refs:?}"
        );
    }
}

#[test]
fn corpus_mean_matches_distillm() {
    let cases = cases();
    let preds: Vec<String> = cases
        .iter()
        .map(|c| c["prediction"].as_str().unwrap().to_string())
        .collect();
    let refs: Vec<Vec<String>> = cases.iter().map(|c| strings(&c["references"])).collect();
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("corpus.json")).unwrap()).unwrap();
    let got = rouge::score_corpus(&preds, &refs).unwrap();
    assert!((got.rouge_l - want["rougeL"].as_f64().unwrap()).abs() < 1e-9);
    assert!((got.exact_match - want["exact_match"].as_f64().unwrap()).abs() < 1e-9);
    assert!(rouge::score_corpus(&preds[1..], &refs).is_err());
}

fn pocl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pocl"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn rouge_command_json_and_errors() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rouge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = cases();
    let (p, r) = (dir.join("pred.jsonl"), dir.join("ref.jsonl"));
    let mut ptext = String::new();
    let mut rtext = String::new();
    for (i, c) in cases.iter().enumerate() {
        ptext += &format!("{}\n", c["prediction"]);
        // Single references as plain strings, several as arrays: both forms are accepted.
        let refs = &c["references"];
        let line = if i % 2 == 0 && refs.as_array().unwrap().len() == 1 {
            refs[0].clone()
        } else {
            refs.clone()
        };
        rtext += &format!("{line}\n");
    }
    std::fs::write(&p, &ptext).unwrap();
    std::fs::write(&r, &rtext).unwrap();
    let out = pocl(&[
        "rouge",
        "--predictions",
        p.to_str().unwrap(),
        "--references",
        r.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("corpus.json")).unwrap()).unwrap();
    assert!((v["rougeL"].as_f64().unwrap() - want["rougeL"].as_f64().unwrap()).abs() < 1e-9);
    let scores = v["scores"].as_array().unwrap();
    assert_eq!(scores.len(), cases.len());
    for (s, c) in scores.iter().zip(&cases) {
        assert!((s.as_f64().unwrap() - c["rougeL"].as_f64().unwrap()).abs() < 1e-9);
    }
    // Plain output: the mean only.
    let out = pocl(&[
        "rouge",
        "--predictions",
        p.to_str().unwrap(),
        "--references",
        r.to_str().unwrap(),
    ]);
    let mean: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!((mean - want["rougeL"].as_f64().unwrap()).abs() < 1e-4);

    // Mismatched line counts are an error naming both files.
    std::fs::write(
        &p,
        ptext
            .lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = pocl(&[
        "rouge",
        "--predictions",
        p.to_str().unwrap(),
        "--references",
        r.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pred.jsonl") && err.contains("ref.jsonl"),
        "{err}"
    );

    // A non-string prediction names the file and the line.
    std::fs::write(&p, "\"ok\"\n42\n").unwrap();
    let out = pocl(&[
        "rouge",
        "--predictions",
        p.to_str().unwrap(),
        "--references",
        r.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pred.jsonl:2:"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
