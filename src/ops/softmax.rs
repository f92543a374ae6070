//! The rows of the attention softmax, softmax(scores·scale + bias), forward and backward, in
//! place: the kernels of the fused attention op ([`super::attention`]). f32 with the vectorised
//! `exp_f32` (masked scores give exactly 0) and 16 lanes of partial sums; compiled per
//! instruction set.

use super::fastmath::exp_f32;
use super::simd::multiversion;

/// In place: row ← softmax(row·scale + bias) (the attention op's rows). f32 with the
/// vectorised `exp_f32` (masked scores give exactly 0) and 16 lanes of partial sums.
#[inline(always)]
fn forward_inplace_impl(row: &mut [f32], bias: &[f32], scale: f32) {
    const L: usize = 16;
    let k = row.len();
    let bias = &bias[..k];
    // The max in 16 independent lanes: one running max is a dependency chain the compiler may
    // not reorder (it dominated the row for attention's 128-wide rows).
    let full = k / L * L;
    let mut lanes = [f32::NEG_INFINITY; L];
    for (c, b) in row[..full].chunks_exact_mut(L).zip(bias.chunks_exact(L)) {
        for l in 0..L {
            let v = c[l] * scale + b[l];
            c[l] = v;
            lanes[l] = lanes[l].max(v);
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for j in full..k {
        let v = row[j] * scale + bias[j];
        row[j] = v;
        max = max.max(v);
    }
    let mut acc = [0f32; L];
    for c in row[..full].chunks_exact_mut(L) {
        for l in 0..L {
            let e = exp_f32(c[l] - max);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for v in &mut row[full..] {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// In place: dp ← scale · p · (dp − Σ p·dp).
#[inline(always)]
fn backward_inplace_impl(p: &[f32], dp: &mut [f32], scale: f32) {
    let k = dp.len();
    let p = &p[..k];
    let dot: f64 = p
        .iter()
        .zip(dp.iter())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let dot = dot as f32;
    for j in 0..k {
        dp[j] = scale * p[j] * (dp[j] - dot);
    }
}

multiversion! {
    pub(crate) fn softmax_forward_row => forward_inplace_impl(row: &mut [f32], bias: &[f32], scale: f32) -> ()
}

multiversion! {
    pub(crate) fn softmax_backward_row => backward_inplace_impl(p: &[f32], dp: &mut [f32], scale: f32) -> ()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows against f64: probabilities, masked entries exactly 0, and the backward pass against
    /// the analytic Jacobian-vector product scale·p·(dp − p·dp).
    #[test]
    fn rows_match_f64() {
        let k = 37; // a full 16-lane part and a tail
        let scores: Vec<f32> = (0..k).map(|j| ((j * 13 % 7) as f32 - 3.0) * 1.7).collect();
        let bias: Vec<f32> = (0..k)
            .map(|j| if j % 5 == 4 { -1e9 } else { 0.0 })
            .collect();
        let scale = 0.37f32;
        let mut p = scores.clone();
        softmax_forward_row(&mut p, &bias, scale);
        let z: Vec<f64> = (0..k)
            .map(|j| scores[j] as f64 * scale as f64 + bias[j] as f64)
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
        for j in 0..k {
            let want = (z[j] - m).exp() / sum;
            assert!(
                (p[j] as f64 - want).abs() < 1e-7,
                "p[{j}] {} vs {want}",
                p[j]
            );
            if bias[j] < -1.0 {
                assert_eq!(p[j], 0.0);
            }
        }
        let dp0: Vec<f32> = (0..k).map(|j| ((j * 5 % 11) as f32 - 5.0) / 3.0).collect();
        let mut ds = dp0.clone();
        softmax_backward_row(&p, &mut ds, scale);
        let dot: f64 = (0..k).map(|j| p[j] as f64 * dp0[j] as f64).sum();
        for j in 0..k {
            let want = scale as f64 * p[j] as f64 * (dp0[j] as f64 - dot);
            assert!(
                (ds[j] as f64 - want).abs() < 1e-6,
                "ds[{j}] {} vs {want}",
                ds[j]
            );
        }
    }
}
