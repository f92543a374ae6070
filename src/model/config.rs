//! Hugging Face `config.json`, in both styles seen in the wild:
//! transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
//! (`rope_parameters: {rope_theta, rope_type}`, `dtype`).
//!
//! Options we do not implement are refused here, with the key named, so a model never runs with
//! silently wrong numbers.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The model families pocl implements; each has its own file under `model/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Opt,
    /// Llama, Qwen2, Qwen3 and Mistral: one architecture driven by config flags.
    Llama,
}

/// The activation a config names (defined with the ops that compute it).
pub use crate::ops::Activation;

/// The resolved, validated configuration every family reads from.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub model_type: String,
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub norm_eps: f64,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    // Llama family.
    pub rope_theta: f64,
    /// Llama 3 frequency scaling (`rope_type: "llama3"`); `None` = the default rope.
    pub rope_llama3: Option<Llama3Rope>,
    /// Biases on the q/k/v projections (Qwen2 always, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`; never Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm on each head's queries and keys before RoPE.
    pub qk_norm: bool,
    // GPT-2.
    pub scale_attn_by_inverse_layer_idx: bool,
    // OPT.
    pub word_embed_proj_dim: usize,
    pub do_layer_norm_before: bool,
    /// The config.json as read; saving writes it back (dtype updated) so transformers reloads it.
    pub raw: Value,
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("key \"{key}\": expected a non-negative integer, got {x}")),
    }
}

fn need_usize(v: &Value, keys: &[&str]) -> Result<usize> {
    for k in keys {
        if let Some(n) = get_usize(v, k)? {
            return Ok(n);
        }
    }
    bail!("missing key \"{}\"", keys[0])
}

fn get_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("key \"{key}\": expected a number, got {x}")),
    }
}

fn get_bool(v: &Value, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| anyhow!("key \"{key}\": expected true or false, got {x}")),
    }
}

/// `eos_token_id` is an integer or a list of integers.
fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| anyhow!("key \"{key}\": expected integers"))
            })
            .collect(),
        Some(x) => Ok(vec![x
            .as_u64()
            .ok_or_else(|| anyhow!("key \"{key}\": expected an integer, got {x}"))?
            as u32]),
    }
}

fn activation(name: &str) -> Result<Activation> {
    Ok(match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        "relu" => Activation::Relu,
        "silu" | "swish" => Activation::Silu,
        other => bail!("activation \"{other}\" is not supported (gelu_new, gelu, relu, silu are)"),
    })
}

/// Llama 3.1 / 3.2 rope scaling (`rope_type: "llama3"`): long wavelengths divided by `factor`,
/// short ones kept, those between interpolated (transformers `_compute_llama3_parameters`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Rope settings: transformers 5 nests them in `rope_parameters`, transformers 4 has a top-level
/// `rope_theta` and an optional `rope_scaling`. The default rope and Llama 3 scaling are
/// implemented; any other scaling is refused with its key.
fn rope(v: &Value) -> Result<(f64, Option<Llama3Rope>)> {
    let mut theta = get_f64(v, "rope_theta")?;
    let mut llama3 = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(p) = v.get(key).filter(|p| !p.is_null()) else {
            continue;
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        match kind {
            "default" => {}
            "llama3" => {
                let need = |k: &str| {
                    get_f64(p, k)?.ok_or_else(|| anyhow!("key \"{key}.{k}\": missing (llama3 rope)"))
                };
                let r = Llama3Rope {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                };
                if r.factor <= 0.0 || r.high_freq_factor <= r.low_freq_factor || r.low_freq_factor <= 0.0 {
                    bail!("key \"{key}\": llama3 rope needs factor > 0 and high_freq_factor > low_freq_factor > 0");
                }
                llama3 = Some(r);
            }
            _ => bail!("key \"{key}.rope_type\": rope scaling \"{kind}\" is not implemented (only the default and llama3 ropes are)"),
        }
        if let Some(t) = get_f64(p, "rope_theta")? {
            theta = Some(t);
        }
    }
    Ok((theta.unwrap_or(10_000.0), llama3))
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let dir = &super::gguf::model_dir(dir)?;
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let v = &raw;
        let model_type = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("missing key \"model_type\""))?
            .to_string();
        let family = match model_type.as_str() {
            "gpt2" => Family::Gpt2,
            "opt" => Family::Opt,
            "llama" | "qwen2" | "qwen3" | "mistral" => Family::Llama,
            other => bail!(
                "unknown architecture \"{other}\" (model_type); supported: gpt2, opt, llama, qwen2, qwen3, mistral"
            ),
        };
        for key in ["num_experts", "num_local_experts", "n_routed_experts"] {
            if get_usize(v, key)?.unwrap_or(0) > 0 {
                bail!("key \"{key}\": mixture-of-experts models are not supported");
            }
        }
        let vocab_size = need_usize(v, &["vocab_size"])?;
        let hidden_size = need_usize(v, &["hidden_size", "n_embd"])?;
        let num_layers = need_usize(v, &["num_hidden_layers", "n_layer"])?;
        let num_heads = need_usize(v, &["num_attention_heads", "n_head"])?;
        if num_heads == 0 || hidden_size == 0 || num_layers == 0 || vocab_size == 0 {
            bail!("hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be positive");
        }
        let num_kv_heads = get_usize(v, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("key \"num_key_value_heads\": {num_kv_heads} does not divide num_attention_heads {num_heads}");
        }
        let head_dim = match get_usize(v, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}");
                }
                hidden_size / num_heads
            }
        };
        let (default_act, default_ffn) = match family {
            Family::Gpt2 => ("gelu_new", 4 * hidden_size),
            Family::Opt => ("relu", 4 * hidden_size),
            Family::Llama => ("silu", 0),
        };
        let act_name = ["activation_function", "hidden_act"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
            .unwrap_or(default_act);
        let intermediate_size = get_usize(v, "intermediate_size")?
            .or(get_usize(v, "ffn_dim")?)
            .or(get_usize(v, "n_inner")?)
            .unwrap_or(default_ffn);
        if intermediate_size == 0 {
            bail!("missing key \"intermediate_size\"");
        }
        let mut max_positions = 2048;
        for key in ["n_positions", "max_position_embeddings"] {
            if let Some(n) = get_usize(v, key)? {
                if n == 0 {
                    bail!("key \"{key}\": the model must have at least one position (got 0)");
                }
                max_positions = n;
            }
        }
        let mut norm_eps = 1e-5;
        for key in ["layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"] {
            if let Some(eps) = get_f64(v, key)? {
                // eps <= 0 divides by zero on a constant row (a NaN the model would spread).
                if eps <= 0.0 {
                    bail!("key \"{key}\": the norm epsilon must be > 0 (got {eps})");
                }
                norm_eps = eps;
            }
        }
        let tie_default = !matches!(model_type.as_str(), "llama" | "mistral" | "qwen3");
        let tie_word_embeddings = get_bool(v, "tie_word_embeddings", tie_default)?;

        // A sliding window changes the attention pattern; we only implement full attention.
        let sliding = get_usize(v, "sliding_window")?.is_some();
        let use_sliding = match model_type.as_str() {
            "qwen2" | "qwen3" => get_bool(v, "use_sliding_window", false)?,
            _ => sliding,
        };
        if use_sliding && family == Family::Llama {
            bail!("key \"sliding_window\": sliding-window attention is not implemented (set it to null to use full attention)");
        }
        if family == Family::Gpt2 && get_bool(v, "add_cross_attention", false)? {
            bail!("key \"add_cross_attention\": cross-attention GPT-2 is not supported");
        }
        let (rope_theta, rope_llama3) = if family == Family::Llama {
            rope(v)?
        } else {
            (10_000.0, None)
        };
        let attention_bias = get_bool(v, "attention_bias", false)?;
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let word_embed_proj_dim = get_usize(v, "word_embed_proj_dim")?.unwrap_or(hidden_size);
        if family == Family::Opt && !get_bool(v, "enable_bias", true)? {
            bail!("key \"enable_bias\": OPT without biases is not supported");
        }
        if family == Family::Opt && !get_bool(v, "layer_norm_elementwise_affine", true)? {
            bail!("key \"layer_norm_elementwise_affine\": OPT without affine layer norms is not supported");
        }
        let eos_token_ids = token_ids(v, "eos_token_id")?;
        for (key, ids) in [
            ("eos_token_id", eos_token_ids.clone()),
            ("bos_token_id", token_ids(v, "bos_token_id")?),
            ("pad_token_id", token_ids(v, "pad_token_id")?),
        ] {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                bail!("key \"{key}\": id {id} is beyond the vocabulary (vocab_size {vocab_size})");
            }
        }
        if rope_theta <= 0.0 {
            bail!("key \"rope_theta\": must be > 0 (got {rope_theta})");
        }
        Ok(ModelConfig {
            family,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            max_positions,
            norm_eps,
            activation: activation(act_name)?,
            tie_word_embeddings,
            eos_token_ids,
            bos_token_id: token_ids(v, "bos_token_id")?.first().copied(),
            pad_token_id: token_ids(v, "pad_token_id")?.first().copied(),
            rope_theta,
            rope_llama3,
            qkv_bias,
            o_bias,
            mlp_bias: get_bool(v, "mlp_bias", false)?,
            qk_norm: model_type == "qwen3",
            scale_attn_by_inverse_layer_idx: get_bool(v, "scale_attn_by_inverse_layer_idx", false)?,
            word_embed_proj_dim,
            do_layer_norm_before: get_bool(v, "do_layer_norm_before", true)?,
            model_type,
            raw,
        })
    }

    /// The config.json to save next to f32 weights: the original, with the dtype keys updated.
    pub fn to_saved_json(&self) -> Value {
        let mut raw = self.raw.clone();
        if let Some(obj) = raw.as_object_mut() {
            let key = if obj.contains_key("torch_dtype") {
                "torch_dtype"
            } else {
                "dtype"
            };
            obj.insert(key.to_string(), Value::String("float32".into()));
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama(extra: Value) -> Result<ModelConfig> {
        let mut v = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(v)
    }

    #[test]
    fn rope_theta_in_both_styles() {
        assert_eq!(
            llama(json!({"rope_theta": 500000.0})).unwrap().rope_theta,
            500000.0
        );
        let v5 = json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}});
        assert_eq!(llama(v5).unwrap().rope_theta, 1e6);
        assert_eq!(llama(json!({})).unwrap().rope_theta, 10000.0);
    }

    #[test]
    fn unsupported_options_are_refused_with_the_key() {
        let e = llama(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})).unwrap_err();
        assert!(format!("{e}").contains("rope_scaling"), "{e}");
        let e = llama(json!({"sliding_window": 4096})).unwrap_err();
        assert!(format!("{e}").contains("sliding_window"), "{e}");
        let e = llama(json!({"num_local_experts": 8})).unwrap_err();
        assert!(format!("{e}").contains("num_local_experts"), "{e}");
        let e = ModelConfig::from_json(json!({"model_type": "bert"})).unwrap_err();
        assert!(
            format!("{e}").contains("unknown architecture \"bert\""),
            "{e}"
        );
        let e = llama(json!({"num_key_value_heads": 3})).unwrap_err();
        assert!(format!("{e}").contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn qwen2_sliding_window_is_ignored_when_disabled() {
        let mut v = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "sliding_window": 4096, "use_sliding_window": false});
        let c = ModelConfig::from_json(v.clone()).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        v["use_sliding_window"] = json!(true);
        assert!(ModelConfig::from_json(v).is_err());
    }

    #[test]
    fn llama3_rope_in_both_styles() {
        let p = json!({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = llama(json!({"rope_parameters": p.clone()})).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.rope_llama3.unwrap().factor, 8.0);
        let mut v4 = p.clone();
        v4.as_object_mut().unwrap().remove("rope_theta");
        let c = llama(json!({"rope_theta": 5e5, "rope_scaling": v4})).unwrap();
        assert_eq!(
            c.rope_llama3.unwrap().original_max_position_embeddings,
            8192.0
        );
        let mut bad = p;
        bad.as_object_mut().unwrap().remove("low_freq_factor");
        let e = llama(json!({"rope_parameters": bad})).unwrap_err();
        assert!(
            format!("{e}").contains("rope_parameters.low_freq_factor"),
            "{e}"
        );
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = llama(json!({"eos_token_id": [2, 7]})).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 7]);
    }
}
