//! Fresh models: a config.json for a family and shape, weights initialised as transformers does,
//! written as an ordinary HF directory next to a given tokenizer. The demo and the tests build
//! their teachers and students this way.

use super::config::ModelConfig;
use super::{gpt2, llama, opt, CausalLm, StateDict};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads (Llama family; = heads for multi-head attention).
    pub kv_heads: usize,
    /// MLP width (0 = the family's default: 4·hidden for GPT-2/OPT, ~8/3·hidden for Llama).
    pub intermediate: usize,
    pub max_positions: usize,
}

/// config.json of a `family` model of `shape` for a tokenizer of `vocab` ids with EOS `eos`.
pub fn config_json(family: &str, shape: &Shape, vocab: usize, eos: u32) -> Result<Value> {
    let s = shape;
    let llama_ffn = if s.intermediate > 0 {
        s.intermediate
    } else {
        (8 * s.hidden / 3).div_ceil(8) * 8
    };
    let ffn = if s.intermediate > 0 {
        s.intermediate
    } else {
        4 * s.hidden
    };
    Ok(match family {
        "gpt2" => {
            json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
            "n_embd": s.hidden, "n_layer": s.layers, "n_head": s.heads, "n_positions": s.max_positions,
            "n_inner": ffn, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": true, "dtype": "float32"})
        }
        "opt" => {
            json!({"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": vocab,
            "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "ffn_dim": ffn, "max_position_embeddings": s.max_positions, "word_embed_proj_dim": s.hidden,
            "do_layer_norm_before": true, "activation_function": "relu", "enable_bias": true,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "tie_word_embeddings": true, "dtype": "float32"})
        }
        "llama" | "qwen2" | "qwen3" => {
            let arch = match family {
                "llama" => "LlamaForCausalLM",
                "qwen2" => "Qwen2ForCausalLM",
                _ => "Qwen3ForCausalLM",
            };
            let mut c = json!({"model_type": family, "architectures": [arch], "vocab_size": vocab,
                "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
                "num_key_value_heads": s.kv_heads, "intermediate_size": llama_ffn,
                "max_position_embeddings": s.max_positions, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": family == "qwen2", "dtype": "float32"});
            if family == "qwen3" {
                c["head_dim"] = json!(s.hidden / s.heads);
            }
            c
        }
        other => bail!("unknown model family \"{other}\" (gpt2, opt, llama, qwen2, qwen3)"),
    })
}

/// Builds a freshly initialised model from a config (on the CPU; it is saved, not trained).
pub fn build(config: ModelConfig, seed: u64) -> Result<Box<dyn CausalLm>> {
    build_with(config, seed, false, false, &crate::backend::Backend::cpu())
}

/// [`build`], optionally frozen (forward only, see `Params::frozen`).
/// `frozen`: no autograd graph; `bf16`: also matrices packed to bf16 (see `model::load_frozen_bf16`).
pub fn build_with(
    config: ModelConfig,
    seed: u64,
    frozen: bool,
    bf16: bool,
    backend: &crate::backend::Backend,
) -> Result<Box<dyn CausalLm>> {
    let mut sd = StateDict::random(seed);
    sd.frozen = frozen || bf16;
    sd.bf16 = bf16;
    sd.backend = backend.clone();
    Ok(match config.family {
        super::config::Family::Gpt2 => Box::new(gpt2::Gpt2::new(config, &mut sd)?),
        super::config::Family::Opt => Box::new(opt::Opt::new(config, &mut sd)?),
        super::config::Family::Llama => Box::new(llama::Llama::new(config, &mut sd)?),
    })
}

/// Writes a new random `family` model of `shape` for the tokenizer in `tokenizer_dir` to `out`.
pub fn init(
    family: &str,
    shape: &Shape,
    tokenizer_dir: &Path,
    out: &Path,
    seed: u64,
) -> Result<Box<dyn CausalLm>> {
    let tok = Tokenizer::from_dir(tokenizer_dir, None)?;
    let Some(eos) = tok.eos_id else {
        bail!(
            "{}: the tokenizer has no EOS token",
            tokenizer_dir.display()
        )
    };
    if shape.heads == 0
        || !shape.hidden.is_multiple_of(shape.heads)
        || shape.kv_heads == 0
        || !shape.heads.is_multiple_of(shape.kv_heads)
    {
        bail!(
            "hidden ({}) must be divisible by heads ({}), and heads by kv heads ({})",
            shape.hidden,
            shape.heads,
            shape.kv_heads
        );
    }
    let config = ModelConfig::from_json(config_json(family, shape, tok.vocab_size(), eos)?)?;
    check_fits_memory(&config, available_memory())?;
    let model = build(config, seed)?;
    super::save(model.as_ref(), out, Some(tokenizer_dir))?;
    Ok(model)
}

/// An upper bound of a model's parameter count from its config (every family's tensors: the
/// embeddings, a position table, and per layer four attention and three MLP matrices).
fn max_parameters(c: &ModelConfig) -> u128 {
    let (v, h, f) = (
        c.vocab_size as u128,
        c.hidden_size as u128,
        c.intermediate_size as u128,
    );
    let attn = (c.num_heads * c.head_dim) as u128;
    let heads = if c.tie_word_embeddings { 1 } else { 2 };
    heads * v * h
        + c.max_positions as u128 * h
        + c.num_layers as u128 * (4 * h * attn + 3 * h * f + 8 * h)
}

/// Refuses a model whose f32 weights would not fit in `available` bytes (twice the weights:
/// saving serialises a copy). Without this the allocation aborts the process with no message.
fn check_fits_memory(c: &ModelConfig, available: Option<u64>) -> Result<()> {
    let params = max_parameters(c);
    let need = params.saturating_mul(8);
    if let Some(avail) = available {
        if need > avail as u128 {
            bail!(
                "a model of hidden {}, {} layers and vocabulary {} has up to {:.3e} parameters, \
                 needing {:.1} GB to build and save, but only {:.1} GB of memory is available; \
                 choose a smaller --hidden, --layers or --intermediate",
                c.hidden_size,
                c.num_layers,
                c.vocab_size,
                params as f64,
                need as f64 / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    Ok(())
}

/// The memory the system can give this process now (Linux: MemAvailable), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod size_tests {
    use super::*;

    fn gpt2(hidden: usize) -> ModelConfig {
        let shape = Shape {
            hidden,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            intermediate: 0,
            max_positions: 512,
        };
        ModelConfig::from_json(config_json("gpt2", &shape, 1000, 0).unwrap()).unwrap()
    }

    #[test]
    fn parameter_bound_covers_the_real_count() {
        // A GPT-2 block has 12h^2 + 13h parameters; embeddings v*h + p*h; final norm 2h.
        let h = 64u128;
        let exact = 1000 * h + 512 * h + 4 * (12 * h * h + 13 * h) + 2 * h;
        let bound = max_parameters(&gpt2(64));
        assert!(bound >= exact && bound < exact * 2, "{bound} vs {exact}");
        let model = build(gpt2(64), 0).unwrap();
        assert_eq!(model.params().num_elements() as u128, exact);
    }

    #[test]
    fn too_large_models_are_refused_before_allocating() {
        let e = check_fits_memory(&gpt2(100_000), Some(64 << 30)).unwrap_err();
        assert!(format!("{e}").contains("--hidden"), "{e}");
        check_fits_memory(&gpt2(64), Some(64 << 30)).unwrap();
        check_fits_memory(&gpt2(100_000), None).unwrap();
    }
}
