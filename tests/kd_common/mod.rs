//! Shared by the kd integration tests: the deterministic inputs that tools/make_kd_fixtures.py
//! also generates (so the fixture stores only references), and the fixture loader.
#![allow(dead_code)]

use std::collections::HashMap;

pub const MASK: [f32; 6] = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0];
pub const ROWS: usize = 6;

/// 64-bit LCG (Knuth's MMIX constants); `next` returns the top 24 bits. Mirrors the Python one.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 40
    }
    /// k/64 − 8 with k in [0, 1024): exact in f32.
    pub fn logit(&mut self) -> f32 {
        (self.next() % 1024) as f32 / 64.0 - 8.0
    }
}

/// An f32 CPU tensor of `shape` filled with LCG logits times `scale`.
pub fn logits_tensor(seed: u64, shape: &[usize], scale: f32) -> candle_core::Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = lcg_logits(seed, n).iter().map(|x| x * scale).collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

pub fn lcg_logits(seed: u64, n: usize) -> Vec<f32> {
    let mut g = Lcg(seed);
    (0..n).map(|_| g.logit()).collect()
}

/// Teacher, student [ROWS × v] (row-major) and labels, exactly as the Python script builds them.
pub fn inputs(v: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let mut t = lcg_logits(2 * v as u64 + 1, ROWS * v);
    let mut s = lcg_logits(2 * v as u64 + 2, ROWS * v);
    let mut g = Lcg(2 * v as u64 + 3);
    let labels = (0..ROWS).map(|_| (g.next() % v as u64) as u32).collect();
    for j in 0..v {
        t[2 * v + j] = t[2 * v + j] * 256.0 + 20000.0;
        s[2 * v + j] = s[2 * v + j] * 256.0 - 20000.0;
        if j % 5 == 0 {
            t[3 * v + j] = f32::NEG_INFINITY;
        }
        if j % 3 == 1 {
            t[4 * v + j] = -1e30;
        }
        s[5 * v + j] = t[5 * v + j];
    }
    (t, s, labels)
}

pub struct Fixture(pub HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Fixture {
    pub fn load() -> Fixture {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kd/reference.safetensors"
        );
        let bytes = std::fs::read(path).expect("fixture missing: run tools/make_kd_fixtures.py");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut m = HashMap::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let vals: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                dt => panic!("unexpected dtype {dt:?} for {name}"),
            };
            m.insert(name.to_string(), (view.shape().to_vec(), vals));
        }
        Fixture(m)
    }
    pub fn get(&self, key: &str) -> &[f64] {
        &self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no {key}"))
            .1
    }
    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

/// The (vocab, temperatures) cases of the fixture.
pub fn cases() -> Vec<(usize, Vec<f64>)> {
    vec![
        (50, vec![0.5, 1.0, 2.0, 10.0]),
        (1000, vec![0.5, 1.0, 2.0, 10.0]),
        (50257, vec![1.0, 2.0]),
    ]
}

/// Python's f"{T:g}" for the temperatures used.
pub fn tkey(t: f64) -> String {
    if t.fract() == 0.0 {
        format!("{}", t as i64)
    } else {
        format!("{t}")
    }
}

/// Checks a gradient [ROWS × v] against the fixture entry `key` (full, or sampled + row norms),
/// row by row relative to the row's largest reference entry. Returns the worst relative error.
pub fn check_grad(fx: &Fixture, key: &str, v: usize, got: &[f32], tol: f64) -> f64 {
    check_grad_rows(fx, key, v, got, tol, &[])
}

/// [`check_grad`] without the rows in `skip` (left out by the caller's mask).
pub fn check_grad_rows(
    fx: &Fixture,
    key: &str,
    v: usize,
    got: &[f32],
    tol: f64,
    skip: &[usize],
) -> f64 {
    let mut worst = 0.0f64;
    // Rows whose reference gradient is ~0 (student == teacher) are judged on the scale of row 0,
    // an ordinary row: f32 noise there must be small compared to a real gradient.
    let row0 = if fx.has(&format!("{key}_grad")) {
        fx.get(&format!("{key}_grad"))[..v]
            .iter()
            .fold(0.0f64, |a, x| a.max(x.abs()))
    } else {
        fx.get(&format!("{key}_grad_rowmaxabs"))[0]
    };
    let row_scale = |_r: usize, rowmax: f64| rowmax.max(1e-3 * row0).max(1e-9);
    if fx.has(&format!("{key}_grad")) {
        let want = fx.get(&format!("{key}_grad"));
        for r in (0..ROWS).filter(|r| !skip.contains(r)) {
            let rowmax = want[r * v..(r + 1) * v]
                .iter()
                .fold(0.0f64, |a, x| a.max(x.abs()));
            for j in 0..v {
                let e = (got[r * v + j] as f64 - want[r * v + j]).abs() / row_scale(r, rowmax);
                assert!(
                    e <= tol,
                    "{key}: grad[{r},{j}] = {} vs {} (rel {e:.2e})",
                    got[r * v + j],
                    want[r * v + j]
                );
                worst = worst.max(e);
            }
        }
    } else {
        let idx = fx.get(&format!("{key}_grad_idx"));
        let val = fx.get(&format!("{key}_grad_val"));
        let sumsq = fx.get(&format!("{key}_grad_rowsumsq"));
        let maxabs = fx.get(&format!("{key}_grad_rowmaxabs"));
        for (&i, &want) in idx.iter().zip(val) {
            let i = i as usize;
            let r = i / v;
            if skip.contains(&r) {
                continue;
            }
            let e = (got[i] as f64 - want).abs() / row_scale(r, maxabs[r]);
            assert!(
                e <= tol,
                "{key}: grad[{r},{}] = {} vs {want} (rel {e:.2e})",
                i % v,
                got[i]
            );
            worst = worst.max(e);
        }
        for r in (0..ROWS).filter(|r| !skip.contains(r)) {
            let row = &got[r * v..(r + 1) * v];
            let ss: f64 = row.iter().map(|&x| x as f64 * x as f64).sum();
            let ma = row.iter().fold(0.0f64, |a, &x| a.max((x as f64).abs()));
            let floor = (1e-6 * tol).powi(2) * v as f64;
            assert!(
                (ss - sumsq[r]).abs() <= 2.0 * tol * sumsq[r] + floor,
                "{key}: row {r} sum of squares {ss} vs {}",
                sumsq[r]
            );
            assert!(
                (ma - maxabs[r]).abs() <= tol * row_scale(r, maxabs[r]),
                "{key}: row {r} max |g| {ma} vs {}",
                maxabs[r]
            );
        }
    }
    worst
}
