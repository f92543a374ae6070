//! The bf16 teacher (`model::load_frozen_bf16`, recipe key model.teacher_dtype = "bf16") against
//! the f32 teacher: the effect on the logits and on the KD loss and its gradient is bounded.
//! bf16 keeps 8 significant bits (relative rounding ≤ 2^-9 ≈ 0.2% per weight); the bounds below
//! are a few times what is measured on the fixture models, so a broken kernel or layout (which
//! gives O(1) errors) fails while honest rounding passes.

use candle_core::{Device, Tensor};
use pocl::kd::{Divergence, Head, Mix, Objective, Targets};
use pocl::model::{self, CausalLm, Input};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn input(vocab: usize) -> (Tensor, Tensor, Tensor) {
    let (b, t) = (2, 16);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let dev = &Device::Cpu;
    (
        Tensor::from_vec(ids, (b, t), dev).unwrap(),
        Tensor::from_vec(pos, (b, t), dev).unwrap(),
        Tensor::ones((b, t), candle_core::DType::U32, dev).unwrap(),
    )
}

fn logits(m: &dyn CausalLm, ids: &Tensor, pos: &Tensor, mask: &Tensor) -> Vec<f32> {
    let input = Input {
        ids,
        positions: pos,
        key_mask: mask,
    };
    m.logits(&input, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bf16_logits_stay_close_to_f32_in_every_family() {
    for name in [
        "gpt2", "opt", "opt-350m", "llama", "qwen2", "qwen3", "mistral",
    ] {
        let dir = fixture(name);
        let f32m = model::load_frozen(&dir, &pocl::backend::Backend::cpu()).unwrap();
        let bf16m = model::load_frozen_bf16(&dir, &pocl::backend::Backend::cpu()).unwrap();
        let v = f32m.config().vocab_size;
        let (ids, pos, mask) = input(v);
        let (a, b) = (
            logits(f32m.as_ref(), &ids, &pos, &mask),
            logits(bf16m.as_ref(), &ids, &pos, &mask),
        );
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // Mean KL(p_f32 ‖ p_bf16) per token, in nats: what a KD loss against this teacher sees.
        let kl: f64 = a
            .chunks(v)
            .zip(b.chunks(v))
            .map(|(p, q)| {
                let lse = |r: &[f32]| {
                    let m = r.iter().fold(f32::MIN, |m, x| m.max(*x)) as f64;
                    m + r.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln()
                };
                let (lp, lq) = (lse(p), lse(q));
                p.iter()
                    .zip(q)
                    .map(|(x, y)| {
                        let lpx = *x as f64 - lp;
                        lpx.exp() * (lpx - (*y as f64 - lq))
                    })
                    .sum::<f64>()
            })
            .sum::<f64>()
            / (a.len() / v) as f64;
        eprintln!(
            "{name}: max |logit| {scale:.3e}, max |bf16 − f32| {err:.3e}, mean KL {kl:.3e} nats"
        );
        // Random fixture weights make dot products cancel heavily, which magnifies the relative
        // rounding of bf16 (2^-9 per operand) by ~√d: a few % of the logit scale is honest.
        assert!(
            err <= 0.06 * scale,
            "{name}: bf16 logits off by {err} (scale {scale})"
        );
        assert!(kl < 2e-3, "{name}: KL(f32 ‖ bf16) = {kl} nats per token");
        // The kernels that round x to bf16 must change something; f32-widen keeps x in f32, so
        // on a fixture whose weights are already bf16 values (llama) it is exact.
        let widen = pocl::ops::bf16::selected_kernel() == Ok(pocl::ops::bf16::Kernel::F32Widen);
        assert!(
            err > 0.0 || widen,
            "{name}: bf16 must actually round something"
        );
    }
}

/// The KD loss with a bf16 teacher, and the student's gradient, against the f32 teacher.
#[test]
fn bf16_teacher_changes_the_kd_loss_and_gradient_only_slightly() {
    let dir = fixture("gpt2");
    let student = model::load(&dir, &pocl::backend::Backend::cpu()).unwrap();
    let v = student.config().vocab_size;
    let (ids, pos, mask) = input(v);
    let input = Input {
        ids: &ids,
        positions: &pos,
        key_mask: &mask,
    };
    let n = ids.elem_count();
    let labels = Tensor::from_vec(
        (0..n)
            .map(|i| ((i * 31 + 5) % v) as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let loss_mask = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let obj = Objective::new(Divergence::Fkl);
    let mut results = vec![];
    for bf16 in [false, true] {
        let teacher = if bf16 {
            model::load_frozen_bf16(&fixture("llama"), &pocl::backend::Backend::cpu()).unwrap()
        } else {
            model::load_frozen(&fixture("llama"), &pocl::backend::Backend::cpu()).unwrap()
        };
        // A Llama teacher of vocab 800 for a GPT-2 student of 601: compared over the common
        // prefix, as for teachers with padded vocabularies.
        assert!(teacher.config().vocab_size >= v);
        // Each run is its own step: the student's in-place gradient buffers start empty.
        student.params().zero_grad();
        let th = teacher.hidden(&input, None).unwrap();
        let sh = student.hidden(&input, None).unwrap();
        let out = obj
            .loss_from_heads(
                Some(Head {
                    hidden: &th,
                    weight: teacher.lm_head(),
                }),
                Head {
                    hidden: &sh,
                    weight: student.lm_head(),
                },
                v,
                Targets {
                    labels: &labels,
                    mask: &loss_mask,
                    denominator: n as f64,
                },
                Mix {
                    temperature: 2.0,
                    kd_weight: 0.7,
                },
            )
            .unwrap();
        let g = student
            .params()
            .grads(&out.loss.backward().unwrap())
            .unwrap();
        let grad: Vec<f32> = g
            .iter()
            .flat_map(|t| {
                t.as_ref()
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .unwrap_or_default()
            })
            .collect();
        results.push((out.kd, grad));
    }
    let ((kd32, g32), (kd16, g16)) = (&results[0], &results[1]);
    let dot: f64 = g32
        .iter()
        .zip(g16)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let n32: f64 = g32.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let n16: f64 = g16.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let cosine = dot / (n32 * n16);
    let rel = (kd16 - kd32).abs() / kd32.abs();
    eprintln!(
        "kd f32 {kd32:.6e} bf16 {kd16:.6e} (relative {rel:.2e}); gradient cosine {cosine:.8}"
    );
    assert!(*kd32 > 0.0);
    assert!(rel < 1e-3, "KD loss moved by {rel} relative");
    assert!(
        cosine > 0.9999,
        "gradient direction changed: cosine {cosine}"
    );
}
