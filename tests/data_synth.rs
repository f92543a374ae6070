//! The built-in benchmark: deterministic per seed, disjoint splits, answers that are exact
//! functions of the prompt, difficulty knobs that do what they say, and a usable tokenizer.

use pocl::data::synthetic::{
    generate, make_sample, number_words, write_benchmark, Family, Phrasing, SynthConfig, SynthData,
};
use pocl::data::{encode_samples, load_jsonl, EncodeOptions, LoadOptions, Sample, Template};
use rand::SeedableRng;
use std::collections::HashSet;
use std::path::PathBuf;

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        n_train: 1000,
        n_dev: 100,
        n_test: 100,
        vocab_size: 1024,
    }
}

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("synth-{name}-{}", std::process::id()))
}

fn key(s: &Sample) -> (String, String) {
    (s.instruction.clone(), s.input.clone())
}

#[test]
fn deterministic_per_seed() {
    let (a, b, c) = (
        generate(&small(1)).unwrap(),
        generate(&small(1)).unwrap(),
        generate(&small(2)).unwrap(),
    );
    for ((_, x), (_, y)) in a.splits().iter().zip(b.splits().iter()) {
        assert_eq!(x, y);
    }
    assert_ne!(a.train, c.train);
}

#[test]
fn splits_are_disjoint_balanced_and_shaped_as_intended() {
    let d: SynthData = generate(&SynthConfig::default()).unwrap();
    let sizes: Vec<usize> = d.splits().iter().map(|(_, s)| s.len()).collect();
    assert_eq!(sizes, [4000, 200, 200, 200, 200]);
    let mut all = HashSet::new();
    for (name, part) in d.splits() {
        for s in part {
            assert!(all.insert(key(s)), "{name}: prompt appears twice: {s:?}");
        }
        let fams: HashSet<&str> = part.iter().map(|s| s.category.as_str()).collect();
        assert_eq!(fams.len(), 10, "{name}: every family present");
        assert_eq!(
            part.iter().map(|s| s.id).collect::<Vec<_>>(),
            (1..=part.len() as u64).collect::<Vec<_>>()
        );
    }
    // Every fact a held-out answer states is stated somewhere in training (it can be memorised).
    let facts = |part: &[Sample]| -> HashSet<String> {
        part.iter()
            .filter(|s| s.category == "fact" || s.category == "describe")
            .flat_map(|s| {
                s.response
                    .split_inclusive(". ")
                    .map(|x| x.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let known = facts(&d.train);
    assert_eq!(known.len(), 24 * 5);
    for (name, part) in d.splits().into_iter().skip(1) {
        assert!(facts(part).is_subset(&known), "{name}");
    }
    // Unseen phrasings really are unseen: no test_phrasing instruction occurs in training.
    let train_instr: HashSet<&str> = d.train.iter().map(|s| s.instruction.as_str()).collect();
    for s in &d.test_phrasing {
        assert!(!train_instr.contains(s.instruction.as_str()), "{s:?}");
    }
    // Long inputs: per family, every test_long answer is longer than the mean train answer and
    // the longest input exceeds every training input.
    for f in Family::ALL {
        let pick = |part: &[Sample]| -> Vec<Sample> {
            part.iter()
                .filter(|s| s.category == f.name())
                .cloned()
                .collect()
        };
        let (tr, lo) = (pick(&d.train), pick(&d.test_long));
        let words = |s: &Sample| s.input.split_whitespace().count();
        let mean = |v: &[Sample], g: &dyn Fn(&Sample) -> usize| {
            v.iter().map(g).sum::<usize>() as f64 / v.len() as f64
        };
        if f == Family::Count {
            assert!(
                lo.iter().map(words).min() > tr.iter().map(words).max(),
                "{f:?}"
            );
        } else {
            assert!(
                mean(&lo, &|s| s.response.len()) > 1.3 * mean(&tr, &|s| s.response.len()),
                "{f:?}"
            );
        }
    }
}

#[test]
fn answers_are_exact_functions_of_the_prompt() {
    let d = generate(&small(5)).unwrap();
    for s in d.splits().iter().flat_map(|(_, p)| p.iter()) {
        let w: Vec<&str> = s.input.split(' ').collect();
        match s.category.as_str() {
            "copy" => assert_eq!(s.response, s.input),
            "uppercase" => assert_eq!(s.response, s.input.to_uppercase()),
            "reverse" => assert_eq!(
                s.response,
                w.iter().rev().copied().collect::<Vec<_>>().join(" ")
            ),
            "sort" => {
                let mut v: Vec<u32> = w.iter().map(|x| x.parse().unwrap()).collect();
                v.sort();
                assert_eq!(
                    s.response,
                    v.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            "count" => assert_eq!(s.response.split(' ').next().unwrap(), w.len().to_string()),
            "arithmetic" => {
                let mut total: i64 = w[0].parse().unwrap();
                for op in w[1..].chunks(2) {
                    let x: i64 = op[1].parse().unwrap();
                    total += if op[0] == "+" { x } else { -x };
                }
                assert!(total >= 0);
                assert_eq!(s.response, format!("{} = {total}", s.input));
            }
            "spell" => assert_eq!(s.response, number_words(s.input.parse().unwrap())),
            "acronym" => assert_eq!(
                s.response,
                w.iter().map(|x| &x[..1]).collect::<Vec<_>>().join(" ")
            ),
            "fact" | "describe" => assert!(s.input.is_empty() && s.response.ends_with('.')),
            other => panic!("unknown family {other}"),
        }
    }
    // The fact table is consistent: the same question always gets the same answer.
    let mut answers = std::collections::HashMap::new();
    for s in d
        .splits()
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|s| s.category == "fact")
    {
        for sent in s.response.split_inclusive(". ") {
            let sent = sent.trim();
            let subject = sent.rsplit_once(' ').unwrap().0.to_string();
            let prev = answers.insert(subject.clone(), sent.to_string());
            assert!(prev.is_none_or(|p| p == sent), "{subject}");
        }
    }
}

#[test]
fn difficulty_knobs_change_answer_length() {
    let facts = pocl::data::synthetic::fact_table();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for f in Family::ALL {
        let levels: Vec<usize> = f.train_levels().chain(f.long_levels()).collect();
        let mut prev = 0.0;
        for &level in &levels {
            let samples: Vec<Sample> = (0..40)
                .map(|_| make_sample(f, level, Phrasing::Seen, &facts, &mut rng))
                .collect();
            let mean_chars = samples.iter().map(|s| s.response.len()).sum::<usize>() as f64 / 40.0;
            let sentences = |s: &Sample| s.response.matches(". ").count() + 1;
            match f {
                Family::Copy
                | Family::Uppercase
                | Family::Reverse
                | Family::Sort
                | Family::Acronym => {
                    assert!(
                        samples
                            .iter()
                            .all(|s| s.response.split(' ').count() == level),
                        "{f:?} {level}"
                    )
                }
                Family::Count => {
                    assert!(samples.iter().all(|s| s.input.split(' ').count() == level))
                }
                Family::Fact | Family::Describe => assert!(
                    samples.iter().all(|s| sentences(s) == level),
                    "{f:?} {level}"
                ),
                // More digits: longer results and longer number words.
                Family::Arithmetic | Family::Spell => {
                    assert!(mean_chars > prev, "{f:?} {level}: {mean_chars} <= {prev}")
                }
            }
            if f != Family::Count {
                assert!(
                    mean_chars > prev,
                    "{f:?}: answers do not grow at level {level}"
                );
            }
            prev = mean_chars;
        }
    }
    assert_eq!(number_words(0), "zero");
    assert_eq!(number_words(115), "one hundred fifteen");
    assert_eq!(number_words(40), "forty");
    assert_eq!(number_words(12005), "twelve thousand five");
    assert_eq!(
        number_words(999_999),
        "nine hundred ninety-nine thousand nine hundred ninety-nine"
    );
}

#[test]
fn written_benchmark_and_tokenizer() {
    let dir = tmp("written");
    let cfg = SynthConfig::default();
    let summary = write_benchmark(&dir, &cfg).unwrap();
    assert!(
        summary.vocab_size > 800 && summary.vocab_size <= cfg.vocab_size,
        "{}",
        summary.vocab_size
    );
    let tok = pocl::tokenizer::Tokenizer::from_dir(&dir, None).unwrap();
    assert_eq!(tok.eos_id, Some(0));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    let mem = generate(&cfg).unwrap();
    for (name, part) in mem.splits() {
        let loaded =
            load_jsonl(&dir.join(format!("{name}.jsonl")), LoadOptions::default()).unwrap();
        assert_eq!(loaded.format, pocl::data::Format::Dolly);
        assert_eq!(loaded.samples, part, "{name} reads back as generated");
        // Sizes suited to tiny models: prompts short with the Alpaca template, answers mostly
        // within 40 tokens (the long test set is allowed to be longer).
        let enc = encode_samples(&tok, &loaded.samples, &EncodeOptions::default()).unwrap();
        assert!(enc.skipped.is_empty());
        let within = |limit: usize, f: &dyn Fn(&pocl::data::Example) -> usize| {
            enc.examples.iter().filter(|e| f(e) <= limit).count() as f64 / enc.examples.len() as f64
        };
        assert!(
            within(80, &|e| e.prompt_ids.len()) >= 0.99,
            "{name}: prompts"
        );
        if name != "test_long" {
            assert!(
                within(40, &|e| e.response_ids.len()) >= 0.95,
                "{name}: answers"
            );
        }
        let plain = EncodeOptions {
            template: Template::Plain,
            ..Default::default()
        };
        let s = &loaded.samples[0];
        let e = pocl::data::encode_sample(&tok, s, &plain).unwrap().unwrap();
        let text = tok
            .decode(
                &[e.prompt_ids.clone(), e.response_ids.clone()].concat(),
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            format!("{}{}", Template::Plain.prompt(s), s.response),
            "byte-level round trip"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn synth_command_is_deterministic_across_processes() {
    let run = |out: &PathBuf, seed: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pocl"))
            .args([
                "data",
                "synth",
                "--out",
                out.to_str().unwrap(),
                "--seed",
                seed,
                "--train",
                "600",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (a, b, c) = (tmp("cli-a"), tmp("cli-b"), tmp("cli-c"));
    run(&a, "3");
    run(&b, "3");
    run(&c, "4");
    for f in [
        "train.jsonl",
        "dev.jsonl",
        "test_id.jsonl",
        "test_long.jsonl",
        "test_phrasing.jsonl",
        "tokenizer.json",
        "facts.json",
    ] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between two runs with the same seed");
        if f == "train.jsonl" {
            assert_ne!(x, std::fs::read(c.join(f)).unwrap());
        }
    }
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).ok();
    }
}
