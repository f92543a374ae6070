//! Batched autoregressive generation with a KV cache.
//!
//! Prompts of different lengths are left-padded internally (so the last column is every row's
//! newest token), with positions counted over real tokens only; callers pass plain id lists and
//! never deal with padding. Finished rows leave the batch. Logit processing follows transformers'
//! order: no-repeat-ngram ban, temperature, top-k, top-p, then sampling (or argmax when greedy).

use super::{CausalLm, Input, KvCache};
use crate::ops;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    Greedy,
    /// `top_k = 0` and `top_p = 1` disable those filters.
    Sample {
        temperature: f64,
        top_k: usize,
        top_p: f64,
    },
}

#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Forbid repeating any n-gram of this size (0 = off), as transformers' no_repeat_ngram_size.
    pub no_repeat_ngram: usize,
    /// Generation of a row stops after it produces one of these.
    pub eos_ids: Vec<u32>,
    pub seed: u64,
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize, eos_ids: Vec<u32>) -> Self {
        GenerationConfig {
            max_new_tokens,
            sampling: Sampling::Greedy,
            no_repeat_ngram: 0,
            eos_ids,
            seed: 0,
        }
    }
}

/// Generates a continuation of every prompt; returns the new tokens of each (EOS included when
/// produced), in prompt order. When sampling, all rows draw from one stream seeded with
/// `cfg.seed`, so a row's answer depends on the rest of the batch (see [`generate_seeded_rows`]).
pub fn generate(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    generate_with(
        model,
        prompts,
        cfg,
        RowRngs::Shared(Box::new(ChaCha8Rng::seed_from_u64(cfg.seed))),
    )
}

/// [`generate`] with one RNG per row, seeded with `row_seeds[i]` (`cfg.seed` is unused): a row's
/// answer then depends only on its prompt and its seed, not on which other prompts share the
/// batch or in what order, so batching can be chosen for speed without changing results.
pub fn generate_seeded_rows(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    row_seeds: &[u64],
) -> Result<Vec<Vec<u32>>> {
    if row_seeds.len() != prompts.len() {
        bail!(
            "{} row seeds for {} prompts",
            row_seeds.len(),
            prompts.len()
        );
    }
    let rngs = row_seeds
        .iter()
        .map(|&s| ChaCha8Rng::seed_from_u64(s))
        .collect();
    generate_with(model, prompts, cfg, RowRngs::PerRow(rngs))
}

/// Where each row's random draws come from.
enum RowRngs {
    Shared(Box<ChaCha8Rng>),
    PerRow(Vec<ChaCha8Rng>),
}

impl RowRngs {
    /// The RNG of the prompt with original index `row`.
    fn get(&mut self, row: usize) -> &mut ChaCha8Rng {
        match self {
            RowRngs::Shared(r) => r,
            RowRngs::PerRow(v) => &mut v[row],
        }
    }
}

fn generate_with(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    mut rngs: RowRngs,
) -> Result<Vec<Vec<u32>>> {
    if let Sampling::Sample {
        temperature, top_p, ..
    } = cfg.sampling
    {
        if temperature <= 0.0 || !(top_p > 0.0 && top_p <= 1.0) {
            bail!("sampling needs temperature > 0 and 0 < top_p <= 1");
        }
    }
    let n = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("cannot generate from an empty prompt");
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = prompts.iter().flatten().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is out of range for a vocabulary of {vocab}");
    }
    // The context length: each row's prompt and answer fit the model's positions (one rule,
    // `model::context`; a row's budget depends on its own prompt only).
    let positions = model.config().max_positions;
    let budgets: Vec<(usize, usize)> = prompts
        .iter()
        .map(|p| super::context::generation_budget(positions, p.len(), cfg.max_new_tokens))
        .collect();
    if budgets
        .iter()
        .zip(prompts)
        .any(|(&(keep, new), p)| keep < p.len() || new < cfg.max_new_tokens)
    {
        super::context::notice_once(&format!(
            "the model has {positions} positions: longer prompts keep their last tokens and \
             answers stop at the last position (max_new_tokens {} does not fit every prompt)",
            cfg.max_new_tokens
        ));
    }
    let prompts: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&budgets)
        .map(|(p, &(keep, _))| p[p.len() - keep..].to_vec())
        .collect();
    let max_steps = budgets.iter().map(|b| b.1).max().unwrap_or(0);
    let dev = &model.backend().device;
    let width = prompts.iter().map(Vec::len).max().unwrap();
    // Left padding: pad id 0 (any valid id; it is masked out).
    let mut ids = Vec::with_capacity(n * width);
    let mut mask_rows = Vec::with_capacity(n);
    for p in &prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
        mask_rows.push(
            std::iter::repeat_n(0u32, pad)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect::<Vec<_>>(),
        );
    }
    let positions = ops::positions_from_mask(&mask_rows);
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut key_mask = Tensor::from_vec(mask_rows.concat(), (n, width), dev)?;
    let mut input_ids = Tensor::from_vec(ids, (n, width), dev)?;
    let mut pos = Tensor::from_vec(positions.concat(), (n, width), dev)?;
    let mut history: Vec<Vec<u32>> = prompts.clone();
    let mut active: Vec<usize> = (0..n).collect(); // original index of each batch row
    let mut cache = KvCache::default();

    for step in 0..max_steps {
        let logits = model.logits(
            &Input {
                ids: &input_ids,
                positions: &pos,
                key_mask: &key_mask,
            },
            Some(&mut cache),
        )?;
        let t = logits.dim(1)?;
        let last = logits
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut keep = Vec::with_capacity(active.len());
        let mut next_ids = Vec::with_capacity(active.len());
        for (row, &orig) in active.iter().enumerate() {
            let mut l = last[row].clone();
            if let Some((_, col, x)) = crate::finite::first_non_finite(&l, l.len()) {
                bail!(
                    "the model's logits are not finite ({x} for token {col}) at new token {} of prompt {orig}; \
                     its weights or activations overflow",
                    step + 1
                );
            }
            ban_repeated_ngrams(&mut l, &history[orig], cfg.no_repeat_ngram);
            let tok = choose(&mut l, &cfg.sampling, rngs.get(orig));
            out[orig].push(tok);
            history[orig].push(tok);
            if !cfg.eos_ids.contains(&tok) && out[orig].len() < budgets[orig].1 {
                keep.push(row as u32);
                next_ids.push(tok);
            }
        }
        if keep.is_empty() || step + 1 == max_steps {
            break;
        }
        if keep.len() < active.len() {
            let keep_t = Tensor::new(keep.as_slice(), dev)?;
            cache.select_rows(&keep_t)?;
            key_mask = key_mask.index_select(&keep_t, 0)?;
            active = keep.iter().map(|&r| active[r as usize]).collect();
        }
        let b = active.len();
        key_mask = Tensor::cat(&[&key_mask, &Tensor::ones((b, 1), DType::U32, dev)?], 1)?;
        input_ids = Tensor::from_vec(next_ids, (b, 1), dev)?;
        let p: Vec<u32> = active.iter().map(|&o| next_pos[o]).collect();
        for &o in &active {
            next_pos[o] += 1;
        }
        pos = Tensor::from_vec(p, (b, 1), dev)?;
    }
    Ok(out)
}

/// Sets to −∞ every token that would complete an n-gram already present in `history`.
pub fn ban_repeated_ngrams(logits: &mut [f32], history: &[u32], n: usize) {
    if n == 0 || history.len() + 1 < n {
        return;
    }
    let prefix = &history[history.len() + 1 - n..];
    for w in history.windows(n) {
        if &w[..n - 1] == prefix {
            logits[w[n - 1] as usize] = f32::NEG_INFINITY;
        }
    }
}

/// Picks the next token from one row of logits (modified in place by the filters).
pub fn choose(logits: &mut [f32], sampling: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let (temperature, top_k, top_p) = match *sampling {
        Sampling::Greedy => return argmax(logits),
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
        } => (temperature, top_k, top_p),
    };
    for l in logits.iter_mut() {
        *l = (*l as f64 / temperature) as f32;
    }
    if top_k > 0 && top_k < logits.len() {
        // Keep every token whose logit is >= the k-th largest (ties at the boundary survive).
        let mut sorted = logits.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[top_k - 1];
        logits
            .iter_mut()
            .filter(|l| **l < kth)
            .for_each(|l| *l = f32::NEG_INFINITY);
    }
    let probs = softmax(logits);
    let mut keep: Vec<bool> = vec![true; logits.len()];
    if top_p < 1.0 {
        // transformers: sort ascending, drop tokens while the cumulative mass is <= 1 − top_p,
        // always keeping the most likely token.
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(a.cmp(&b)));
        let mut cum = 0.0f64;
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if cum <= 1.0 - top_p && rank + 1 < order.len() {
                keep[i] = false;
            }
        }
    }
    let total: f64 = probs
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(p, _)| p)
        .sum();
    let mut u = rng.random::<f64>() * total;
    let mut last_kept = 0;
    for (i, (&p, &k)) in probs.iter().zip(&keep).enumerate() {
        if !k || p == 0.0 {
            continue;
        }
        last_kept = i;
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    last_kept as u32
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Index of the first maximum (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Convenience for callers holding a tensor of logits [vocab].
pub fn argmax_tensor(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    #[test]
    fn ngram_ban_matches_transformers_rule() {
        let mut l = vec![0f32; 6];
        // history 1 2 3 1 2 with n = 3: the prefix (1, 2) was followed by 3 -> ban 3.
        ban_repeated_ngrams(&mut l, &[1, 2, 3, 1, 2], 3);
        assert_eq!(l[3], f32::NEG_INFINITY);
        assert_eq!(l.iter().filter(|x| x.is_infinite()).count(), 1);
        let mut l = vec![0f32; 6];
        ban_repeated_ngrams(&mut l, &[4], 3);
        assert!(l.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let logits = vec![0.1f32, 3.0, 0.2, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let s = Sampling::Sample {
                temperature: 1.0,
                top_k: 1,
                top_p: 1.0,
            };
            assert_eq!(choose(&mut logits.clone(), &s, &mut rng), 1);
        }
        let s = Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let draw = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..50)
                .map(|_| choose(&mut logits.clone(), &s, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        assert!(
            d.contains(&1) && d.contains(&3),
            "both likely tokens are drawn: {d:?}"
        );
    }

    #[test]
    fn seeded_rows_do_not_depend_on_the_batch() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2");
        let m = crate::model::load_frozen(&dir, &Backend::cpu()).unwrap();
        let prompts = vec![
            vec![5u32, 9, 13, 2, 7, 11, 3],
            vec![4u32, 8],
            vec![6u32, 1, 12, 10],
        ];
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            no_repeat_ngram: 0,
            eos_ids: vec![],
            seed: 0,
        };
        let seeds = [11u64, 22, 33];
        let batched = generate_seeded_rows(m.as_ref(), &prompts, &cfg, &seeds).unwrap();
        // Alone, and in a reversed batch: every row samples exactly the same tokens.
        for i in 0..3 {
            let alone =
                generate_seeded_rows(m.as_ref(), &prompts[i..=i], &cfg, &seeds[i..=i]).unwrap();
            assert_eq!(alone[0], batched[i], "row {i}");
        }
        let rev: Vec<Vec<u32>> = prompts.iter().rev().cloned().collect();
        let rev_seeds: Vec<u64> = seeds.iter().rev().copied().collect();
        let mut reversed = generate_seeded_rows(m.as_ref(), &rev, &cfg, &rev_seeds).unwrap();
        reversed.reverse();
        assert_eq!(reversed, batched);
        // Another seed samples something else (a random model at T = 1 is near uniform).
        let other = generate_seeded_rows(m.as_ref(), &prompts[..1], &cfg, &[12]).unwrap();
        assert_ne!(other[0], batched[0]);
        // The shared-stream path is unchanged: a one-row batch seeded s equals row seed s.
        let shared = generate(
            m.as_ref(),
            &prompts[..1],
            &GenerationConfig {
                seed: 11,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!(shared[0], batched[0]);
        assert!(generate_seeded_rows(m.as_ref(), &prompts, &cfg, &seeds[..2]).is_err());
    }

    #[test]
    fn rows_leaving_the_batch_at_eos_do_not_disturb_the_others() {
        // One row stops early while the others go on: the KV cache drops its rows mid-generation.
        for name in ["gpt2", "opt", "qwen3"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models")
                .join(name);
            let m = crate::model::load_frozen(&dir, &Backend::cpu()).unwrap();
            let prompts = vec![
                vec![5u32, 9, 13, 2, 7],
                vec![4u32, 8],
                vec![6u32, 1, 12, 10],
            ];
            let free = generate(
                m.as_ref(),
                &prompts[..1],
                &GenerationConfig::greedy(8, vec![]),
            )
            .unwrap()
            .remove(0);
            let cfg = GenerationConfig::greedy(8, vec![free[1]]);
            let batched = generate(m.as_ref(), &prompts, &cfg).unwrap();
            assert_eq!(batched[0], free[..2].to_vec(), "{name}");
            for (p, got) in prompts.iter().zip(&batched) {
                let alone = generate(m.as_ref(), std::slice::from_ref(p), &cfg).unwrap();
                assert_eq!(got, &alone[0], "{name}: prompt {p:?}");
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two only.
        let logits: Vec<f32> = [0.64f32, 0.24, 0.09, 0.03].iter().map(|p| p.ln()).collect();
        let s = Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let seen: std::collections::BTreeSet<u32> = (0..300)
            .map(|_| choose(&mut logits.clone(), &s, &mut rng))
            .collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }
}
