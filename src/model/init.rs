//! Fresh models: a config.json for a family and shape, weights initialised as transformers does,
//! written as an ordinary HF directory next to a given tokenizer. The demo and the tests build
//! their teachers and students this way. Also students pruned from a teacher ([`init_from`]).

use super::config::ModelConfig;
use super::{gpt2, llama, opt, CausalLm, Matrices, StateDict};
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
    build_with(
        config,
        seed,
        false,
        Matrices::F32,
        &crate::backend::Backend::cpu(),
    )
}

/// [`build`], optionally frozen (forward only, see `Params::frozen`).
/// `frozen`: no autograd graph; `matrices`: their form (frozen unless [`Matrices::F32`]).
pub fn build_with(
    config: ModelConfig,
    seed: u64,
    frozen: bool,
    matrices: Matrices,
    backend: &crate::backend::Backend,
) -> Result<Box<dyn CausalLm>> {
    let mut sd = StateDict::random(seed);
    sd.frozen = frozen || matrices != Matrices::F32;
    sd.matrices = matrices;
    sd.backend = backend.clone();
    build_from(config, &mut sd)
}

fn build_from(config: ModelConfig, sd: &mut StateDict) -> Result<Box<dyn CausalLm>> {
    Ok(match config.family {
        super::config::Family::Gpt2 => Box::new(gpt2::Gpt2::new(config, sd)?),
        super::config::Family::Opt => Box::new(opt::Opt::new(config, sd)?),
        super::config::Family::Llama => Box::new(llama::Llama::new(config, sd)?),
    })
}

/// A trainable random model whose linear layers compute in `precision` (see `Params::weight`).
pub fn build_student(
    config: ModelConfig,
    seed: u64,
    precision: crate::backend::StudentPrecision,
    backend: &crate::backend::Backend,
) -> Result<Box<dyn CausalLm>> {
    let mut sd = StateDict::random(seed);
    sd.backend = backend.clone();
    sd.precision = precision;
    build_from(config, &mut sd)
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

/// Which of the teacher's layers a student pruned from it keeps (`pocl init --from`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepLayers {
    /// This many, evenly spaced, the first and the last included (`--keep-layers N`).
    Count(usize),
    /// These layer indices, increasing (`--layers 0,4,8`).
    Indices(Vec<usize>),
}

impl KeepLayers {
    /// The kept layer indices of a `total`-layer teacher, increasing.
    pub fn resolve(&self, total: usize) -> Result<Vec<usize>> {
        match self {
            KeepLayers::Count(n) => {
                let n = *n;
                if n == 0 || n > total {
                    bail!("--keep-layers {n}: the teacher has {total} layers (keep 1 to {total})");
                }
                if n == 1 {
                    return Ok(vec![0]);
                }
                // round(i·(total−1)/(n−1)), half up: 0 and total−1 always, distinct since n ≤ total.
                Ok((0..n)
                    .map(|i| (2 * i * (total - 1) + (n - 1)) / (2 * (n - 1)))
                    .collect())
            }
            KeepLayers::Indices(ix) => {
                if ix.is_empty() {
                    bail!("--layers: no layer given");
                }
                if let Some(&bad) = ix.iter().find(|&&i| i >= total) {
                    bail!(
                        "--layers: layer {bad} does not exist (the teacher has layers 0 to {})",
                        total - 1
                    );
                }
                if ix.windows(2).any(|w| w[0] >= w[1]) {
                    bail!("--layers {ix:?}: give each layer once, in increasing order");
                }
                Ok(ix.clone())
            }
        }
    }
}

/// The layer index in an HF parameter name (`model.layers.3.mlp…`, `transformer.h.3.attn…`,
/// `model.decoder.layers.3.fc1…`), split as (prefix, index, suffix); `None` outside the layers.
fn layer_of(name: &str) -> Option<(String, usize, String)> {
    let parts: Vec<&str> = name.split('.').collect();
    (1..parts.len()).find_map(|k| {
        let i = parts[k].parse::<usize>().ok()?;
        matches!(parts[k - 1], "h" | "layers")
            .then(|| (parts[..k].join("."), i, parts[k + 1..].join(".")))
    })
}

/// A student pruned from `teacher`: its embeddings, final norm, lm head and the layers `keep`
/// chooses (renumbered from 0), saved in HF layout to `out` with the teacher's tokenizer files.
/// Returns the kept teacher layers and the student's parameter count.
pub fn init_from(teacher: &Path, keep: &KeepLayers, out: &Path) -> Result<(Vec<usize>, usize)> {
    // Copying weights needs no kernels: the CPU, frozen.
    let model = crate::model::load_frozen(teacher, &crate::backend::Backend::cpu())?;
    let config = model.config();
    let kept = keep.resolve(config.num_layers)?;
    let mut raw = config.to_saved_json();
    let key = if raw.get("n_layer").is_some() {
        "n_layer"
    } else {
        "num_hidden_layers"
    };
    raw[key] = json!(kept.len());
    // transformers 5 lists a per-layer attention kind (Qwen2/Qwen3): keep the chosen layers' entries.
    if let Some(types) = raw.get("layer_types").and_then(|t| t.as_array()).cloned() {
        if types.len() == config.num_layers {
            raw["layer_types"] = Value::Array(kept.iter().map(|&i| types[i].clone()).collect());
        }
    }
    ModelConfig::from_json(raw.clone())?;
    let mut tensors = Vec::new();
    let mut count = 0;
    for (name, var) in model.params().iter() {
        let new_name = match layer_of(name) {
            None => name.to_string(),
            Some((prefix, i, suffix)) => match kept.iter().position(|&k| k == i) {
                Some(j) => format!("{prefix}.{j}.{suffix}"),
                None => continue,
            },
        };
        count += var.elem_count();
        tensors.push((new_name, var.as_tensor().clone()));
    }
    let weights = super::weights::safetensors_bytes(tensors)?;
    super::write_dir(out, &raw, &weights, Some(teacher), &[])?;
    Ok((kept, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_layers_keep_first_and_last() {
        let r = |n, total| KeepLayers::Count(n).resolve(total).unwrap();
        assert_eq!(r(10, 30), vec![0, 3, 6, 10, 13, 16, 19, 23, 26, 29]);
        assert_eq!(r(2, 3), vec![0, 2]);
        assert_eq!(r(3, 3), vec![0, 1, 2]);
        assert_eq!(r(4, 12), vec![0, 4, 7, 11]);
        assert_eq!(r(1, 5), vec![0]);
        assert!(KeepLayers::Count(4).resolve(3).is_err());
        assert!(KeepLayers::Count(0).resolve(3).is_err());
    }

    #[test]
    fn explicit_layers_are_checked() {
        let r = |v: &[usize]| KeepLayers::Indices(v.to_vec()).resolve(4);
        assert_eq!(r(&[0, 3]).unwrap(), vec![0, 3]);
        let e = r(&[0, 4]).unwrap_err().to_string();
        assert!(e.contains("layer 4 does not exist"), "{e}");
        assert!(r(&[2, 1]).is_err() && r(&[1, 1]).is_err() && r(&[]).is_err());
    }

    #[test]
    fn layer_index_in_hf_names() {
        let l = |n| layer_of(n).map(|(p, i, s)| format!("{p}|{i}|{s}"));
        assert_eq!(
            l("model.layers.12.mlp.up_proj.weight").unwrap(),
            "model.layers|12|mlp.up_proj.weight"
        );
        assert_eq!(
            l("transformer.h.3.ln_1.bias").unwrap(),
            "transformer.h|3|ln_1.bias"
        );
        assert_eq!(
            l("model.decoder.layers.0.fc1.weight").unwrap(),
            "model.decoder.layers|0|fc1.weight"
        );
        assert_eq!(l("model.norm.weight"), None);
        assert_eq!(l("transformer.wte.weight"), None);
    }
}
