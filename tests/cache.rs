//! The teacher cache (issue 15): the sparse (top-K + rest) divergences against the dense kernel.

use pocl::kd::divergence::{divergence_row, RowScratch};
use pocl::kd::sparse::{sparse_divergence_row, teacher_buckets, SparseRow};
use pocl::kd::Divergence;

fn rnd(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn all_divergences() -> Vec<Divergence> {
    ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
        .iter()
        .map(|n| Divergence::parse(n, None, None).unwrap())
        .collect()
}

/// (D, gradient dD/db) of the sparse teacher made from `t` with `k` tokens, at temperature T.
fn sparse(div: Divergence, t: &[f32], s: &[f32], k: usize, temp: f64) -> (f64, Vec<f32>) {
    let (ids, lps) = teacher_buckets(t, k, &[temp]);
    let mut g = vec![0f32; s.len()];
    let row = SparseRow {
        ids: &ids,
        log_p: &lps[0],
    };
    let mut sc = RowScratch::new(s.len());
    let d = sparse_divergence_row(div, row, s, 1.0 / temp, &mut sc, Some((&mut g, 1.0))).unwrap();
    (d, g)
}

fn dense(div: Divergence, t: &[f32], s: &[f32], temp: f64) -> (f64, Vec<f32>) {
    let mut g = vec![0f32; s.len()];
    let mut sc = RowScratch::new(s.len());
    let d = divergence_row(div, t, s, 1.0 / temp, &mut sc, Some((&mut g, 1.0))).unwrap();
    (d, g)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn sparse_equals_the_full_vocabulary_kernel_when_k_is_the_vocabulary() {
    let v = 50;
    for (seed, div) in all_divergences().into_iter().enumerate() {
        for temp in [1.0, 1.5, 2.0] {
            let (t, s) = (rnd(seed as u64, v, 8.0), rnd(100 + seed as u64, v, 8.0));
            let (ds, gs) = sparse(div, &t, &s, v, temp);
            let (dd, gd) = dense(div, &t, &s, temp);
            assert!(
                (ds - dd).abs() <= 1e-10 * dd.abs().max(1e-12),
                "{div} T={temp}: sparse {ds} vs dense {dd}"
            );
            let err = max_diff(&gs, &gd);
            assert!(
                err <= 1e-6 * max_abs(&gd),
                "{div} T={temp}: gradient differs by {err} (top {})",
                max_abs(&gd)
            );
        }
    }
}

/// p̂ and q̂: the distributions conditioned on the rest (tokens outside the teacher's top K), and
/// the two rest masses.
fn rest_parts(t: &[f32], s: &[f32], k: usize, temp: f64) -> (Vec<f64>, Vec<f64>, f64, f64) {
    let soft = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f64::MIN, |m, &v| m.max(v as f64 / temp));
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 / temp - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    let (p, q) = (soft(t), soft(s));
    let (ids, _) = teacher_buckets(t, k, &[temp]);
    let rest: Vec<usize> = (0..t.len())
        .filter(|j| !ids.contains(&(*j as u32)))
        .collect();
    let (pr, qr): (f64, f64) = (
        rest.iter().map(|&j| p[j]).sum(),
        rest.iter().map(|&j| q[j]).sum(),
    );
    (
        rest.iter().map(|&j| p[j] / pr).collect(),
        rest.iter().map(|&j| q[j] / qr).collect(),
        pr,
        qr,
    )
}

fn kl(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| if *x > 0.0 { x * (x / y).ln() } else { 0.0 })
        .sum()
}

#[test]
fn sparse_error_for_k_below_the_vocabulary_stays_within_its_bound() {
    let v = 60;
    for (seed, div) in all_divergences().into_iter().enumerate() {
        for temp in [1.0, 2.0] {
            for k in [1, 5, 20, 59] {
                let (t, s) = (rnd(7 + seed as u64, v, 6.0), rnd(70 + seed as u64, v, 6.0));
                let (ds, _) = sparse(div, &t, &s, k, temp);
                let (dd, _) = dense(div, &t, &s, temp);
                let gap = dd - ds;
                let (ph, qh, pr, qr) = rest_parts(&t, &s, k, temp);
                let tol = 1e-10 * dd.abs().max(1.0);
                // Merging outcomes never increases an f-divergence.
                assert!(
                    gap >= -tol,
                    "{div} T={temp} K={k}: sparse {ds} > dense {dd}"
                );
                let what = format!("{div} T={temp} K={k}: gap {gap}");
                match div {
                    // Chain rule: the gap is the rest's mass times the divergence inside it.
                    Divergence::Fkl => assert!((gap - pr * kl(&ph, &qh)).abs() <= tol, "{what}"),
                    Divergence::Rkl => assert!((gap - qr * kl(&qh, &ph)).abs() <= tol, "{what}"),
                    Divergence::Tvd => assert!(gap <= pr.min(qr) + tol, "{what}"),
                    Divergence::Jsd { beta } => {
                        let w = beta.min(1.0 - beta);
                        assert!(gap <= (pr + qr) * (1.0 + (1.0 / w).ln()) + tol, "{what}")
                    }
                    Divergence::Skl { alpha } | Divergence::Srkl { alpha } => {
                        assert!(
                            gap <= (pr + qr) * (1.0 + (1.0 / alpha).ln()) + tol,
                            "{what}"
                        )
                    }
                }
            }
        }
    }
}

#[test]
fn sparse_gradient_matches_finite_differences() {
    let (v, k, temp) = (30, 6, 1.5);
    for (seed, div) in all_divergences().into_iter().enumerate() {
        if div == Divergence::Tvd {
            continue; // piecewise linear: covered against the dense kernel at K = V
        }
        let t = rnd(3 + seed as u64, v, 5.0);
        // Logits on a 1/1024 grid, so that ±h below is exact in f32.
        let s: Vec<f32> = rnd(30 + seed as u64, v, 5.0)
            .iter()
            .map(|x| (x * 1024.0).round() / 1024.0)
            .collect();
        let (_, g) = sparse(div, &t, &s, k, temp);
        let h = 1.0 / 256.0;
        let mut fd = vec![0f32; v];
        for j in 0..v {
            let (mut a, mut b) = (s.clone(), s.clone());
            a[j] += h;
            b[j] -= h;
            // dD/ds = dD/db / T, and the kernel returns dD/db.
            let d = (sparse(div, &t, &a, k, temp).0 - sparse(div, &t, &b, k, temp).0)
                / (2.0 * h as f64);
            fd[j] = (d * temp) as f32;
        }
        let err = max_diff(&g, &fd);
        assert!(
            err <= 1e-3 * max_abs(&fd),
            "{div}: gradient vs finite differences {err} (top {})",
            max_abs(&fd)
        );
    }
}
