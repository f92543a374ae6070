//! Real models (issue 14): Llama 3 rope scaling and students pruned from a teacher, against
//! float64 transformers references (tests/fixtures/realmodels, made by
//! tools/make_realmodel_fixtures.py).

mod common;
use candle_core::{DType, Device, Tensor};
use pocl::backend::{Backend, Kernels};
use pocl::model::{self, init::KeepLayers};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/realmodels")
        .join(name)
}

fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|, the numerics contract's relative error.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max((a - b).unwrap()) / max(b.clone())
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-realmodels-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// (exit code, stderr) of `pocl args`.
fn pocl(args: &[&str]) -> (i32, String) {
    let (code, _, err) = common::pocl(args);
    (code, err)
}

/// A failing command: non-zero exit, one line naming `needle`, no panic.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, err) = pocl(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn llama3_rope_matches_transformers() {
    let r = load_st(&fixture("llama3-rope/reference.safetensors"));
    for k in [Kernels::Fused, Kernels::Portable] {
        let m = model::load(&fixture("llama3-rope"), &Backend::cpu_with(k)).unwrap();
        assert!(m.config().rope_llama3.is_some());
        for (i, l) in [("seq_ids", "seq_logits"), ("long_ids", "long_logits")] {
            let got = model::forward_ids(m.as_ref(), &ids(&r[i])).unwrap();
            // The long reference keeps the last rows only.
            let rows = r[l].dim(0).unwrap();
            let got = got.narrow(0, got.dim(0).unwrap() - rows, rows).unwrap();
            let err = rel_err(&got, &r[l]);
            assert!(err < 1e-4, "{k}: {l} rel err {err}");
        }
    }
}

#[test]
fn pruned_student_matches_transformers() {
    let r = load_st(&fixture("llama3-rope/pruned_0_2.safetensors"));
    let out = tmpdir("pruned");
    for (tag, keep) in [
        ("count", KeepLayers::Count(2)),
        ("list", KeepLayers::Indices(vec![0, 2])),
    ] {
        let dir = out.join(tag);
        let (kept, _) = model::init::init_from(&fixture("llama3-rope"), &keep, &dir).unwrap();
        assert_eq!(kept, vec![0, 2]);
        assert!(dir.join("tokenizer.json").is_file());
        let m = model::load(&dir, &Backend::cpu()).unwrap();
        assert_eq!(m.config().num_layers, 2);
        let got = model::forward_ids(m.as_ref(), &ids(&r["seq_ids"])).unwrap();
        let err = rel_err(&got, &r["seq_logits"]);
        assert!(err < 1e-4, "{tag}: pruned logits rel err {err}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn init_from_on_the_command_line() {
    let out = tmpdir("cli");
    let teacher = fixture("llama3-rope");
    let student = out.join("student");
    let (t, s) = (teacher.to_str().unwrap(), student.to_str().unwrap());
    let (code, err) = pocl(&["init", "--from", t, "--layers", "1", "--out", s]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("teacher layers [1]"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["rope_parameters"]["rope_type"], "llama3");

    // Bad choices: one line each, and the directory already written is left as it was, even
    // with --force (the student is checked before anything replaces it).
    let before = std::fs::read(student.join("model.safetensors")).unwrap();
    let bad: &[(&[&str], &str)] = &[
        (&["--keep-layers", "4"], "the teacher has 3 layers"),
        (&["--layers", "0,3"], "layer 3 does not exist"),
        (&["--layers", "2,1"], "increasing order"),
        (&["--layers", "0,x"], "--layers"),
    ];
    for (extra, needle) in bad {
        let mut args = vec!["init", "--from", t, "--out", s, "--force"];
        args.extend_from_slice(extra);
        assert_one_line_error(&args, needle);
    }
    assert_one_line_error(
        &[
            "init",
            "--from",
            out.join("nothing").to_str().unwrap(),
            "--keep-layers",
            "2",
            "--out",
            s,
            "--force",
        ],
        "nothing",
    );
    assert_eq!(
        std::fs::read(student.join("model.safetensors")).unwrap(),
        before
    );
    std::fs::remove_dir_all(&out).ok();
}

fn gguf_fixture(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

#[test]
fn gguf_models_match_transformers() {
    let out = tmpdir("gguf");
    for arch in ["llama", "qwen2", "qwen3"] {
        // A copy: loading a .gguf path converts it beside the file, which must not be the tree.
        let file = out.join(format!("{arch}.gguf"));
        std::fs::copy(gguf_fixture(&format!("{arch}.gguf")), &file).unwrap();
        let r = load_st(&gguf_fixture(&format!("{arch}.reference.safetensors")));
        let dir = out.join(arch);
        model::gguf::convert(&file, &dir).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        for path in [&dir, &file] {
            let m = model::load_frozen(path, &Backend::cpu()).unwrap();
            let got = model::forward_ids(m.as_ref(), &ids(&r["seq_ids"])).unwrap();
            let err = rel_err(&got, &r["seq_logits"]);
            assert!(
                err < 1e-4,
                "{arch} ({}): logits rel err {err}",
                path.display()
            );
        }
        // Tokenizer: ids and decoded text as transformers' GGUF tokenizer gives them.
        let cases: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(gguf_fixture(&format!("{arch}.cases.json"))).unwrap(),
        )
        .unwrap();
        let tok = pocl::tokenizer::Tokenizer::from_dir(&file, None).unwrap();
        for c in cases["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
            assert_eq!(tok.encode(text).unwrap(), want, "{arch}: ids of {text:?}");
            assert_eq!(
                tok.decode(&want, false).unwrap(),
                c["decoded"].as_str().unwrap(),
                "{arch}: decoded {text:?}"
            );
        }
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert!(tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>"));
        assert_eq!(tc["bos_token"], "<|endoftext|>");
        let g: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("generation_config.json")).unwrap(),
        )
        .unwrap();
        assert!(g["eos_token_id"].is_u64());
    }
    std::fs::remove_dir_all(&out).ok();
}

/// A Llama 3.1-style GGUF keeps its rope scaling only in llama.cpp's `rope_freqs` divisors: the
/// conversion recovers transformers' llama3 parameters from them, and the logits over 200
/// positions (all three frequency bands at work) match the HF model the file was written from.
#[test]
fn gguf_llama3_rope_freqs_become_llama3_rope_parameters() {
    let out = tmpdir("gguf-llama3");
    let dir = out.join("llama3");
    model::gguf::convert(&gguf_fixture("llama3.gguf"), &dir).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let rope = &c["rope_parameters"];
    assert_eq!(rope["rope_type"], "llama3", "{rope}");
    for (k, v) in [
        ("factor", 8.0),
        ("low_freq_factor", 1.0),
        ("high_freq_factor", 4.0),
        ("original_max_position_embeddings", 64.0),
    ] {
        assert_eq!(rope[k].as_f64(), Some(v), "{k}: {rope}");
    }
    let r = load_st(&gguf_fixture("llama3.reference.safetensors"));
    let m = model::load_frozen(&dir, &Backend::cpu()).unwrap();
    let got = model::forward_ids(m.as_ref(), &ids(&r["long_ids"])).unwrap();
    let n = got.dim(0).unwrap();
    let err = rel_err(&got.narrow(0, n - 16, 16).unwrap(), &r["long_logits"]);
    assert!(err < 1e-4, "logits rel err {err}");
    std::fs::remove_dir_all(&out).ok();
}

/// A SentencePiece vocabulary (Llama 2 / Mistral GGUFs) with scores and no merges: ids and
/// decoded text as transformers' GGUF tokenizer gives them, and BOS added as it adds it.
#[test]
fn gguf_sentencepiece_vocabulary_matches_transformers() {
    let out = tmpdir("gguf-spm");
    let dir = out.join("spm");
    model::gguf::convert(&gguf_fixture("llama-spm.gguf"), &dir).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gguf_fixture("llama-spm.cases.json")).unwrap(),
    )
    .unwrap();
    let tok = pocl::tokenizer::Tokenizer::from_dir(&dir, None).unwrap();
    for c in cases["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "decoded {text:?}"
        );
    }
    let raw = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let w = &cases["with_special"];
    let got = raw.encode(w["text"].as_str().unwrap(), true).unwrap();
    let want: Vec<u32> = serde_json::from_value(w["ids"].clone()).unwrap();
    assert_eq!(got.get_ids(), want, "BOS from the post-processor");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bad_gguf_files_get_one_line_and_nothing_written() {
    let out = tmpdir("gguf-bad");
    let good = std::fs::read(gguf_fixture("qwen2.gguf")).unwrap();
    let truncated = out.join("truncated.gguf");
    std::fs::write(&truncated, &good[..good.len() * 3 / 5]).unwrap();
    let header_only = out.join("header.gguf");
    std::fs::write(&header_only, &good[..100]).unwrap();
    let dest = out.join("converted");
    let d = dest.to_str().unwrap();
    let cases: [(PathBuf, &str); 6] = [
        (truncated, "truncated.gguf"),
        (header_only, "header.gguf"),
        (
            gguf_fixture("unknown-type.gguf"),
            "GGML tensor type 99 is not supported",
        ),
        (
            gguf_fixture("gpt2-arch.gguf"),
            "architecture \"gpt2\" is not supported",
        ),
        (out.join("missing.gguf"), "missing.gguf"),
        (
            gguf_fixture("llama3-bad-rope.gguf"),
            "is not a Llama 3 schedule pocl recognises",
        ),
    ];
    for (file, needle) in &cases {
        assert_one_line_error(
            &["convert", "--gguf", file.to_str().unwrap(), "--out", d],
            needle,
        );
        assert!(!dest.exists(), "{}: something was written", file.display());
    }
    std::fs::remove_dir_all(&out).ok();
}
