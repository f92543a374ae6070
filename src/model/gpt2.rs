//! GPT-2 (transformers `GPT2LMHeadModel`).
//!
//! Pre-LN blocks, learned absolute positions, fused qkv projection, tied lm head. Weights use
//! the `Conv1D` layout [in, out] (y = x·W + b), unlike `nn.Linear`. Hub files come with and
//! without the `transformer.` key prefix and carry `attn.bias` / `attn.masked_bias` buffers,
//! which are not parameters and are ignored.

use super::config::ModelConfig;
use super::{CausalLm, Input, KvCache, Params, StateDict};
use crate::ops::{Kernels, Weight};
use anyhow::Result;
use candle_core::{Tensor, D};

struct Block {
    ln_1: (Tensor, Tensor),
    c_attn: (Weight, Tensor), // [d, 3d], [3d]
    c_proj: (Weight, Tensor), // [d, d], [d]
    ln_2: (Tensor, Tensor),
    c_fc: (Weight, Tensor),     // [d, inner], [inner]
    mlp_proj: (Weight, Tensor), // [inner, d], [d]
}

pub struct Gpt2 {
    config: ModelConfig,
    params: Params,
    wte: Weight, // [vocab, d], also the lm head
    wpe: Tensor, // [n_positions, d]
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
}

/// Conv1D: x [.., in] · w [in, out] + b.
fn conv1d(k: Kernels, x: &Tensor, (w, b): &(Weight, Tensor)) -> candle_core::Result<Tensor> {
    k.linear(w, x, Some(b))
}

/// Takes tensors from the state dict under GPT-2's key names (with or without `transformer.`),
/// registering them as parameters saved as `transformer.*`.
struct Loader<'a> {
    params: Params,
    sd: &'a mut StateDict,
    src: &'static str,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let from = format!("{}{name}", self.src);
        self.params
            .take(self.sd, &from, &format!("transformer.{name}"), shape)
    }

    fn matrix(&mut self, name: &str, shape: &[usize], out_in: bool) -> Result<Weight> {
        let from = format!("{}{name}", self.src);
        self.params.weight(
            self.sd,
            &from,
            &format!("transformer.{name}"),
            shape,
            out_in,
        )
    }

    /// The token embedding, also the (tied) lm head: f32 whatever the precision.
    fn embedding(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let from = format!("{}{name}", self.src);
        self.params
            .embedding(self.sd, &from, &format!("transformer.{name}"), shape)
    }

    /// LayerNorm (weight, bias).
    fn norm(&mut self, name: &str, d: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.tensor(&format!("{name}.weight"), &[d])?,
            self.tensor(&format!("{name}.bias"), &[d])?,
        ))
    }

    /// Conv1D (weight [in, out], bias).
    fn conv(&mut self, name: &str, inp: usize, out: usize) -> Result<(Weight, Tensor)> {
        Ok((
            self.matrix(&format!("{name}.weight"), &[inp, out], false)?,
            self.tensor(&format!("{name}.bias"), &[out])?,
        ))
    }
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
        let mut l = Loader {
            params: Params::new(sd),
            sd,
            src,
        };
        let wte = l.embedding("wte.weight", &[v, d])?;
        let wpe = l.tensor("wpe.weight", &[config.max_positions, d])?;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let h = format!("h.{i}");
            blocks.push(Block {
                ln_1: l.norm(&format!("{h}.ln_1"), d)?,
                c_attn: l.conv(&format!("{h}.attn.c_attn"), d, 3 * d)?,
                c_proj: l.conv(&format!("{h}.attn.c_proj"), d, d)?,
                ln_2: l.norm(&format!("{h}.ln_2"), d)?,
                c_fc: l.conv(&format!("{h}.mlp.c_fc"), d, inner)?,
                mlp_proj: l.conv(&format!("{h}.mlp.c_proj"), inner, d)?,
            });
        }
        let ln_f = l.norm("ln_f", d)?;
        let (params, sd) = (l.params, l.sd);
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

    fn lm_head(&self) -> &Weight {
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
        let k = self.params.backend().kernels;
        let bias = input.attention_bias()?;
        let tok = k.embed(&self.wte, input.ids)?;
        let pos = k.embed(&Weight::out_in(self.wpe.clone()), input.positions)?;
        let mut x = (tok + pos)?.reshape((b, t, c.hidden_size))?; // [b, t, d]
        for (i, blk) in self.blocks.iter().enumerate() {
            let a = k.layer_norm(&x, &blk.ln_1.0, &blk.ln_1.1, c.norm_eps)?;
            let qkv = conv1d(k, &a, &blk.c_attn)?; // [b, t, 3d]
            let mut scale = 1.0 / (hd as f64).sqrt();
            if c.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            let att = match cache.as_deref_mut() {
                // q, k and v read in place from the fused projection.
                None => k.attention_qkv(&qkv, h, &bias, scale)?,
                Some(cache) => {
                    let heads = |j: usize| {
                        qkv.narrow(D::Minus1, j * c.hidden_size, c.hidden_size)?
                            .reshape((b, t, h, hd))?
                            .transpose(1, 2)
                    };
                    let (kk, vv) = cache.append(i, heads(1)?, heads(2)?)?; // [b, h, t, hd]
                    k.attention(&heads(0)?, &kk, &vv, &bias, scale)?
                }
            };
            x = (x + conv1d(k, &att, &blk.c_proj)?)?;
            let m = k.layer_norm(&x, &blk.ln_2.0, &blk.ln_2.1, c.norm_eps)?;
            let (fc, fc_b) = &blk.c_fc;
            let m = k.linear_activate(fc, &m, Some(fc_b), c.activation)?;
            x = (x + conv1d(k, &m, &blk.mlp_proj)?)?;
        }
        k.layer_norm(&x, &self.ln_f.0, &self.ln_f.1, c.norm_eps)
    }
}
