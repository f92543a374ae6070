//! `pocl eval` (the paper's multi-seed ROUGE-L protocol) and `pocl generate-data` (SeqKD data)
//! end to end on the tiny `gpt2` fixture (random weights: answers are noise, which makes
//! different seeds give different answers).

mod common;
use common::pocl;
use pocl::data::{load_jsonl, prompt_ids, EncodeOptions, Format, LoadOptions, Sample, Template};
use pocl::eval::evaluate::{
    evaluate, generate_answers, mean_std, Decoding, EvalConfig, EvalReport, Generated,
};
use pocl::eval::rouge_l_multi;
use pocl::model::generate::{generate, GenerationConfig, Sampling};
use pocl::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn gpt2() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-eval-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pocl_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (code, out, err) = pocl(args);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    out
}

fn assert_clean_error<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needle: &str) {
    let (code, _, err) = pocl(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line expected, got {err}"
    );
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

/// A Dolly test set (prompts of different lengths, so batches mix lengths) and a processed set
/// whose samples list several references.
fn write_sets(dir: &Path) -> (PathBuf, PathBuf) {
    let dolly = dir.join("qa.jsonl");
    let rows = [
        ("Name three primary colors.", "", "Red, yellow and blue."),
        (
            "Summarize the text.",
            "The fox jumped over the lazy dog twice.",
            "A fox jumped over a dog.",
        ),
        ("Say hello.", "", "hello world"),
        ("What is two plus two?", "", "four"),
        (
            "Give the capital.",
            "France is a country in Europe.",
            "Paris",
        ),
        ("Spell cat.", "", "c a t"),
        ("Which is larger, 3 or 7?", "", "7 is larger"),
    ];
    let text: String = rows
        .iter()
        .map(|(i, c, r)| {
            serde_json::json!({"instruction": i, "context": c, "response": r, "category": "open_qa"})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&dolly, text).unwrap();
    let processed = dir.join("multi.jsonl");
    let rows = [
        ("Q: name a color\nA:", vec!["red", "blue green"]),
        ("Q: say a number\nA:", vec!["one", "two", "three"]),
        ("Q: hi\nA:", vec!["hello"]),
    ];
    let text: String = rows
        .iter()
        .map(|(p, o)| serde_json::json!({"prompt": p, "output": o}).to_string() + "\n")
        .collect();
    std::fs::write(&processed, text).unwrap();
    (dolly, processed)
}

const SMALL: &[&str] = &[
    "--template",
    "plain",
    "--max-prompt-len",
    "24",
    "--max-new-tokens",
    "12",
];

fn eval_args(data: &[&str], out: &str, extra: &[&str]) -> Vec<String> {
    eval_args_for(&gpt2(), data, out, extra)
}

fn eval_args_for(model: &Path, data: &[&str], out: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "eval".to_string(),
        "--model".into(),
        model.display().to_string(),
    ];
    a.push("--data".into());
    a.extend(data.iter().map(|s| s.to_string()));
    a.extend(["--out".to_string(), out.to_string()]);
    a.extend(SMALL.iter().chain(extra).map(|s| s.to_string()));
    a
}

fn read_answers(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn answers_of(out: &Path, set: &str, seed: u64) -> Vec<String> {
    read_answers(&out.join(format!("answers/{set}/seed{seed}.jsonl")))
        .iter()
        .map(|a| a["answer"].as_str().unwrap().to_string())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn results_and_answer_files_are_consistent() {
    let dir = tmpdir("results");
    let (dolly, multi) = write_sets(&dir);
    let out = dir.join("run");
    let data = [dolly.to_str().unwrap(), multi.to_str().unwrap()];
    let stdout = pocl_ok(&eval_args(
        &data,
        out.to_str().unwrap(),
        &["--seeds", "10,20,30", "--batch-size", "4"],
    ));
    assert!(stdout.contains("qa") && stdout.contains("multi") && stdout.contains("average"));
    let results: EvalReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results.seeds, vec![10, 20, 30]);
    assert_eq!(results.sets.len(), 2);
    assert!(!results.decoding.greedy);
    assert_eq!(results.decoding.temperature, Some(1.0));
    assert_eq!(results.decoding.no_repeat_ngram, 6);
    assert_eq!(results.decoding.eos_ids, vec![600]);
    assert!(results.wall_time_s > 0.0);
    let samples = |p: &Path| load_jsonl(p, LoadOptions::default()).unwrap().samples;
    for (set, path, n) in [(&results.sets[0], &dolly, 7), (&results.sets[1], &multi, 3)] {
        let loaded = samples(path);
        assert_eq!(set.n, n);
        assert_eq!(set.per_seed.len(), 3);
        for ps in &set.per_seed {
            let answers =
                read_answers(&out.join(format!("answers/{}/seed{}.jsonl", set.name, ps.seed)));
            assert_eq!(answers.len(), n, "{} seed {}", set.name, ps.seed);
            let mut sum = 0.0;
            for (a, s) in answers.iter().zip(&loaded) {
                assert_eq!(a["id"].as_u64(), Some(s.id));
                let refs: Vec<String> = a["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(refs, s.references(), "references of sample {}", s.id);
                assert_eq!(a["prompt"].as_str().unwrap(), Template::Plain.prompt(s));
                let r = a["rougeL"].as_f64().unwrap();
                let want = 100.0 * rouge_l_multi(&refs, a["answer"].as_str().unwrap());
                assert!(close(r, want), "sample {}: {r} vs {want}", s.id);
                sum += r;
            }
            assert!(
                close(ps.rouge_l, sum / n as f64),
                "{}: per-seed mean",
                set.name
            );
        }
        let xs: Vec<f64> = set.per_seed.iter().map(|s| s.rouge_l).collect();
        let mean = xs.iter().sum::<f64>() / 3.0;
        let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
        assert!(
            close(set.mean, mean) && close(set.std, std),
            "{}: {xs:?}",
            set.name
        );
    }
    // The average: per seed over sets, then mean ± std over seeds.
    for (k, ps) in results.average.per_seed.iter().enumerate() {
        let want =
            (results.sets[0].per_seed[k].rouge_l + results.sets[1].per_seed[k].rouge_l) / 2.0;
        assert!(close(ps.rouge_l, want));
    }
    assert!(close(
        results.average.mean,
        (results.sets[0].mean + results.sets[1].mean) / 2.0
    ));
    let (_, std) = mean_std(
        &results
            .average
            .per_seed
            .iter()
            .map(|s| s.rouge_l)
            .collect::<Vec<_>>(),
    );
    assert!(close(results.average.std, std));

    // --json prints what results.json holds (same sets and decoding; wall time differs).
    let json_out = dir.join("run-json");
    let printed = pocl_ok(&eval_args(
        &data,
        json_out.to_str().unwrap(),
        &["--seeds", "10,20,30", "--batch-size", "4", "--json"],
    ));
    let printed: EvalReport = serde_json::from_str(&printed).unwrap();
    let saved: EvalReport =
        serde_json::from_str(&std::fs::read_to_string(json_out.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(printed, saved);
    assert_eq!(printed.sets, results.sets, "a rerun reproduces every score");
    std::fs::remove_dir_all(&dir).ok();
}

/// The gpt2 fixture with 150 extra EOS ids in generation_config.json: answers stop after a few
/// tokens, at different steps, so rows leave their batch mid-generation.
fn gpt2_early_eos(dir: &Path) -> PathBuf {
    let d = dir.join("gpt2-early-eos");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(gpt2().join(f), d.join(f)).unwrap();
    }
    let eos: Vec<u32> = (0..150).chain([600]).collect();
    std::fs::write(
        d.join("generation_config.json"),
        serde_json::json!({ "eos_token_id": eos }).to_string(),
    )
    .unwrap();
    d
}

#[test]
fn seeds_reproduce_and_batching_does_not_change_answers() {
    let dir = tmpdir("seeds");
    let (dolly, multi) = write_sets(&dir);
    let data = [dolly.to_str().unwrap(), multi.to_str().unwrap()];
    let early = gpt2_early_eos(&dir);
    for (tag, model) in [("full", gpt2()), ("early", early)] {
        let run = |name: &str, extra: &[&str]| {
            let out = dir.join(format!("{tag}-{name}"));
            pocl_ok(&eval_args_for(&model, &data, out.to_str().unwrap(), extra));
            out
        };
        let a = run("a", &["--seeds", "10,20", "--batch-size", "4"]);
        let b = run("b", &["--seeds", "10,20", "--batch-size", "1"]);
        let c = run("c", &["--seeds", "20", "--batch-size", "3"]);
        for set in ["qa", "multi"] {
            for seed in [10, 20] {
                assert_eq!(
                    answers_of(&a, set, seed),
                    answers_of(&b, set, seed),
                    "{tag} {set} seed {seed}: batch size 4 vs 1"
                );
            }
            assert_eq!(
                answers_of(&a, set, 20),
                answers_of(&c, set, 20),
                "{tag} {set}: same seed"
            );
            let (s10, s20) = (answers_of(&a, set, 10), answers_of(&a, set, 20));
            assert_ne!(
                s10, s20,
                "{tag} {set}: seeds 10 and 20 sample different answers"
            );
            if tag == "full" {
                // Twelve tokens drawn near-uniformly from 601: never equal by chance.
                assert!(s10.iter().zip(&s20).all(|(x, y)| x != y), "{s10:?} {s20:?}");
            }
        }
    }
    let lens: Vec<usize> = answers_of(&dir.join("early-a"), "qa", 10)
        .iter()
        .map(|a| a.len())
        .collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "answers should stop at different lengths: {lens:?}"
    );

    // Greedy: the seed plays no part; std over seeds is 0.
    let g = dir.join("g");
    pocl_ok(&eval_args(
        &data,
        g.to_str().unwrap(),
        &["--seeds", "1,2,3", "--greedy"],
    ));
    let results: EvalReport =
        serde_json::from_str(&std::fs::read_to_string(g.join("results.json")).unwrap()).unwrap();
    assert!(results.decoding.greedy && results.decoding.temperature.is_none());
    for set in ["qa", "multi"] {
        let first = answers_of(&g, set, 1);
        assert_eq!(first, answers_of(&g, set, 2));
        assert_eq!(first, answers_of(&g, set, 3));
    }
    assert!(results.sets.iter().all(|s| s.std == 0.0));
    std::fs::remove_dir_all(&dir).ok();
}

fn load_gpt2() -> (Box<dyn pocl::model::CausalLm>, Tokenizer) {
    let m = pocl::model::load_frozen(&gpt2(), &pocl::backend::Backend::cpu()).unwrap();
    let tok = Tokenizer::from_dir(&gpt2(), Some(600)).unwrap();
    (m, tok)
}

fn small_decoding(sampling: Sampling) -> Decoding {
    Decoding {
        sampling,
        max_new_tokens: 12,
        no_repeat_ngram: 0,
        template: Template::Plain,
        max_prompt_len: 24,
        batch_size: 3,
        eos_ids: vec![600],
    }
}

/// The greedy answers of `generate` itself, one prompt at a time.
fn reference_greedy(
    model: &dyn pocl::model::CausalLm,
    tok: &Tokenizer,
    samples: &[Sample],
    max_new: usize,
) -> Vec<String> {
    let opts = EncodeOptions {
        template: Template::Plain,
        max_prompt_len: 24,
        max_len: 512,
    };
    samples
        .iter()
        .map(|s| {
            let p = prompt_ids(tok, s, &opts).unwrap();
            let ids = generate(model, &[p], &GenerationConfig::greedy(max_new, vec![600]))
                .unwrap()
                .remove(0);
            tok.decode(&ids, true).unwrap()
        })
        .collect()
}

#[test]
fn library_api_matches_generate_and_the_report() {
    let dir = tmpdir("lib");
    let (dolly, multi) = write_sets(&dir);
    let (model, tok) = load_gpt2();
    let load = |p: &Path| load_jsonl(p, LoadOptions::default()).unwrap().samples;
    let sets = vec![
        ("qa".to_string(), load(&dolly)),
        ("multi".to_string(), load(&multi)),
    ];
    // Greedy answers are those of model::generate.
    let greedy = small_decoding(Sampling::Greedy);
    let got: Vec<String> = generate_answers(model.as_ref(), &tok, &sets[0].1, &greedy, 7)
        .unwrap()
        .into_iter()
        .map(|g| g.text)
        .collect();
    assert_eq!(got, reference_greedy(model.as_ref(), &tok, &sets[0].1, 12));

    let cfg = EvalConfig {
        seeds: vec![10, 20],
        decoding: small_decoding(Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }),
        model: None,
        verbose: false,
    };
    let report = evaluate(model.as_ref(), &tok, &sets, &cfg, None).unwrap();
    for (set, (_, samples)) in report.sets.iter().zip(&sets) {
        for ps in &set.per_seed {
            let answers =
                generate_answers(model.as_ref(), &tok, samples, &cfg.decoding, ps.seed).unwrap();
            let mean = samples
                .iter()
                .zip(&answers)
                .map(|(s, a)| 100.0 * rouge_l_multi(&s.references(), &a.text))
                .sum::<f64>()
                / samples.len() as f64;
            assert!(close(ps.rouge_l, mean), "{} seed {}", set.name, ps.seed);
        }
    }
    // Bad configurations are errors, not panics.
    let mut bad = cfg.clone();
    bad.seeds = vec![10, 10];
    assert!(evaluate(model.as_ref(), &tok, &sets, &bad, None).is_err());
    bad.seeds = vec![];
    assert!(evaluate(model.as_ref(), &tok, &sets, &bad, None).is_err());
    let empty = vec![("x".to_string(), Vec::new())];
    assert!(evaluate(model.as_ref(), &tok, &empty, &cfg, None).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_errors_are_one_clear_line() {
    let dir = tmpdir("errors");
    let (dolly, _) = write_sets(&dir);
    let out = dir.join("o");
    let (d, o) = (dolly.to_str().unwrap(), out.to_str().unwrap());
    assert_clean_error(
        &eval_args(&["/nonexistent/test.jsonl"], o, &[]),
        "/nonexistent/test.jsonl",
    );
    // gpt2 weights with another model's (larger) tokenizer.
    let mismatched = dir.join("mismatched");
    std::fs::create_dir_all(&mismatched).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(gpt2().join(f), mismatched.join(f)).unwrap();
    }
    let llama_tok = gpt2().parent().unwrap().join("llama/tokenizer.json");
    std::fs::copy(llama_tok, mismatched.join("tokenizer.json")).unwrap();
    let mut args = eval_args(&[d], o, &[]);
    args[2] = mismatched.display().to_string();
    assert_clean_error(&args, "does not belong to this model");
    std::fs::remove_file(mismatched.join("tokenizer.json")).unwrap();
    assert_clean_error(&args, "tokenizer.json not found");
    assert_clean_error(&eval_args(&[d, d], o, &[]), "two test sets are named");
    assert_clean_error(&eval_args(&[d], o, &["--seeds", "10,10"]), "listed twice");
    assert_clean_error(
        &eval_args(&[d], o, &["--temperature", "0"]),
        "--temperature",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generate_data_writes_teacher_answers_as_dolly() {
    let dir = tmpdir("gendata");
    let (dolly, multi) = write_sets(&dir);
    let out = dir.join("seqkd.jsonl");
    let base = |out: &Path, extra: &[&str]| {
        let mut a: Vec<String> = [
            "generate-data",
            "--model",
            gpt2().to_str().unwrap(),
            "--data",
            dolly.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(SMALL.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |args: Vec<String>| pocl_ok(&args);
    let summary = run(base(&out, &["--greedy", "--batch-size", "3"]));
    assert!(summary.contains("7 samples"), "{summary}");
    let input = load_jsonl(&dolly, LoadOptions::default()).unwrap().samples;
    let loaded = load_jsonl(&out, LoadOptions::default()).unwrap();
    assert_eq!(loaded.format, Format::Dolly);
    assert_eq!(loaded.samples.len(), input.len());
    let (model, tok) = load_gpt2();
    let want = reference_greedy(model.as_ref(), &tok, &input, 12);
    for ((got, src), w) in loaded.samples.iter().zip(&input).zip(&want) {
        assert_eq!(
            (&got.instruction, &got.input, &got.category),
            (&src.instruction, &src.input, &src.category)
        );
        assert_eq!(&got.response, w, "sample {}", src.id);
    }

    // Sampling (the default): reproducible by seed whatever the batch size.
    let s1 = dir.join("s1.jsonl");
    let s2 = dir.join("s2.jsonl");
    let s3 = dir.join("s3.jsonl");
    run(base(&s1, &["--batch-size", "1"]));
    run(base(&s2, &["--batch-size", "5"]));
    run(base(&s3, &["--seed", "11"]));
    let text = |p: &Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(text(&s1), text(&s2));
    assert_ne!(text(&s1), text(&s3));

    // Pre-rendered prompts cannot be written as Dolly records.
    let mut args = base(&dir.join("x.jsonl"), &[]);
    args[4] = multi.to_str().unwrap().to_string();
    assert_clean_error(&args, "cannot be written as Dolly");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn empty_teacher_answers_are_dropped_and_counted() {
    let samples: Vec<Sample> = (1..=4)
        .map(|i| {
            let mut s = Sample::new(i, format!("q{i}"), "ctx", format!("old {i}"));
            s.category = "cat".into();
            s.extra_references = vec!["x".into()];
            s
        })
        .collect();
    let g = |ids: Vec<u32>, text: &str| Generated {
        ids,
        text: text.into(),
    };
    let answers = vec![
        g(vec![5, 6, 600], "an answer"),
        g(vec![600], ""),
        g(vec![7, 8], " \n "),
        g(vec![9, 9, 9], "cut short"),
    ];
    let d = pocl::data::seqkd::teacher_data(&samples, &answers, &[600]);
    assert_eq!(d.empty, vec![2, 3]);
    assert_eq!(d.unfinished, 1);
    assert_eq!(d.tokens, 6);
    assert_eq!(d.samples.len(), 2);
    assert_eq!(d.samples[0].response, "an answer");
    assert_eq!(d.samples[1].id, 4);
    assert_eq!(
        (
            &d.samples[0].instruction[..],
            &d.samples[0].input[..],
            &d.samples[0].category[..]
        ),
        ("q1", "ctx", "cat")
    );
    assert!(d.samples[0].extra_references.is_empty());
}
