//! ROUGE-L exactly as Google's `rouge-score` computes it with
//! `RougeScorer(["rougeL"], use_stemmer=True)`, and exact match as DistiLLM computes it.
//!
//! rouge-score's tokenizer: lowercase (Python `str.lower`), every run of characters outside
//! `[a-z0-9]` becomes one space, split on whitespace, Porter-stem tokens longer than 3 characters,
//! drop empty tokens. Non-ASCII letters therefore vanish (they separate tokens), except the two
//! code points whose lowercase contains ASCII: U+0130 (-> "i" + U+0307) and the Kelvin sign (-> "k").

use super::porter;
use crate::data::jsonl::read_json_lines_strict;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// rouge-score's `tokenize.tokenize(text, stemmer)`.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    // Python lowercases the whole string; only the final-sigma rule is context dependent and
    // sigma is not ASCII, so lowercasing char by char gives the same [a-z0-9] characters.
    let mut clean = String::with_capacity(text.len());
    for c in text.chars() {
        for l in c.to_lowercase() {
            clean.push(if l.is_ascii_lowercase() || l.is_ascii_digit() {
                l
            } else {
                ' '
            });
        }
    }
    clean
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if use_stemmer && t.len() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        // rouge-score's final VALID_TOKEN_RE check: drop anything empty after stemming.
        .filter(|t| !t.is_empty())
        .collect()
}

/// Length of the longest common subsequence (two-row dynamic programme).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L precision, recall and F-measure in [0, 1] between tokenized texts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

/// rouge-score's `_score_lcs(target_tokens, prediction_tokens)`, same float operations.
pub fn score_lcs(target: &[String], prediction: &[String]) -> Score {
    if target.is_empty() || prediction.is_empty() {
        return Score {
            precision: 0.0,
            recall: 0.0,
            fmeasure: 0.0,
        };
    }
    let lcs = lcs_len(target, prediction) as f64;
    let precision = lcs / prediction.len() as f64;
    let recall = lcs / target.len() as f64;
    let fmeasure = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Score {
        precision,
        recall,
        fmeasure,
    }
}

/// ROUGE-L F-measure in [0, 1] of `prediction` against one reference (stemmer on).
pub fn rouge_l(reference: &str, prediction: &str) -> f64 {
    score_lcs(&tokenize(reference, true), &tokenize(prediction, true)).fmeasure
}

/// The best F-measure over several references (DistiLLM's `metric_max_over_ground_truths`).
/// Returns 0 for no references.
pub fn rouge_l_multi<S: AsRef<str>>(references: &[S], prediction: &str) -> f64 {
    let pred = tokenize(prediction, true);
    references
        .iter()
        .map(|r| score_lcs(&tokenize(r.as_ref(), true), &pred).fmeasure)
        .fold(0.0, f64::max)
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// DistiLLM's `normalize_answer`: lowercase, drop ASCII punctuation, collapse whitespace
/// (articles are kept, unlike SQuAD).
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split(is_py_space)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// DistiLLM's exact match, maximised over the references.
pub fn exact_match<S: AsRef<str>>(references: &[S], prediction: &str) -> bool {
    let p = normalize_answer(prediction);
    references.iter().any(|r| normalize_answer(r.as_ref()) == p)
}

/// Corpus-level results, percentages (×100) as DistiLLM reports them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CorpusScores {
    /// Mean ROUGE-L F1 ×100 (computed as 100 · Σf / n, DistiLLM's order of operations).
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    /// Exact-match rate ×100.
    pub exact_match: f64,
    /// Per-sample ROUGE-L F1 ×100.
    pub scores: Vec<f64>,
}

/// Scores every prediction against its references. Line counts must match and every sample
/// needs at least one reference.
pub fn score_corpus<S: AsRef<str>>(
    predictions: &[S],
    references: &[Vec<S>],
) -> Result<CorpusScores> {
    if predictions.len() != references.len() {
        bail!(
            "{} predictions but {} references: the files must have one line per sample",
            predictions.len(),
            references.len()
        );
    }
    let (mut sum, mut em) = (0.0f64, 0usize);
    let mut scores = Vec::with_capacity(predictions.len());
    for (i, (p, refs)) in predictions.iter().zip(references).enumerate() {
        if refs.is_empty() {
            bail!("sample {}: empty list of references", i + 1);
        }
        let f = rouge_l_multi(refs, p.as_ref());
        sum += f;
        em += exact_match(refs, p.as_ref()) as usize;
        scores.push(100.0 * f);
    }
    let n = predictions.len().max(1) as f64;
    Ok(CorpusScores {
        rouge_l: 100.0 * sum / n,
        exact_match: 100.0 * em as f64 / n,
        scores,
    })
}

/// Reads a predictions file: one JSON string per line.
pub fn read_predictions(path: &Path) -> Result<Vec<String>> {
    read_json_lines_strict(path, false)?
        .into_iter()
        .map(|l| match l.value {
            serde_json::Value::String(s) => Ok(s),
            _ => bail!("{}:{}: expected a JSON string", path.display(), l.line),
        })
        .collect()
}

/// Reads a references file: one JSON string or array of strings per line.
pub fn read_references(path: &Path) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for l in read_json_lines_strict(path, false)? {
        let bad = || {
            anyhow!(
                "{}:{}: expected a JSON string or a non-empty array of strings",
                path.display(),
                l.line
            )
        };
        out.push(match &l.value {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_>>()?,
            _ => return Err(bad()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_matches_rouge_score_rules() {
        assert_eq!(
            tokenize("The Runners were RUNNING!", true),
            ["the", "runner", "were", "run"]
        );
        assert_eq!(tokenize("  café--x ", false), ["caf", "x"]);
        assert_eq!(
            tokenize("İstanbul \u{212A}elvin", false),
            ["i", "stanbul", "kelvin"]
        );
        assert!(tokenize("", true).is_empty());
    }

    #[test]
    fn lcs_and_f() {
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3]), 2);
        let f = rouge_l("the cat sat on the mat", "the cat on the mat");
        assert!((f - 2.0 * 1.0 * (5.0 / 6.0) / (1.0 + 5.0 / 6.0)).abs() < 1e-15);
        assert_eq!(rouge_l("", "x"), 0.0);
    }

    #[test]
    fn exact_match_normalizes() {
        assert!(exact_match(&["The  answer."], "the answer"));
        assert!(!exact_match(&["an answer"], "answer"));
    }
}
