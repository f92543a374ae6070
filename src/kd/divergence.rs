//! The KD divergences of POCL.md §4 and their per-row math (value + analytic gradient).
//!
//! Notation, per token row: a = t/T (teacher), b = s/T (student), p = softmax(a), q = softmax(b).
//! Every divergence D(p, q) is written so that its gradient w.r.t. the student's scaled logits b is
//! `dD/db_j = q_j (g_j − Σ_k q_k g_k)` with `g = ∂D/∂q`; the closed forms used below are:
//!
//! | name | D | dD/db_j |
//! |---|---|---|
//! | fkl  | Σ p (log p − log q) | q_j − p_j |
//! | rkl  | Σ q (log q − log p) | q_j (log q_j − log p_j − D) |
//! | jsd  | β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q | (1−β) q_j (r_j − KL(q‖m)), r = log(q/m) |
//! | tvd  | ½ Σ abs(p − q) | q_j (σ_j − Σ_k q_k σ_k), σ = ½ sign(q − p) |
//! | skl  | KL(p‖m), m = αp + (1−α)q | (1−α) q_j (Σ_k p_k q_k / m_k − p_j / m_j) |
//! | srkl | KL(q‖m), m = (1−α)p + αq | q_j (r_j − D − α (q_j/m_j − Σ_k q_k²/m_k)), r = log(q/m) |
//!
//! Zero probabilities: 0·log 0 = 0 (terms with a zero weight are skipped, never evaluated as
//! 0·∞). The teacher's log-probabilities are floored at [`LOG_PROB_FLOOR`] (−1e30), so a −∞
//! teacher logit behaves like a −1e30 one: rkl where p = 0 < q, mathematically +∞, is a finite
//! ~1e30-sized value with a finite gradient, and nothing is ever NaN. The student is not floored
//! (that would cut its gradient): fkl is +∞ where the student has an exact zero (−∞ logit) that
//! the teacher does not, while its gradient q − p stays finite. jsd, tvd, skl and srkl are
//! bounded for all inputs (skl, srkl ≤ log(1/α); jsd ≤ H(β) ≤ log 2; tvd ≤ 1).

use crate::ops::fastmath as fm;
use crate::ops::simd::multiversion;
use anyhow::{bail, Result};

/// The floor applied to the teacher's log-probabilities (see the module docs).
pub const LOG_PROB_FLOOR: f64 = -1e30;

/// A white-box KD divergence D(p_teacher ‖ q_student) from POCL.md §4.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// Forward KL, KL(p‖q) — the true KL including the teacher entropy (not the cross-entropy).
    Fkl,
    /// Reverse KL, KL(q‖p).
    Rkl,
    /// Generalised Jensen–Shannon: β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q.
    Jsd { beta: f64 },
    /// Total variation distance ½ Σ |p − q|.
    Tvd,
    /// Skew forward KL: KL(p‖αp + (1−α)q).
    Skl { alpha: f64 },
    /// Skew reverse KL: KL(q‖(1−α)p + αq).
    Srkl { alpha: f64 },
}

/// Default β of jsd and α of skl / srkl (the paper's).
pub const DEFAULT_BETA: f64 = 0.1;
pub const DEFAULT_ALPHA: f64 = 0.1;

/// The names [`Divergence::parse`] accepts.
pub const DIVERGENCE_NAMES: [&str; 6] = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"];

impl Divergence {
    /// Parses a loss name; `alpha` (skl, srkl) and `beta` (jsd) default to 0.1 and must lie in
    /// (0, 1). Giving a parameter the divergence does not use is an error, not silently ignored.
    pub fn parse(name: &str, alpha: Option<f64>, beta: Option<f64>) -> Result<Self> {
        let name = name.trim().to_ascii_lowercase();
        let check = |what: &str, v: f64| -> Result<f64> {
            if !(v > 0.0 && v < 1.0) {
                bail!("{what} = {v} is out of range for loss '{name}': it must lie strictly between 0 and 1");
            }
            Ok(v)
        };
        let uses_alpha = matches!(name.as_str(), "skl" | "srkl");
        let uses_beta = name == "jsd";
        if alpha.is_some() && !uses_alpha && DIVERGENCE_NAMES.contains(&name.as_str()) {
            bail!("alpha is only used by skl and srkl, not by '{name}'");
        }
        if beta.is_some() && !uses_beta && DIVERGENCE_NAMES.contains(&name.as_str()) {
            bail!("beta is only used by jsd, not by '{name}'");
        }
        Ok(match name.as_str() {
            "fkl" => Divergence::Fkl,
            "rkl" => Divergence::Rkl,
            "jsd" => Divergence::Jsd {
                beta: check("beta", beta.unwrap_or(DEFAULT_BETA))?,
            },
            "tvd" => Divergence::Tvd,
            "skl" => Divergence::Skl {
                alpha: check("alpha", alpha.unwrap_or(DEFAULT_ALPHA))?,
            },
            "srkl" => Divergence::Srkl {
                alpha: check("alpha", alpha.unwrap_or(DEFAULT_ALPHA))?,
            },
            _ => bail!(
                "unknown KD loss '{name}'; valid names: {}",
                DIVERGENCE_NAMES.join(", ")
            ),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Divergence::Fkl => "fkl",
            Divergence::Rkl => "rkl",
            Divergence::Jsd { .. } => "jsd",
            Divergence::Tvd => "tvd",
            Divergence::Skl { .. } => "skl",
            Divergence::Srkl { .. } => "srkl",
        }
    }

    /// Checks the parameter range for values built directly rather than through [`Self::parse`].
    pub fn validate(&self) -> Result<()> {
        let bad = |v: f64| !(v > 0.0 && v < 1.0);
        match *self {
            Divergence::Jsd { beta } if bad(beta) => bail!("jsd beta = {beta} must lie in (0, 1)"),
            Divergence::Skl { alpha } | Divergence::Srkl { alpha } if bad(alpha) => {
                bail!("{} alpha = {alpha} must lie in (0, 1)", self.name())
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::Jsd { beta } => write!(f, "jsd(beta={beta})"),
            Divergence::Skl { alpha } => write!(f, "skl(alpha={alpha})"),
            Divergence::Srkl { alpha } => write!(f, "srkl(alpha={alpha})"),
            d => f.write_str(d.name()),
        }
    }
}

/// Per-thread buffers of one vocabulary row each; the kernel never holds more than this per
/// thread besides its inputs and the gradient it writes.
pub struct RowScratch {
    /// exp(a − max a), then per-divergence values.
    p: Vec<f64>,
    /// exp(b − max b).
    q: Vec<f64>,
    /// Per-element quantities the sums and the gradient pass reuse (log(q/m), p/m, ...).
    r: Vec<f64>,
    u: Vec<f64>,
}

impl RowScratch {
    pub fn new(width: usize) -> Self {
        RowScratch {
            p: vec![0.0; width],
            q: vec![0.0; width],
            r: vec![0.0; width],
            u: vec![0.0; width],
        }
    }
    /// The student-exponentials row, for the sparse kernel (`kd::sparse`).
    pub(crate) fn q_mut(&mut self) -> &mut [f64] {
        &mut self.q
    }
    pub fn ensure(&mut self, width: usize) {
        if self.p.len() < width {
            *self = RowScratch::new(width);
        }
    }
}

/// Max of a row; errors when it is not finite (+∞, or no finite logit at all), since the
/// softmax is then undefined. NaN elements are not caught here and propagate to a NaN loss.
#[inline]
pub(crate) fn row_max(x: &[f32], who: &str) -> Result<f32> {
    let m = fm::max(x);
    if !m.is_finite() {
        bail!("{who} row has no finite maximum logit ({m}); the softmax is undefined");
    }
    Ok(m)
}

/// Fills `out` with exp((x − max)·inv_t) and returns log Σ exp(x·inv_t), computed stably.
/// (Map first, sum after: the loop vectoriser handles the map; a fused map-reduce stays scalar.)
#[inline(always)]
fn exp_row(x: &[f32], max: f32, inv_t: f64, out: &mut [f64]) -> f64 {
    let out = &mut out[..x.len()];
    let mx = max as f64;
    for (o, &v) in out.iter_mut().zip(x) {
        // (v − max) in f64 is exact for f32 inputs, so huge offsets cost no precision.
        *o = fm::exp((v as f64 - mx) * inv_t);
    }
    mx * inv_t + fm::sum(out.len(), |j| out[j]).ln()
}

#[inline(always)]
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `if cond { x } else { 0 }` as a select, so 0·∞ never happens and loops stay branch-free.
#[inline(always)]
fn sel(cond: bool, x: f64) -> f64 {
    if cond {
        x
    } else {
        0.0
    }
}

/// Computes the divergence D_T(teacher ‖ student) of one row. When `grad` is given, adds
/// `coef · dD/db` to it (the caller folds the T² scale, the 1/T chain factor and the row weight
/// into `coef`). Returns D (unscaled).
pub fn divergence_row(
    div: Divergence,
    t: &[f32],
    s: &[f32],
    inv_t: f64,
    sc: &mut RowScratch,
    grad: Option<(&mut [f32], f64)>,
) -> Result<f64> {
    if t.len() != s.len() {
        bail!(
            "teacher row has {} logits, student row {}",
            t.len(),
            s.len()
        );
    }
    let mt = row_max(t, "teacher")?;
    let ms = row_max(s, "student")?;
    sc.ensure(t.len());
    Ok(divergence_row_mv(div, t, s, mt, ms, inv_t, sc, grad))
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn divergence_row_mv => divergence_row_impl(div: Divergence, t: &[f32], s: &[f32], mt: f32, ms: f32, inv_t: f64, sc: &mut RowScratch, grad: Option<(&mut [f32], f64)>) -> f64
}

multiversion! {
    fn cross_entropy_row_mv => cross_entropy_row_impl(s: &[f32], ms: f32, label: usize, sc: &mut RowScratch, grad: Option<(&mut [f32], f64)>) -> f64
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn divergence_row_impl(
    div: Divergence,
    t: &[f32],
    s: &[f32],
    mt: f32,
    ms: f32,
    inv_t: f64,
    sc: &mut RowScratch,
    grad: Option<(&mut [f32], f64)>,
) -> f64 {
    let v = t.len();
    let (t, s) = (&t[..v], &s[..v]);
    let (pe, qe) = (&mut sc.p[..v], &mut sc.q[..v]);
    let (r, u) = (&mut sc.r[..v], &mut sc.u[..v]);
    let lse_t = exp_row(t, mt, inv_t, pe);
    let lse_s = exp_row(s, ms, inv_t, qe);
    // Normalisers folded into the uses: p = pe·izt, q = qe·izs (saves a pass per row).
    let izt = (-(lse_t - mt as f64 * inv_t)).exp();
    let izs = (-(lse_s - ms as f64 * inv_t)).exp();
    // Log-probabilities straight from the logits (never the log of an underflowed probability).
    let lp = |x: f32| {
        let l = x as f64 * inv_t - lse_t;
        if l > LOG_PROB_FLOOR {
            l
        } else {
            LOG_PROB_FLOOR
        }
    };
    let lq = |x: f32| x as f64 * inv_t - lse_s;
    // Each divergence: element-wise map loops (vectorised) into the scratch rows, then lane sums
    // over them, then the gradient map. Rows stay in L2, so the extra passes are cheap.
    match div {
        Divergence::Fkl => {
            for j in 0..v {
                let p = pe[j] * izt;
                r[j] = sel(p > 0.0, p * (lp(t[j]) - lq(s[j])));
            }
            let d = fm::sum(v, |j| r[j]);
            if let Some((g, c)) = grad {
                let g = &mut g[..v];
                for j in 0..v {
                    g[j] += (c * (qe[j] * izs - pe[j] * izt)) as f32;
                }
            }
            d
        }
        Divergence::Rkl => {
            for j in 0..v {
                let q = qe[j] * izs;
                r[j] = sel(q > 0.0, q * (lq(s[j]) - lp(t[j])));
            }
            let d = fm::sum(v, |j| r[j]);
            if let Some((g, c)) = grad {
                let g = &mut g[..v];
                for j in 0..v {
                    let q = qe[j] * izs;
                    g[j] += sel(q > 0.0, c * q * (lq(s[j]) - lp(t[j]) - d)) as f32;
                }
            }
            d
        }
        Divergence::Tvd => {
            for j in 0..v {
                r[j] = (qe[j] * izs - pe[j] * izt).abs();
            }
            let d = fm::sum(v, |j| r[j]);
            for j in 0..v {
                let (p, q) = (pe[j] * izt, qe[j] * izs);
                r[j] = q * 0.5 * sign(q - p);
            }
            let gbar = fm::sum(v, |j| r[j]);
            if let Some((g, c)) = grad {
                let g = &mut g[..v];
                for j in 0..v {
                    let (p, q) = (pe[j] * izt, qe[j] * izs);
                    g[j] += (c * q * (0.5 * sign(q - p) - gbar)) as f32;
                }
            }
            0.5 * d
        }
        // The mixtures m of jsd / skl / srkl: log m = ln(wp·p + wq·q), one vectorised ln, for
        // every element; where m is not a normal f64 (both probabilities below ~1e-290, only in
        // rows with extreme logits) a scalar fix-up pass redoes the element in the log domain.
        Divergence::Jsd { beta } => {
            let mix = Mix::new(beta, 1.0 - beta);
            let mut tiny = 0usize;
            for j in 0..v {
                let (p, q) = (pe[j] * izt, qe[j] * izs);
                let m = mix.m(p, q);
                tiny += (m < M_MIN) as usize;
                let lm = fm::ln(m.max(M_MIN));
                r[j] = lq(s[j]) - lm; // log(q/m), reused by the gradient
                u[j] = sel(p > 0.0, p * (lp(t[j]) - lm));
            }
            if tiny > 0 {
                for j in 0..v {
                    let (p, q) = (pe[j] * izt, qe[j] * izs);
                    if mix.m(p, q) < M_MIN {
                        let (lpj, lqj) = (lp(t[j]), lq(s[j]));
                        let lm = mix.log_m(lpj, lqj);
                        r[j] = lqj - lm;
                        u[j] = sel(p > 0.0, p * (lpj - lm));
                    }
                }
            }
            let kl_pm = fm::sum(v, |j| u[j]);
            let kl_qm = fm::sum(v, |j| {
                let q = qe[j] * izs;
                sel(q > 0.0, q * r[j])
            });
            if let Some((g, c)) = grad {
                let (g, c) = (&mut g[..v], c * (1.0 - beta));
                for j in 0..v {
                    let q = qe[j] * izs;
                    g[j] += sel(q > 0.0, c * q * (r[j] - kl_qm)) as f32;
                }
            }
            beta * kl_pm + (1.0 - beta) * kl_qm
        }
        Divergence::Skl { alpha } => {
            let mix = Mix::new(alpha, 1.0 - alpha);
            let mut tiny = 0usize;
            for j in 0..v {
                let (p, q) = (pe[j] * izt, qe[j] * izs);
                let m = mix.m(p, q);
                tiny += (m < M_MIN) as usize;
                let mc = m.max(M_MIN);
                let x = lp(t[j]) - fm::ln(mc); // log(p/m)
                r[j] = sel(p > 0.0, p / mc); // p/m ≤ 1/α
                u[j] = sel(p > 0.0, p * x);
            }
            if tiny > 0 {
                for j in 0..v {
                    let (p, q) = (pe[j] * izt, qe[j] * izs);
                    if mix.m(p, q) < M_MIN {
                        let lpj = lp(t[j]);
                        let x = lpj - mix.log_m(lpj, lq(s[j]));
                        r[j] = sel(p > 0.0, x.exp());
                        u[j] = sel(p > 0.0, p * x);
                    }
                }
            }
            let d = fm::sum(v, |j| u[j]);
            let sum_pq_m = fm::sum(v, |j| qe[j] * izs * r[j]);
            if let Some((g, c)) = grad {
                let (g, c) = (&mut g[..v], c * (1.0 - alpha));
                for j in 0..v {
                    g[j] += (c * qe[j] * izs * (sum_pq_m - r[j])) as f32;
                }
            }
            d
        }
        Divergence::Srkl { alpha } => {
            let mix = Mix::new(1.0 - alpha, alpha);
            let mut tiny = 0usize;
            for j in 0..v {
                let (p, q) = (pe[j] * izt, qe[j] * izs);
                let m = mix.m(p, q);
                tiny += (m < M_MIN) as usize;
                let mc = m.max(M_MIN);
                r[j] = lq(s[j]) - fm::ln(mc); // log(q/m)
                u[j] = sel(q > 0.0, q / mc); // q/m ≤ 1/α
            }
            if tiny > 0 {
                for j in 0..v {
                    let (p, q) = (pe[j] * izt, qe[j] * izs);
                    if mix.m(p, q) < M_MIN {
                        let lqj = lq(s[j]);
                        let x = lqj - mix.log_m(lp(t[j]), lqj);
                        r[j] = x;
                        u[j] = sel(q > 0.0, x.exp());
                    }
                }
            }
            let d = fm::sum(v, |j| {
                let q = qe[j] * izs;
                sel(q > 0.0, q * r[j])
            });
            let w = fm::sum(v, |j| qe[j] * izs * u[j]);
            if let Some((g, c)) = grad {
                let g = &mut g[..v];
                for j in 0..v {
                    let q = qe[j] * izs;
                    g[j] += sel(q > 0.0, c * q * (r[j] - d - alpha * (u[j] - w))) as f32;
                }
            }
            d
        }
    }
}

/// Below this a mixture m is recomputed in the log domain (see the mixture divergences).
const M_MIN: f64 = 1e-290;

/// The mixture m = wp·p + wq·q of jsd / skl / srkl.
struct Mix {
    wp: f64,
    wq: f64,
    lwp: f64,
    lwq: f64,
}

impl Mix {
    fn new(wp: f64, wq: f64) -> Self {
        Mix {
            wp,
            wq,
            lwp: wp.ln(),
            lwq: wq.ln(),
        }
    }
    #[inline(always)]
    fn m(&self, p: f64, q: f64) -> f64 {
        self.wp * p + self.wq * q
    }
    /// log m from log p and log q, for the elements where m underflows.
    fn log_m(&self, lp: f64, lq: f64) -> f64 {
        let (a, b) = (self.lwp + lp, self.lwq + lq);
        let hi = a.max(b);
        hi + ((a - hi).exp() + (b - hi).exp()).ln()
    }
}

/// Cross-entropy −log softmax(s)\[label\] of one row (temperature 1); adds `coef·(softmax(s) −
/// onehot(label))` to `grad` when given.
pub fn cross_entropy_row(
    s: &[f32],
    label: usize,
    sc: &mut RowScratch,
    grad: Option<(&mut [f32], f64)>,
) -> Result<f64> {
    let v = s.len();
    if label >= v {
        bail!("label {label} is outside the vocabulary (size {v})");
    }
    let ms = row_max(s, "student")?;
    sc.ensure(v);
    Ok(cross_entropy_row_mv(s, ms, label, sc, grad))
}

#[inline(always)]
fn cross_entropy_row_impl(
    s: &[f32],
    ms: f32,
    label: usize,
    sc: &mut RowScratch,
    grad: Option<(&mut [f32], f64)>,
) -> f64 {
    let v = s.len();
    let qe = &mut sc.q[..v];
    let lse = exp_row(s, ms, 1.0, qe);
    if let Some((g, c)) = grad {
        let g = &mut g[..v];
        let cz = c * (-(lse - ms as f64)).exp();
        for j in 0..v {
            g[j] += (cz * qe[j]) as f32;
        }
        g[label] -= c as f32;
    }
    lse - s[label] as f64
}
