//! Branch-free f64 `exp` and `ln` that the compiler can vectorise (libm's are opaque calls that
//! keep the row loops scalar), accurate to a few ulp, plus lane-parallel reductions.
//!
//! Only integer adds / shifts and float mul / add are used, so the same code vectorises with
//! SSE2, AVX2 or AVX-512 (the kernel compiles one copy per instruction set and picks at run time).

/// Lanes of the explicit reductions: independent partial sums let LLVM vectorise a float
/// reduction without reassociating it (the order is fixed, so results are deterministic).
pub const LANES: usize = 8;

const LOG2E: f64 = std::f64::consts::LOG2_E;
const LN2_HI: f64 = 0.693_147_180_369_123_8;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// 1.5·2^52: x + MAGIC rounds x to an integer held in the low mantissa bits.
const MAGIC: f64 = 6_755_399_441_055_744.0;
/// Below this exp(x) is subnormal (< 2^-1022): returned as 0, far below anything that matters.
const EXP_MIN: f64 = -708.0;

/// e^x for x ≤ 709 (the kernel only needs x ≤ 0); 0 below −708, NaN stays NaN.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    let xc = if x < EXP_MIN { EXP_MIN } else { x };
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    // r = x − n·ln2 in two parts (Cody–Waite), |r| ≤ ln2/2.
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor to r^12/12!: the next term is < 2e-16 relative on |r| ≤ 0.347.
    let mut p = 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n from the integer in t's low bits: (n + 1023) shifted into the exponent field.
    let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    if x < EXP_MIN {
        0.0
    } else {
        p * scale
    }
}

/// e^x in f32 for the f32 kernels (attention softmax, activations), ≤ 2 ulp on [−87, 88];
/// exactly 0 below −87.3 (masked scores), NaN stays NaN. Twice the lanes of [`exp`] per vector.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E_F: f32 = std::f32::consts::LOG2_E;
    const LN2_HI_F: f32 = 0.693_145_75;
    const LN2_LO_F: f32 = 1.428_606_8e-6;
    /// 1.5·2^23: x + MAGIC_F rounds x to an integer held in the low mantissa bits.
    const MAGIC_F: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E_F + MAGIC_F;
    let n = t - MAGIC_F;
    let r = (xc - n * LN2_HI_F) - n * LN2_LO_F;
    // Taylor to r^7/7!: the next term is < 1e-8 relative on |r| ≤ 0.347.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        p * scale
    }
}

/// ln x for positive normal x (the kernel calls it on values in [1, 2]).
#[inline(always)]
pub fn ln(x: f64) -> f64 {
    const SQRT2: f64 = std::f64::consts::SQRT_2;
    const TWO52: f64 = 4_503_599_627_370_496.0;
    let bits = x.to_bits();
    // Mantissa in [1, 2) and the biased exponent as a float (via the 2^52 trick, no int→float op).
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let e = f64::from_bits((bits >> 52) | 0x4330_0000_0000_0000) - TWO52 - 1023.0;
    let big = m > SQRT2;
    let m = if big { m * 0.5 } else { m };
    let e = if big { e + 1.0 } else { e };
    // ln m = 2 atanh(f), f = (m − 1)/(m + 1), |f| ≤ 0.172: odd series to f^21.
    let f = (m - 1.0) / (m + 1.0);
    let f2 = f * f;
    let mut s = 1.0 / 21.0;
    s = s * f2 + 1.0 / 19.0;
    s = s * f2 + 1.0 / 17.0;
    s = s * f2 + 1.0 / 15.0;
    s = s * f2 + 1.0 / 13.0;
    s = s * f2 + 1.0 / 11.0;
    s = s * f2 + 1.0 / 9.0;
    s = s * f2 + 1.0 / 7.0;
    s = s * f2 + 1.0 / 5.0;
    s = s * f2 + 1.0 / 3.0;
    s = s * f2 + 1.0;
    e * LN2_HI + (2.0 * f * s + e * LN2_LO)
}

/// log(e^a + e^b), stable; exact when one side is −∞.
#[inline(always)]
pub fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + ln(1.0 + exp(lo - hi))
}

/// Σ_j f(j) for j in 0..n, in [`LANES`] interleaved partial sums.
#[inline(always)]
pub fn sum<F: FnMut(usize) -> f64>(n: usize, mut f: F) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut j = 0;
    while j + LANES <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(j + k);
        }
        j += LANES;
    }
    let mut tail = 0.0;
    while j < n {
        tail += f(j);
        j += 1;
    }
    acc.iter().sum::<f64>() + tail
}

/// Two sums at once: Σ_j f(j).0 and Σ_j f(j).1.
#[inline(always)]
pub fn sum2<F: FnMut(usize) -> (f64, f64)>(n: usize, mut f: F) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mut j = 0;
    while j + LANES <= n {
        for k in 0..LANES {
            let (x, y) = f(j + k);
            a[k] += x;
            b[k] += y;
        }
        j += LANES;
    }
    let (mut ta, mut tb) = (0.0, 0.0);
    while j < n {
        let (x, y) = f(j);
        ta += x;
        tb += y;
        j += 1;
    }
    (a.iter().sum::<f64>() + ta, b.iter().sum::<f64>() + tb)
}

/// max of an f32 slice (−∞ when empty; NaN elements are skipped).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        for i in 0..200_001 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (super::exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(super::exp_f32(-1e9), 0.0);
        assert_eq!(super::exp_f32(0.0), 1.0);
        assert!(super::exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_and_ln_are_accurate() {
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let x = -708.0 + i as f64 * (708.0 + 5.0) / 200_000.0;
            let (got, want) = (super::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-16, "exp: worst relative error {worst:e}");
        assert_eq!(super::exp(-709.0), 0.0);
        assert_eq!(super::exp(f64::NEG_INFINITY), 0.0);
        assert!(super::exp(f64::NAN).is_nan());
        assert_eq!(super::exp(0.0), 1.0);
        let mut worst: f64 = 0.0;
        for i in 1..200_000 {
            let x = i as f64 * 1e-4 + 1e-300 * (i % 7) as f64;
            let (got, want) = (super::ln(x), x.ln());
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        for &x in &[1e-300, 1e-20, 0.5, 1.0, 2.0, 1e10, 1e300] {
            let (got, want) = (super::ln(x), f64::ln(x));
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        assert!(worst < 4e-16, "ln: worst error {worst:e}");
        assert_eq!(super::ln(1.0), 0.0);
        assert_eq!(super::log_add_exp(0.5, f64::NEG_INFINITY), 0.5);
    }
}
