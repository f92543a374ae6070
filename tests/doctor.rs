//! `pocl doctor`: on this CPU every check passes and every line is JSON with the expected names;
//! `--device cuda` in a build without CUDA is refused with one line; and every check can fail.

mod common;
use common::pocl;
use pocl::backend::Backend;
use pocl::doctor::Doctor;
use serde_json::Value;
use std::collections::BTreeSet;

/// The checks every run makes, by name.
fn expected_checks() -> BTreeSet<String> {
    let mut names: Vec<String> = [
        "linear",
        "linear.conv1d",
        "embed",
        "layer_norm",
        "rms_norm",
        "activate.gelu_tanh",
        "activate.gelu_erf",
        "activate.relu",
        "activate.silu",
        "attention",
        "attention.decode",
        "attention_qkv",
        "linear.bf16_mixed",
        "linear.conv1d.bf16_mixed",
        "linear_activate",
        "linear_activate.bf16_mixed",
        "model.gpt2.bf16_mixed",
        "model.qwen3.bf16_mixed",
    ]
    .iter()
    .flat_map(|op| [format!("{op}.forward"), format!("{op}.backward")])
    .collect();
    for op in [
        "linear.decode",
        "linear.f32_packed",
        "linear.bf16",
        "embed.bf16",
        "attention.left_padded",
    ] {
        names.push(format!("{op}.forward"));
    }
    for div in ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] {
        for t in [1, 2] {
            for part in ["forward", "backward"] {
                names.push(format!("kd_head.{div}.T{t}.{part}"));
            }
        }
    }
    for part in ["forward", "backward"] {
        names.push(format!("kd_head.fkl.T2.bf16_teacher.{part}"));
    }
    for n in [
        "adamw.clip",
        "kd_steps.gpt2",
        "kd_steps.qwen3",
        "kd_steps.gpt2.bf16_teacher",
        "kd_steps.gpt2.bf16_mixed",
        "kd_steps.gpt2.bf16_mixed.grad_norms",
        "kd_steps.qwen3.bf16_mixed",
        "kd_steps.qwen3.bf16_mixed.grad_norms",
        "generate.gpt2",
        "generate.opt",
        "generate.qwen3",
    ] {
        names.push(n.to_string());
    }
    names.into_iter().collect()
}

#[test]
fn doctor_passes_on_this_cpu_with_one_json_line_per_check() {
    for (args, target, reference) in [
        (vec!["doctor"], "cpu/fused", "cpu/portable"),
        (
            vec!["doctor", "--kernels", "portable"],
            "cpu/portable",
            "cpu/fused",
        ),
    ] {
        let (code, out, err) = pocl(&args);
        assert_eq!(code, 0, "{args:?}: {err}\n{out}");
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        // The build first.
        let build = &lines[0];
        assert_eq!(build["pocl"], env!("CARGO_PKG_VERSION"));
        assert_eq!(build["features"]["cuda"], cfg!(feature = "cuda"));
        assert!(build["cpu"]["model"].is_string(), "{build}");
        assert!(build["bf16_matmul"]["kernel"].is_string(), "{build}");
        assert_eq!(build["target"], target);
        assert_eq!(build["reference"], reference);
        // Then one line per check, every one passed, with its measure.
        let checks = &lines[1..lines.len() - 1];
        let names: BTreeSet<String> = checks
            .iter()
            .map(|c| c["check"].as_str().expect("a check name").to_string())
            .collect();
        assert_eq!(names.len(), checks.len(), "a check name repeats");
        assert_eq!(names, expected_checks());
        for c in checks {
            assert_eq!(c["ok"], true, "{c}");
            assert_eq!(c["device"], "cpu", "{c}");
            assert_eq!(format!("cpu/{}", c["kernels"].as_str().unwrap()), target);
            assert_eq!(c["reference"], reference, "{c}");
            assert!(c["shape"].is_string() && c["tol"].is_number(), "{c}");
            let close = c["max_abs_err"].is_number() && c["max_rel_err"].is_number();
            let ids = c["mismatched_ids"] == 0;
            assert!(close || ids, "{c}");
            if close {
                assert!(c["max_rel_err"].as_f64() <= c["tol"].as_f64(), "{c}");
            }
        }
        // And the summary.
        let summary = &lines[lines.len() - 1]["summary"];
        assert_eq!(summary["checks"], checks.len());
        assert_eq!(summary["failed"], 0);
        assert_eq!(summary["ok"], true);
        assert!(summary["seconds"].as_f64().unwrap() < 60.0, "{summary}");
    }
}

/// A build without the `cuda` feature refuses `--device cuda` with Backend::new's one line.
#[cfg(not(feature = "cuda"))]
#[test]
fn doctor_refuses_cuda_in_a_build_without_it() {
    for device in ["cuda", "cuda:1"] {
        let (code, out, err) = pocl(&["doctor", "--device", device]);
        assert_ne!(code, 0);
        assert_eq!(out, "", "nothing else is printed");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("this pocl was built without CUDA support; see README, 'GPU'"),
            "{err}"
        );
    }
}

/// No check that cannot fail: a target perturbed by 5% of each tensor's largest value (and one
/// changed generated id) fails every check, with the measure that says why.
#[test]
fn every_check_fails_on_a_perturbed_target() {
    let doctor = Doctor {
        perturb: 0.05,
        ..Doctor::new(Backend::cpu())
    };
    let checks = doctor.run(&mut |_| {});
    assert_eq!(checks.len(), expected_checks().len());
    for c in &checks {
        let line = c.to_json(&doctor);
        assert!(!c.ok(), "{line}");
        assert_eq!(line["ok"], false);
        assert!(line.get("error").is_none(), "{line}");
    }
}
