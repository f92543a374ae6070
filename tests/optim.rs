//! AdamW + global grad-norm clip against torch (tests/fixtures/optim, tools/make_optim_fixtures.py).

use candle_core::{Device, Tensor, Var};
use pocl::backend::Kernels;
use pocl::train::optim::{clip_coef, AdamW, AdamWConfig};

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// All implementations (the fused CPU update, the portable tensor-op one, and the CUDA kernels'
/// ops, whose CPU side runs here) against torch.
#[test]
fn adamw_with_clipping_matches_torch() {
    for kernels in [Kernels::Fused, Kernels::Portable, Kernels::Cuda] {
        adamw_matches_torch(kernels);
    }
}

fn adamw_matches_torch(kernels: Kernels) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/optim/adamw.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let w =
        Var::from_tensor(&Tensor::from_vec(floats(&f["init"]["w"]), (2, 3), &Device::Cpu).unwrap())
            .unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(floats(&f["init"]["b"]), 3, &Device::Cpu).unwrap())
        .unwrap();
    let params = [("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut opt = AdamW::new(params.iter().map(|(n, v)| (n.as_str(), v)), cfg, kernels).unwrap();
    assert!(
        opt.slots[0].decay && !opt.slots[1].decay,
        "1-D parameters are not decayed"
    );
    for (k, s) in f["steps"].as_array().unwrap().iter().enumerate() {
        let grads = vec![
            Some(Tensor::new(floats(&s["grad_w"]), &Device::Cpu).unwrap()),
            Some(Tensor::new(floats(&s["grad_b"]), &Device::Cpu).unwrap()),
        ];
        let (norm, coef) = clip_coef(&grads, 1.0, kernels).unwrap();
        assert!(
            (norm - s["norm"].as_f64().unwrap()).abs() < 1e-5 * norm,
            "{kernels} step {k}: norm"
        );
        opt.update(&grads, coef, s["lr"].as_f64().unwrap()).unwrap();
        for (var, key) in [(&w, "w"), (&b, "b")] {
            let got = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, want) in got.iter().zip(floats(&s[key])) {
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{kernels} step {k} {key}: {g} vs {want}"
                );
            }
        }
    }
}
