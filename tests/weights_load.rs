//! Loading a checkpoint maps its files and converts one tensor at a time (issue 12): the peak
//! resident set of a process that loads a model stays near the model's in-memory (f32) size,
//! whatever dtype the file stores, instead of file + every converted tensor. Conversion is exact,
//! and a damaged file is refused at load with an error naming it.

use candle_core::{DType, Device, Tensor};
use pocl::model::StateDict;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `pocl args` to completion and returns its peak resident set in bytes (the kernel's
/// `ru_maxrss` of that child, from `wait4`). The child starts from this process's memory map
/// (vfork + exec), whose high-water mark the kernel carries over: this process therefore never
/// holds a model (files are written tensor by tensor), and the baseline is measured the same way.
// The child is reaped by `wait4` (which also gives its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn peak_rss(args: &[&str]) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pocl"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain syscall on our own child with valid out-pointers; a zeroed rusage is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "pocl {args:?} failed: {err}"
    );
    usage.ru_maxrss as u64 * 1024
}

/// The header of a safetensors file and where its data starts.
fn header(f: &std::fs::File) -> (Map<String, Value>, u64) {
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0).unwrap();
    let n = u64::from_le_bytes(n);
    let mut h = vec![0u8; n as usize];
    f.read_exact_at(&mut h, 8).unwrap();
    (serde_json::from_slice(&h).unwrap(), 8 + n)
}

/// Copies the model directory `src` (f32 weights) to `dst` with every tensor stored as bf16,
/// converting one tensor at a time so that this process stays small (see [`peak_rss`]).
fn bf16_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    let f = std::fs::File::open(src.join("model.safetensors")).unwrap();
    let (h, start) = header(&f);
    let mut tensors: Vec<(&String, &Value, u64, u64)> = h
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32");
            let o = &v["data_offsets"];
            (
                k,
                &v["shape"],
                o[0].as_u64().unwrap(),
                o[1].as_u64().unwrap(),
            )
        })
        .collect();
    tensors.sort_by_key(|t| t.2);
    let mut out = Map::new();
    let mut at = 0;
    for (name, shape, a, b) in &tensors {
        let len = (b - a) / 2;
        out.insert(
            name.to_string(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + len]}),
        );
        at += len;
    }
    let mut out = serde_json::to_vec(&out).unwrap();
    out.resize(out.len().div_ceil(8) * 8, b' ');
    let mut w =
        std::io::BufWriter::new(std::fs::File::create(dst.join("model.safetensors")).unwrap());
    w.write_all(&(out.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&out).unwrap();
    for (_, _, a, b) in &tensors {
        let mut bytes = vec![0u8; (b - a) as usize];
        f.read_exact_at(&mut bytes, start + a).unwrap();
        for x in bytes.chunks_exact(4) {
            let v = f32::from_le_bytes(x.try_into().unwrap());
            w.write_all(&half::bf16::from_f32(v).to_le_bytes()).unwrap();
        }
    }
    w.flush().unwrap();
}

#[test]
fn loading_a_model_peaks_near_its_in_memory_size() {
    let d = tmpdir("memory");
    let (f32_dir, bf16_dir) = (d.join("f32"), d.join("bf16"));
    let out = d.join("logits.safetensors");
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2");
    // ~13M parameters (52 MB in f32), no tensor above 1 MB.
    let init = [
        "init",
        "--family",
        "gpt2",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        f32_dir.to_str().unwrap(),
        "--hidden",
        "256",
        "--layers",
        "16",
    ];
    peak_rss(&init);
    bf16_copy(&f32_dir, &bf16_dir);
    let forward = |model: &Path| {
        peak_rss(&[
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "1,2,3",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    // The binary itself, its thread pool and a forward pass of a tiny model.
    let base = forward(&tokenizer);
    let f = std::fs::File::open(f32_dir.join("model.safetensors")).unwrap();
    let f32_bytes = f.metadata().unwrap().len() - header(&f).1;
    for model in [&f32_dir, &bf16_dir] {
        let peak = forward(model);
        let ratio = peak.saturating_sub(base) as f64 / f32_bytes as f64;
        eprintln!(
            "{}: peak {:.1} MB, baseline {:.1} MB, f32 weights {:.1} MB: {ratio:.3}x",
            model.display(),
            peak as f64 / 1e6,
            base as f64 / 1e6,
            f32_bytes as f64 / 1e6
        );
        assert!(
            ratio <= 1.1,
            "{}: loading peaked at {ratio:.2}x the f32 weights",
            model.display()
        );
    }
    std::fs::remove_dir_all(&d).ok();
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-weights-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load_error(dir: &Path) -> String {
    match StateDict::load(dir) {
        Ok(_) => panic!("{}: loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn every_stored_float_dtype_is_upcast_exactly_when_taken() {
    let d = tmpdir("dtypes");
    let values: Vec<f64> = (0..24).map(|i| (i as f64 - 11.3) * 0.137 + 1e-9).collect();
    let src = Tensor::from_vec(values, (4, 6), &Device::Cpu).unwrap();
    let dtypes = [
        ("a", DType::F32),
        ("b", DType::F16),
        ("c", DType::BF16),
        ("d", DType::F64),
    ];
    let mut tensors: HashMap<String, Tensor> = dtypes
        .iter()
        .map(|(n, t)| (n.to_string(), src.to_dtype(*t).unwrap()))
        .collect();
    tensors.insert("unknown.weight".into(), src.clone());
    tensors.insert("h.0.attn.bias".into(), src.clone());
    candle_core::safetensors::save(&tensors, d.join("model.safetensors")).unwrap();

    let mut sd = StateDict::load(&d).unwrap();
    for (name, _) in dtypes {
        let got = sd.take(name, &[4, 6]).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = tensors[name].to_dtype(DType::F32).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&got), bits(&want), "{name}");
        assert!(!sd.contains(name));
    }
    let e = format!("{:#}", sd.take("a", &[4, 6]).unwrap_err());
    assert!(e.contains("missing tensor \"a\""), "{e}");
    let e = format!("{:#}", sd.take("unknown.weight", &[6, 4]).unwrap_err());
    assert!(e.contains("\"unknown.weight\" has shape [4, 6]"), "{e}");
    assert_eq!(sd.leftovers(), Vec::<String>::new());
    let sd = StateDict::load(&d).unwrap();
    assert_eq!(sd.leftovers(), ["a", "b", "c", "d", "unknown.weight"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn damaged_files_are_refused_at_load_naming_the_file() {
    let d = tmpdir("damaged");
    let good = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/gpt2/model.safetensors"),
    )
    .unwrap();
    // A file of header `json` and `len` data bytes.
    let raw = |json: &str, len: usize| {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.resize(f.len() + len, 0);
        f
    };
    let cases = [
        (
            "truncated",
            good[..good.len() - 100].to_vec(),
            "corrupt safetensors file",
        ),
        (
            "header-cut",
            good[..1000].to_vec(),
            "corrupt safetensors file",
        ),
        (
            "beyond-end",
            raw(
                r#"{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#,
                16,
            ),
            "corrupt safetensors file",
        ),
        (
            "gap",
            raw(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                16,
            ),
            "corrupt safetensors file",
        ),
        (
            "unsupported",
            raw(
                r#"{"w":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}}"#,
                16,
            ),
            "tensor \"w\": unsupported dtype I32",
        ),
    ];
    for (tag, bytes, needle) in cases {
        let m = d.join(tag);
        std::fs::create_dir_all(&m).unwrap();
        let file = m.join("model.safetensors");
        std::fs::write(&file, bytes).unwrap();
        let e = load_error(&m);
        assert!(
            e.contains(&file.display().to_string()) && e.contains(needle),
            "{tag}: {e}"
        );
    }
    // A shard of a sharded checkpoint: the error names that shard.
    let m = d.join("sharded");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(m.join("model-00001-of-00002.safetensors"), &good).unwrap();
    std::fs::write(
        m.join("model-00002-of-00002.safetensors"),
        &good[..good.len() / 2],
    )
    .unwrap();
    let e = load_error(&m);
    assert!(
        e.contains("model-00002-of-00002.safetensors: corrupt safetensors file"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).ok();
}
