//! Teacher and student vocabularies: the common-prefix rule.
//!
//! Model vocab sizes often differ only by padding rows added for matmul efficiency (Qwen2.5:
//! 151936 vs 152064 with the same 151665-token tokenizer). The ids the tokenizer can produce are
//! then a common prefix of both logit rows, and KD compares the two distributions renormalised
//! over that prefix: padding logits get no KD gradient. This is only sound when the tokenizers
//! agree, which [`common_vocab`] checks; different tokenizers are refused.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};

/// The common vocabulary width for KD, min(teacher_width, student_width), after checking that the
/// two tokenizers are the same (same id → token table, same model / normalizer / pre-tokenizer) and
/// that every id they can produce lies inside the common prefix.
pub fn common_vocab(
    teacher: &Tokenizer,
    student: &Tokenizer,
    teacher_width: usize,
    student_width: usize,
) -> Result<usize> {
    let (ti, si) = (teacher.inner(), student.inner());
    let (tn, sn) = (ti.get_vocab_size(true), si.get_vocab_size(true));
    let common = teacher_width.min(student_width);
    for id in 0..tn.max(sn) as u32 {
        let (a, b) = (ti.id_to_token(id), si.id_to_token(id));
        if a != b {
            bail!(
                "the teacher and student tokenizers differ at id {id} ({} vs {}): KD needs the same \
                 tokenizer for teacher and student",
                a.as_deref().unwrap_or("<none>"),
                b.as_deref().unwrap_or("<none>")
            );
        }
    }
    let sections = |t: &tokenizers::Tokenizer| -> Result<serde_json::Value> {
        let s = t
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        serde_json::from_str(&s).context("tokenizer JSON")
    };
    let (tj, sj) = (sections(ti)?, sections(si)?);
    for key in ["model", "normalizer", "pre_tokenizer", "added_tokens"] {
        if tj.get(key) != sj.get(key) {
            bail!(
                "the teacher and student tokenizers have the same vocabulary but a different \
                 '{key}': KD needs the same tokenizer for teacher and student"
            );
        }
    }
    if tn > common {
        bail!(
            "the tokenizer has {tn} tokens but the common vocabulary prefix is only {common} \
             (teacher {teacher_width}, student {student_width}): some token ids have no logit in \
             one of the models"
        );
    }
    Ok(common)
}

/// Narrows logits [.., V] to their first `vocab` entries, flattened to [N, vocab], without copying
/// (the kernel reads strided rows). Use on both teacher and student after [`common_vocab`].
pub fn narrow_to_prefix(logits: &Tensor, vocab: usize) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    if vocab > v {
        bail!("cannot narrow logits of vocab {v} to {vocab}");
    }
    let n = logits.elem_count() / v.max(1);
    // Reshape first (free on contiguous logits), then narrow: a 2-D row-strided view.
    let x = if logits.rank() == 2 {
        logits.clone()
    } else {
        logits.reshape((n, v))?
    };
    Ok(if vocab == v {
        x
    } else {
        x.narrow(1, 0, vocab)?
    })
}
