//! Test inputs made from the fixtures (a copy of the tiny GPT-2 with its config.json or weights
//! edited, small safetensors files, recipes) and a runner for the `pocl` binary; shared by
//! tests/bad_input.rs and tests/numbers.rs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A tensor name and the edit applied to its f32 values.
pub type Patch<'a> = (&'a str, &'a dyn Fn(&mut [f32]));

/// Copies the tiny GPT-2 fixture to `dst`, with its config.json edited by `edit` and its
/// weights by `patch` (tensor name, f32 values).
pub fn model_copy(dst: &Path, edit: impl Fn(&mut serde_json::Value), patch: Option<Patch>) {
    let src = fixture("models/gpt2");
    std::fs::create_dir_all(dst).unwrap();
    for f in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    if let Some((name, f)) = patch {
        let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
        let mut vals: Vec<f32> =
            t.2.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        f(&mut vals);
        t.2 = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    let out = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(dst.join("model.safetensors"), out).unwrap();
}

/// An f32 safetensors file holding `name` = `values` of `shape`.
pub fn write_tensor(path: &Path, name: &str, shape: &[usize], values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
        .unwrap();
    std::fs::write(
        path,
        safetensors::tensor::serialize([(name, v)], None).unwrap(),
    )
    .unwrap();
}

/// A fresh, empty directory for one test.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-inputs-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// (exit code, stdout, stderr) of `pocl args`, run in `cwd`.
pub fn pocl_in<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pocl"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A recipe at `dir/name` training `student` with SFT (no curriculum, one epoch, batches of 2)
/// on `data` (also the dev set), plus `extra` TOML lines.
pub fn sft_recipe(dir: &Path, name: &str, student: &str, data: &str, extra: &str) -> PathBuf {
    let p = dir.join(name);
    let text = format!(
        "out = \"run\"\n[model]\nstudent = \"{student}\"\n[data]\ntrain = \"{data}\"\n\
         dev = \"{data}\"\n[objective]\nloss = \"sft\"\n[curriculum]\nkind = \"none\"\n\
         [optim]\nepochs = 1\nbatch_size = 2\nmicro_batch_size = 2\n{extra}"
    );
    std::fs::write(&p, text).unwrap();
    p
}
