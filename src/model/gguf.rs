//! GGUF files (llama.cpp, Ollama) in: the metadata becomes config.json, generation_config.json,
//! tokenizer.json and tokenizer_config.json, the tensors (any GGML type candle's `quantized`
//! module knows, dequantized by it) become f32 tensors under HF names, and the whole is written as
//! an ordinary HF directory ([`convert`]). Architectures: llama (SmolLM, Mistral-style), qwen2,
//! qwen3. A `.gguf` path given where a model directory is expected is converted once into a
//! cache directory ([`model_dir`]).

use super::config::Llama3Rope;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The GGUF architectures pocl converts, and the HF model_type / class of each.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "llama", "LlamaForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
];

/// A GGUF file's metadata and tensor index, with the file kept open for reading tensors.
struct Gguf {
    path: PathBuf,
    file: std::fs::File,
    content: Content,
}

impl Gguf {
    fn open(path: &Path) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let content = Content::read(&mut file).map_err(|e| {
            let e = e.to_string();
            // candle's message may carry more lines after the type code.
            let code = e.strip_prefix("unknown dtype for tensor ");
            match code.and_then(|c| c.split_whitespace().next()) {
                Some(code) => anyhow!(
                    "{}: GGML tensor type {code} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K are)",
                    path.display()
                ),
                None => anyhow!("{}: not a readable GGUF file: {e}", path.display()),
            }
        })?;
        Ok(Gguf {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    fn get(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    fn need(&self, key: &str) -> Result<&GValue> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: missing metadata key \"{key}\"", self.path.display()))
    }

    /// An integer metadata value (GGUF writers use any integer width).
    fn int(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            GValue::U8(x) => *x as u64,
            GValue::U16(x) => *x as u64,
            GValue::U32(x) => *x as u64,
            GValue::U64(x) => *x,
            GValue::I8(x) if *x >= 0 => *x as u64,
            GValue::I16(x) if *x >= 0 => *x as u64,
            GValue::I32(x) if *x >= 0 => *x as u64,
            GValue::I64(x) if *x >= 0 => *x as u64,
            other => bail!(
                "{}: metadata \"{key}\": expected a non-negative integer, got {other:?}",
                self.path.display()
            ),
        };
        Ok(Some(n))
    }

    fn need_int(&self, key: &str) -> Result<u64> {
        self.need(key)?;
        Ok(self.int(key)?.expect("present"))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.get(key) {
            None => None,
            Some(GValue::F32(x)) => Some(*x as f64),
            Some(GValue::F64(x)) => Some(*x),
            Some(_) => self.int(key)?.map(|n| n as f64),
        })
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(other) => bail!(
                "{}: metadata \"{key}\": expected a string, got {other:?}",
                self.path.display()
            ),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let list = self.need(key)?.to_vec().map_err(|e| self.bad(key, e))?;
        list.iter()
            .map(|v| v.to_string().cloned().map_err(|e| self.bad(key, e)))
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let Some(v) = self.get(key) else {
            return Ok(vec![]);
        };
        let list = v.to_vec().map_err(|e| self.bad(key, e))?;
        list.iter()
            .map(|v| match v {
                GValue::I32(x) => Ok(*x as i64),
                GValue::U32(x) => Ok(*x as i64),
                GValue::I64(x) => Ok(*x),
                GValue::U8(x) => Ok(*x as i64),
                GValue::I8(x) => Ok(*x as i64),
                other => Err(self.bad(key, format!("expected integers, got {other:?}"))),
            })
            .collect()
    }

    fn floats(&self, key: &str) -> Result<Vec<f32>> {
        let list = self.need(key)?.to_vec().map_err(|e| self.bad(key, e))?;
        list.iter()
            .map(|v| match v {
                GValue::F32(x) => Ok(*x),
                GValue::F64(x) => Ok(*x as f32),
                other => Err(self.bad(key, format!("expected floats, got {other:?}"))),
            })
            .collect()
    }

    fn bad(&self, key: &str, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: metadata \"{key}\": {e}", self.path.display())
    }

    /// Tensor `name` dequantized to f32 (by candle's `quantized` module), in HF row-major shape.
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor \"{name}\": {e}", self.path.display()))?;
        q.dequantize(&Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor \"{name}\": {e}", self.path.display()))
    }
}

/// llama.cpp's converter interleaves the two rotary halves of every q / k head
/// (`permute(w, n_head, n_head_kv)`); this undoes it (transformers' `reverse_permute_weights`):
/// rows [heads, 2, hd/2] -> [heads, hd/2, 2] read back as [heads, 2, hd/2].
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        bail!("cannot undo the q/k permutation: {rows} rows for {heads} heads");
    }
    let half = rows / heads / 2;
    let mut shape = vec![heads, half, 2];
    shape.extend_from_slice(&dims[1..]);
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The HF name of a GGUF tensor (`None`: not a model parameter, e.g. llama.cpp's `rope_freqs`).
fn hf_name(name: &str) -> Result<Option<String>> {
    Ok(Some(match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        "rope_freqs.weight" => return Ok(None),
        _ => {
            let rest = name
                .strip_prefix("blk.")
                .ok_or_else(|| anyhow!("unexpected tensor \"{name}\""))?;
            let (layer, part) = rest
                .split_once('.')
                .ok_or_else(|| anyhow!("unexpected tensor \"{name}\""))?;
            let (base, kind) = part
                .rsplit_once('.')
                .ok_or_else(|| anyhow!("unexpected tensor \"{name}\""))?;
            let hf = match base {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => bail!("unexpected tensor \"{name}\" (mixture-of-experts and other layer kinds are not supported)"),
            };
            format!("model.layers.{layer}.{hf}.{kind}")
        }
    }))
}

/// The candidate Llama 3 rope parameters tried against a `rope_freqs` tensor, most likely first:
/// (original context, low_freq_factor, high_freq_factor). Every released Llama 3.1 / 3.2 uses
/// (8192, 1, 4); the others cover smaller relatives (and the test fixture's 64).
const LLAMA3_CANDIDATES: &[(f64, f64, f64)] = &[
    (8192.0, 1.0, 4.0),
    (4096.0, 1.0, 4.0),
    (16384.0, 1.0, 4.0),
    (2048.0, 1.0, 4.0),
    (32768.0, 1.0, 4.0),
    (1024.0, 1.0, 4.0),
    (512.0, 1.0, 4.0),
    (256.0, 1.0, 4.0),
    (128.0, 1.0, 4.0),
    (64.0, 1.0, 4.0),
    (8192.0, 1.0, 2.0),
    (8192.0, 1.0, 8.0),
    (8192.0, 2.0, 4.0),
];

/// Llama 3.1 / 3.2 GGUFs carry their rope scaling as llama.cpp's `rope_freqs` tensor (one divisor
/// per frequency: 1 for short wavelengths, `factor` for long ones, interpolated between), not as
/// parameters, while config.json needs the parameters. They are recovered by matching: factor =
/// the largest divisor, and the first of [`LLAMA3_CANDIDATES`] whose transformers-computed
/// frequencies (`llama::rope_inv_freq`) give the stored divisors within 1e-4. A tensor that no
/// candidate reproduces is refused. `None`: no tensor, or all divisors 1.
fn llama3_rope(g: &mut Gguf, theta: f64, head_dim: usize) -> Result<Option<Llama3Rope>> {
    const NAME: &str = "rope_freqs.weight";
    if !g.content.tensor_infos.contains_key(NAME) {
        return Ok(None);
    }
    let stored: Vec<f32> = g.tensor(NAME)?.flatten_all()?.to_vec1()?;
    if stored.len() != head_dim / 2 {
        bail!(
            "{}: tensor \"{NAME}\" has {} values, expected head_dim / 2 = {}",
            g.path.display(),
            stored.len(),
            head_dim / 2
        );
    }
    if stored.iter().all(|&d| (d - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    let factor = stored.iter().fold(0f32, |m, &d| m.max(d)) as f64;
    let plain = super::llama::rope_inv_freq(theta, head_dim, None);
    for &(original, low, high) in LLAMA3_CANDIDATES {
        let r = Llama3Rope {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        };
        let scaled = super::llama::rope_inv_freq(theta, head_dim, Some(r));
        let fits = plain.iter().zip(&scaled).zip(&stored).all(|((p, s), d)| {
            let divisor = p / s;
            (divisor - d).abs() <= 1e-4 * d.abs()
        });
        if fits {
            return Ok(Some(r));
        }
    }
    bail!(
        "{}: the rope scaling in \"{NAME}\" (divisors {:.4?}) is not a Llama 3 schedule pocl recognises; convert the original HF checkpoint instead",
        g.path.display(),
        stored
    )
}

/// config.json for the GGUF's architecture and shape.
fn config_json(
    g: &mut Gguf,
    arch: &str,
    model_type: &str,
    class: &str,
    vocab: usize,
) -> Result<Value> {
    let k = |s: &str| format!("{arch}.{s}");
    if let Some(kind) = g.string(&k("rope.scaling.type"))?.filter(|t| *t != "none") {
        bail!(
            "{}: rope scaling \"{kind}\" (\"{}\") in a GGUF file is not supported; convert the original HF checkpoint instead",
            g.path.display(),
            k("rope.scaling.type")
        );
    }
    let hidden = g.need_int(&k("embedding_length"))?;
    let heads = g.need_int(&k("attention.head_count"))?;
    let theta = g.float(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let head_dim = match g.int(&k("attention.key_length"))? {
        Some(hd) => hd,
        None => hidden / heads.max(1),
    };
    let rope = match llama3_rope(g, theta, head_dim as usize)? {
        None => json!({"rope_type": "default", "rope_theta": theta}),
        Some(r) => json!({
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }),
    };
    let mut c = json!({
        "model_type": model_type,
        "architectures": [class],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": g.need_int(&k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": g.int(&k("attention.head_count_kv"))?.unwrap_or(heads),
        "intermediate_size": g.need_int(&k("feed_forward_length"))?,
        "max_position_embeddings": g.int(&k("context_length"))?.unwrap_or(2048),
        "rms_norm_eps": g.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "hidden_act": "silu",
        "rope_parameters": rope,
        // llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": !g.content.tensor_infos.contains_key("output.weight"),
        "dtype": "float32",
    });
    if let Some(hd) = g.int(&k("attention.key_length"))? {
        c["head_dim"] = json!(hd);
    }
    for (ours, theirs) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ] {
        if let Some(id) = g.int(&format!("tokenizer.ggml.{theirs}"))? {
            c[ours] = json!(id);
        }
    }
    Ok(c)
}

/// GPT-2's byte-to-character map (bytes_to_unicode): printable bytes stand for themselves, the
/// others are shifted past 255.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        map[*b as usize] = char::from_u32(c).expect("valid code point");
    }
    map
}

/// The split regexes of the `tokenizer.ggml.pre` kinds transformers knows (its
/// `GGUF_PRE_TOKENIZER_SPLITS`); others keep GPT-2's byte-level split.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" => QWEN2,
        _ => return None,
    })
}

/// tokenizer.json of a byte-level BPE GGUF vocabulary (`tokenizer.ggml.model = "gpt2"`), as
/// transformers builds it from the same metadata: BPE over the vocabulary and merges, GPT-2's
/// byte-level pre-tokenizer (or the split of `tokenizer.ggml.pre`), control tokens (type 3)
/// added as special tokens, user-defined ones (type 4) as plain added tokens.
fn byte_level_tokenizer(g: &Gguf, tokens: &[String]) -> Result<Value> {
    let chars = byte_chars();
    let alphabet: std::collections::HashSet<char> = chars.iter().copied().collect();
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let spelled = if t.chars().all(|c| alphabet.contains(&c)) {
            t.clone()
        } else {
            t.bytes().map(|b| chars[b as usize]).collect()
        };
        vocab.insert(spelled, json!(i));
    }
    let merges = file_merges(g)?;
    let types = g.ints("tokenizer.ggml.token_type")?;
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        let special = match ty {
            3 if t.chars().all(|c| alphabet.contains(&c)) => true,
            4 => false,
            _ => continue,
        };
        added.push(
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": !special, "special": special}),
        );
    }
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre = g.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = match split_regex(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        None => byte_level(true),
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    }))
}

/// tokenizer_config.json: the special tokens by content, the chat template, BOS/EOS adding.
/// `tokenizer.ggml.merges` ("a b" strings) as tokenizer.json's [a, b] pairs.
fn file_merges(g: &Gguf) -> Result<Vec<Value>> {
    Ok(g.strings("tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect())
}

/// tokenizer.json of a SentencePiece BPE GGUF vocabulary (`tokenizer.ggml.model = "llama"`:
/// Llama 2, Mistral), as transformers builds it (`sentencepiece_tokenizer` + `LlamaTokenizer`):
/// the pieces as the file spells them (with "▁" for spaces), byte fallback, a Metaspace
/// pre-tokenizer prepending "▁" to the first word, merges from the file or else rebuilt from
/// the scores ([`merges_from_scores`]), control tokens and the unknown token special, and the
/// BOS (EOS) token added by the post-processor when the file says so (default: BOS).
fn sentencepiece_tokenizer(g: &Gguf, tokens: &[String]) -> Result<Value> {
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = if g.get("tokenizer.ggml.merges").is_some() {
        file_merges(g)?
    } else {
        let scores = g.floats("tokenizer.ggml.scores")?;
        if scores.len() != tokens.len() {
            return Err(g.bad(
                "tokenizer.ggml.scores",
                format!("{} scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        merges_from_scores(tokens, &scores)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect()
    };
    let types = g.ints("tokenizer.ggml.token_type")?;
    let unk = g.int("tokenizer.ggml.unknown_token_id")?;
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let special = match types.get(i) {
            Some(3) => true,
            _ if unk == Some(i as u64) => true,
            Some(4) => false,
            _ => continue,
        };
        added.push(
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special}),
        );
    }
    let flag = |key: &str, default: bool| match g.get(&format!("tokenizer.ggml.{key}")) {
        Some(GValue::Bool(b)) => *b,
        _ => default,
    };
    let token_of = |key: &str| -> Result<Option<(String, u64)>> {
        Ok(g.int(&format!("tokenizer.ggml.{key}"))?
            .and_then(|id| tokens.get(id as usize).map(|t| (t.clone(), id))))
    };
    // (0: before the sequence, 1: after it; the token and its id)
    let mut ends: Vec<(u8, (String, u64))> = Vec::new();
    if flag("add_bos_token", true) {
        ends.extend(token_of("bos_token_id")?.map(|t| (0, t)));
    }
    if flag("add_eos_token", false) {
        ends.extend(token_of("eos_token_id")?.map(|t| (1, t)));
    }
    let post_processor = if ends.is_empty() {
        Value::Null
    } else {
        let wrap = |seq: &str, type_id: u32| -> Vec<Value> {
            let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": type_id}});
            let mut v: Vec<Value> = ends
                .iter()
                .filter(|e| e.0 == 0)
                .map(|e| special(&e.1 .0))
                .collect();
            v.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            v.extend(ends.iter().filter(|e| e.0 == 1).map(|e| special(&e.1 .0)));
            v
        };
        let single = wrap("A", 0);
        let mut pair = single.clone();
        pair.extend(wrap("B", 1));
        let specials: Map<String, Value> = ends
            .iter()
            .map(|(_, (t, id))| (t.clone(), json!({"id": t, "ids": [id], "tokens": [t]})))
            .collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    }))
}

/// The merges a SentencePiece vocabulary implies (transformers' `generate_merges` with scores):
/// every split of a piece into two pieces of the vocabulary is a merge ranked by the piece's
/// score (higher first), ties by the left then the right part's length in characters, then in
/// the order found (pieces in file order, a piece's splits by the parts' ids).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    let mut id: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        id.insert(t, i); // the last of duplicates, as a Python dict keeps it
    }
    let mut order: Vec<&str> = Vec::new();
    let mut score: HashMap<&str, f32> = HashMap::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for piece in order {
        let s = score[piece];
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| id.contains_key(l) && id.contains_key(r))
            .map(|(l, r)| (l, r, s))
            .collect();
        local.sort_by_key(|(l, r, _)| (id[l], id[r]));
        merges.extend(local);
    }
    // Descending and stable, as Python's sorted(..., reverse=True).
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(b.0.chars().count().cmp(&a.0.chars().count()))
            .then(b.1.chars().count().cmp(&a.1.chars().count()))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

fn tokenizer_config(g: &Gguf, tokens: &[String]) -> Result<Value> {
    let mut c = json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
    for (ours, theirs) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(id) = g.int(&format!("tokenizer.ggml.{theirs}"))? {
            let t = tokens.get(id as usize).ok_or_else(|| {
                g.bad(
                    &format!("tokenizer.ggml.{theirs}"),
                    format!("id {id} is outside the vocabulary"),
                )
            })?;
            c[ours] = json!(t);
        }
    }
    if let Some(t) = g.string("tokenizer.chat_template")? {
        c["chat_template"] = json!(t);
    }
    for key in ["add_bos_token", "add_eos_token"] {
        if let Some(GValue::Bool(b)) = g.get(&format!("tokenizer.ggml.{key}")) {
            c[key] = json!(b);
        }
    }
    Ok(c)
}

/// The HF tensors of the GGUF (f32, HF names, q/k rows un-permuted for llama).
fn tensors(
    g: &mut Gguf,
    arch: &str,
    heads: usize,
    kv_heads: usize,
) -> Result<Vec<(String, Tensor)>> {
    let mut names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Some(hf) = hf_name(&name).with_context(|| g.path.display().to_string())? else {
            continue;
        };
        let mut t = g.tensor(&name)?;
        if arch == "llama" {
            if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                t = unpermute_rows(&t, heads)?;
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                t = unpermute_rows(&t, kv_heads)?;
            }
        }
        out.push((hf, t));
    }
    Ok(out)
}

/// Writes the HF directory of GGUF file `gguf` to `out` (atomically: nothing is written unless
/// the whole conversion succeeds).
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let mut g = Gguf::open(gguf)?;
    let arch = g
        .string("general.architecture")?
        .ok_or_else(|| {
            anyhow!(
                "{}: missing metadata key \"general.architecture\"",
                gguf.display()
            )
        })?
        .to_string();
    let Some(&(_, model_type, class)) = ARCHITECTURES.iter().find(|(a, _, _)| *a == arch) else {
        bail!(
            "{}: GGUF architecture \"{arch}\" is not supported (llama, qwen2, qwen3 are)",
            gguf.display()
        );
    };
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let kind = g.string("tokenizer.ggml.model")?.unwrap_or("").to_string();
    let tokenizer = match kind.as_str() {
        "gpt2" => byte_level_tokenizer(&g, &tokens)?,
        "llama" => sentencepiece_tokenizer(&g, &tokens)?,
        _ => bail!(
            "{}: tokenizer \"{kind}\" (tokenizer.ggml.model) is not supported (byte-level BPE, \"gpt2\", and SentencePiece BPE, \"llama\", are)",
            gguf.display()
        ),
    };
    let config = config_json(&mut g, &arch, model_type, class, tokens.len())?;
    let parsed = super::config::ModelConfig::from_json(config.clone())
        .with_context(|| gguf.display().to_string())?;
    let tensors = tensors(&mut g, &arch, parsed.num_heads, parsed.num_kv_heads)?;
    let mut generation = json!({"do_sample": false});
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if !config[key].is_null() {
            generation[key] = config[key].clone();
        }
    }
    let json_bytes = |v: &Value| -> Result<Vec<u8>> { Ok(serde_json::to_vec_pretty(v)?) };
    let extra = [
        ("tokenizer.json", json_bytes(&tokenizer)?),
        (
            "tokenizer_config.json",
            json_bytes(&tokenizer_config(&g, &tokens)?)?,
        ),
        ("generation_config.json", json_bytes(&generation)?),
    ];
    let weights = super::weights::safetensors_bytes(tensors)?;
    // The result must load as any model directory does (shapes, names, tokenizer) before it
    // replaces `out`.
    super::write_dir_checked(out, &config, &weights, None, &extra, |dir| {
        super::load_frozen(dir, &crate::backend::Backend::cpu())?;
        crate::tokenizer::Tokenizer::from_dir(dir, None)?;
        Ok(())
    })
    .with_context(|| format!("{}: converted from {}", out.display(), gguf.display()))
}

/// Whether `path` names a GGUF file rather than a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && path.is_file()
}

/// The model directory for `path`: `path` itself, or for a `.gguf` file, its conversion, made
/// once into `<file>.pocl/` beside it (redone when the file is newer than the conversion).
/// Every place that opens a model directory goes through this function.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if !is_gguf(path) {
        return Ok(path.to_path_buf());
    }
    let name = path.file_name().expect("a file").to_string_lossy();
    let dir = path.with_file_name(format!("{name}.pocl"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (modified(path), modified(&dir.join("model.safetensors"))) {
        (Some(src), Some(conv)) => conv >= src,
        _ => false,
    };
    if !fresh {
        eprintln!("converting {} to {}", path.display(), dir.display());
        convert(path, &dir)?;
    }
    Ok(dir)
}
