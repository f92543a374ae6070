//! Causal language models in the Hugging Face layout: one [`CausalLm`] abstraction, one file per
//! family (gpt2.rs, opt.rs, llama.rs for Llama/Qwen2/Qwen3/Mistral).

pub mod config;
pub mod context;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod init;
pub mod llama;
pub mod opt;
pub mod weights;

use crate::backend::{Backend, StudentPrecision};
use crate::ops;
use anyhow::{Context, Result};
use candle_core::Tensor;
use config::{Family, ModelConfig};
use std::path::Path;
pub use weights::{Matrices, Params, StateDict};

/// One forward call's token inputs. `key_mask` covers the cached tokens followed by the new ones.
pub struct Input<'a> {
    /// [b, t] u32 token ids of the new tokens.
    pub ids: &'a Tensor,
    /// [b, t] u32 position of each new token (see `ops::positions_from_mask`).
    pub positions: &'a Tensor,
    /// [b, past + t], 1 for real tokens, 0 for padding.
    pub key_mask: &'a Tensor,
}

impl<'a> Input<'a> {
    /// The additive attention bias [b, 1, t, past + t] shared by every layer.
    pub fn attention_bias(&self) -> candle_core::Result<Tensor> {
        ops::attention_bias(self.key_mask, self.ids.dim(1)?)
    }
}

/// Per-layer keys and values [b, h_kv, t, d] of the tokens seen so far (generation only).
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Appends this step's k, v for `layer` and returns all keys and values so far.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            // Heads come in as transposed views; store them contiguous so rows can be selected.
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// Keeps only the batch rows in `keep` (finished sequences leave the batch).
    pub fn select_rows(&mut self, keep: &Tensor) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(keep, 0)?;
            *v = v.index_select(keep, 0)?;
        }
        Ok(())
    }
}

/// A decoder-only language model with trainable parameters.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Trainable parameters, under the HF names they are saved with.
    fn params(&self) -> &Params;
    /// Final hidden states [b, t, d], ready for the lm head.
    fn hidden(&self, input: &Input, cache: Option<&mut KvCache>) -> candle_core::Result<Tensor>;
    /// The lm-head weight [vocab, d] (the token embedding when tied).
    fn lm_head(&self) -> &ops::Weight;

    /// The device and kernels the model computes with (inputs go to this device).
    fn backend(&self) -> &Backend {
        self.params().backend()
    }

    /// Logits [b, t, vocab].
    fn logits(&self, input: &Input, cache: Option<&mut KvCache>) -> candle_core::Result<Tensor> {
        let h = self.hidden(input, cache)?;
        self.backend().kernels.linear(self.lm_head(), &h, None)
    }
}

/// Loads the model in `dir` (config.json + safetensors weights, HF layout) onto `backend`,
/// computing in f32, trainable.
pub fn load(dir: &Path, backend: &Backend) -> Result<Box<dyn CausalLm>> {
    load_student(dir, backend, StudentPrecision::F32)
}

/// [`load`], with the linear layers computing in `precision` (the weights stay f32).
pub fn load_student(
    dir: &Path,
    backend: &Backend,
    precision: StudentPrecision,
) -> Result<Box<dyn CausalLm>> {
    load_with(dir, false, Matrices::F32, backend, precision)
}

/// Loads a model that is only run forward (an evaluated checkpoint, a model that decodes): no
/// autograd graph, f32 tensors.
pub fn load_frozen(dir: &Path, backend: &Backend) -> Result<Box<dyn CausalLm>> {
    load_frozen_as(dir, Matrices::F32, backend)
}

/// A frozen model whose matrices (linear layers, embeddings, lm head) are converted once to bf16
/// (packed for the bf16 kernels of `ops::bf16` with the fused kernels: AMX tiles where the CPU
/// has them); norms and biases stay f32. For a teacher that only runs forward: half its memory.
pub fn load_frozen_bf16(dir: &Path, backend: &Backend) -> Result<Box<dyn CausalLm>> {
    load_frozen_as(dir, Matrices::Bf16, backend)
}

/// A frozen model with its matrices in the form `matrices` says ([`Matrices`]).
pub fn load_frozen_as(
    dir: &Path,
    matrices: Matrices,
    backend: &Backend,
) -> Result<Box<dyn CausalLm>> {
    load_with(dir, true, matrices, backend, StudentPrecision::F32)
}

fn load_with(
    dir: &Path,
    frozen: bool,
    matrices: Matrices,
    backend: &Backend,
    precision: StudentPrecision,
) -> Result<Box<dyn CausalLm>> {
    let dir = &gguf::model_dir(dir)?;
    let config = ModelConfig::from_dir(dir)?;
    let mut sd = StateDict::load(dir)?;
    sd.frozen = frozen;
    sd.matrices = matrices;
    sd.backend = backend.clone();
    sd.precision = precision;
    let model: Box<dyn CausalLm> = match config.family {
        Family::Gpt2 => Box::new(gpt2::Gpt2::new(config, &mut sd)?),
        Family::Opt => Box::new(opt::Opt::new(config, &mut sd)?),
        Family::Llama => Box::new(llama::Llama::new(config, &mut sd)?),
    };
    let left = sd.leftovers();
    if !left.is_empty() {
        eprintln!(
            "warning: {}: ignored {} unexpected tensor(s): {}",
            dir.display(),
            left.len(),
            left.join(", ")
        );
    }
    Ok(model)
}

/// Logits [len, vocab] of one unpadded sequence.
pub fn forward_ids(model: &dyn CausalLm, ids: &[u32]) -> Result<Tensor> {
    let n = ids.len();
    let dev = &model.backend().device;
    let t = Tensor::from_slice(ids, (1, n), dev)?;
    let pos = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), (1, n), dev)?;
    let mask = Tensor::ones((1, n), candle_core::DType::U32, dev)?;
    let logits = model.logits(
        &Input {
            ids: &t,
            positions: &pos,
            key_mask: &mask,
        },
        None,
    )?;
    Ok(logits.squeeze(0)?)
}

/// Completes an interrupted [`save`]: if `out` is missing but its previous version was set
/// aside, that version is restored.
pub fn recover_dir(out: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
        return Ok(());
    };
    let old = parent.join(format!(".{}.old", name.to_string_lossy()));
    if !out.exists() && old.is_dir() {
        std::fs::rename(&old, out).with_context(|| format!("cannot restore {}", out.display()))?;
    }
    Ok(())
}

/// Tokenizer and generation files copied next to saved weights so the directory is complete.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Saves `model` as an HF directory (config.json + model.safetensors in f32, plus the tokenizer
/// files found in `side_files_from`). The directory is assembled under a temporary name and
/// renamed into place, so an interrupted save never leaves a half-written checkpoint.
pub fn save(model: &dyn CausalLm, out: &Path, side_files_from: Option<&Path>) -> Result<()> {
    save_with(model, out, side_files_from, &[])
}

/// [`save`], plus `extra` files (name, bytes) written into the same directory before it is
/// renamed into place (training checkpoints add optimiser and trainer state this way).
pub fn save_with(
    model: &dyn CausalLm,
    out: &Path,
    side_files_from: Option<&Path>,
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    let weights = model.params().to_safetensors()?;
    write_dir(
        out,
        &model.config().to_saved_json(),
        &weights,
        side_files_from,
        extra,
    )
}

/// Writes an HF model directory (config.json, model.safetensors holding `weights`, the side files
/// of `side_files_from`, `extra`) atomically: assembled under a temporary name, then renamed into
/// place, so an interrupted write never leaves a half-written directory.
pub fn write_dir(
    out: &Path,
    config: &serde_json::Value,
    weights: &[u8],
    side_files_from: Option<&Path>,
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    write_dir_checked(out, config, weights, side_files_from, extra, |_| Ok(()))
}

/// [`write_dir`], with `check` run on the assembled directory before it replaces `out`: when the
/// check fails, the temporary directory is removed and `out` is left as it was.
pub fn write_dir_checked(
    out: &Path,
    config: &serde_json::Value,
    weights: &[u8],
    side_files_from: Option<&Path>,
    extra: &[(&str, Vec<u8>)],
    check: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::create_dir_all(parent)?;
    let name = out
        .file_name()
        .context("output path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let filled = fill_dir(&tmp, config, weights, side_files_from, extra).and_then(|_| check(&tmp));
    if filled.is_err() {
        // A failed or refused write (full disk, unreadable side file, a failed check) leaves no
        // temporary directory behind, and `out` as it was.
        std::fs::remove_dir_all(&tmp).ok();
    }
    filled?;
    // Replace: out -> .name.old, tmp -> out, drop old. A kill between the two renames leaves
    // only .name.old, which `recover_dir` puts back.
    recover_dir(out)?;
    let old = parent.join(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old)?; // stale: `out` holds a complete newer version
    }
    if out.exists() {
        std::fs::rename(out, &old).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot create {}", out.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).ok();
    }
    Ok(())
}

/// Writes the files of a model directory into the new directory `tmp` (see [`write_dir`]).
fn fill_dir(
    tmp: &Path,
    config: &serde_json::Value,
    weights: &[u8],
    side_files_from: Option<&Path>,
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    std::fs::create_dir_all(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )?;
    std::fs::write(tmp.join("model.safetensors"), weights)?;
    if let Some(src) = side_files_from {
        let src = gguf::model_dir(src)?;
        for f in SIDE_FILES {
            let p = src.join(f);
            if p.is_file() {
                std::fs::copy(&p, tmp.join(f))
                    .with_context(|| format!("cannot copy {}", p.display()))?;
            }
        }
    }
    for (name, bytes) in extra {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("cannot write {name} in {}", tmp.display()))?;
    }
    Ok(())
}
