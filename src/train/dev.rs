//! Dev evaluation after every epoch: the dev loss (the student's response cross-entropy) and dev
//! ROUGE-L, generated through the final evaluation's own path.

use crate::config::Recipe;
use crate::data::{collate, Example};
use crate::kd::{Head, Mix, Objective, Targets};
use crate::model::generate::Sampling;
use crate::model::{CausalLm, Input};
use crate::tokenizer::Tokenizer;
use anyhow::Result;

/// The mean cross-entropy of the student over every dev response token (`kd_vocab` wide, as the
/// training loss), in batches of `batch_size`.
pub fn dev_loss(
    student: &dyn CausalLm,
    objective: Objective,
    kd_vocab: usize,
    dev: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    let tokens: usize = dev.iter().map(|e| e.response_ids.len()).sum();
    let mut total = 0.0;
    for chunk in dev.chunks(batch_size) {
        let b = collate(&chunk.iter().collect::<Vec<_>>(), pad_id)?
            .to_device(&student.backend().device)?;
        let input = Input {
            ids: &b.input_ids,
            positions: &b.position_ids,
            key_mask: &b.attention_mask,
        };
        let hidden = student.hidden(&input, None)?.detach();
        // Detached: this loss is never differentiated, so the head computes no gradient.
        let head = student.lm_head().detach();
        let student = Head {
            hidden: &hidden,
            weight: &head,
        };
        let targets = Targets {
            labels: &b.labels.flatten_all()?,
            mask: &b.loss_mask.flatten_all()?,
            denominator: tokens as f64,
        };
        let out = objective.loss_from_heads(None, student, kd_vocab, targets, Mix::CE_ONLY)?;
        total += out.ce;
    }
    Ok(total)
}

/// Dev ROUGE-L ×100 of the first `eval.dev_rouge_samples` dev examples (`references[i]` are the
/// answers of `dev[i]`), with the final evaluation's own generation path (`eval::evaluate`): the
/// same decoding and per-sample seeds, so dev and test scores are comparable (POCL.md §7).
/// `None` when no sample is scored.
pub fn dev_rouge(
    student: &dyn CausalLm,
    tokenizer: &Tokenizer,
    dev: &[Example],
    references: &[Vec<String>],
    recipe: &Recipe,
    eos_ids: &[u32],
) -> Result<Option<f64>> {
    use crate::eval::evaluate::{generate_prepared, Decoding};
    let n = recipe.eval.dev_rouge_samples.min(dev.len());
    if n == 0 {
        return Ok(None);
    }
    let e = &recipe.eval;
    let sampling = if e.greedy {
        Sampling::Greedy
    } else {
        Sampling::Sample {
            temperature: e.temperature,
            top_k: e.top_k,
            top_p: e.top_p,
        }
    };
    let dec = Decoding {
        sampling,
        max_new_tokens: e.max_new_tokens,
        no_repeat_ngram: e.no_repeat_ngram,
        template: super::splits::encode_options(recipe)?.template,
        max_prompt_len: recipe.data.max_prompt_len,
        batch_size: recipe.curriculum.score_batch_size.max(1),
        eos_ids: eos_ids.to_vec(),
    };
    let dev = &dev[..n];
    let prompts: Vec<Vec<u32>> = dev.iter().map(|x| x.prompt_ids.clone()).collect();
    let ids: Vec<u64> = dev.iter().map(|x| x.id).collect();
    let answers = generate_prepared(student, tokenizer, &prompts, &ids, &dec, recipe.seed)?;
    let total: f64 = answers
        .iter()
        .zip(references)
        .map(|(a, r)| 100.0 * crate::eval::rouge::rouge_l_multi(r, &a.text))
        .sum();
    Ok(Some(total / n as f64))
}
