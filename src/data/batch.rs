//! The ONE place where samples become token ids and token ids become training batches. The
//! trainer, the difficulty measurer and the evaluator all go through these functions, so the
//! template, truncation, EOS, label shift and response mask cannot drift apart.
//!
//! Tokenization (DistiLLM's `process_data_dolly.py`, POCL.md §5):
//! - `prompt_ids = encode(prompt)`; `full = encode(prompt + response) ++ [EOS]`;
//!   `response_ids = full[len(prompt_ids)..]`. Encoding prompt and response together makes BPE
//!   merges across the boundary come out as in the reference.
//! - A prompt longer than `max_prompt_len` keeps its first `max_prompt_len` tokens (reference).
//! - The sequence `prompt ++ response` is cut to `max_len` tokens: a response cut this way loses
//!   its EOS, as in the reference (teaching the model to stop mid-answer would be worse).
//! - An empty (or whitespace-only) response, or a prompt that leaves no room for one response
//!   token, is not encoded: it is reported as [`SkipReason`].

use super::{Sample, Template};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};

/// Tokenization limits and the template.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    pub template: Template,
    /// Prompt tokens kept (256 in the paper).
    pub max_prompt_len: usize,
    /// Prompt + response tokens kept (512 in the paper).
    pub max_len: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            template: Template::Alpaca,
            max_prompt_len: 256,
            max_len: 512,
        }
    }
}

impl EncodeOptions {
    pub fn validate(&self) -> Result<()> {
        if self.max_prompt_len == 0 || self.max_len < 2 {
            bail!(
                "max_prompt_len ({}) must be at least 1 and max_len ({}) at least 2",
                self.max_prompt_len,
                self.max_len
            );
        }
        Ok(())
    }
}

/// A tokenized sample. `prompt_ids ++ response_ids` is the training sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    /// Ends with EOS unless the sequence was cut at `max_len`.
    pub response_ids: Vec<u32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.response_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a sample was not turned into an [`Example`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    EmptyResponse,
    /// The (truncated) prompt plus one response token does not fit in `max_len`.
    NoRoomForResponse,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::EmptyResponse => "empty response",
            SkipReason::NoRoomForResponse => "the prompt leaves no room for a response",
        })
    }
}

fn eos(tok: &Tokenizer) -> Result<u32> {
    tok.eos_id.ok_or_else(|| {
        anyhow!("the tokenizer has no EOS token: set eos_token_id in the model's config.json")
    })
}

/// With the chat template, a sample's prompt must have been rendered by [`super::chat::prepare`].
fn chat_prepared(sample: &Sample, opts: &EncodeOptions) -> Result<()> {
    if opts.template == Template::Chat && sample.prompt.is_none() {
        bail!(
            "sample {}: template \"chat\" is not supported by this command (its data is not \
             rendered with the model's chat template); use alpaca or plain",
            sample.id
        );
    }
    Ok(())
}

/// The prompt token ids used for generation and for training: `encode(prompt)` cut to
/// `max_prompt_len` tokens.
pub fn prompt_ids(tok: &Tokenizer, sample: &Sample, opts: &EncodeOptions) -> Result<Vec<u32>> {
    chat_prepared(sample, opts)?;
    let mut ids = tok.encode(&opts.template.prompt(sample))?;
    ids.truncate(opts.max_prompt_len);
    Ok(ids)
}

/// Tokenizes one sample for training or teacher-forced scoring; `Ok(Err(reason))` when the sample
/// must be left out (reported, never silently trained on).
pub fn encode_sample(
    tok: &Tokenizer,
    sample: &Sample,
    opts: &EncodeOptions,
) -> Result<std::result::Result<Example, SkipReason>> {
    opts.validate()?;
    Ok(encode_inner(tok, sample, opts, eos(tok)?)?.map(|(e, _)| e))
}

/// [`encode_sample`] plus whether the prompt was cut.
fn encode_inner(
    tok: &Tokenizer,
    sample: &Sample,
    opts: &EncodeOptions,
    eos: u32,
) -> Result<std::result::Result<(Example, bool), SkipReason>> {
    if sample.response.trim().is_empty() {
        return Ok(Err(SkipReason::EmptyResponse));
    }
    chat_prepared(sample, opts)?;
    let prompt = opts.template.prompt(sample);
    let mut prompt_ids = tok.encode(&prompt)?;
    let mut full = tok.encode(&(prompt + &sample.response + &sample.end_of_turn))?;
    // A chat response already ends with the template's end-of-turn token, which is often the EOS
    // itself (ChatML's <|im_end|>): it is not doubled.
    if full.last() != Some(&eos) {
        full.push(eos);
    }
    // Offsets into the joint encoding, as in the reference (the prompt's length as encoded alone).
    let mut response_ids = full.get(prompt_ids.len()..).unwrap_or(&[]).to_vec();
    let prompt_cut = prompt_ids.len() > opts.max_prompt_len;
    prompt_ids.truncate(opts.max_prompt_len);
    if response_ids.is_empty() || prompt_ids.len() + 1 > opts.max_len {
        return Ok(Err(SkipReason::NoRoomForResponse));
    }
    response_ids.truncate(opts.max_len - prompt_ids.len());
    Ok(Ok((
        Example {
            id: sample.id,
            prompt_ids,
            response_ids,
        },
        prompt_cut,
    )))
}

/// The examples of a data set plus what was left out and what was cut.
#[derive(Debug, Default)]
pub struct Encoded {
    pub examples: Vec<Example>,
    /// (sample id, reason) of every sample left out.
    pub skipped: Vec<(u64, SkipReason)>,
    /// Samples whose prompt was cut to `max_prompt_len`.
    pub truncated_prompts: usize,
    /// Samples whose response was cut at `max_len` (and so has no EOS).
    pub truncated_responses: usize,
}

impl Encoded {
    /// One line for the user when anything was skipped or cut, e.g. for the run log.
    pub fn summary(&self) -> Option<String> {
        if self.skipped.is_empty() && self.truncated_prompts == 0 && self.truncated_responses == 0 {
            return None;
        }
        let count = |r| self.skipped.iter().filter(|(_, x)| *x == r).count();
        let mut s = format!(
            "{} examples; skipped {} with an empty response and {} whose prompt leaves no room for a response; \
             cut {} prompts at max_prompt_len and {} responses at max_len",
            self.examples.len(),
            count(SkipReason::EmptyResponse),
            count(SkipReason::NoRoomForResponse),
            self.truncated_prompts,
            self.truncated_responses
        );
        if let Some((id, r)) = self.skipped.first() {
            s += &format!(" (first skipped: sample {id}, {r})");
        }
        Some(s)
    }
}

/// Tokenizes many samples, keeping their order and ids.
pub fn encode_samples(
    tok: &Tokenizer,
    samples: &[Sample],
    opts: &EncodeOptions,
) -> Result<Encoded> {
    opts.validate()?;
    let eos = eos(tok)?;
    let mut out = Encoded::default();
    for s in samples {
        match encode_inner(tok, s, opts, eos)? {
            Ok((e, prompt_cut)) => {
                out.truncated_prompts += prompt_cut as usize;
                if e.response_ids.last() != Some(&eos) {
                    out.truncated_responses += 1;
                }
                out.examples.push(e);
            }
            Err(r) => out.skipped.push((s.id, r)),
        }
    }
    Ok(out)
}

/// A right-padded training batch. For a sequence `s = prompt ++ response` of length `L`, row
/// `b` holds `input = s[0..L-1]` and `labels = s[1..L]` (logits at position i predict token i+1);
/// `loss_mask[i] = 1` iff token i+1 belongs to the response (EOS included). Padding positions have
/// the pad id in both `input_ids` and `labels`, attention 0, loss_mask 0 and position id 0.
#[derive(Debug)]
pub struct Batch {
    /// Sample ids, one per row.
    pub ids: Vec<u64>,
    /// `[b, t]` u32.
    pub input_ids: Tensor,
    /// `[b, t]` f32, 1 on real tokens.
    pub attention_mask: Tensor,
    /// `[b, t]` u32, 0..L-1 on real tokens.
    pub position_ids: Tensor,
    /// `[b, t]` u32, the next token.
    pub labels: Tensor,
    /// `[b, t]` f32, 1 where the label is a response token.
    pub loss_mask: Tensor,
}

impl Batch {
    /// Number of response tokens the loss averages over (the sum of `loss_mask`).
    pub fn response_tokens(&self) -> usize {
        self.loss_mask
            .sum_all()
            .and_then(|s| s.to_scalar::<f32>())
            .map(|v| v as usize)
            .unwrap_or(0)
    }

    pub fn to_device(&self, device: &Device) -> Result<Batch> {
        Ok(Batch {
            ids: self.ids.clone(),
            input_ids: self.input_ids.to_device(device)?,
            attention_mask: self.attention_mask.to_device(device)?,
            position_ids: self.position_ids.to_device(device)?,
            labels: self.labels.to_device(device)?,
            loss_mask: self.loss_mask.to_device(device)?,
        })
    }
}

/// Builds a batch (on the CPU) from examples; `t` is the longest sequence length minus one.
/// The positions of an example whose next token is a response token: the rows the loss counts
/// (mask 1 in [`collate`]) and the rows a teacher cache stores.
pub fn counted_rows(e: &Example) -> std::ops::Range<usize> {
    e.prompt_ids.len().max(1) - 1..e.len().saturating_sub(1)
}

pub fn collate(examples: &[&Example], pad_id: u32) -> Result<Batch> {
    if examples.is_empty() {
        bail!("cannot collate an empty batch");
    }
    for e in examples {
        if e.len() < 2 || e.response_ids.is_empty() {
            bail!(
                "sample {}: an example needs a response and at least two tokens",
                e.id
            );
        }
    }
    let b = examples.len();
    let t = examples.iter().map(|e| e.len() - 1).max().unwrap_or(0);
    let mut input = vec![pad_id; b * t];
    let mut labels = vec![pad_id; b * t];
    let mut attn = vec![0f32; b * t];
    let mut pos = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for (row, e) in examples.iter().enumerate() {
        let seq: Vec<u32> = e
            .prompt_ids
            .iter()
            .chain(&e.response_ids)
            .copied()
            .collect();
        let counted = counted_rows(e);
        for i in 0..seq.len() - 1 {
            let k = row * t + i;
            input[k] = seq[i];
            labels[k] = seq[i + 1];
            attn[k] = 1.0;
            pos[k] = i as u32;
            mask[k] = if counted.contains(&i) { 1.0 } else { 0.0 };
        }
    }
    let dev = Device::Cpu;
    Ok(Batch {
        ids: examples.iter().map(|e| e.id).collect(),
        input_ids: Tensor::from_vec(input, (b, t), &dev)?,
        attention_mask: Tensor::from_vec(attn, (b, t), &dev)?,
        position_ids: Tensor::from_vec(pos, (b, t), &dev)?,
        labels: Tensor::from_vec(labels, (b, t), &dev)?,
        loss_mask: Tensor::from_vec(mask, (b, t), &dev)?,
    })
}
