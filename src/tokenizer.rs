//! `tokenizer.json` (Hugging Face `tokenizers` format) loading, encoding and decoding.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// A Hugging Face tokenizer plus the special ids the rest of pocl needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// End-of-sequence id (from the model config when known, else the tokenizer's own guess).
    pub eos_id: Option<u32>,
    /// The file it was read from, for error messages.
    source: Option<std::path::PathBuf>,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`; `eos_id` usually comes from the model's config.json.
    pub fn from_dir(dir: &Path, eos_id: Option<u32>) -> Result<Self> {
        let dir = &crate::model::gguf::model_dir(dir)?;
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(anyhow!("{}: tokenizer.json not found", dir.display()));
        }
        Self::from_file(&path, eos_id)
    }

    pub fn from_file(path: &Path, eos_id: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let eos_id = eos_id.or_else(|| {
            ["<|endoftext|>", "</s>", "<|im_end|>", "<eos>"]
                .iter()
                .find_map(|t| inner.token_to_id(t))
        });
        Ok(Tokenizer {
            inner,
            eos_id,
            source: Some(path.to_path_buf()),
        })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer, eos_id: Option<u32>) -> Self {
        Tokenizer {
            inner,
            eos_id,
            source: None,
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes without adding special tokens (BOS/EOS are the caller's decision).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes, skipping special tokens as the evaluation protocol does.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        // `tokenizers` silently drops ids it does not know: a model whose vocabulary is larger
        // than its tokenizer's would lose text without a trace.
        // (Looked up by id, not compared with the size: added tokens may leave gaps.)
        if let Some(id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            let n = self.vocab_size();
            let file = self
                .source
                .as_ref()
                .map_or("the tokenizer".to_string(), |p| p.display().to_string());
            bail!("token id {id} has no entry in {file} ({n} tokens): the tokenizer does not cover the model's vocabulary");
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        crate::write_atomic(path, json.as_bytes())
            .with_context(|| format!("saving {}", path.display()))
    }
}
