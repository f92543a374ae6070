//! The difficulty measurer (POCL.md §2): for every training sample, the student's ROUGE-L of its
//! greedy answer and its teacher-forced cross-entropy of the reference response. The student is
//! the checkpoint training starts from; the teacher is not used.

use super::fuse::{fuse, Metric, Scored};
use crate::data::{collate, Example};
use crate::eval::evaluate::batched_by_length;
use crate::eval::rouge::rouge_l_multi;
use crate::model::generate::{generate, GenerationConfig};
use crate::model::{CausalLm, Input};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, D};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct MeasureConfig {
    /// Greedy answers of up to this many tokens (paper: 256).
    pub max_new_tokens: usize,
    /// no_repeat_ngram_size of the answers (paper: 6).
    pub no_repeat_ngram: usize,
    /// Samples per generation / forward batch.
    pub batch_size: usize,
    pub metric: Metric,
    pub rrf_k: f64,
    pub buckets: usize,
}

impl MeasureConfig {
    /// Refuses settings without a meaning; `key` turns a field name into the name the user
    /// wrote (a recipe key or a flag).
    // `!(x > 0.0)` is deliberate: it also rejects NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<()> {
        if !(self.rrf_k > 0.0 && self.rrf_k.is_finite()) {
            bail!(
                "{}: must be a finite number > 0 (got {}); the paper uses 60",
                key("rrf_k"),
                self.rrf_k
            );
        }
        if self.max_new_tokens == 0 && self.metric != Metric::Ce {
            bail!(
                "{}: must be at least 1 to score answers by ROUGE-L (or measure with metric \"ce\" alone)",
                key("max_new_tokens")
            );
        }
        if self.batch_size == 0 {
            bail!("{}: must be at least 1", key("batch_size"));
        }
        if self.buckets == 0 {
            bail!("{}: must be at least 1", key("buckets"));
        }
        Ok(())
    }
}

impl Default for MeasureConfig {
    fn default() -> Self {
        MeasureConfig {
            max_new_tokens: 256,
            no_repeat_ngram: 6,
            batch_size: 16,
            metric: Metric::Both,
            rrf_k: 60.0,
            buckets: 4,
        }
    }
}

/// Mean cross-entropy of each example's response tokens, teacher-forced on its prompt.
pub fn response_ce(
    model: &dyn CausalLm,
    examples: &[Example],
    pad_id: u32,
    batch_size: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = collate(&chunk.iter().collect::<Vec<_>>(), pad_id)?
            .to_device(&model.backend().device)?;
        let input = Input {
            ids: &b.input_ids,
            positions: &b.position_ids,
            key_mask: &b.attention_mask,
        };
        let logits = model.logits(&input, None)?.detach();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&b.labels.unsqueeze(2)?, 2)?.squeeze(2)?.neg()?; // [b, t]
        let mask = b.loss_mask.to_dtype(DType::F32)?;
        let sums = (nll * &mask)?.sum(1)?.to_vec1::<f32>()?;
        let counts = mask.sum(1)?.to_vec1::<f32>()?;
        for ((s, c), e) in sums.iter().zip(&counts).zip(chunk) {
            // NaN marks "no response tokens" (ranked hardest by `fuse`); a non-finite loss of
            // counted tokens is the model's fault and must not be ranked as a difficulty.
            if *c > 0.0 && !s.is_finite() {
                bail!(
                    "sample {}: the model's cross-entropy is {s} (non-finite logits); the model's weights or activations overflow",
                    e.id
                );
            }
            out.push(if *c > 0.0 {
                *s as f64 / *c as f64
            } else {
                f64::NAN
            });
        }
    }
    Ok(out)
}

/// Greedy answers to every example's prompt, decoded, in input order (generated in batches of
/// similar length: `eval::evaluate::batched_by_length`).
pub fn answers(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    examples: &[Example],
    cfg: &GenerationConfig,
    batch_size: usize,
) -> Result<Vec<String>> {
    let lens: Vec<usize> = examples.iter().map(|e| e.prompt_ids.len()).collect();
    let mut bar = crate::progress::Progress::new("difficulty: student answers", lens.len());
    batched_by_length(&lens, batch_size, &mut |done| bar.set(done, ""), |batch| {
        let prompts: Vec<Vec<u32>> = batch
            .iter()
            .map(|&i| examples[i].prompt_ids.clone())
            .collect();
        generate(model, &prompts, cfg)?
            .iter()
            .map(|ids| tok.decode(ids, true))
            .collect()
    })
}

/// Scores every example (`references[i]` holds the acceptable answers of `examples[i]`; ROUGE-L
/// takes the best) and returns the samples easiest first with ranks, RRF score and bucket.
pub fn measure(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    examples: &[Example],
    references: &[Vec<String>],
    eos_ids: &[u32],
    pad_id: u32,
    cfg: &MeasureConfig,
) -> Result<Vec<Scored>> {
    if examples.len() != references.len() {
        bail!(
            "{} examples but {} references",
            examples.len(),
            references.len()
        );
    }
    let need_rouge = cfg.metric != Metric::Ce;
    let need_ce = cfg.metric != Metric::Rouge;
    let ce = if need_ce {
        response_ce(model, examples, pad_id, cfg.batch_size)?
    } else {
        vec![0.0; examples.len()]
    };
    let rouge: Vec<f64> = if need_rouge {
        let mut gen = GenerationConfig::greedy(cfg.max_new_tokens, eos_ids.to_vec());
        gen.no_repeat_ngram = cfg.no_repeat_ngram;
        let texts = answers(model, tok, examples, &gen, cfg.batch_size)?;
        texts
            .iter()
            .zip(references)
            .map(|(t, r)| 100.0 * rouge_l_multi(r, t))
            .collect()
    } else {
        vec![0.0; examples.len()]
    };
    let samples: Vec<(u64, f64, f64)> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id, rouge[i], ce[i]))
        .collect();
    Ok(fuse(&samples, cfg.metric, cfg.rrf_k, cfg.buckets))
}

/// Writes scores as JSON lines, easiest first (atomically).
pub fn write_scores(path: &Path, scores: &[Scored]) -> Result<()> {
    let mut text = String::new();
    for s in scores {
        text.push_str(&serde_json::to_string(s)?);
        text.push('\n');
    }
    crate::write_atomic(path, text.as_bytes())
}

pub fn read_scores(path: &Path) -> Result<Vec<Scored>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read scores {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a score record", path.display(), i + 1))
        })
        .collect()
}
