//! The Llama architecture and its config-driven variants (transformers `LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `MistralForCausalLM`).
//!
//! Pre-RMSNorm blocks, rotary positions (rotate-half convention), grouped-query attention, gated
//! MLP. The variants differ only by flags read in config.rs: Qwen2 adds q/k/v biases and ties the
//! head; Qwen3 normalises each head's queries and keys (q_norm / k_norm) and may set a head_dim
//! other than hidden / heads.

use super::config::{Llama3Rope, ModelConfig};
use super::{CausalLm, Input, KvCache, Params, StateDict};
use crate::ops::{Kernels, Weight};
use anyhow::Result;
use candle_core::{Device, Tensor, D};

struct Layer {
    input_norm: Tensor,
    q: (Weight, Option<Tensor>),
    k: (Weight, Option<Tensor>),
    v: (Weight, Option<Tensor>),
    o: (Weight, Option<Tensor>),
    q_norm: Option<Tensor>, // [head_dim], Qwen3
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate: (Weight, Option<Tensor>),
    up: (Weight, Option<Tensor>),
    down: (Weight, Option<Tensor>),
}

pub struct Llama {
    config: ModelConfig,
    params: Params,
    embed_tokens: Weight, // [vocab, d]
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Weight, // [vocab, d]
    inv_freq: Vec<f32>,
}

impl Llama {
    pub fn new(config: ModelConfig, sd: &mut StateDict) -> Result<Self> {
        let c = &config;
        let (d, v, f, hd) = (c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let mut params = Params::new(sd);
        let p = |params: &mut Params, sd: &mut StateDict, name: &str, shape: &[usize]| {
            params.take(sd, name, name, shape)
        };
        let embed_tokens = params.embedding(
            sd,
            "model.embed_tokens.weight",
            "model.embed_tokens.weight",
            &[v, d],
        )?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let pre = format!("model.layers.{i}");
            let mut lin = |name: &str,
                           out: usize,
                           inp: usize,
                           bias: bool|
             -> Result<(Weight, Option<Tensor>)> {
                let wn = format!("{pre}.{name}.weight");
                let w = params.weight(sd, &wn, &wn, &[out, inp], true)?;
                let b = if bias {
                    Some(p(&mut params, sd, &format!("{pre}.{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok((w, b))
            };
            let q = lin("self_attn.q_proj", qd, d, c.qkv_bias)?;
            let k = lin("self_attn.k_proj", kvd, d, c.qkv_bias)?;
            let vv = lin("self_attn.v_proj", kvd, d, c.qkv_bias)?;
            let o = lin("self_attn.o_proj", d, qd, c.o_bias)?;
            let gate = lin("mlp.gate_proj", f, d, c.mlp_bias)?;
            let up = lin("mlp.up_proj", f, d, c.mlp_bias)?;
            let down = lin("mlp.down_proj", d, f, c.mlp_bias)?;
            let (params, sd) = (&mut params, &mut *sd);
            let input_norm = p(params, sd, &format!("{pre}.input_layernorm.weight"), &[d])?;
            let post_norm = p(
                params,
                sd,
                &format!("{pre}.post_attention_layernorm.weight"),
                &[d],
            )?;
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(p(
                        params,
                        sd,
                        &format!("{pre}.self_attn.q_norm.weight"),
                        &[hd],
                    )?),
                    Some(p(
                        params,
                        sd,
                        &format!("{pre}.self_attn.k_norm.weight"),
                        &[hd],
                    )?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_norm,
                q,
                k,
                v: vv,
                o,
                q_norm,
                k_norm,
                post_norm,
                gate,
                up,
                down,
            });
        }
        let norm = p(&mut params, sd, "model.norm.weight", &[d])?;
        let lm_head = if c.tie_word_embeddings {
            if sd.contains("lm_head.weight") {
                sd.take("lm_head.weight", &[v, d])?;
            }
            embed_tokens.clone()
        } else {
            params.embedding(sd, "lm_head.weight", "lm_head.weight", &[v, d])?
        };
        let inv_freq = inv_freq(c);
        Ok(Llama {
            config,
            params,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// cos and sin [b, 1, t, head_dim] for the given positions (angles in f64, then f32).
    fn rope_tables(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let pos = positions.to_vec2::<u32>()?;
        let (b, t, hd) = (pos.len(), pos[0].len(), self.config.head_dim);
        let (mut cos, mut sin) = (
            Vec::with_capacity(b * t * hd),
            Vec::with_capacity(b * t * hd),
        );
        for row in &pos {
            for &p in row {
                // The two halves of a head share the same frequencies (cat(freqs, freqs)).
                for _half in 0..2 {
                    for &f in &self.inv_freq {
                        let a = p as f64 * f as f64;
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        // Made on the host (angles in f64), then moved to the model's device.
        let dev = positions.device();
        Ok((
            Tensor::from_vec(cos, (b, 1, t, hd), &Device::Cpu)?.to_device(dev)?,
            Tensor::from_vec(sin, (b, 1, t, hd), &Device::Cpu)?.to_device(dev)?,
        ))
    }
}

/// The rope's inverse frequencies, in f32 as transformers computes them (identical angles):
/// θ^(−2i/d), then, for Llama 3 scaling, long wavelengths divided by `factor`, short ones kept and
/// the band between interpolated (`_compute_llama3_parameters`, same f32 operations).
fn inv_freq(c: &ModelConfig) -> Vec<f32> {
    rope_inv_freq(c.rope_theta, c.head_dim, c.rope_llama3)
}

/// [`inv_freq`] from the rope's parameters alone (GGUF conversion matches llama.cpp's
/// `rope_freqs` against it).
pub fn rope_inv_freq(theta: f64, hd: usize, llama3: Option<Llama3Rope>) -> Vec<f32> {
    let base = (0..hd / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / hd as f32));
    let Some(r) = llama3 else {
        return base.collect();
    };
    let (factor, low, high) = (
        r.factor as f32,
        r.low_freq_factor as f32,
        r.high_freq_factor,
    );
    let old_len = r.original_max_position_embeddings;
    let (low_wavelen, high_wavelen) = (
        (old_len / r.low_freq_factor) as f32,
        (old_len / high) as f32,
    );
    let span = (high - r.low_freq_factor) as f32;
    base.map(|f| {
        // torch's `scalar / tensor` is reciprocal(tensor) * scalar.
        let wavelen = (1.0 / f) * std::f64::consts::TAU as f32;
        if wavelen < high_wavelen {
            f
        } else if wavelen > low_wavelen {
            f / factor
        } else {
            let smooth = ((1.0 / wavelen) * old_len as f32 - low) / span;
            (1.0 - smooth) * f / factor + smooth * f
        }
    })
    .collect()
}

/// x·cos + rotate_half(x)·sin with rotate_half(x) = cat(−x₂, x₁) over the two halves of the head.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn lin(k: Kernels, x: &Tensor, (w, b): &(Weight, Option<Tensor>)) -> candle_core::Result<Tensor> {
    k.linear(w, x, b.as_ref())
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn lm_head(&self) -> &Weight {
        &self.lm_head
    }

    fn hidden(
        &self,
        input: &Input,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t) = input.ids.dims2()?;
        let (hd, eps) = (c.head_dim, c.norm_eps);
        let kn = self.params.backend().kernels;
        let bias = input.attention_bias()?;
        let (cos, sin) = self.rope_tables(input.positions)?;
        let mut x = kn
            .embed(&self.embed_tokens, input.ids)?
            .reshape((b, t, c.hidden_size))?;
        for (i, l) in self.layers.iter().enumerate() {
            let a = kn.rms_norm(&x, &l.input_norm, eps)?;
            // [b, t, heads·hd] -> [b, heads, t, hd], with Qwen3's per-head norm before rope.
            let heads = |proj: &(Weight, Option<Tensor>),
                         n: usize,
                         norm: &Option<Tensor>|
             -> candle_core::Result<Tensor> {
                let y = lin(kn, &a, proj)?.reshape((b, t, n, hd))?;
                let y = match norm {
                    Some(w) => kn.rms_norm(&y, w, eps)?,
                    None => y,
                };
                y.transpose(1, 2)
            };
            let q = apply_rope(&heads(&l.q, c.num_heads, &l.q_norm)?, &cos, &sin)?;
            let mut k = apply_rope(&heads(&l.k, c.num_kv_heads, &l.k_norm)?, &cos, &sin)?;
            let mut v = heads(&l.v, c.num_kv_heads, &None)?;
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = cache.append(i, k.contiguous()?, v.contiguous()?)?;
            }
            let att = kn.attention(&q, &k, &v, &bias, 1.0 / (hd as f64).sqrt())?;
            x = (x + lin(kn, &att, &l.o)?)?;
            let m = kn.rms_norm(&x, &l.post_norm, eps)?;
            let g = kn.linear_activate(&l.gate.0, &m, l.gate.1.as_ref(), c.activation)?;
            x = (x + lin(kn, &(g * lin(kn, &m, &l.up)?)?, &l.down)?)?;
        }
        kn.rms_norm(&x, &self.norm, eps)
    }
}
