//! The lm head fused with the loss (`Objective::loss_from_heads`) against the unfused path:
//! logits by candle's matmul, the loss kernel (itself checked against float64 torch in
//! kd_reference.rs) and candle's autograd through the matmul. Loss, logged parts and the
//! gradients w.r.t. the student's hidden states and head must agree, across several row chunks,
//! masked rows, a narrowed common vocabulary and every kind of objective.

mod kd_common;
use candle_core::{Device, Tensor, Var};
use kd_common::Lcg;
use pocl::kd::{Divergence, Head, Mix, Objective, Targets};
use pocl::ops::{Kernels, Weight};

use kd_common::logits_tensor as randn;

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()))
        / scale
}

struct Case {
    rows: usize,
    ds: usize,
    dt: usize,
    /// Head widths of student and teacher; the loss compares the first `vocab` logits.
    vs: usize,
    vt: usize,
    vocab: usize,
    kd_weight: f64,
    temperature: f64,
    div: Divergence,
}

fn check(c: &Case) {
    let dev = &Device::Cpu;
    let hs = Var::from_tensor(&randn(1, &[c.rows, c.ds], 1.0)).unwrap();
    let ws = Var::from_tensor(&randn(2, &[c.vs, c.ds], 0.5)).unwrap();
    let ht = randn(3, &[c.rows, c.dt], 1.0);
    let wt = randn(4, &[c.vt, c.dt], 0.5);
    let mut g = Lcg(5);
    // A third of the rows masked out (prompt / padding), some weights fractional.
    let mask: Vec<f32> = (0..c.rows)
        .map(|i| match i % 3 {
            0 => 0.0,
            1 => 1.0,
            _ => 0.5,
        })
        .collect();
    let mask = Tensor::from_vec(mask, c.rows, dev).unwrap();
    let labels: Vec<u32> = (0..c.rows)
        .map(|_| (g.next() % c.vocab as u64) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, c.rows, dev).unwrap();
    let obj = Objective::new(c.div);
    let targets = Targets {
        labels: &labels,
        mask: &mask,
        denominator: 37.0,
    };
    let mix = Mix {
        temperature: c.temperature,
        kd_weight: c.kd_weight,
    };

    let (wt_head, ws_head) = (
        Weight::out_in(wt.clone()),
        Weight::out_in(ws.as_tensor().clone()),
    );
    let fused = obj
        .loss_from_heads(
            Some(Head {
                hidden: &ht,
                weight: &wt_head,
            }),
            Head {
                hidden: hs.as_tensor(),
                weight: &ws_head,
            },
            c.vocab,
            targets,
            mix,
        )
        .unwrap();
    let fg = fused.loss.backward().unwrap();

    let s_logits = hs
        .as_tensor()
        .matmul(&ws.as_tensor().narrow(0, 0, c.vocab).unwrap().t().unwrap())
        .unwrap();
    let t_logits = ht
        .matmul(&wt.narrow(0, 0, c.vocab).unwrap().t().unwrap())
        .unwrap();
    let plain = obj.loss(Some(&t_logits), &s_logits, targets, mix).unwrap();
    let pg = plain.loss.backward().unwrap();

    let (lf, lp) = (
        fused.loss.to_scalar::<f32>().unwrap(),
        plain.loss.to_scalar::<f32>().unwrap(),
    );
    assert!(
        ((lf - lp) / lp).abs() < 2e-6,
        "{:?}: loss {lf} vs {lp}",
        c.div
    );
    assert!((fused.ce - plain.ce).abs() <= 2e-6 * plain.ce.abs());
    assert!((fused.kd - plain.kd).abs() <= 2e-6 * plain.kd.abs().max(1e-9));
    for (name, var) in [("hidden", &hs), ("head", &ws)] {
        let a = flat(fg.get(var).expect("fused gradient"));
        let b = flat(pg.get(var).expect("plain gradient"));
        assert_eq!(a.len(), b.len());
        let e = rel_err(&a, &b);
        assert!(e < 1e-5, "{:?}: d/d{name} relative error {e}", c.div);
    }
    // Masked rows get exactly zero gradient, and so do head rows beyond the common vocabulary.
    let gh = flat(fg.get(&hs).unwrap());
    assert!(gh[..c.ds].iter().all(|&x| x == 0.0));
    let gw = flat(fg.get(&ws).unwrap());
    assert!(gw[c.vocab * c.ds..].iter().all(|&x| x == 0.0));
}

#[test]
fn fused_head_matches_unfused_over_several_chunks() {
    // Vocab 50257: a chunk holds ~125 rows, so 300 rows (200 counted) take two chunks.
    for div in [
        Divergence::Fkl,
        Divergence::Rkl,
        Divergence::parse("jsd", None, Some(0.3)).unwrap(),
        Divergence::Tvd,
        Divergence::parse("skl", Some(0.1), None).unwrap(),
        Divergence::parse("srkl", Some(0.1), None).unwrap(),
    ] {
        check(&Case {
            rows: 300,
            ds: 8,
            dt: 12,
            vs: 50257,
            vt: 50257,
            vocab: 50257,
            kd_weight: 0.7,
            temperature: 2.0,
            div,
        });
    }
}

#[test]
fn fused_head_narrowed_vocab_pure_kd_and_pure_ce() {
    for (kd_weight, temperature) in [(1.0, 1.0), (0.0, 1.0), (0.5, 0.7)] {
        check(&Case {
            rows: 40,
            ds: 16,
            dt: 6,
            vs: 130,
            vt: 128,
            vocab: 120,
            kd_weight,
            temperature,
            div: Divergence::Fkl,
        });
    }
}

#[test]
fn fused_head_errors_name_the_problem() {
    let dev = &Device::Cpu;
    let h = Tensor::zeros((4, 8), candle_core::DType::F32, dev).unwrap();
    let w = Tensor::zeros((10, 8), candle_core::DType::F32, dev).unwrap();
    let labels = Tensor::zeros(4, candle_core::DType::U32, dev).unwrap();
    let mask = Tensor::ones(4, candle_core::DType::F32, dev).unwrap();
    let w = Weight::out_in(w);
    let head = Head {
        hidden: &h,
        weight: &w,
    };
    let obj = Objective::new(Divergence::Fkl);
    let targets = Targets {
        labels: &labels,
        mask: &mask,
        denominator: 4.0,
    };
    let e = obj
        .loss_from_heads(
            None,
            head,
            10,
            targets,
            Mix {
                temperature: 1.0,
                kd_weight: 0.5,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("needs teacher"), "{e}");
    let e = obj
        .loss_from_heads(None, head, 11, targets, Mix::CE_ONLY)
        .unwrap_err();
    assert!(format!("{e:#}").contains("vocab 11"), "{e:#}");
    let short = Tensor::ones(3, candle_core::DType::F32, dev).unwrap();
    let e = obj
        .loss_from_heads(
            None,
            head,
            10,
            Targets {
                mask: &short,
                ..targets
            },
            Mix::CE_ONLY,
        )
        .unwrap_err();
    assert!(e.to_string().contains("mask has 3"), "{e}");
}

/// A tied embedding + head whose gradient is written in place (`ops::grad`): the embedding's
/// rows and the head's dL/dW land in one buffer, and must equal what candle's autograd builds
/// for the same graph with a plain weight — to the bit for one backward pass (same order of
/// additions). Also: micro-batches add up, the next step overwrites (rows beyond the compared
/// vocabulary and a step with no counted row leave no stale values), and a forward pass whose
/// backward never runs is caught instead of leaking into the gradient.
#[test]
fn tied_gradient_buffer_equals_candles_accumulation() {
    use pocl::ops::grad::GradBuffer;
    use std::sync::Arc;
    let dev = &Device::Cpu;
    let (rows, d, vs, vocab) = (40, 24, 150, 131);
    let w = Var::from_tensor(&randn(11, &[vs, d], 0.5)).unwrap();
    let x = randn(12, &[rows, d], 1.0);
    let mut g = Lcg(13);
    let ids: Vec<u32> = (0..rows).map(|_| (g.next() % vs as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, rows, dev).unwrap();
    let labels: Vec<u32> = (0..rows)
        .map(|_| (g.next() % vocab as u64) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, rows, dev).unwrap();
    let some = Tensor::from_vec(
        (0..rows)
            .map(|i| (i % 3) as f32 * 0.5)
            .collect::<Vec<f32>>(),
        rows,
        dev,
    )
    .unwrap();
    let none = Tensor::zeros(rows, candle_core::DType::F32, dev).unwrap();
    let obj = Objective::new(Divergence::Fkl);
    // hidden = tanh(embedding rows + x): the embedding's gradient is dense in its rows.
    let loss = |weight: &Weight, mask: &Tensor| {
        let h = (Kernels::Fused.embed(weight, &ids).unwrap() + &x)
            .unwrap()
            .tanh()
            .unwrap();
        obj.loss_from_heads(
            None,
            Head { hidden: &h, weight },
            vocab,
            Targets {
                labels: &labels,
                mask,
                denominator: 17.0,
            },
            Mix::CE_ONLY,
        )
        .unwrap()
        .loss
    };
    let plain = Weight::out_in(w.as_tensor().clone());
    let reference = |mask: &Tensor| {
        flat(
            loss(&plain, mask)
                .backward()
                .unwrap()
                .get(w.as_tensor())
                .unwrap(),
        )
    };
    let buffer = Arc::new(GradBuffer::new(w.shape()));
    let tied = Weight::trainable(w.as_tensor().clone(), true, buffer.clone());

    let store = loss(&tied, &some).backward().unwrap();
    assert!(store.get(w.as_tensor()).is_none(), "candle got no copy");
    let one = flat(&buffer.grad().unwrap().unwrap());
    assert_eq!(one, reference(&some), "one backward pass: bitwise equal");

    // A second micro-batch adds to the buffer.
    loss(&tied, &some).backward().unwrap();
    let two = flat(&buffer.grad().unwrap().unwrap());
    let doubled: Vec<f32> = one.iter().map(|a| 2.0 * a).collect();
    assert!(rel_err(&two, &doubled) < 1e-6);

    // The next step overwrites: with no counted row only the embedding's rows remain.
    buffer.zero();
    loss(&tied, &none).backward().unwrap();
    assert_eq!(flat(&buffer.grad().unwrap().unwrap()), reference(&none));

    // A differentiable forward pass that is never back-propagated is caught.
    buffer.zero();
    let _unused = loss(&tied, &some);
    assert!(buffer.grad().is_err());
    let err = obj.loss_from_heads(
        None,
        Head {
            hidden: &x,
            weight: &tied,
        },
        vocab,
        Targets {
            labels: &labels,
            mask: &some,
            denominator: 17.0,
        },
        Mix::CE_ONLY,
    );
    assert!(err.is_err(), "a second pending write is refused");
}
