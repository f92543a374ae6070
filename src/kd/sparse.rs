//! The divergences against a SPARSE teacher: its K most probable tokens plus one "rest" bucket
//! (every other token together), as a teacher cache stores it (`crate::cache`).
//!
//! # The approximation (documented here, once)
//! Per row, the vocabulary is partitioned into K + 1 buckets: each of the teacher's top-K tokens
//! alone, and the rest. The teacher's bucket probabilities are exact (its top-K logits and the
//! log-sum-exp of its FULL row at the stage temperature are stored, and so is its rest mass);
//! the student's are exact too (its own full softmax: q_rest = Σ of its probabilities outside
//! the teacher's top K). The divergence is then computed between these two (K + 1)-bucket
//! distributions, i.e. the full-vocabulary divergence with the teacher's and the student's
//! probabilities inside the rest bucket replaced by their bucket totals. Consequences:
//! - K = vocabulary: the rest is empty and the value equals the full-vocabulary divergence.
//! - K < vocabulary: every divergence here is an f-divergence, and merging outcomes never
//!   increases one (data processing), so 0 ≤ D_full − D_sparse; the gap is the divergence of
//!   the two distributions *inside* the rest bucket, weighted by its mass: exactly
//!   p_rest·KL(p̂‖q̂) for fkl and q_rest·KL(q̂‖p̂) for rkl (p̂, q̂ = the distributions conditioned on
//!   the rest), at most min(p_rest, q_rest) for tvd, and at most (p_rest + q_rest)(1 + ln 1/w)
//!   for the mixtures jsd (w = min(β, 1−β)), skl and srkl (w = α). `tests/cache.rs` checks each.
//! - The gradient is the exact gradient of the sparse value (not an approximation of the dense
//!   gradient): inside the rest bucket it pushes the student's tokens in proportion to their own
//!   probabilities.
//!
//! - **Sampled rest** (a cache built with `sampled` = M > 0): K − M top tokens, and M tokens
//!   drawn from the teacher's rest distribution π at the cache's hottest temperature. Forward
//!   KL then estimates its rest term by importance weighting ([`sampled_fkl`]): unbiased, in
//!   value and gradient, at every temperature, instead of the bucket's lower bound; per row the
//!   estimate is noisy (it is an average over tokens that makes it precise). The other
//!   divergences weight the rest by the student's mass, where the teacher's samples rarely fall,
//!   and keep the bucket over the K − M top tokens.
//!
//! Gradient: with bucket probabilities q̄_b = Σ_{j∈b} q_j and g_b = ∂D/∂q̄_b,
//! dD/db_j = q_j (g_{b(j)} − ḡ), ḡ = Σ_b q̄_b g_b (b = s/T, the student's scaled logits), the same
//! form as the dense kernel's (see `divergence`), with the closed forms of g per divergence below.

use super::divergence::{cross_entropy_row, row_max, Divergence, RowScratch, LOG_PROB_FLOOR};
use super::kernel::{with_scratch, LossSpec, RowLoss};
use crate::ops::fastmath as fm;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// One row's sparse teacher at the stage temperature: the token ids of its top K and the log
/// probabilities of the K + 1 buckets (`log_p[K]` is the rest; −∞ when the rest is empty), and,
/// in a cache with a sampled rest, M tokens drawn from the rest with their log-probabilities
/// and log importance weights (see [`sampled_fkl`]).
#[derive(Clone, Copy, Debug)]
pub struct SparseRow<'a> {
    pub ids: &'a [u32],
    pub log_p: &'a [f64],
    pub samples: Samples<'a>,
}

/// A row's tokens sampled from the teacher's rest (empty when the cache has none): ids (may
/// repeat), the teacher's log p at the stage temperature and log w = log p_T − log(M·π), π the
/// rest distribution the samples were drawn from.
#[derive(Clone, Copy, Debug, Default)]
pub struct Samples<'a> {
    pub ids: &'a [u32],
    pub log_p: &'a [f64],
    pub log_w: &'a [f64],
}

/// The sparse teacher of a batch's counted rows: K ids and K + 1 bucket log-probabilities per
/// row (a teacher cache's rows, or the same computed live), and M samples of the rest per row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseTargets {
    pub k: usize,
    pub ids: Vec<u32>,
    pub log_p: Vec<f64>,
    /// Sampled rest tokens per row (0: none).
    pub m: usize,
    pub sample_ids: Vec<u32>,
    pub sample_log_p: Vec<f64>,
    pub sample_log_w: Vec<f64>,
}

impl SparseTargets {
    pub fn rows(&self) -> usize {
        self.ids.len() / self.k.max(1)
    }
    pub fn row(&self, r: usize) -> SparseRow<'_> {
        let (a, b) = (r * self.m, (r + 1) * self.m);
        SparseRow {
            ids: &self.ids[r * self.k..(r + 1) * self.k],
            log_p: &self.log_p[r * (self.k + 1)..(r + 1) * (self.k + 1)],
            samples: Samples {
                ids: &self.sample_ids[a..b],
                log_p: &self.sample_log_p[a..b],
                log_w: &self.sample_log_w[a..b],
            },
        }
    }
}

/// The loss of `out.len()` rows of student `logits` ([rows, width]) against sparse rows
/// `first..` of `t`, in parallel; with `grad`, dL/dlogits replaces the logits (as the dense
/// kernel's in-place variant does for the fused head).
#[allow(clippy::too_many_arguments)]
pub fn sparse_loss_rows(
    spec: &LossSpec,
    t: &SparseTargets,
    first: usize,
    logits: &mut [f32],
    width: usize,
    labels: Option<&[u32]>,
    weights: &[f32],
    out: &mut [RowLoss],
    grad: bool,
) -> Result<()> {
    let n = out.len();
    if logits.len() != n * width || weights.len() != n || labels.is_some_and(|l| l.len() != n) {
        bail!(
            "sparse kd kernel: {} logits, {} weights for {n} rows of {width}",
            logits.len(),
            weights.len()
        );
    }
    if first + n > t.rows() {
        bail!(
            "the sparse teacher has {} rows but the batch counts at least {} (cache and data disagree)",
            t.rows(),
            first + n
        );
    }
    logits
        .par_chunks_mut(width)
        .zip(out.par_iter_mut())
        .enumerate()
        .try_for_each(|(r, (row, o))| {
            with_scratch(width, |sc| {
                let label = labels.map(|l| l[r]);
                let tr = Some(t.row(first + r));
                let w = weights[r] as f64;
                *o = if grad {
                    let s = row.to_vec();
                    row.fill(0.0);
                    sparse_row_loss(spec, tr, label, w, &s, sc, Some(row))
                } else {
                    sparse_row_loss(spec, tr, label, w, row, sc, None)
                }
                .map_err(|e| anyhow::anyhow!("row {}: {e}", first + r))?;
                Ok(())
            })
        })
}

/// Σ_b exp(x_b) in the log domain (−∞ for an empty or all −∞ input).
fn log_sum_exp(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = x.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// ln(e^a + e^b).
fn log_add(a: f64, b: f64) -> f64 {
    let hi = a.max(b);
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + ((a - hi).exp() + (b - hi).exp()).ln()
}

/// The teacher's K + 1 bucket log-probabilities from its logits `z` [V] (f64 arithmetic): the top
/// `k` token ids (most probable first, ties by lower id) and, per temperature, log p of each
/// bucket with the exact full-row log-sum-exp. What the cache stores and what the live path
/// computes, so the two agree by construction. Returns (ids, per temperature: log_p [k + 1]).
pub fn teacher_buckets(z: &[f32], k: usize, temperatures: &[f64]) -> (Vec<u32>, Vec<Vec<f64>>) {
    let k = k.min(z.len());
    let mut idx: Vec<u32> = (0..z.len() as u32).collect();
    let by = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by);
    }
    idx.truncate(k);
    idx.sort_by(by);
    let mut in_top = vec![false; z.len()];
    for &i in &idx {
        in_top[i as usize] = true;
    }
    let lps = temperatures
        .iter()
        .map(|&t| {
            let it = 1.0 / t;
            let all = log_sum_exp(z.iter().map(|&x| x as f64 * it));
            let rest = log_sum_exp(
                z.iter()
                    .zip(&in_top)
                    .filter(|(_, &top)| !top)
                    .map(|(&x, _)| x as f64 * it),
            );
            let mut lp: Vec<f64> = idx
                .iter()
                .map(|&i| z[i as usize] as f64 * it - all)
                .collect();
            lp.push(rest - all);
            lp
        })
        .collect();
    (idx, lps)
}

/// m token ids drawn (with replacement) from the teacher's distribution over the tokens NOT
/// in `top`, at temperature `t`, by inversion of its cumulative sum (f64).
pub fn sample_rest(z: &[f32], top: &[u32], t: f64, m: usize, seed: u64) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let mut in_top = vec![false; z.len()];
    for &i in top {
        in_top[i as usize] = true;
    }
    let hi = (z.iter().zip(&in_top))
        .filter(|(_, &t)| !t)
        .map(|(&x, _)| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut cum = Vec::with_capacity(z.len());
    let mut acc = 0.0;
    for (&x, &skip) in z.iter().zip(&in_top) {
        if !skip {
            acc += ((x as f64 - hi) / t).exp();
        }
        cum.push(acc);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..m)
        .map(|_| {
            let u = rng.random::<f64>() * acc;
            // The first token whose cumulative mass exceeds u (never a top token: its mass is 0).
            cum.partition_point(|&c| c <= u).min(z.len() - 1) as u32
        })
        .collect()
}

/// Checks a sparse row against a vocabulary of `v`: ids in range and distinct, K + 1 log probs.
fn check_row(t: &SparseRow, v: usize) -> Result<()> {
    if t.log_p.len() != t.ids.len() + 1 {
        bail!(
            "sparse teacher row: {} ids but {} bucket log-probabilities (expected ids + 1)",
            t.ids.len(),
            t.log_p.len()
        );
    }
    let mut ids = t.ids.to_vec();
    ids.sort_unstable();
    if let Some(&last) = ids.last() {
        if last as usize >= v {
            bail!("sparse teacher row: token id {last} is outside the vocabulary (size {v})");
        }
    }
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("sparse teacher row: token id {} appears twice", w[0]);
    }
    let sm = &t.samples;
    if sm.log_p.len() != sm.ids.len() || sm.log_w.len() != sm.ids.len() {
        bail!(
            "sparse teacher row: {} sampled ids, {} log p, {} log w",
            sm.ids.len(),
            sm.log_p.len(),
            sm.log_w.len()
        );
    }
    if let Some(&i) = sm
        .ids
        .iter()
        .find(|&&i| i as usize >= v || t.ids.contains(&i))
    {
        bail!("sparse teacher row: sampled token id {i} is outside the vocabulary (size {v}) or among the top ids");
    }
    Ok(())
}

/// D_T(sparse teacher ‖ student) of one row over the K + 1 buckets; when `grad` is given, adds
/// `coef · dD/db` to it (b = s/T; the caller folds T², 1/T and the row weight into `coef`, as for
/// the dense `divergence_row`). Returns D (unscaled).
pub fn sparse_divergence_row(
    div: Divergence,
    t: SparseRow,
    s: &[f32],
    inv_t: f64,
    sc: &mut RowScratch,
    grad: Option<(&mut [f32], f64)>,
) -> Result<f64> {
    let v = s.len();
    check_row(&t, v)?;
    let ms = row_max(s, "student")? as f64;
    sc.ensure(v);
    let qe = &mut sc.q_mut()[..v];
    for (o, &x) in qe.iter_mut().zip(s) {
        *o = fm::exp((x as f64 - ms) * inv_t);
    }
    let z = fm::sum(v, |j| qe[j]);
    let lz = z.ln();
    let k = t.ids.len();
    if div == Divergence::Fkl && !t.samples.ids.is_empty() {
        return Ok(sampled_fkl(&t, s, ms, inv_t, lz, qe, z, grad));
    }
    // The student's rest mass summed directly over the rest (no 1 − Σ cancellation): the
    // cached entries are zeroed for the sum and restored after.
    let saved: Vec<f64> = t.ids.iter().map(|&i| qe[i as usize]).collect();
    for &i in t.ids {
        qe[i as usize] = 0.0;
    }
    let rest = fm::sum(v, |j| qe[j]);
    for (&i, &e) in t.ids.iter().zip(&saved) {
        qe[i as usize] = e;
    }
    // Bucket log-probabilities: teacher floored as in the dense kernel, student exact.
    let lp: Vec<f64> = t.log_p.iter().map(|&x| x.max(LOG_PROB_FLOOR)).collect();
    let mut lq: Vec<f64> = t
        .ids
        .iter()
        .map(|&i| (s[i as usize] as f64 - ms) * inv_t - lz)
        .collect();
    lq.push(if rest > 0.0 {
        rest.ln() - lz
    } else {
        f64::NEG_INFINITY
    });
    // The teacher's buckets renormalised (their stored sum differs from 1 by the cache's
    // rounding only), so D is a divergence between two distributions.
    let norm = log_sum_exp(lp.iter().copied());
    let lp: Vec<f64> = lp.iter().map(|x| (x - norm).max(LOG_PROB_FLOOR)).collect();
    let (d, h) = bucket_divergence(div, &lp, &lq);
    if let Some((gr, c)) = grad {
        let gbar: f64 = h.iter().sum();
        let gr = &mut gr[..v];
        let before: Vec<f32> = t.ids.iter().map(|&i| gr[i as usize]).collect();
        // Rest tokens: q_j (g_rest − ḡ) = qe_j (h_rest / rest − ḡ / z); the cached ones are
        // overwritten below.
        if rest > 0.0 {
            let cr = c * (h[k] / rest - gbar / z);
            for j in 0..v {
                gr[j] += (cr * qe[j]) as f32;
            }
        }
        for (b, (&i, &g0)) in t.ids.iter().zip(&before).enumerate() {
            gr[i as usize] = g0 + (c * (h[b] - lq[b].exp() * gbar)) as f32;
        }
    }
    Ok(d)
}

/// Forward KL with a sampled rest: the top K exact and the rest estimated from M tokens j_m
/// drawn from the teacher's rest distribution π (at the cache's hottest temperature):
///   Σ_rest p_j log(p_j/q_j) ≈ Σ_m w_m log(p_{j_m}/q_{j_m}),  w_m = p_{j_m} / (M·π(j_m)),
/// unbiased at every temperature (E[Σ_m w_m f(j_m)] = Σ_rest p_j f(j)). As a soft-target
/// cross-entropy with coefficients c (p on the top K, w_m on each sample) plus the teacher's
/// own entropy term, its gradient is dD/db_j = (Σ c) q_j − c_j. The estimate is of the value
/// and of its gradient, not a divergence between two distributions: one row's can be negative.
#[allow(clippy::too_many_arguments)]
fn sampled_fkl(
    t: &SparseRow,
    s: &[f32],
    ms: f64,
    inv_t: f64,
    lz: f64,
    qe: &[f64],
    z: f64,
    grad: Option<(&mut [f32], f64)>,
) -> f64 {
    let k = t.ids.len();
    let lq = |i: u32| (s[i as usize] as f64 - ms) * inv_t - lz;
    // (coefficient, teacher log p, token) per term.
    let terms = (0..k)
        .map(|b| (t.log_p[b].exp(), t.log_p[b], t.ids[b]))
        .chain((0..t.samples.ids.len()).map(|m| {
            let sm = &t.samples;
            (sm.log_w[m].exp(), sm.log_p[m], sm.ids[m])
        }));
    let mut d = 0.0;
    let mut total = 0.0;
    for (c, lp, i) in terms.clone() {
        if c > 0.0 {
            d += c * (lp.max(LOG_PROB_FLOOR) - lq(i));
        }
        total += c;
    }
    if let Some((gr, coef)) = grad {
        let cq = coef * total / z;
        for (g, &e) in gr.iter_mut().zip(qe) {
            *g += (cq * e) as f32;
        }
        for (c, _, i) in terms {
            gr[i as usize] -= (coef * c) as f32;
        }
    }
    d
}

/// D over bucket distributions given as log-probabilities (teacher `lp`, student `lq`) and
/// h_b = q_b·∂D/∂q_b per bucket (0 where q_b = 0).
fn bucket_divergence(div: Divergence, lp: &[f64], lq: &[f64]) -> (f64, Vec<f64>) {
    let n = lp.len();
    let p: Vec<f64> = lp.iter().map(|x| x.exp()).collect();
    let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
    // 0·log 0 = 0: a term with a zero weight is skipped, never evaluated as 0·∞.
    let sel = |c: bool, x: f64| if c { x } else { 0.0 };
    let log_mix = |wp: f64, wq: f64, b: usize| log_add(wp.ln() + lp[b], wq.ln() + lq[b]);
    let sum = |f: &dyn Fn(usize) -> f64| (0..n).map(f).sum::<f64>();
    let qg = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
        (0..n).map(|b| sel(q[b] > 0.0, q[b] * f(b))).collect()
    };
    match div {
        // g = −p/q, so h = −p (finite even where q underflows).
        Divergence::Fkl => (
            sum(&|b| sel(p[b] > 0.0, p[b] * (lp[b] - lq[b]))),
            p.iter().map(|x| -x).collect(),
        ),
        Divergence::Rkl => (
            sum(&|b| sel(q[b] > 0.0, q[b] * (lq[b] - lp[b]))),
            qg(&|b| lq[b] - lp[b] + 1.0),
        ),
        Divergence::Tvd => (
            0.5 * sum(&|b| (p[b] - q[b]).abs()),
            qg(&|b| {
                let s = q[b] - p[b];
                0.5 * if s > 0.0 {
                    1.0
                } else if s < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }),
        ),
        Divergence::Jsd { beta } => {
            let lm: Vec<f64> = (0..n).map(|b| log_mix(beta, 1.0 - beta, b)).collect();
            let d = sum(&|b| {
                beta * sel(p[b] > 0.0, p[b] * (lp[b] - lm[b]))
                    + (1.0 - beta) * sel(q[b] > 0.0, q[b] * (lq[b] - lm[b]))
            });
            (d, qg(&|b| (1.0 - beta) * (lq[b] - lm[b])))
        }
        Divergence::Skl { alpha } => {
            let lm: Vec<f64> = (0..n).map(|b| log_mix(alpha, 1.0 - alpha, b)).collect();
            let d = sum(&|b| sel(p[b] > 0.0, p[b] * (lp[b] - lm[b])));
            (d, qg(&|b| -(1.0 - alpha) * (lp[b] - lm[b]).exp()))
        }
        Divergence::Srkl { alpha } => {
            let lm: Vec<f64> = (0..n).map(|b| log_mix(1.0 - alpha, alpha, b)).collect();
            let d = sum(&|b| sel(q[b] > 0.0, q[b] * (lq[b] - lm[b])));
            let h = qg(&|b| lq[b] - lm[b] + 1.0 - alpha * (lq[b] - lm[b]).exp());
            (d, h)
        }
    }
}

/// One row of the objective against a sparse teacher: (CE at T = 1 when `label` is given, and
/// D_T when the spec has a divergence), adding the weighted gradient to `g` when given: the
/// sparse counterpart of the dense kernel's row loss, with the same coefficients.
pub fn sparse_row_loss(
    spec: &LossSpec,
    teacher: Option<SparseRow>,
    label: Option<u32>,
    weight: f64,
    s: &[f32],
    sc: &mut RowScratch,
    mut g: Option<&mut [f32]>,
) -> Result<RowLoss> {
    let mut res = RowLoss::default();
    if weight == 0.0 {
        return Ok(res);
    }
    if let Some(div) = spec.divergence.filter(|_| spec.kd_coef != 0.0) {
        let Some(t) = teacher else {
            bail!("kd kernel: a divergence needs the sparse teacher of every counted row")
        };
        let c = weight * spec.kd_coef * spec.inv_temperature;
        let gk = g.as_deref_mut().map(|g| (g, c));
        res.kd = sparse_divergence_row(div, t, s, spec.inv_temperature, sc, gk)?;
    }
    if let Some(l) = label {
        let gc = g
            .filter(|_| spec.ce_coef != 0.0)
            .map(|g| (g, weight * spec.ce_coef));
        res.ce = cross_entropy_row(s, l as usize, sc, gc)?;
    }
    Ok(res)
}
