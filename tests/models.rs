//! Model families against float64 transformers references (tests/fixtures/models, made by
//! tools/make_fixtures.py): logits, padded batches, greedy decoding, gradients, save/load. The
//! reference checks run on both kernel sets (fused and portable), and the portable gradients
//! are checked against the fused ones parameter by parameter.

use candle_core::{DType, Device, Tensor, Var};
use pocl::backend::{Backend, Kernels};
use pocl::kd::{Divergence, Head, Mix, Objective, Targets};
use pocl::model::generate::{generate, GenerationConfig};
use pocl::model::{self, CausalLm, Input};
use std::collections::HashMap;
use std::path::PathBuf;

const FAMILIES: &[&str] = &[
    "gpt2", "gpt2-hub", "opt", "opt-350m", "llama", "llama-v4", "qwen2", "qwen3", "mistral",
];

/// Kernels::Cuda on the CPU: the CUDA kernel set's code around its kernels (the norm ops, the
/// chunked lm head + loss, portable ops elsewhere), each kernel's CPU side standing in.
const KERNELS: [Kernels; 3] = [Kernels::Fused, Kernels::Portable, Kernels::Cuda];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// max |a − b| / max |b|, the numerics contract's relative error.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale
}

#[test]
fn logits_match_transformers() {
    for (name, k) in FAMILIES.iter().flat_map(|n| KERNELS.map(|k| (n, k))) {
        let m = model::load(&dir(name), &Backend::cpu_with(k))
            .unwrap_or_else(|e| panic!("{name} {k}: {e:#}"));
        let r = reference(name);
        let seq: Vec<u32> = ids(&r["seq_ids"]).flatten_all().unwrap().to_vec1().unwrap();
        let got = model::forward_ids(m.as_ref(), &seq).unwrap();
        let err = rel_err(&got, &r["seq_logits"]);
        assert!(err < 1e-4, "{name} {k}: unpadded logits rel err {err}");
    }
}

#[test]
fn padded_batches_match_transformers() {
    for (name, k) in FAMILIES.iter().flat_map(|n| KERNELS.map(|k| (n, k))) {
        let m = model::load(&dir(name), &Backend::cpu_with(k)).unwrap();
        let r = reference(name);
        let (input, mask) = (ids(&r["batch_ids"]), ids(&r["batch_mask"]));
        let rows: Vec<Vec<u32>> = mask.to_vec2().unwrap();
        let pos = Tensor::new(pocl::ops::positions_from_mask(&rows), &Device::Cpu).unwrap();
        let got = m
            .logits(
                &Input {
                    ids: &input,
                    positions: &pos,
                    key_mask: &mask,
                },
                None,
            )
            .unwrap();
        let want = &r["batch_logits"];
        // Only real tokens are compared: padding positions carry no meaning.
        for (b, row) in rows.iter().enumerate() {
            for (t, &keep) in row.iter().enumerate() {
                if keep == 1 {
                    let g = got.get(b).unwrap().get(t).unwrap();
                    let w = want.get(b).unwrap().get(t).unwrap();
                    let err = rel_err(&g, &w);
                    assert!(
                        err < 1e-4,
                        "{name} {k}: batch row {b} pos {t}: rel err {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn greedy_decoding_matches_transformers() {
    for (name, k) in FAMILIES.iter().flat_map(|n| KERNELS.map(|k| (n, k))) {
        let m = model::load(&dir(name), &Backend::cpu_with(k)).unwrap();
        let r = reference(name);
        let prompt: Vec<u32> = ids(&r["greedy_prompt"])
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (key, ngram) in [("greedy_ids", 0), ("greedy_ngram_ids", 2)] {
            let want: Vec<u32> = ids(&r[key]).flatten_all().unwrap().to_vec1().unwrap();
            let mut cfg = GenerationConfig::greedy(want.len(), vec![]);
            cfg.no_repeat_ngram = ngram;
            let got = generate(m.as_ref(), std::slice::from_ref(&prompt), &cfg)
                .unwrap()
                .remove(0);
            assert_eq!(got, want, "{name} {k}: {key}");
        }
    }
}

#[test]
fn batched_generation_equals_one_by_one() {
    // Prompts of different lengths share a batch (left-padded inside): each row must decode as alone.
    for (name, k) in ["gpt2", "opt-350m", "qwen3"]
        .map(|n| KERNELS.map(|k| (n, k)))
        .concat()
    {
        let m = model::load(&dir(name), &Backend::cpu_with(k)).unwrap();
        let prompts = vec![
            vec![5u32, 9, 13, 2, 7, 11, 3],
            vec![4u32, 8],
            vec![6u32, 1, 12, 10],
        ];
        // Declare a token of the first row's output an EOS, so rows finish at different steps
        // and the batch shrinks mid-generation.
        let free = generate(
            m.as_ref(),
            &prompts[..1],
            &GenerationConfig::greedy(8, vec![]),
        )
        .unwrap();
        let cfg = GenerationConfig::greedy(8, vec![free[0][3]]);
        let batched = generate(m.as_ref(), &prompts, &cfg).unwrap();
        assert!(
            batched.iter().any(|r| r.len() < 8),
            "{name}: some row must stop early: {batched:?}"
        );
        for (p, got) in prompts.iter().zip(&batched) {
            let alone = generate(m.as_ref(), std::slice::from_ref(p), &cfg)
                .unwrap()
                .remove(0);
            assert_eq!(got, &alone, "{name} {k}: prompt {p:?}");
        }
    }
}

#[test]
fn generation_stops_at_eos() {
    let m = model::load(&dir("gpt2"), &pocl::backend::Backend::cpu()).unwrap();
    let prompt = vec![5u32, 9, 13];
    let free = generate(
        m.as_ref(),
        std::slice::from_ref(&prompt),
        &GenerationConfig::greedy(10, vec![]),
    )
    .unwrap()
    .remove(0);
    // Declare the 3rd generated token an EOS: generation must end right after producing it.
    let eos = free[2];
    let first = free.iter().position(|&t| t == eos).unwrap();
    let got = generate(
        m.as_ref(),
        &[prompt],
        &GenerationConfig::greedy(10, vec![eos]),
    )
    .unwrap()
    .remove(0);
    assert_eq!(got, free[..=first].to_vec());
}

/// A fixed, non-trivial scalar function of the logits.
fn probe_loss(m: &dyn CausalLm, seq: &[u32]) -> Tensor {
    let logits = model::forward_ids(m, seq).unwrap();
    let n = logits.elem_count();
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let w = Tensor::from_vec(w, logits.dims(), &Device::Cpu).unwrap();
    (logits * w).unwrap().sum_all().unwrap()
}

#[test]
fn every_parameter_gets_a_correct_gradient() {
    let seq = [3u32, 17, 5, 9, 11, 2, 8];
    for name in FAMILIES {
        let m = model::load(&dir(name), &pocl::backend::Backend::cpu()).unwrap();
        let loss = probe_loss(m.as_ref(), &seq);
        // candle's store and the in-place buffers of the matrices, as the trainer reads them.
        let grads = m.params().grads(&loss.backward().unwrap()).unwrap();
        for ((pname, _), g) in m.params().iter().zip(&grads) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let sq = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                sq.is_finite() && sq > 0.0,
                "{name}: gradient of {pname} is {sq}"
            );
        }
        // Central finite differences on one element of a few parameters (f32 model: loose tolerance).
        let picks: Vec<((&str, &Var), &Option<Tensor>)> =
            m.params().iter().zip(&grads).step_by(5).collect();
        for ((pname, var), g) in picks {
            let g = g.as_ref().unwrap().flatten_all().unwrap();
            let flat = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let gv = g.to_vec1::<f32>().unwrap();
            let i = (0..gv.len())
                .max_by(|&a, &b| gv[a].abs().total_cmp(&gv[b].abs()))
                .unwrap();
            let eps = 1e-2f32;
            let shifted = |d: f32| {
                let mut v = flat.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = probe_loss(m.as_ref(), &seq)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                l
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(flat.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let an = gv[i] as f64;
            assert!(
                (fd - an).abs() <= 2e-2 * an.abs().max(1.0),
                "{name}: {pname}[{i}] analytic {an} vs finite difference {fd}"
            );
        }
    }
}

/// The probe loss plus a KD objective through the lm head (CE mixed with JSD at T = 2 against
/// a frozen copy of the model as teacher): the head fused with the loss on the fused path, the
/// materialised logits and the candle composition on the portable one.
fn probe_and_kd_loss(m: &dyn CausalLm, teacher: &dyn CausalLm, seq: &[u32]) -> Tensor {
    let n = seq.len();
    let dev = &Device::Cpu;
    let ids = Tensor::from_slice(seq, (1, n), dev).unwrap();
    let pos = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), (1, n), dev).unwrap();
    let mask = Tensor::ones((1, n), DType::U32, dev).unwrap();
    let input = Input {
        ids: &ids,
        positions: &pos,
        key_mask: &mask,
    };
    let mut objective = Objective::new(Divergence::Jsd { beta: 0.3 });
    objective.kernels = m.backend().kernels;
    let labels: Vec<u32> = seq[1..].iter().copied().chain([seq[0]]).collect();
    let labels = Tensor::new(labels, dev).unwrap();
    let loss_mask: Vec<f32> = (0..n).map(|i| if i < 2 { 0.0 } else { 1.0 }).collect();
    let loss_mask = Tensor::new(loss_mask, dev).unwrap();
    let (th, sh) = (
        teacher.hidden(&input, None).unwrap(),
        m.hidden(&input, None).unwrap(),
    );
    let vocab = m.config().vocab_size;
    let kd = objective
        .loss_from_heads(
            Some(Head {
                hidden: &th,
                weight: teacher.lm_head(),
            }),
            Head {
                hidden: &sh,
                weight: m.lm_head(),
            },
            vocab,
            Targets {
                labels: &labels,
                mask: &loss_mask,
                denominator: (n - 2) as f64,
            },
            Mix {
                temperature: 2.0,
                kd_weight: 0.6,
            },
        )
        .unwrap();
    (probe_loss(m, seq) + kd.loss).unwrap()
}

/// Every parameter's gradient through the portable kernels against the fused kernels' (the
/// norms, attention, activations, embedding and linear backward, the lm head and the KD loss),
/// within 1e-4 relative to the parameter's largest gradient entry.
#[test]
fn portable_gradients_match_fused() {
    let seq = [3u32, 17, 5, 9, 11, 2, 8, 4];
    for name in FAMILIES {
        let mut per_kernels = Vec::new();
        for k in KERNELS {
            let backend = Backend::cpu_with(k);
            let m = model::load(&dir(name), &backend).unwrap();
            let teacher = model::load_frozen(&dir(name), &backend).unwrap();
            // Move the student off the teacher so the KD term has a gradient of its own.
            for (_, var) in m.params().iter() {
                let t = var.as_tensor();
                let n = t.elem_count();
                let shift: Vec<f32> = (0..n)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) * 2e-3)
                    .collect();
                let shift = Tensor::from_vec(shift, t.dims(), &Device::Cpu).unwrap();
                var.set(&(t + shift).unwrap()).unwrap();
            }
            let loss = probe_and_kd_loss(m.as_ref(), teacher.as_ref(), &seq);
            let grads = m.params().grads(&loss.backward().unwrap()).unwrap();
            let named: Vec<(String, Tensor)> = m
                .params()
                .iter()
                .zip(grads)
                .map(|((n, _), g)| {
                    let g = g.unwrap_or_else(|| panic!("{name} {k}: no gradient for {n}"));
                    (n.to_string(), g)
                })
                .collect();
            per_kernels.push(named);
        }
        let fused = &per_kernels[0];
        for (k, portable) in KERNELS.iter().zip(&per_kernels).skip(1) {
            assert_eq!(fused.len(), portable.len(), "{name}: parameter count");
            let max_abs = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            // A key bias shifts every score of a query alike, so its true gradient is 0 and both
            // paths return rounding noise: such a parameter is measured against a floor of 1e-3 of
            // the model's largest gradient instead of its own.
            let floor = 1e-3 * fused.iter().map(|(_, g)| max_abs(g)).fold(0f32, f32::max);
            for ((pn, gf), (_, gp)) in fused.iter().zip(portable) {
                let gp = gp.reshape(gf.dims()).unwrap();
                let diff = max_abs(&(&gp - gf).unwrap());
                let err = diff / max_abs(gf).max(floor);
                assert!(
                    err < 1e-4,
                    "{name}: {pn}: {k:?} vs fused gradient rel err {err}"
                );
            }
        }
    }
}

#[test]
fn save_then_load_gives_identical_logits() {
    let tmp = std::env::temp_dir().join(format!("pocl-roundtrip-{}", std::process::id()));
    for name in FAMILIES {
        let src = dir(name);
        let m = model::load(&src, &pocl::backend::Backend::cpu()).unwrap();
        let out = tmp.join(name);
        model::save(m.as_ref(), &out, Some(&src)).unwrap();
        assert!(
            out.join("tokenizer.json").is_file(),
            "{name}: tokenizer copied"
        );
        let again = model::load(&out, &pocl::backend::Backend::cpu()).unwrap();
        let seq = [1u32, 4, 9, 16, 25];
        let a = model::forward_ids(m.as_ref(), &seq)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = model::forward_ids(again.as_ref(), &seq)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{name}: logits changed after save/load");
        assert_eq!(m.params().len(), again.params().len());
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn unsupported_rope_scaling_is_refused() {
    let e = model::load(&dir("llama-yarn"), &pocl::backend::Backend::cpu())
        .err()
        .expect("yarn must be refused");
    let msg = format!("{e:#}");
    assert!(msg.contains("yarn") && msg.contains("config.json"), "{msg}");
}

/// Eight optimizer steps (jsd at T = 2 mixed with CE, clip, AdamW) with the CUDA kernel set run
/// on the CPU (each CUDA op's CPU side) against the fused CPU kernels: the same loss and gradient
/// norm at every step within 1e-4. Covers the chunked head, the norm and softmax ops, AdamW with
/// packed moments and the norm op of the clip, together, as training uses them.
#[test]
fn cuda_kernel_set_trains_like_the_fused_one_on_the_cpu() {
    use pocl::data::{collate, Example};
    use pocl::train::optim::{AdamW, AdamWConfig};
    use pocl::train::step::{optimizer_step, Models};
    for name in ["gpt2", "llama"] {
        let run = |k: Kernels| -> Vec<(f64, f64)> {
            let backend = Backend::cpu_with(k);
            let student = model::load(&dir(name), &backend).unwrap();
            let teacher = model::load_frozen(&dir(name), &backend).unwrap();
            for (_, var) in student.params().iter() {
                let t = var.as_tensor();
                let shift: Vec<f32> = (0..t.elem_count())
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) * 2e-3)
                    .collect();
                let shift = Tensor::from_vec(shift, t.dims(), &Device::Cpu).unwrap();
                var.set(&(t + shift).unwrap()).unwrap();
            }
            let vocab = student.config().vocab_size as u32;
            let examples: Vec<Example> = (0..3u64)
                .map(|id| Example {
                    id,
                    prompt_ids: (0..4 + id as u32).map(|i| (i * 7 + 3) % vocab).collect(),
                    response_ids: (0..6).map(|i| (i * 13 + id as u32) % vocab).collect(),
                })
                .collect();
            let micro = [collate(&examples.iter().collect::<Vec<_>>(), 0).unwrap()];
            let models = Models {
                student: student.as_ref(),
                teacher: Some(teacher.as_ref()),
                sparse_teacher: None,
                objective: Objective {
                    kernels: k,
                    ..Objective::new(Divergence::Jsd { beta: 0.3 })
                },
                kd_vocab: vocab as usize,
            };
            let cfg = AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            };
            let mut opt = AdamW::new(student.params().iter(), cfg, k).unwrap();
            let mix = Mix {
                temperature: 2.0,
                kd_weight: 0.7,
            };
            (0..8)
                .map(|_| {
                    let o = optimizer_step(&models, &mut opt, &micro, mix, 1e-3, 0.5, &mut |_| {})
                        .unwrap();
                    (o.loss, o.grad_norm)
                })
                .collect()
        };
        let (fused, cuda) = (run(Kernels::Fused), run(Kernels::Cuda));
        for (i, (a, b)) in fused.iter().zip(&cuda).enumerate() {
            let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-12);
            assert!(
                rel(a.0, b.0) < 1e-4 && rel(a.1, b.1) < 1e-4,
                "{name} step {i}: fused {a:?} vs cuda set {b:?}"
            );
        }
    }
}
