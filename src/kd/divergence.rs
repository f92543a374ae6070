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
//! bounded for all inputs (skl, srkl ≤ log(1/α); jsd ≤ log 2-ish; tvd ≤ 1).

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
            "jsd" => Divergence::Jsd { beta: check("beta", beta.unwrap_or(DEFAULT_BETA))? },
            "tvd" => Divergence::Tvd,
            "skl" => Divergence::Skl { alpha: check("alpha", alpha.unwrap_or(DEFAULT_ALPHA))? },
            "srkl" => Divergence::Srkl { alpha: check("alpha", alpha.unwrap_or(DEFAULT_ALPHA))? },
            _ => bail!("unknown KD loss '{name}'; valid names: {}", DIVERGENCE_NAMES.join(", ")),
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
    /// p (teacher probabilities), then reused.
    p: Vec<f64>,
    /// q (student probabilities).
    q: Vec<f64>,
    /// A per-element quantity the second pass needs (log(q/m) or q/m).
    r: Vec<f64>,
}

impl RowScratch {
    pub fn new(width: usize) -> Self {
        RowScratch { p: vec![0.0; width], q: vec![0.0; width], r: vec![0.0; width] }
    }
    fn ensure(&mut self, width: usize) {
        if self.p.len() < width {
            *self = RowScratch::new(width);
        }
    }
}

/// Max of a row; errors when it is not finite (+∞, or no finite logit at all), since the
/// softmax is then undefined. NaN elements are not caught here and propagate to a NaN loss.
#[inline]
pub(crate) fn row_max(x: &[f32], who: &str) -> Result<f32> {
    let mut m = f32::NEG_INFINITY;
    for &v in x {
        if v > m {
            m = v;
        }
    }
    if !m.is_finite() {
        bail!("{who} row has no finite maximum logit ({m}); the softmax is undefined");
    }
    Ok(m)
}

/// Fills `out` with exp((x − max)·inv_t) and returns (max·inv_t + log Σ, Σ): the log-sum-exp of
/// the scaled row, computed stably.
#[inline]
fn exp_row(x: &[f32], max: f32, inv_t: f64, out: &mut [f64]) -> (f64, f64) {
    let mut z = 0.0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        // (v − max) in f64 is exact for f32 inputs, so huge offsets cost no precision.
        let e = ((v as f64 - max as f64) * inv_t).exp();
        *o = e;
        z += e;
    }
    (max as f64 * inv_t + z.ln(), z)
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
    let v = t.len();
    debug_assert_eq!(s.len(), v);
    sc.ensure(v);
    let (p, q, r) = (&mut sc.p[..v], &mut sc.q[..v], &mut sc.r[..v]);
    let mt = row_max(t, "teacher")?;
    let ms = row_max(s, "student")?;
    let (lse_t, zt) = exp_row(t, mt, inv_t, p);
    let (lse_s, zs) = exp_row(s, ms, inv_t, q);
    let (izt, izs) = (1.0 / zt, 1.0 / zs);
    for x in p.iter_mut() {
        *x *= izt;
    }
    for x in q.iter_mut() {
        *x *= izs;
    }
    // Log-probabilities straight from the logits (never log of an underflowed probability).
    let lp = |j: usize| (t[j] as f64 * inv_t - lse_t).max(LOG_PROB_FLOOR);
    let lq = |j: usize| s[j] as f64 * inv_t - lse_s;

    let d = match div {
        Divergence::Fkl => {
            let mut d = 0.0;
            for j in 0..v {
                if p[j] > 0.0 {
                    d += p[j] * (lp(j) - lq(j));
                }
            }
            if let Some((g, c)) = grad {
                for j in 0..v {
                    g[j] += (c * (q[j] - p[j])) as f32;
                }
            }
            d
        }
        Divergence::Rkl => {
            let mut d = 0.0;
            for j in 0..v {
                if q[j] > 0.0 {
                    let x = lq(j) - lp(j);
                    r[j] = x;
                    d += q[j] * x;
                }
            }
            if let Some((g, c)) = grad {
                for j in 0..v {
                    if q[j] > 0.0 {
                        g[j] += (c * q[j] * (r[j] - d)) as f32;
                    }
                }
            }
            d
        }
        Divergence::Tvd => {
            let (mut d, mut gbar) = (0.0, 0.0);
            for j in 0..v {
                let diff = q[j] - p[j];
                d += diff.abs();
                gbar += q[j] * 0.5 * sign(diff);
            }
            if let Some((g, c)) = grad {
                for j in 0..v {
                    g[j] += (c * q[j] * (0.5 * sign(q[j] - p[j]) - gbar)) as f32;
                }
            }
            0.5 * d
        }
        Divergence::Jsd { beta } => {
            let (mut kl_pm, mut kl_qm) = (0.0, 0.0);
            let mix = Mix::new(beta, 1.0 - beta);
            for j in 0..v {
                if p[j] > 0.0 || q[j] > 0.0 {
                    let lm = mix.log_m(p[j], lp(j), q[j], lq(j));
                    if p[j] > 0.0 {
                        kl_pm += p[j] * (lp(j) - lm);
                    }
                    if q[j] > 0.0 {
                        r[j] = lq(j) - lm;
                        kl_qm += q[j] * r[j];
                    }
                }
            }
            if let Some((g, c)) = grad {
                let c = c * (1.0 - beta);
                for j in 0..v {
                    if q[j] > 0.0 {
                        g[j] += (c * q[j] * (r[j] - kl_qm)) as f32;
                    }
                }
            }
            beta * kl_pm + (1.0 - beta) * kl_qm
        }
        Divergence::Skl { alpha } => {
            let (mut d, mut sum_pq_m) = (0.0, 0.0);
            let mix = Mix::new(alpha, 1.0 - alpha);
            for j in 0..v {
                let mut pm = 0.0;
                if p[j] > 0.0 {
                    let x = lp(j) - mix.log_m(p[j], lp(j), q[j], lq(j));
                    d += p[j] * x;
                    pm = x.exp(); // p/m ≤ 1/α
                }
                r[j] = pm;
                sum_pq_m += q[j] * pm;
            }
            if let Some((g, c)) = grad {
                let c = c * (1.0 - alpha);
                for j in 0..v {
                    g[j] += (c * q[j] * (sum_pq_m - r[j])) as f32;
                }
            }
            d
        }
        Divergence::Srkl { alpha } => {
            let (mut d, mut w) = (0.0, 0.0);
            let mix = Mix::new(1.0 - alpha, alpha);
            for j in 0..v {
                if q[j] > 0.0 {
                    let x = lq(j) - mix.log_m(p[j], lp(j), q[j], lq(j));
                    let qm = x.exp(); // q/m ≤ 1/α
                    r[j] = x;
                    // p holds p_j, no longer needed for j: keep q/m there for the second pass.
                    p[j] = qm;
                    d += q[j] * x;
                    w += q[j] * qm;
                }
            }
            if let Some((g, c)) = grad {
                for j in 0..v {
                    if q[j] > 0.0 {
                        g[j] += (c * q[j] * (r[j] - d - alpha * (p[j] - w))) as f32;
                    }
                }
            }
            d
        }
    };
    Ok(d)
}

/// The mixture m = wp·p + wq·q of jsd / skl / srkl and its log, from probabilities when m is a
/// normal f64, else in the log domain (tiny subnormal p or q: m would round to 0 and log m to −∞).
struct Mix {
    wp: f64,
    wq: f64,
    lwp: f64,
    lwq: f64,
}

impl Mix {
    fn new(wp: f64, wq: f64) -> Self {
        Mix { wp, wq, lwp: wp.ln(), lwq: wq.ln() }
    }
    #[inline]
    fn log_m(&self, p: f64, lp: f64, q: f64, lq: f64) -> f64 {
        let m = self.wp * p + self.wq * q;
        if m >= 1e-290 {
            m.ln()
        } else {
            let (a, b) = (self.lwp + lp, self.lwq + lq);
            let hi = a.max(b);
            hi + ((a - hi).exp() + (b - hi).exp()).ln()
        }
    }
}

#[inline]
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Cross-entropy −log softmax(s)[label] of one row (temperature 1); adds `coef·(softmax(s) −
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
    sc.ensure(v);
    let q = &mut sc.q[..v];
    let ms = row_max(s, "student")?;
    let (lse, z) = exp_row(s, ms, 1.0, q);
    if let Some((g, c)) = grad {
        let cz = c / z;
        for j in 0..v {
            g[j] += (cz * q[j]) as f32;
        }
        g[label] -= c as f32;
    }
    Ok(lse - s[label] as f64)
}
