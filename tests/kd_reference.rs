//! Every divergence (and the CE) and its gradient against float64 PyTorch autograd references
//! (tools/make_kd_fixtures.py): vocab 50, 1000, 50257; T = 0.5, 1, 2, 10; masked rows, extreme
//! logits, teacher zeros from −∞ and −1e30 logits, student == teacher.

mod kd_common;
use candle_core::{Device, Tensor, Var};
use kd_common::*;
use pocl::kd::kernel::{loss_rows, LossSpec, RowLoss, Rows};
use pocl::kd::{self, Divergence};

const TOL: f64 = 1e-4;

fn divergences() -> Vec<(&'static str, Divergence)> {
    kd::DIVERGENCE_NAMES
        .iter()
        .map(|&n| (n, Divergence::parse(n, None, None).unwrap()))
        .collect()
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs() + 1e-9
}

#[test]
fn fused_divergences_and_gradients_match_float64_autograd() {
    let fx = Fixture::load();
    let cpu = Device::Cpu;
    let mask = Tensor::new(&MASK, &cpu).unwrap();
    for (v, temps) in cases() {
        let (t, s, _) = inputs(v);
        let teacher = Tensor::from_vec(t.clone(), (ROWS, v), &cpu).unwrap();
        for &temp in &temps {
            for (name, div) in divergences() {
                let key = format!("V{v}_T{}_{name}", tkey(temp));
                // Per-row values through the row-chunk API (all rows weighted 1).
                let spec = LossSpec {
                    divergence: Some(div),
                    inv_temperature: 1.0 / temp,
                    ce_coef: 0.0,
                    kd_coef: 1.0,
                };
                let mut out = vec![RowLoss::default(); ROWS];
                let ones = [1f32; ROWS];
                loss_rows(
                    &spec,
                    Some(Rows::contiguous(&t, v)),
                    Rows::contiguous(&s, v),
                    None,
                    &ones,
                    None,
                    &mut out,
                )
                .unwrap();
                let want_rows = fx.get(&format!("{key}_rows"));
                for r in 0..ROWS {
                    assert!(
                        close(out[r].kd, want_rows[r], TOL),
                        "{key} row {r}: {} vs {}",
                        out[r].kd,
                        want_rows[r]
                    );
                }
                // Loss and gradient through candle's autograd (the custom op's backward).
                let student = Var::from_vec(s.clone(), (ROWS, v), &cpu).unwrap();
                let loss =
                    kd::kd_loss_sum(&teacher, student.as_tensor(), &mask, div, temp, true).unwrap();
                let got = loss.to_scalar::<f32>().unwrap() as f64;
                let want = fx.get(&format!("{key}_loss"))[0];
                assert!(close(got, want, TOL), "{key}: loss {got} vs {want}");
                let grads = loss.backward().unwrap();
                let g: Vec<f32> = grads
                    .get(&student)
                    .expect("no gradient reached the student")
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let worst = check_grad(&fx, &key, v, &g, TOL);
                eprintln!("{key}: worst gradient error {worst:.1e} (relative to the row max)");
            }
        }
    }
}

#[test]
fn fused_cross_entropy_matches_float64_autograd() {
    let fx = Fixture::load();
    let cpu = Device::Cpu;
    let mask = Tensor::new(&MASK, &cpu).unwrap();
    for (v, _) in cases() {
        let (_, s, labels) = inputs(v);
        let key = format!("V{v}_ce");
        let want_labels: Vec<u32> = fx
            .get(&format!("{key}_labels"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(
            labels, want_labels,
            "the Rust and Python input generators disagree"
        );
        let student = Var::from_vec(s.clone(), (ROWS, v), &cpu).unwrap();
        let lab = Tensor::new(labels.as_slice(), &cpu).unwrap();
        let loss = kd::ce_loss_sum(student.as_tensor(), &lab, &mask).unwrap();
        let want_rows = fx.get(&format!("{key}_rows"));
        let want: f64 = want_rows.iter().zip(MASK).map(|(x, m)| x * m as f64).sum();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(close(got, want, TOL), "{key}: {got} vs {want}");
        let g: Vec<f32> = loss
            .backward()
            .unwrap()
            .get(&student)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        check_grad(&fx, &key, v, &g, TOL);
    }
}

/// The candle composition (the off-CPU fallback) agrees with the same references, in f32.
#[test]
fn naive_composition_matches_float64_autograd() {
    let fx = Fixture::load();
    let cpu = Device::Cpu;
    // Left out: row 5 (student == teacher, D = 0): in f32 the composition computes p and q by
    // different paths and tvd's |p − q| has a kink at 0, so its gradient there is sign noise; row 2
    // (saturated extreme logits): its tiny jsd gradients drown in the composition's f32 rounding.
    // Both rows are what the fused kernel does better; the ordinary and zero-probability rows stay.
    let mut m = MASK;
    m[2] = 0.0;
    m[5] = 0.0;
    let mask = Tensor::new(&m, &cpu).unwrap();
    for (v, temps) in cases().into_iter().filter(|(v, _)| *v <= 1000) {
        let (t, s, _) = inputs(v);
        let teacher = Tensor::from_vec(t.clone(), (ROWS, v), &cpu).unwrap();
        for &temp in &temps {
            for (name, div) in divergences() {
                let key = format!("V{v}_T{}_{name}", tkey(temp));
                let student = Var::from_vec(s.clone(), (ROWS, v), &cpu).unwrap();
                let rows =
                    kd::naive::divergence_rows(div, &teacher, student.as_tensor(), temp).unwrap();
                let loss = (rows.broadcast_mul(&mask).unwrap().sum_all().unwrap() * (temp * temp))
                    .unwrap();
                let got = loss.to_scalar::<f32>().unwrap() as f64;
                let want: f64 = fx
                    .get(&format!("{key}_rows"))
                    .iter()
                    .zip(m)
                    .map(|(d, w)| d * w as f64)
                    .sum::<f64>()
                    * temp
                    * temp;
                assert!(close(got, want, 1e-3), "naive {key}: loss {got} vs {want}");
                let g: Vec<f32> = loss
                    .backward()
                    .unwrap()
                    .get(&student)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let worst = check_grad_rows(&fx, &key, v, &g, 1e-3, &[2, 5]);
                eprintln!("naive {key}: worst gradient error {worst:.1e}");
            }
        }
    }
}
