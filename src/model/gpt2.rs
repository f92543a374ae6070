//! GPT-2 (transformers `GPT2LMHeadModel`).
//!
//! Pre-LN blocks, learned absolute positions, fused qkv projection, tied lm head. Weights use
//! the `Conv1D` layout [in, out] (y = x·W + b), unlike `nn.Linear`. Hub files come with and
//! without the `transformer.` key prefix and carry `attn.bias` / `attn.masked_bias` buffers,
//! which are not parameters and are ignored.

use super::config::ModelConfig;
use super::{CausalLm, Input, KvCache, Params, StateDict};
use crate::ops;
use anyhow::Result;
use candle_core::{Tensor, D};

struct Block {
    ln_1: (Tensor, Tensor),
    c_attn: (Tensor, Tensor), // [d, 3d], [3d]
    c_proj: (Tensor, Tensor), // [d, d], [d]
    ln_2: (Tensor, Tensor),
    c_fc: (Tensor, Tensor),     // [d, inner], [inner]
    mlp_proj: (Tensor, Tensor), // [inner, d], [d]
}

pub struct Gpt2 {
    config: ModelConfig,
    params: Params,
    wte: Tensor, // [vocab, d], also the lm head
    wpe: Tensor, // [n_positions, d]
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
}

/// Conv1D: x [.., in] · w [in, out] + b.
fn conv1d(x: &Tensor, (w, b): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    ops::linear_in_out(x, w, Some(b))
}

impl Gpt2 {
    pub fn new(config: ModelConfig, sd: &mut StateDict) -> Result<Self> {
        let (d, v, inner) = (
            config.hidden_size,
            config.vocab_size,
            config.intermediate_size,
        );
        // Files saved by transformers use `transformer.`; the original hub files do not.
        let src = if sd.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let mut params = Params::new(sd.frozen);
        let mut p = |name: &str, shape: &[usize]| {
            params.take(
                sd,
                &format!("{src}{name}"),
                &format!("transformer.{name}"),
                shape,
            )
        };
        let wte = p("wte.weight", &[v, d])?;
        let wpe = p("wpe.weight", &[config.max_positions, d])?;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let mut pair = |name: &str, w: &[usize], b: usize| -> Result<(Tensor, Tensor)> {
                Ok((
                    p(&format!("h.{i}.{name}.weight"), w)?,
                    p(&format!("h.{i}.{name}.bias"), &[b])?,
                ))
            };
            blocks.push(Block {
                ln_1: pair("ln_1", &[d], d)?,
                c_attn: pair("attn.c_attn", &[d, 3 * d], 3 * d)?,
                c_proj: pair("attn.c_proj", &[d, d], d)?,
                ln_2: pair("ln_2", &[d], d)?,
                c_fc: pair("mlp.c_fc", &[d, inner], inner)?,
                mlp_proj: pair("mlp.c_proj", &[inner, d], d)?,
            });
        }
        let ln_f = (p("ln_f.weight", &[d])?, p("ln_f.bias", &[d])?);
        // The lm head is tied to wte; some files also store a copy, which we drop.
        if sd.contains("lm_head.weight") {
            sd.take("lm_head.weight", &[v, d])?;
        }
        Ok(Gpt2 {
            config,
            params,
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }
}

impl CausalLm for Gpt2 {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn lm_head(&self) -> &Tensor {
        &self.wte
    }

    fn hidden(
        &self,
        input: &Input,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t) = input.ids.dims2()?;
        let (h, hd) = (c.num_heads, c.hidden_size / c.num_heads);
        let bias = input.attention_bias()?;
        let tok = self.wte.index_select(&input.ids.flatten_all()?, 0)?;
        let pos = self.wpe.index_select(&input.positions.flatten_all()?, 0)?;
        let mut x = (tok + pos)?.reshape((b, t, c.hidden_size))?; // [b, t, d]
        for (i, blk) in self.blocks.iter().enumerate() {
            let a = ops::layer_norm(&x, &blk.ln_1.0, &blk.ln_1.1, c.norm_eps)?;
            let qkv = conv1d(&a, &blk.c_attn)?; // [b, t, 3d]
            let heads = |j: usize| {
                qkv.narrow(D::Minus1, j * c.hidden_size, c.hidden_size)?
                    .reshape((b, t, h, hd))?
                    .transpose(1, 2)
            };
            let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?); // [b, h, t, hd]
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = cache.append(i, k, v)?;
            }
            let mut scale = 1.0 / (hd as f64).sqrt();
            if c.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            let att = ops::attention(&q, &k, &v, &bias, scale)?;
            x = (x + conv1d(&att, &blk.c_proj)?)?;
            let m = ops::layer_norm(&x, &blk.ln_2.0, &blk.ln_2.1, c.norm_eps)?;
            let m = ops::activate(&conv1d(&m, &blk.c_fc)?, c.activation)?;
            x = (x + conv1d(&m, &blk.mlp_proj)?)?;
        }
        ops::layer_norm(&x, &self.ln_f.0, &self.ln_f.1, c.norm_eps)
    }
}
