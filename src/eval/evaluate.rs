//! The evaluation protocol of POCL.md §5 (DistiLLM's): for every test set and every generation
//! seed, answer each prompt, score it with ROUGE-L F1 ×100 (best over the sample's references),
//! average over the samples; then report mean ± std over the seeds, and the average over sets.
//!
//! Reproducibility: every sample draws from its own RNG, seeded from (seed, sample id) by
//! [`sample_seed`], so an answer depends only on the model, the prompt, the decoding settings and
//! that pair, never on the batch size or on which prompts share its batch. Prompts are generated
//! in batches of similar length for speed ([`batched_by_length`], which the difficulty measurer
//! uses too).
//!
//! The std over seeds is the sample standard deviation (ddof = 1, numpy's `std(ddof=1)`), the
//! usual estimate from 5 seeds; it is 0 for a single seed.

use crate::data::{prompt_ids, EncodeOptions, Sample, Template};
use crate::eval::rouge_l_multi;
use crate::model::generate::{generate_seeded_rows, GenerationConfig, Sampling};
use crate::model::CausalLm;
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// How answers are produced: prompt rendering and decoding.
#[derive(Clone, Debug)]
pub struct Decoding {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// transformers' no_repeat_ngram_size (0 = off).
    pub no_repeat_ngram: usize,
    pub template: Template,
    /// Prompt tokens kept (the first ones, as in training; see `data::batch::prompt_ids`).
    pub max_prompt_len: usize,
    /// Prompts generated together; does not change any answer, only the speed.
    pub batch_size: usize,
    /// A row stops after one of these; empty = the model config's `eos_token_id`s. Callers that
    /// have the model directory should pass `pipeline::eos_ids` (adds generation_config.json).
    pub eos_ids: Vec<u32>,
}

impl Decoding {
    /// The paper's evaluation decoding: sampling at T = 1, top-k 0, top-p 1, no_repeat_ngram 6,
    /// 256 new tokens, Alpaca prompts cut to 256 tokens.
    pub fn paper() -> Self {
        Decoding {
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            max_new_tokens: 256,
            no_repeat_ngram: 6,
            template: Template::Alpaca,
            max_prompt_len: 256,
            batch_size: 16,
            eos_ids: Vec::new(),
        }
    }

    /// The settings as written to results.json.
    pub fn record(&self) -> DecodingRecord {
        let (greedy, temperature, top_k, top_p) = match self.sampling {
            Sampling::Greedy => (true, None, None, None),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
            } => (false, Some(temperature), Some(top_k), Some(top_p)),
        };
        DecodingRecord {
            greedy,
            temperature,
            top_k,
            top_p,
            no_repeat_ngram: self.no_repeat_ngram,
            max_new_tokens: self.max_new_tokens,
            template: format!("{:?}", self.template).to_lowercase(),
            max_prompt_len: self.max_prompt_len,
            batch_size: self.batch_size,
            eos_ids: self.eos_ids.clone(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.max_new_tokens == 0 || self.max_prompt_len == 0 {
            bail!("batch_size, max_new_tokens and max_prompt_len must be at least 1");
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = self.sampling
        {
            // Written so that NaN is rejected too.
            let valid = temperature > 0.0 && top_p > 0.0 && top_p <= 1.0;
            if !valid {
                bail!(
                    "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p}); \
                     use greedy decoding for argmax"
                );
            }
        }
        Ok(())
    }
}

/// [`Decoding`] in serialisable form (temperature, top-k and top-p are absent when greedy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecodingRecord {
    pub greedy: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub top_p: Option<f64>,
    pub no_repeat_ngram: usize,
    pub max_new_tokens: usize,
    pub template: String,
    pub max_prompt_len: usize,
    pub batch_size: usize,
    pub eos_ids: Vec<u32>,
}

/// An evaluation: seeds, decoding, and what to record.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Generation seeds (the paper: 10, 20, 30, 40, 50).
    pub seeds: Vec<u64>,
    pub decoding: Decoding,
    /// Recorded in results.json (e.g. the model directory).
    pub model: Option<String>,
    /// One progress line per (set, seed) on stderr.
    pub verbose: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            seeds: vec![10, 20, 30, 40, 50],
            decoding: Decoding::paper(),
            model: None,
            verbose: false,
        }
    }
}

/// One generated answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// New tokens, EOS included when produced.
    pub ids: Vec<u32>,
    /// Decoded without special tokens (as DistiLLM's `batch_decode(skip_special_tokens=True)`).
    pub text: String,
}

/// One line of `answers/<set>/seed<S>.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    /// The rendered prompt text (before truncation to `max_prompt_len` tokens).
    pub prompt: String,
    pub answer: String,
    pub references: Vec<String>,
    /// ROUGE-L F1 ×100, best over the references.
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
}

/// One seed's mean ROUGE-L ×100 over a set (or over the sets' means, for the average).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedScore {
    pub seed: u64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetReport {
    pub name: String,
    /// Samples scored.
    pub n: usize,
    pub per_seed: Vec<SeedScore>,
    /// Mean over seeds of the per-seed means.
    pub mean: f64,
    /// Sample std (ddof = 1) over seeds; 0 for one seed.
    pub std: f64,
}

/// The average over sets: per seed, the mean of the sets' per-seed means; then mean ± std over
/// seeds (`mean` equals the mean of the sets' means).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Average {
    pub per_seed: Vec<SeedScore>,
    pub mean: f64,
    pub std: f64,
}

/// Everything results.json holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model: Option<String>,
    pub sets: Vec<SetReport>,
    pub average: Average,
    pub seeds: Vec<u64>,
    pub decoding: DecodingRecord,
    pub wall_time_s: f64,
}

impl EvalReport {
    /// A plain-text table: set | mean ± std | n, then the average.
    pub fn table(&self) -> String {
        let w = self
            .sets
            .iter()
            .map(|s| s.name.chars().count())
            .chain([7])
            .max()
            .unwrap_or(7);
        let mut out = format!("{:<w$}  {:>15}  {:>6}\n", "set", "ROUGE-L", "n");
        for s in &self.sets {
            let ms = format!("{:.2} ± {:.2}", s.mean, s.std);
            out += &format!("{:<w$}  {:>15}  {:>6}\n", s.name, ms, s.n);
        }
        let ms = format!("{:.2} ± {:.2}", self.average.mean, self.average.std);
        out += &format!("{:<w$}  {:>15}  {:>6}\n", "average", ms, "");
        out
    }
}

/// Mean and sample standard deviation (ddof = 1; 0 for fewer than two values).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The RNG seed of one sample under one generation seed (two SplitMix64 rounds, so nearby seeds
/// and ids give unrelated streams).
pub fn sample_seed(seed: u64, id: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(seed) ^ id)
}

/// Fails when the tokenizer can produce ids the model has no embedding for (a model padded to a
/// larger vocabulary than its tokenizer is fine).
pub fn check_tokenizer(model: &dyn CausalLm, tok: &Tokenizer) -> Result<()> {
    let vocab = model.config().vocab_size;
    if tok.vocab_size() > vocab {
        bail!(
            "the tokenizer has {} tokens but the model only {vocab}: tokenizer.json does not belong to this model",
            tok.vocab_size()
        );
    }
    Ok(())
}

/// Prompt token ids of every sample, checked against the model: the tokenizer must fit the
/// model's vocabulary. Prompts longer than the model's positions allow are cut by generation
/// (`model::context`).
pub fn prepare_prompts(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    samples: &[Sample],
    dec: &Decoding,
) -> Result<Vec<Vec<u32>>> {
    dec.validate()?;
    check_tokenizer(model, tok)?;
    let opts = EncodeOptions {
        template: dec.template,
        max_prompt_len: dec.max_prompt_len,
        max_len: dec.max_prompt_len + dec.max_new_tokens,
    };
    samples
        .iter()
        .map(|s| {
            let ids = prompt_ids(tok, s, &opts)?;
            if ids.is_empty() {
                bail!("sample {}: the prompt is empty", s.id);
            }
            Ok(ids)
        })
        .collect()
}

/// Generates an answer to every prompt (`ids[i]` is prompt i's sample id, which seeds its RNG
/// with [`sample_seed`]). Batches group prompts of similar length; the output is in input order.
pub fn generate_prepared(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    ids: &[u64],
    dec: &Decoding,
    seed: u64,
) -> Result<Vec<Generated>> {
    generate_prepared_with_progress(model, tok, prompts, ids, dec, seed, &mut |_| {})
}

/// [`generate_prepared`], calling `progress(done)` after each batch with the prompts answered so far.
pub fn generate_prepared_with_progress(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    ids: &[u64],
    dec: &Decoding,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Generated>> {
    dec.validate()?;
    if prompts.len() != ids.len() {
        bail!("{} prompts but {} sample ids", prompts.len(), ids.len());
    }
    let gc = GenerationConfig {
        max_new_tokens: dec.max_new_tokens,
        sampling: dec.sampling.clone(),
        no_repeat_ngram: dec.no_repeat_ngram,
        eos_ids: if dec.eos_ids.is_empty() {
            model.config().eos_token_ids.clone()
        } else {
            dec.eos_ids.clone()
        },
        seed,
    };
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    batched_by_length(&lens, dec.batch_size, progress, |batch| {
        let rows: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].clone()).collect();
        let seeds: Vec<u64> = batch.iter().map(|&i| sample_seed(seed, ids[i])).collect();
        generate_seeded_rows(model, &rows, &gc, &seeds)?
            .into_iter()
            .map(|new| {
                let text = tok.decode(&new, true)?;
                Ok(Generated { ids: new, text })
            })
            .collect()
    })
}

/// Answers prompts in batches of at most `batch_size` (at least 1) prompts of similar length:
/// sorted by token count, ties by position, so a batch holds little padding. `answer(positions)`
/// answers the prompts at `positions`, one result each in that order; `progress(done)` follows
/// each batch with the number answered so far. Returns the results in input order.
pub fn batched_by_length<T>(
    prompt_lens: &[usize],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
    mut answer: impl FnMut(&[usize]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut order: Vec<usize> = (0..prompt_lens.len()).collect();
    order.sort_by_key(|&i| (prompt_lens[i], i));
    let mut out: Vec<Option<T>> = (0..prompt_lens.len()).map(|_| None).collect();
    let mut done = 0;
    for batch in order.chunks(batch_size.max(1)) {
        let results = answer(batch)?;
        if results.len() != batch.len() {
            bail!(
                "{} answers to a batch of {} prompts",
                results.len(),
                batch.len()
            );
        }
        for (&i, r) in batch.iter().zip(results) {
            out[i] = Some(r);
        }
        done += batch.len();
        progress(done);
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every prompt answered"))
        .collect())
}

/// [`prepare_prompts`] then [`generate_prepared`]: one answer per sample, in sample order.
pub fn generate_answers(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    samples: &[Sample],
    dec: &Decoding,
    seed: u64,
) -> Result<Vec<Generated>> {
    let prompts = prepare_prompts(model, tok, samples, dec)?;
    let ids: Vec<u64> = samples.iter().map(|s| s.id).collect();
    generate_prepared(model, tok, &prompts, &ids, dec, seed)
}

/// Scores answers against the samples' references.
pub fn score_answers(samples: &[Sample], answers: &[Generated], dec: &Decoding) -> Vec<Answer> {
    samples
        .iter()
        .zip(answers)
        .map(|(s, g)| {
            let refs = s.references();
            Answer {
                id: s.id,
                prompt: dec.template.prompt(s),
                answer: g.text.clone(),
                references: refs.iter().map(|r| r.to_string()).collect(),
                rouge_l: 100.0 * rouge_l_multi(&refs, &g.text),
            }
        })
        .collect()
}

/// A set name as a directory name: characters outside `[A-Za-z0-9._-]` become `_`.
pub fn set_dir_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "_".into()
    } else {
        s
    }
}

/// Runs the protocol on every (name, samples) set. With `out`, writes
/// `out/answers/<set>/seed<S>.jsonl` (one [`Answer`] per sample, written as each seed finishes)
/// and `out/results.json` (the returned report), each atomically.
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    sets: &[(String, Vec<Sample>)],
    cfg: &EvalConfig,
    out: Option<&Path>,
) -> Result<EvalReport> {
    let start = Instant::now();
    if cfg.seeds.is_empty() {
        bail!("give at least one generation seed");
    }
    if let Some(d) = cfg
        .seeds
        .iter()
        .enumerate()
        .find(|(i, s)| cfg.seeds[..*i].contains(s))
    {
        bail!("seed {} is listed twice", d.1);
    }
    if sets.is_empty() {
        bail!("no test set to evaluate");
    }
    check_tokenizer(model, tok)?;
    let mut dirs: Vec<String> = Vec::new();
    for (name, samples) in sets {
        if samples.is_empty() {
            bail!("test set {name:?} has no samples");
        }
        let d = set_dir_name(name);
        if dirs.contains(&d) {
            bail!("two test sets are named {name:?} (answer directory {d:?}): rename one");
        }
        dirs.push(d);
    }
    // Tokenize and check every set before the first (long) generation.
    let prompts: Vec<Vec<Vec<u32>>> = sets
        .iter()
        .map(|(name, samples)| {
            prepare_prompts(model, tok, samples, &cfg.decoding)
                .with_context(|| format!("test set {name:?}"))
        })
        .collect::<Result<_>>()?;
    if let Some(o) = out {
        crate::create_dir_all(o)?;
    }
    let greedy = cfg.decoding.sampling == Sampling::Greedy;
    // One progress over every generation of the evaluation (greedy decoding generates once).
    let runs = if greedy { 1 } else { cfg.seeds.len() };
    let total = runs * sets.iter().map(|s| s.1.len()).sum::<usize>();
    let label = format!("eval {}", cfg.model.as_deref().unwrap_or("model"));
    let mut bar = Progress::new(label, total);
    let mut answered = 0;
    let mut reports = Vec::with_capacity(sets.len());
    for (((name, samples), prompts), dir) in sets.iter().zip(&prompts).zip(&dirs) {
        let ids: Vec<u64> = samples.iter().map(|s| s.id).collect();
        let mut per_seed = Vec::with_capacity(cfg.seeds.len());
        let mut greedy_answers: Option<Vec<Generated>> = None;
        for &seed in &cfg.seeds {
            let t0 = Instant::now();
            // Greedy decoding ignores the seed: generate once, score once per seed.
            let answers = match &greedy_answers {
                Some(a) => a.clone(),
                None => {
                    let a = generate_prepared_with_progress(
                        model,
                        tok,
                        prompts,
                        &ids,
                        &cfg.decoding,
                        seed,
                        &mut |d| bar.set(answered + d, &format!("{name} seed {seed}")),
                    )
                    .with_context(|| format!("test set {name:?}, seed {seed}"))?;
                    answered += ids.len();
                    if greedy {
                        greedy_answers = Some(a.clone());
                    }
                    a
                }
            };
            let scored = score_answers(samples, &answers, &cfg.decoding);
            let mean = scored.iter().map(|a| a.rouge_l).sum::<f64>() / scored.len() as f64;
            if let Some(o) = out {
                let d = o.join("answers").join(dir);
                crate::create_dir_all(&d)?;
                let mut text = String::new();
                for a in &scored {
                    text += &serde_json::to_string(a)?;
                    text.push('\n');
                }
                crate::write_atomic(&d.join(format!("seed{seed}.jsonl")), text.as_bytes())?;
            }
            if cfg.verbose {
                eprintln!(
                    "{name} seed {seed}: ROUGE-L {mean:.2} over {} samples ({:.1} s)",
                    scored.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
            per_seed.push(SeedScore {
                seed,
                rouge_l: mean,
            });
        }
        let (mean, std) = mean_std(&per_seed.iter().map(|s| s.rouge_l).collect::<Vec<_>>());
        reports.push(SetReport {
            name: name.clone(),
            n: samples.len(),
            per_seed,
            mean,
            std,
        });
    }
    let avg_per_seed: Vec<SeedScore> = cfg
        .seeds
        .iter()
        .enumerate()
        .map(|(k, &seed)| SeedScore {
            seed,
            rouge_l: reports.iter().map(|r| r.per_seed[k].rouge_l).sum::<f64>()
                / reports.len() as f64,
        })
        .collect();
    let (mean, std) = mean_std(&avg_per_seed.iter().map(|s| s.rouge_l).collect::<Vec<_>>());
    let mut decoding = cfg.decoding.record();
    if decoding.eos_ids.is_empty() {
        decoding.eos_ids = model.config().eos_token_ids.clone();
    }
    let report = EvalReport {
        model: cfg.model.clone(),
        sets: reports,
        average: Average {
            per_seed: avg_per_seed,
            mean,
            std,
        },
        seeds: cfg.seeds.clone(),
        decoding,
        wall_time_s: start.elapsed().as_secs_f64(),
    };
    if let Some(o) = out {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        crate::write_atomic(&o.join("results.json"), json.as_bytes())?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_is_the_sample_std() {
        assert_eq!(mean_std(&[]), (0.0, 0.0));
        assert_eq!(mean_std(&[3.5]), (3.5, 0.0));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        // numpy.std([1, 2, 3, 4], ddof=1) = sqrt(5/3)
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
    }

    #[test]
    fn sample_seeds_differ_by_seed_and_id() {
        let mut all: Vec<u64> = (0..50)
            .flat_map(|seed| (0..50).map(move |id| sample_seed(seed, id)))
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2500);
        assert_eq!(sample_seed(10, 3), sample_seed(10, 3));
    }

    #[test]
    fn length_batches_group_similar_prompts_and_keep_input_order() {
        let lens = [5, 1, 3, 1, 9];
        let mut batches = Vec::new();
        let mut seen = Vec::new();
        let out = batched_by_length(&lens, 2, &mut |done| seen.push(done), |batch| {
            batches.push(batch.to_vec());
            Ok(batch.iter().map(|&i| i * 10).collect())
        })
        .unwrap();
        assert_eq!(out, vec![0, 10, 20, 30, 40], "results in input order");
        assert_eq!(
            batches,
            vec![vec![1, 3], vec![2, 0], vec![4]],
            "by length, ties by position"
        );
        assert_eq!(seen, vec![2, 4, 5]);
    }

    #[test]
    fn set_names_become_safe_directory_names() {
        assert_eq!(set_dir_name("test_id"), "test_id");
        assert_eq!(set_dir_name("a/b c"), "a_b_c");
        assert_eq!(set_dir_name(".."), "_");
        assert_eq!(set_dir_name(""), "_");
    }
}
