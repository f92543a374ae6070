//! The objective (CE mix, T² rule, denominator), gradient accumulation, masks, the public API's
//! errors, divergence parsing and the common-vocabulary rule.

mod kd_common;
use candle_core::{Device, Tensor, Var};
use kd_common::Lcg;
use pocl::kd::{self, Divergence, Mix, Objective, Targets};

use kd_common::logits_tensor as logits;

fn grad_of(loss: &Tensor, var: &Var) -> Vec<f32> {
    loss.backward()
        .unwrap()
        .get(var)
        .expect("no gradient reached the student")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn labels(seed: u64, n: usize, v: usize) -> Tensor {
    let mut g = Lcg(seed);
    Tensor::from_vec(
        (0..n)
            .map(|_| (g.next() % v as u64) as u32)
            .collect::<Vec<u32>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn objective_is_the_weighted_mix_of_ce_and_t2_scaled_kd() {
    let (n, v) = (12, 64);
    let cpu = Device::Cpu;
    let teacher = logits(1, &[n, v], 1.0);
    let lab = labels(3, n, v);
    let mask = Tensor::new(&[1f32, 1., 0., 1., 1., 1., 0., 0., 1., 1., 1., 1.], &cpu).unwrap();
    let den = 20.0; // e.g. response tokens of a larger optimizer step
    for div in [
        Divergence::Fkl,
        Divergence::Jsd { beta: 0.1 },
        Divergence::Srkl { alpha: 0.1 },
    ] {
        for (a, temp, t2) in [
            (0.3, 2.0, true),
            (0.7, 1.5, false),
            (1.0, 1.0, true),
            (0.0, 2.0, true),
        ] {
            let student = Var::from_tensor(&logits(2, &[n, v], 1.0)).unwrap();
            let obj = Objective {
                divergence: div,
                t2,
                ..Objective::new(div)
            };
            let out = obj
                .loss(
                    Some(&teacher),
                    student.as_tensor(),
                    Targets {
                        labels: &lab,
                        mask: &mask,
                        denominator: den,
                    },
                    Mix {
                        temperature: temp,
                        kd_weight: a,
                    },
                )
                .unwrap();
            let g = grad_of(&out.loss, &student);
            // The same from the two separate sums.
            let s2 = Var::from_tensor(&logits(2, &[n, v], 1.0)).unwrap();
            let ce = kd::ce_loss_sum(s2.as_tensor(), &lab, &mask).unwrap();
            let kdl = kd::kd_loss_sum(&teacher, s2.as_tensor(), &mask, div, temp, t2).unwrap();
            let want = ((ce.clone() * ((1.0 - a) / den)).unwrap()
                + (kdl.clone() * (a / den)).unwrap())
            .unwrap();
            let (got_v, want_v) = (
                out.loss.to_scalar::<f32>().unwrap(),
                want.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (got_v - want_v).abs() <= 1e-5 * want_v.abs(),
                "{div} a={a}: {got_v} vs {want_v}"
            );
            let gw = grad_of(&want, &s2);
            assert!(
                max_abs_diff(&g, &gw) <= 1e-6,
                "{div} a={a}: gradients differ"
            );
            // Logged parts: mean CE (always) and mean scale·D (0 when a = 0).
            let ce_mean = ce.to_scalar::<f32>().unwrap() as f64 / den;
            assert!(
                (out.ce - ce_mean).abs() <= 1e-5 * ce_mean,
                "ce part {} vs {ce_mean}",
                out.ce
            );
            let kd_mean = if a > 0.0 {
                kdl.to_scalar::<f32>().unwrap() as f64 / den
            } else {
                0.0
            };
            assert!(
                (out.kd - kd_mean).abs() <= 1e-5 * kd_mean.abs() + 1e-12,
                "kd part {} vs {kd_mean}",
                out.kd
            );
            // T² rule: kd_loss_sum with t2 is T² times the one without.
            if t2 {
                let plain = kd::kd_loss_sum(&teacher, s2.as_tensor(), &mask, div, temp, false)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scaled = kdl.to_scalar::<f32>().unwrap();
                assert!((scaled - (temp * temp) as f32 * plain).abs() <= 1e-5 * scaled.abs());
            }
        }
    }
}

#[test]
fn pure_sft_needs_no_teacher_and_kd_does() {
    let (n, v) = (5, 40);
    let cpu = Device::Cpu;
    let s = Var::from_tensor(&logits(4, &[n, v], 1.0)).unwrap();
    let lab = labels(5, n, v);
    let mask = Tensor::ones(n, candle_core::DType::F32, &cpu).unwrap();
    let obj = Objective::new(Divergence::Fkl);
    let targets = Targets {
        labels: &lab,
        mask: &mask,
        denominator: n as f64,
    };
    let out = obj
        .loss(None, s.as_tensor(), targets, Mix::CE_ONLY)
        .unwrap();
    let ce = kd::ce_loss_sum(s.as_tensor(), &lab, &mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / n as f32;
    assert!((out.loss.to_scalar::<f32>().unwrap() - ce).abs() <= 1e-6);
    assert_eq!(out.kd, 0.0);
    let err = obj
        .loss(
            None,
            s.as_tensor(),
            targets,
            Mix {
                temperature: 1.0,
                kd_weight: 0.5,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("teacher"), "{err}");
}

/// 1 micro-batch of 8 sequences and 4 micro-batches of 2 give the same accumulated gradient when
/// the denominator is the response-token count of the whole optimizer step.
#[test]
fn gradient_accumulation_matches_the_full_batch() {
    let (b, t, v) = (8, 6, 50);
    let cpu = Device::Cpu;
    let teacher = logits(10, &[b, t, v], 1.5);
    let student0 = logits(11, &[b, t, v], 1.5);
    let lab = labels(12, b * t, v).reshape((b, t)).unwrap();
    // Prompts of 1–3 tokens and padding after responses of different lengths.
    let mut m = vec![0f32; b * t];
    for i in 0..b {
        let (start, end) = (1 + i % 3, t - (i % 2));
        for j in start..end {
            m[i * t + j] = 1.0;
        }
    }
    let mask = Tensor::from_vec(m.clone(), (b, t), &cpu).unwrap();
    let micro_masks: Vec<Tensor> = (0..4).map(|k| mask.narrow(0, 2 * k, 2).unwrap()).collect();
    let den = kd::step_denominator(&micro_masks).unwrap();
    assert_eq!(den, m.iter().map(|&x| x as f64).sum::<f64>());
    let obj = Objective::new(Divergence::Jsd { beta: 0.1 });
    let mix = Mix {
        temperature: 1.67,
        kd_weight: 0.8,
    };

    let full = Var::from_tensor(&student0).unwrap();
    let out = obj
        .loss(
            Some(&teacher),
            full.as_tensor(),
            Targets {
                labels: &lab,
                mask: &mask,
                denominator: den,
            },
            mix,
        )
        .unwrap();
    let g_full = grad_of(&out.loss, &full);
    let loss_full = out.loss.to_scalar::<f32>().unwrap();

    let mut g_acc = vec![0f32; b * t * v];
    let mut loss_acc = 0f32;
    let mut g_per_micro_mean = vec![0f32; b * t * v];
    for k in 0..4 {
        let sl = |x: &Tensor| x.narrow(0, 2 * k, 2).unwrap();
        let part = Var::from_tensor(&sl(&student0)).unwrap();
        let o = obj
            .loss(
                Some(&sl(&teacher)),
                part.as_tensor(),
                Targets {
                    labels: &sl(&lab),
                    mask: &sl(&mask),
                    denominator: den,
                },
                mix,
            )
            .unwrap();
        loss_acc += o.loss.to_scalar::<f32>().unwrap();
        let g = grad_of(&o.loss, &part);
        let off = 2 * k * t * v;
        for (i, x) in g.iter().enumerate() {
            g_acc[off + i] += x;
        }
        // The common mistake: each micro-batch divided by its own token count, then averaged.
        let own: f64 = m[2 * k * t..2 * (k + 1) * t]
            .iter()
            .map(|&x| x as f64)
            .sum();
        let part2 = Var::from_tensor(&sl(&student0)).unwrap();
        let o2 = obj
            .loss(
                Some(&sl(&teacher)),
                part2.as_tensor(),
                Targets {
                    labels: &sl(&lab),
                    mask: &sl(&mask),
                    denominator: own,
                },
                mix,
            )
            .unwrap();
        for (i, x) in grad_of(&o2.loss, &part2).iter().enumerate() {
            g_per_micro_mean[off + i] += x / 4.0;
        }
    }
    let scale = g_full.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        max_abs_diff(&g_full, &g_acc) <= 1e-6 * scale.max(1.0),
        "accumulated gradient differs from the full batch"
    );
    assert!((loss_full - loss_acc).abs() <= 1e-5 * loss_full.abs());
    assert!(
        max_abs_diff(&g_full, &g_per_micro_mean) > 1e-3 * scale,
        "the per-micro-batch mean should differ here"
    );
}

#[test]
fn masked_rows_are_excluded_even_when_they_hold_garbage() {
    let (n, v) = (4, 30);
    let cpu = Device::Cpu;
    let mut t: Vec<f32> = logits(20, &[n, v], 1.0)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut s: Vec<f32> = logits(21, &[n, v], 1.0)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for j in 0..v {
        t[v + j] = f32::NAN;
        s[3 * v + j] = f32::INFINITY;
    }
    let teacher = Tensor::from_vec(t, (n, v), &cpu).unwrap();
    let student = Var::from_vec(s, (n, v), &cpu).unwrap();
    let mask = Tensor::new(&[1f32, 0., 1., 0.], &cpu).unwrap();
    let lab = Tensor::new(&[1i64, -100, 2, -100], &cpu).unwrap(); // ignore-index on masked rows is fine
    for div in [Divergence::Fkl, Divergence::Rkl, Divergence::Tvd] {
        let out = Objective::new(div)
            .loss(
                Some(&teacher),
                student.as_tensor(),
                Targets {
                    labels: &lab,
                    mask: &mask,
                    denominator: 2.0,
                },
                Mix {
                    temperature: 2.0,
                    kd_weight: 0.5,
                },
            )
            .unwrap();
        assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
        let g = grad_of(&out.loss, &student);
        assert!(g.iter().all(|x| x.is_finite()));
        assert!(
            g[v..2 * v].iter().chain(&g[3 * v..]).all(|&x| x == 0.0),
            "masked rows got a gradient"
        );
        assert!(g[..v].iter().any(|&x| x != 0.0));
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cpu = Device::Cpu;
    let t = logits(30, &[3, 10], 1.0);
    let s = logits(31, &[3, 10], 1.0);
    let mask = Tensor::ones(3, candle_core::DType::F32, &cpu).unwrap();
    let lab = Tensor::new(&[1u32, 2, 10], &cpu).unwrap();
    let obj = Objective::new(Divergence::Fkl);
    // The error of one call: teacher logits, labels, KD weight a, temperature T, denominator.
    let e = |t: &Tensor, lab: &Tensor, kd_weight: f64, temperature: f64, denominator: f64| {
        let targets = Targets {
            labels: lab,
            mask: &mask,
            denominator,
        };
        let mix = Mix {
            temperature,
            kd_weight,
        };
        obj.loss(Some(t), &s, targets, mix).unwrap_err().to_string()
    };
    assert!(e(&t, &lab, 0.5, 1.0, 3.0).contains("outside the vocabulary"));
    let lab = Tensor::new(&[1u32, 2, 3], &cpu).unwrap();
    assert!(e(&t, &lab, 1.5, 1.0, 3.0).contains("KD weight"));
    assert!(e(&t, &lab, 0.5, 1.0, 0.0).contains("denominator"));
    assert!(e(&t, &lab, 0.5, 0.0, 3.0).contains("temperature"));
    let wide = logits(32, &[3, 12], 1.0);
    let err = e(&wide, &lab, 0.5, 1.0, 3.0);
    assert!(err.contains("common_vocab"), "{err}");
    let short_mask = Tensor::ones(2, candle_core::DType::F32, &cpu).unwrap();
    assert!(
        kd::kd_loss_sum(&t, &s, &short_mask, Divergence::Fkl, 1.0, true)
            .unwrap_err()
            .to_string()
            .contains("mask")
    );
    let inf_row = Tensor::from_vec(vec![f32::NEG_INFINITY; 30], (3, 10), &cpu).unwrap();
    let err = kd::kd_loss_sum(&inf_row, &s, &mask, Divergence::Fkl, 1.0, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no finite maximum"), "{err}");
}

#[test]
fn divergence_names_parse_with_defaults_and_clear_errors() {
    assert_eq!(
        Divergence::parse("fkl", None, None).unwrap(),
        Divergence::Fkl
    );
    assert_eq!(
        Divergence::parse("RKL", None, None).unwrap(),
        Divergence::Rkl
    );
    assert_eq!(
        Divergence::parse("jsd", None, None).unwrap(),
        Divergence::Jsd { beta: 0.1 }
    );
    assert_eq!(
        Divergence::parse("jsd", None, Some(0.5)).unwrap(),
        Divergence::Jsd { beta: 0.5 }
    );
    assert_eq!(
        Divergence::parse("skl", Some(0.2), None).unwrap(),
        Divergence::Skl { alpha: 0.2 }
    );
    assert_eq!(
        Divergence::parse("srkl", None, None).unwrap(),
        Divergence::Srkl { alpha: 0.1 }
    );
    assert_eq!(
        Divergence::parse("tvd", None, None).unwrap(),
        Divergence::Tvd
    );
    let err = Divergence::parse("kl", None, None).unwrap_err().to_string();
    for name in kd::DIVERGENCE_NAMES {
        assert!(err.contains(name), "{err}");
    }
    assert!(Divergence::parse("skl", Some(1.0), None).is_err());
    assert!(Divergence::parse("jsd", None, Some(0.0)).is_err());
    assert!(Divergence::parse("fkl", Some(0.1), None)
        .unwrap_err()
        .to_string()
        .contains("alpha"));
}

fn word_level(words: &[&str]) -> pocl::tokenizer::Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": words[0]}
    });
    let inner: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    pocl::tokenizer::Tokenizer::from_inner(inner, None)
}

#[test]
fn common_vocab_prefix_is_used_when_tokenizers_agree_and_refused_otherwise() {
    let words: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    let w: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    let (tok_a, tok_b) = (word_level(&w), word_level(&w));
    assert_eq!(kd::vocab::common_vocab(&tok_a, &tok_b, 60, 64).unwrap(), 60);
    let mut other = w.clone();
    other.swap(3, 4);
    let err = kd::vocab::common_vocab(&tok_a, &word_level(&other), 60, 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("differ at id 3"), "{err}");
    let err = kd::vocab::common_vocab(&tok_a, &tok_b, 40, 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("common vocabulary prefix"), "{err}");

    // Teacher [2, 3, 60], student [2, 3, 64] (padding columns): narrowed views, no copies; the
    // loss equals the one on explicit prefix copies and the padding columns get no gradient.
    let cpu = Device::Cpu;
    let teacher = logits(40, &[2, 3, 60], 1.0);
    let student = Var::from_tensor(&logits(41, &[2, 3, 64], 1.0)).unwrap();
    let mask = Tensor::ones((2, 3), candle_core::DType::F32, &cpu).unwrap();
    let (t, s) = (
        kd::vocab::narrow_to_prefix(&teacher, 60).unwrap(),
        kd::vocab::narrow_to_prefix(student.as_tensor(), 60).unwrap(),
    );
    let loss = kd::kd_loss_sum(&t, &s, &mask, Divergence::Rkl, 2.0, true).unwrap();
    let s_copy = Var::from_tensor(
        &student
            .as_tensor()
            .narrow(2, 0, 60)
            .unwrap()
            .contiguous()
            .unwrap(),
    )
    .unwrap();
    let want = kd::kd_loss_sum(
        &teacher,
        s_copy.as_tensor(),
        &mask,
        Divergence::Rkl,
        2.0,
        true,
    )
    .unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - want.to_scalar::<f32>().unwrap()).abs() <= 1e-6);
    let g = grad_of(&loss, &student);
    let gw = grad_of(&want, &s_copy);
    for r in 0..6 {
        assert!(g[r * 64 + 60..(r + 1) * 64].iter().all(|&x| x == 0.0));
        assert!(max_abs_diff(&g[r * 64..r * 64 + 60], &gw[r * 60..(r + 1) * 60]) <= 1e-7);
    }
}
