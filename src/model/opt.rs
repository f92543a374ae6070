//! OPT (transformers `OPTForCausalLM`).
//!
//! Learned positions with an offset of 2 (a fairseq legacy), ReLU MLP, biases everywhere, tied
//! head. Two shapes exist: pre-LN (`do_layer_norm_before = true`, most sizes) and the OPT-350m
//! shape, which is post-LN, has no final layer norm, and embeds tokens in a smaller
//! `word_embed_proj_dim` projected in and out of the hidden size.

use super::config::ModelConfig;
use super::{CausalLm, Input, KvCache, Params, StateDict};
use crate::ops::{self, linear};
use anyhow::Result;
use candle_core::Tensor;

/// Learned position embeddings are indexed by position + 2.
const POSITION_OFFSET: u32 = 2;

type Lin = (Tensor, Tensor); // torch layout [out, in], bias [out]

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
    attn_norm: Lin,
    fc1: Lin,
    fc2: Lin,
    ffn_norm: Lin,
}

pub struct Opt {
    config: ModelConfig,
    params: Params,
    embed_tokens: Tensor,        // [vocab, wep]
    embed_positions: Tensor,     // [max_positions + 2, d]
    project_in: Option<Tensor>,  // [d, wep]
    project_out: Option<Tensor>, // [wep, d]
    layers: Vec<Layer>,
    final_norm: Option<Lin>,
    lm_head: Tensor, // [vocab, wep]
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
        let mut params = Params::new(sd.frozen);
        let mut p = |name: &str, shape: &[usize]| {
            params.take(
                sd,
                &format!("{src}decoder.{name}"),
                &format!("model.decoder.{name}"),
                shape,
            )
        };
        let embed_tokens = p("embed_tokens.weight", &[v, wep])?;
        let embed_positions = p(
            "embed_positions.weight",
            &[config.max_positions + POSITION_OFFSET as usize, d],
        )?;
        let (project_in, project_out) = if wep != d {
            (
                Some(p("project_in.weight", &[d, wep])?),
                Some(p("project_out.weight", &[wep, d])?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let mut lin = |name: &str, out: usize, inp: Option<usize>| -> Result<Lin> {
                let w_shape = match inp {
                    Some(inp) => vec![out, inp],
                    None => vec![out], // layer norm
                };
                Ok((
                    p(&format!("layers.{i}.{name}.weight"), &w_shape)?,
                    p(&format!("layers.{i}.{name}.bias"), &[out])?,
                ))
            };
            layers.push(Layer {
                q: lin("self_attn.q_proj", d, Some(d))?,
                k: lin("self_attn.k_proj", d, Some(d))?,
                v: lin("self_attn.v_proj", d, Some(d))?,
                out: lin("self_attn.out_proj", d, Some(d))?,
                attn_norm: lin("self_attn_layer_norm", d, None)?,
                fc1: lin("fc1", f, Some(d))?,
                fc2: lin("fc2", d, Some(f))?,
                ffn_norm: lin("final_layer_norm", d, None)?,
            });
        }
        let final_norm = if has_final_norm {
            Some((
                p("final_layer_norm.weight", &[d])?,
                p("final_layer_norm.bias", &[d])?,
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
            params.take(sd, "lm_head.weight", "lm_head.weight", &[v, wep])?
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

    fn lm_head(&self) -> &Tensor {
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
        let bias = input.attention_bias()?;
        let mut x = self
            .embed_tokens
            .index_select(&input.ids.flatten_all()?, 0)?;
        if let Some(w) = &self.project_in {
            x = linear(&x, w, None)?;
        }
        let pos = (input.positions.flatten_all()? + POSITION_OFFSET as f64)?;
        let mut x = (x + self.embed_positions.index_select(&pos, 0)?)?.reshape((b, t, d))?;
        let norm = |x: &Tensor, (w, b): &Lin| ops::layer_norm(x, w, b, c.norm_eps);
        for (i, l) in self.layers.iter().enumerate() {
            let a = if pre_ln {
                norm(&x, &l.attn_norm)?
            } else {
                x.clone()
            };
            let heads = |(w, bb): &Lin| {
                linear(&a, w, Some(bb))?
                    .reshape((b, t, h, hd))?
                    .transpose(1, 2)
            };
            let (q, mut k, mut v) = (heads(&l.q)?, heads(&l.k)?, heads(&l.v)?);
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = cache.append(i, k, v)?;
            }
            let att = ops::attention(&q, &k, &v, &bias, 1.0 / (hd as f64).sqrt())?;
            x = (x + linear(&att, &l.out.0, Some(&l.out.1))?)?;
            if !pre_ln {
                x = norm(&x, &l.attn_norm)?;
            }
            let m = if pre_ln {
                norm(&x, &l.ffn_norm)?
            } else {
                x.clone()
            };
            let m = ops::activate(&linear(&m, &l.fc1.0, Some(&l.fc1.1))?, c.activation)?;
            x = (x + linear(&m, &l.fc2.0, Some(&l.fc2.1))?)?;
            if !pre_ln {
                x = norm(&x, &l.ffn_norm)?;
            }
        }
        if let Some(n) = &self.final_norm {
            x = norm(&x, n)?;
        }
        if let Some(w) = &self.project_out {
            x = linear(&x, w, None)?;
        }
        Ok(x)
    }
}
