//! OPT (transformers `OPTForCausalLM`).
//!
//! Learned positions with an offset of 2 (a fairseq legacy), ReLU MLP, biases everywhere, tied
//! head. Two shapes exist: pre-LN (`do_layer_norm_before = true`, most sizes) and the OPT-350m
//! shape, which is post-LN, has no final layer norm, and embeds tokens in a smaller
//! `word_embed_proj_dim` projected in and out of the hidden size.

use super::config::ModelConfig;
use super::{CausalLm, Input, KvCache, Params, StateDict};
use crate::ops::Weight;
use anyhow::Result;
use candle_core::Tensor;

/// Learned position embeddings are indexed by position + 2.
const POSITION_OFFSET: u32 = 2;

type Lin = (Weight, Tensor); // torch layout [out, in], bias [out]
type Norm = (Tensor, Tensor); // LayerNorm weight, bias

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
    attn_norm: Norm,
    fc1: Lin,
    fc2: Lin,
    ffn_norm: Norm,
}

pub struct Opt {
    config: ModelConfig,
    params: Params,
    embed_tokens: Weight,        // [vocab, wep]
    embed_positions: Tensor,     // [max_positions + 2, d]
    project_in: Option<Weight>,  // [d, wep]
    project_out: Option<Weight>, // [wep, d]
    layers: Vec<Layer>,
    final_norm: Option<Norm>,
    lm_head: Weight, // [vocab, wep]
}

impl Opt {
    pub fn new(config: ModelConfig, sd: &mut StateDict) -> Result<Self> {
        let (d, v, f, wep) = (
            config.hidden_size,
            config.vocab_size,
            config.intermediate_size,
            config.word_embed_proj_dim,
        );
        let src = if sd.contains("decoder.embed_tokens.weight") {
            ""
        } else {
            "model."
        };
        let has_final_norm = config.do_layer_norm_before
            && !config
                .raw
                .get("_remove_final_layer_norm")
                .and_then(|x| x.as_bool())
                .unwrap_or(false);
        let mut params = Params::new(sd);
        let key = |name: &str| {
            (
                format!("{src}decoder.{name}"),
                format!("model.decoder.{name}"),
            )
        };
        let p = |params: &mut Params, sd: &mut StateDict, name: &str, shape: &[usize]| {
            let (from, to) = key(name);
            params.take(sd, &from, &to, shape)
        };
        let m = |params: &mut Params, sd: &mut StateDict, name: &str, shape: &[usize]| {
            let (from, to) = key(name);
            params.weight(sd, &from, &to, shape, true)
        };
        let ps = &mut params;
        let (from, to) = key("embed_tokens.weight");
        let embed_tokens = ps.embedding(sd, &from, &to, &[v, wep])?;
        let embed_positions = p(
            ps,
            sd,
            "embed_positions.weight",
            &[config.max_positions + POSITION_OFFSET as usize, d],
        )?;
        let (project_in, project_out) = if wep != d {
            (
                Some(m(ps, sd, "project_in.weight", &[d, wep])?),
                Some(m(ps, sd, "project_out.weight", &[wep, d])?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Lin> {
                Ok((
                    m(ps, sd, &format!("layers.{i}.{name}.weight"), &[out, inp])?,
                    p(ps, sd, &format!("layers.{i}.{name}.bias"), &[out])?,
                ))
            };
            let (q, k, vv, out) = (
                lin("self_attn.q_proj", d, d)?,
                lin("self_attn.k_proj", d, d)?,
                lin("self_attn.v_proj", d, d)?,
                lin("self_attn.out_proj", d, d)?,
            );
            let attn_norm = (
                p(
                    ps,
                    sd,
                    &format!("layers.{i}.self_attn_layer_norm.weight"),
                    &[d],
                )?,
                p(
                    ps,
                    sd,
                    &format!("layers.{i}.self_attn_layer_norm.bias"),
                    &[d],
                )?,
            );
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Lin> {
                Ok((
                    m(ps, sd, &format!("layers.{i}.{name}.weight"), &[out, inp])?,
                    p(ps, sd, &format!("layers.{i}.{name}.bias"), &[out])?,
                ))
            };
            let (fc1, fc2) = (lin("fc1", f, d)?, lin("fc2", d, f)?);
            let ffn_norm = (
                p(ps, sd, &format!("layers.{i}.final_layer_norm.weight"), &[d])?,
                p(ps, sd, &format!("layers.{i}.final_layer_norm.bias"), &[d])?,
            );
            layers.push(Layer {
                q,
                k,
                v: vv,
                out,
                attn_norm,
                fc1,
                fc2,
                ffn_norm,
            });
        }
        let final_norm = if has_final_norm {
            Some((
                p(ps, sd, "final_layer_norm.weight", &[d])?,
                p(ps, sd, "final_layer_norm.bias", &[d])?,
            ))
        } else {
            None
        };
        let lm_head = if config.tie_word_embeddings {
            if sd.contains("lm_head.weight") {
                sd.take("lm_head.weight", &[v, wep])?;
            }
            embed_tokens.clone()
        } else {
            params.embedding(sd, "lm_head.weight", "lm_head.weight", &[v, wep])?
        };
        Ok(Opt {
            config,
            params,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_norm,
            lm_head,
        })
    }
}

impl CausalLm for Opt {
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
        let (h, hd, d) = (c.num_heads, c.hidden_size / c.num_heads, c.hidden_size);
        let pre_ln = c.do_layer_norm_before;
        let kn = self.params.backend().kernels;
        let bias = input.attention_bias()?;
        let mut x = kn.embed(&self.embed_tokens, input.ids)?;
        if let Some(w) = &self.project_in {
            x = kn.linear(w, &x, None)?;
        }
        let pos = (input.positions.flatten_all()? + POSITION_OFFSET as f64)?;
        let positions = kn.embed(&Weight::out_in(self.embed_positions.clone()), &pos)?;
        let mut x = (x + positions)?.reshape((b, t, d))?;
        let norm = |x: &Tensor, (w, b): &Norm| kn.layer_norm(x, w, b, c.norm_eps);
        for (i, l) in self.layers.iter().enumerate() {
            let a = if pre_ln {
                norm(&x, &l.attn_norm)?
            } else {
                x.clone()
            };
            let heads = |(w, bb): &Lin| {
                kn.linear(w, &a, Some(bb))?
                    .reshape((b, t, h, hd))?
                    .transpose(1, 2)
            };
            let (q, mut k, mut v) = (heads(&l.q)?, heads(&l.k)?, heads(&l.v)?);
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = cache.append(i, k, v)?;
            }
            let att = kn.attention(&q, &k, &v, &bias, 1.0 / (hd as f64).sqrt())?;
            x = (x + kn.linear(&l.out.0, &att, Some(&l.out.1))?)?;
            if !pre_ln {
                x = norm(&x, &l.attn_norm)?;
            }
            let m = if pre_ln {
                norm(&x, &l.ffn_norm)?
            } else {
                x.clone()
            };
            let m = kn.linear_activate(&l.fc1.0, &m, Some(&l.fc1.1), c.activation)?;
            x = (x + kn.linear(&l.fc2.0, &m, Some(&l.fc2.1))?)?;
            if !pre_ln {
                x = norm(&x, &l.ffn_norm)?;
            }
        }
        if let Some(n) = &self.final_norm {
            x = norm(&x, n)?;
        }
        if let Some(w) = &self.project_out {
            x = kn.linear(w, &x, None)?;
        }
        Ok(x)
    }
}
