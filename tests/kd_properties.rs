//! Properties of the divergences (D(p, p) = 0, D ≥ 0, bounds, finiteness where the KLs blow up,
//! shift invariance, large logits over T ∈ [0.5, 10]) and finite-difference gradient checks.

mod kd_common;
use kd_common::Lcg;
use pocl::kd::kernel::{loss_rows, LossSpec, RowLoss, Rows};
use pocl::kd::{Divergence, DIVERGENCE_NAMES};

const TEMPS: [f64; 5] = [0.5, 1.0, 2.0, 5.0, 10.0];

fn all_divs() -> Vec<Divergence> {
    DIVERGENCE_NAMES
        .iter()
        .map(|n| Divergence::parse(n, None, None).unwrap())
        .collect()
}

/// Per-row D_T (unscaled) and, with `grad`, d(Σ_r scale·D_r)/ds, for rows of width v.
fn eval(
    div: Divergence,
    t: &[f32],
    s: &[f32],
    v: usize,
    temp: f64,
    scale: f64,
    grad: bool,
) -> (Vec<f64>, Vec<f32>) {
    let n = t.len() / v;
    let spec = LossSpec {
        divergence: Some(div),
        inv_temperature: 1.0 / temp,
        ce_coef: 0.0,
        kd_coef: scale,
    };
    let mut out = vec![RowLoss::default(); n];
    let mut g = vec![0f32; if grad { n * v } else { 0 }];
    let w = vec![1f32; n];
    loss_rows(
        &spec,
        Some(Rows::contiguous(t, v)),
        Rows::contiguous(s, v),
        None,
        &w,
        grad.then_some(&mut g[..]),
        &mut out,
    )
    .unwrap();
    (out.iter().map(|r| r.kd).collect(), g)
}

fn random_rows(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut g = Lcg(seed);
    (0..n).map(|_| g.logit() * scale).collect()
}

#[test]
fn identical_distributions_give_zero_and_zero_gradient() {
    let v = 301;
    for (i, scale) in [1.0f32, 8.0, 64.0].into_iter().enumerate() {
        let mut t = random_rows(11 + i as u64, 4 * v, scale);
        t[v..2 * v]
            .iter_mut()
            .step_by(3)
            .for_each(|x| *x = f32::NEG_INFINITY); // exact zeros in both
        for div in all_divs() {
            for temp in TEMPS {
                let (d, g) = eval(div, &t, &t, v, temp, temp * temp, true);
                for (r, x) in d.iter().enumerate() {
                    assert!(x.abs() <= 1e-12, "{div} T={temp} row {r}: D(p,p) = {x}");
                }
                let gmax = g.iter().fold(0f32, |a, x| a.max(x.abs()));
                assert!(gmax <= 1e-9, "{div} T={temp}: gradient at p = q is {gmax}");
            }
        }
    }
}

#[test]
fn divergences_are_nonnegative_and_bounded() {
    let v = 257;
    let n = 16;
    for (i, scale) in [0.25f32, 1.0, 8.0, 100.0].into_iter().enumerate() {
        let t = random_rows(100 + i as u64, n * v, scale);
        let s = random_rows(200 + i as u64, n * v, scale);
        for div in all_divs() {
            for temp in TEMPS {
                let (d, g) = eval(div, &t, &s, v, temp, 1.0, true);
                assert!(
                    g.iter().all(|x| x.is_finite()),
                    "{div} T={temp}: non-finite gradient"
                );
                for &x in &d {
                    assert!(x >= -1e-12, "{div} T={temp}: D = {x} < 0");
                    let bound = match div {
                        Divergence::Tvd => 1.0,
                        Divergence::Skl { alpha } | Divergence::Srkl { alpha } => -alpha.ln(),
                        Divergence::Jsd { .. } => std::f64::consts::LN_2,
                        _ => f64::INFINITY,
                    };
                    assert!(
                        x <= bound + 1e-9,
                        "{div} T={temp}: D = {x} above its bound {bound}"
                    );
                }
            }
        }
    }
}

/// Where the teacher has exact zeros the student does not (rkl → +∞ mathematically) and where
/// the student has exact zeros the teacher does not (fkl = +∞), nothing is NaN, the skew and
/// bounded divergences stay finite and bounded, and every gradient is finite.
#[test]
fn zero_probabilities_never_give_nan_and_skew_divergences_stay_finite() {
    let v = 97;
    let base_t = random_rows(7, v, 1.0);
    let base_s = random_rows(8, v, 1.0);
    // teacher zeros (−∞ or −1e30) against a full student; student zeros (−∞) against a full teacher.
    for (what, zero) in [
        ("teacher -inf", f32::NEG_INFINITY),
        ("teacher -1e30", -1e30),
        ("student -inf", f32::NEG_INFINITY),
    ] {
        let (mut t, mut s) = (base_t.clone(), base_s.clone());
        let target = if what.starts_with("teacher") {
            &mut t
        } else {
            &mut s
        };
        target.iter_mut().step_by(4).for_each(|x| *x = zero);
        for div in all_divs() {
            for temp in TEMPS {
                let (d, g) = eval(div, &t, &s, v, temp, temp * temp, true);
                let d = d[0];
                assert!(!d.is_nan(), "{what} {div} T={temp}: NaN");
                assert!(
                    g.iter().all(|x| x.is_finite()),
                    "{what} {div} T={temp}: non-finite gradient"
                );
                match div {
                    Divergence::Fkl if what == "student -inf" => {
                        assert_eq!(d, f64::INFINITY, "{what} fkl")
                    }
                    Divergence::Rkl if what.starts_with("teacher") => {
                        // The −1e30 floor on log p: finite, ~1e28 or more, never NaN.
                        assert!(d.is_finite() && d > 1e20, "{what} rkl T={temp}: {d}")
                    }
                    Divergence::Skl { alpha } | Divergence::Srkl { alpha } => {
                        assert!(
                            d.is_finite() && d <= -alpha.ln() + 1e-9,
                            "{what} {div}: {d}"
                        )
                    }
                    _ => assert!(d.is_finite(), "{what} {div} T={temp}: {d}"),
                }
            }
        }
    }
}

#[test]
fn large_logits_and_offsets_are_stable_over_the_temperature_range() {
    let v = 513;
    let t = random_rows(31, 2 * v, 1000.0); // |logits| up to 8000
    let s = random_rows(32, 2 * v, 1000.0);
    for div in all_divs() {
        for temp in TEMPS {
            let (d, g) = eval(div, &t, &s, v, temp, temp * temp, true);
            assert!(
                d.iter().all(|x| x.is_finite()) && g.iter().all(|x| x.is_finite()),
                "{div} T={temp}"
            );
            // Softmax is shift invariant: adding 2^14 to every logit (exact in f32 here) changes nothing.
            let shift = |x: &[f32]| x.iter().map(|&y| y + 16384.0).collect::<Vec<f32>>();
            let (d2, _) = eval(div, &shift(&t), &s, v, temp, 1.0, false);
            let (d3, _) = eval(div, &t, &shift(&s), v, temp, 1.0, false);
            for r in 0..2 {
                for other in [d2[r], d3[r]] {
                    assert!(
                        (other - d[r]).abs() <= 1e-9 * d[r].abs() + 1e-12,
                        "{div} T={temp}: shift changed {} to {other}",
                        d[r]
                    );
                }
            }
        }
    }
}

/// Central differences with Richardson extrapolation on f32-exact perturbations, of the f64
/// per-row values, against the analytic gradient (T² rule and 1/T chain factor included).
#[test]
fn gradients_match_finite_differences() {
    let v = 37;
    let t = random_rows(41, v, 0.5);
    let s0 = random_rows(42, v, 0.5);
    let h = 1.0f32 / 64.0; // s ± h and s ± h/2 are exact in f32 for k/128 − 4 logits
    for div in all_divs() {
        for temp in [0.5, 1.0, 2.0, 10.0] {
            let scale = temp * temp;
            let (_, g) = eval(div, &t, &s0, v, temp, scale, true);
            let gmax = g.iter().fold(0f64, |a, &x| a.max(x.abs() as f64));
            let mut skipped = 0;
            for j in 0..v {
                let f = |dx: f32| {
                    let mut s = s0.clone();
                    s[j] += dx;
                    eval(div, &t, &s, v, temp, 1.0, false).0[0] * scale
                };
                let d1 = |hh: f32| (f(hh) - f(-hh)) / (2.0 * hh as f64);
                let (a, b) = (d1(h), d1(h / 2.0));
                if matches!(div, Divergence::Tvd) && (a - b).abs() > 1e-3 * gmax {
                    // tvd has kinks where p_k = q_k; a step that crosses one is no derivative.
                    skipped += 1;
                    continue;
                }
                let fd = (4.0 * b - a) / 3.0;
                let err = (fd - g[j] as f64).abs();
                assert!(
                    err <= 1e-4 * gmax + 1e-9,
                    "{div} T={temp} j={j}: analytic {} vs finite difference {fd}",
                    g[j]
                );
            }
            assert!(
                skipped <= v / 4,
                "{div} T={temp}: {skipped} of {v} entries sit on a kink"
            );
        }
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let v = 29;
    let s0 = random_rows(51, v, 0.5);
    let label = 7u32;
    let spec = LossSpec {
        divergence: None,
        inv_temperature: 1.0,
        ce_coef: 1.0,
        kd_coef: 0.0,
    };
    let run = |s: &[f32], grad: Option<&mut [f32]>| {
        let mut out = [RowLoss::default()];
        loss_rows(
            &spec,
            None,
            Rows::contiguous(s, v),
            Some(&[label]),
            &[1.0],
            grad,
            &mut out,
        )
        .unwrap();
        out[0].ce
    };
    let mut g = vec![0f32; v];
    run(&s0, Some(&mut g));
    let h = 1.0f32 / 64.0;
    for j in 0..v {
        let f = |dx: f32| {
            let mut s = s0.clone();
            s[j] += dx;
            run(&s, None)
        };
        let d1 = |hh: f32| (f(hh) - f(-hh)) / (2.0 * hh as f64);
        let fd = (4.0 * d1(h / 2.0) - d1(h)) / 3.0;
        assert!(
            (fd - g[j] as f64).abs() <= 1e-5,
            "CE j={j}: analytic {} vs finite difference {fd}",
            g[j]
        );
    }
}
