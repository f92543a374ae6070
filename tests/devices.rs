//! The device and kernel options of the command line: `--kernels portable` reproduces the
//! float64 transformers references through the CLI, and a device this build lacks is refused
//! with one clear line by every command that runs a model.

mod common;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

const FAMILIES: &[&str] = &[
    "gpt2", "gpt2-hub", "opt", "opt-350m", "llama", "llama-v4", "qwen2", "qwen3", "mistral",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// (exit code, stderr) of `pocl args`.
fn pocl(args: &[&str]) -> (i32, String) {
    let (code, _, err) = common::pocl(args);
    (code, err)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-devices-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `pocl forward --kernels portable` writes the logits of transformers' float64 forward pass
/// (within 1e-4 relative) for every family fixture.
#[test]
fn portable_forward_matches_transformers_through_the_cli() {
    let d = tmpdir("forward");
    for name in FAMILIES {
        let reference = candle_core::safetensors::load(
            fixture(name).join("reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let seq: Vec<u32> = reference["seq_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ids = seq.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let out = d.join(format!("{name}.safetensors"));
        let model = fixture(name);
        let (code, err) = pocl(&[
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            &ids,
            "--output",
            out.to_str().unwrap(),
            "--kernels",
            "portable",
        ]);
        assert_eq!(code, 0, "{name}: {err}");
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["logits"].clone();
        let want: &Tensor = &reference["seq_logits"];
        let max_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let err = max_abs(&(&got - want).unwrap()) / max_abs(want);
        assert!(err < 1e-4, "{name}: portable logits rel err {err}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// Without the `cuda` feature, `--device cuda` (or `cuda:N`, or the recipe key run.device) fails
/// before any work with the one line that points to the README, for every command that runs a
/// model, and writes nothing.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_is_refused_with_one_line_by_a_build_without_it() {
    const LINE: &str = "this pocl was built without CUDA support; see README, 'GPU'";
    let d = tmpdir("cuda");
    let model = fixture("gpt2");
    let m = model.to_str().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/dolly.jsonl");
    let data = data.to_str().unwrap();
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let recipe = d.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!("[model]\nstudent = \"{m}\"\n[data]\ntrain = \"{data}\"\n[objective]\nloss = \"sft\"\n[curriculum]\nkind = \"none\"\n"),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "forward", "--model", m, "--ids", "1,2", "--output", o, "--device", "cuda",
        ],
        vec![
            "generate", "--model", m, "--ids", "1,2", "--device", "cuda:1",
        ],
        vec![
            "score", "--model", m, "--data", data, "--out", o, "--device", "cuda",
        ],
        vec!["eval", "--model", m, "--data", data, "--device", "cuda"],
        vec![
            "generate-data",
            "--model",
            m,
            "--data",
            data,
            "--out",
            o,
            "--device",
            "cuda",
        ],
        vec!["bench", "generate", "--reps", "1", "--device", "cuda"],
        vec!["demo", "--quick", "--out", o, "--device", "cuda"],
        vec!["train", "--config", r, "--out", o, "--device", "cuda"],
        vec![
            "train",
            "--config",
            r,
            "--out",
            o,
            "--set",
            "run.device=cuda",
        ],
    ];
    for args in cases {
        let (code, err) = pocl(&args);
        assert_ne!(code, 0, "{args:?} must fail");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(LINE), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // A device name that is not one gets its own clear line.
    let (code, err) = pocl(&[
        "forward", "--model", m, "--ids", "1", "--output", o, "--device", "gpu",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// A CUDA build on a machine without a usable GPU (the libcuda stub on the library path, or no
/// driver) refuses `--device cuda` with one line naming the device; with a GPU it runs.
#[cfg(feature = "cuda")]
#[test]
fn cuda_build_without_a_gpu_refuses_with_one_line() {
    let d = tmpdir("cuda-build");
    let model = fixture("gpt2");
    let out = d.join("out");
    let (code, err) = pocl(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2",
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    if code == 0 {
        return; // a GPU is here
    }
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot open CUDA device 0"), "{err}");
}
