//! `pocl kd-loss`: output format, agreement with the library, the gradient file, and clear
//! errors (exit 1, `error: ...` naming the file and tensor, never a panic).

mod common;
use common::pocl;
mod kd_common;
use kd_common::lcg_logits;
use std::path::{Path, PathBuf};

fn write_tensor(path: &Path, name: &str, data: &[f32], shape: &[usize]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .unwrap();
    std::fs::write(
        path,
        safetensors::tensor::serialize([(name, view)], None).unwrap(),
    )
    .unwrap();
}

fn read_tensor(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    (
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        v.shape().to_vec(),
    )
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-kd-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn kd_loss_prints_the_masked_mean_and_writes_its_gradient() {
    let d = tmpdir("ok");
    let (n, v) = (5, 23);
    let (t, s) = (lcg_logits(1, n * v), lcg_logits(2, n * v));
    let m = [1f32, 0., 1., 1., 0.];
    write_tensor(&d.join("t.safetensors"), "logits", &t, &[n, v]);
    write_tensor(&d.join("s.safetensors"), "logits", &s, &[n, v]);
    write_tensor(&d.join("m.safetensors"), "mask", &m, &[n]);
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let (code, out, err) = pocl(&[
        "kd-loss",
        "--teacher",
        &p("t.safetensors"),
        "--student",
        &p("s.safetensors"),
        "--mask",
        &p("m.safetensors"),
        "--loss",
        "skl",
        "--alpha",
        "0.2",
        "--temperature",
        "2",
        "--output",
        &p("g.safetensors"),
    ]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let got = json["loss"].as_f64().unwrap();

    use candle_core::{Device, Tensor, Var};
    let cpu = Device::Cpu;
    let student = Var::from_vec(s, (n, v), &cpu).unwrap();
    let sum = pocl::kd::kd_loss_sum(
        &Tensor::from_vec(t, (n, v), &cpu).unwrap(),
        student.as_tensor(),
        &Tensor::new(&m, &cpu).unwrap(),
        pocl::kd::Divergence::Skl { alpha: 0.2 },
        2.0,
        true,
    )
    .unwrap();
    let want = (sum / 3.0).unwrap();
    let want_v = want.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - want_v).abs() <= 1e-6 * want_v.abs(),
        "{got} vs {want_v}"
    );
    let gw: Vec<f32> = want
        .backward()
        .unwrap()
        .get(&student)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (g, shape) = read_tensor(&d.join("g.safetensors"), "grad");
    assert_eq!(shape, vec![n, v]);
    assert_eq!(g, gw);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn kd_loss_errors_name_the_file_and_tensor() {
    let d = tmpdir("err");
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    write_tensor(
        &d.join("t.safetensors"),
        "logits",
        &lcg_logits(3, 40),
        &[4, 10],
    );
    write_tensor(
        &d.join("s.safetensors"),
        "logits",
        &lcg_logits(4, 40),
        &[4, 10],
    );
    write_tensor(
        &d.join("wrong.safetensors"),
        "weights",
        &lcg_logits(5, 40),
        &[4, 10],
    );
    write_tensor(
        &d.join("s3.safetensors"),
        "logits",
        &lcg_logits(6, 30),
        &[3, 10],
    );
    write_tensor(
        &d.join("s12.safetensors"),
        "logits",
        &lcg_logits(6, 48),
        &[4, 12],
    );
    write_tensor(&d.join("m.safetensors"), "mask", &[1.0; 3], &[3]);
    std::fs::write(d.join("junk.safetensors"), b"not a safetensors file").unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec![p("missing.safetensors"), p("s.safetensors")],
            vec!["missing.safetensors"],
        ),
        (
            vec![p("junk.safetensors"), p("s.safetensors")],
            vec!["junk.safetensors", "safetensors"],
        ),
        (
            vec![p("wrong.safetensors"), p("s.safetensors")],
            vec!["wrong.safetensors", "'logits'", "weights"],
        ),
        (
            vec![p("t.safetensors"), p("s3.safetensors")],
            vec!["s3.safetensors", "rows"],
        ),
        (
            vec![p("t.safetensors"), p("s12.safetensors")],
            vec!["--teacher-tokenizer"],
        ),
    ];
    for (files, needles) in cases {
        let (code, _, err) = pocl(&[
            "kd-loss",
            "--teacher",
            &files[0],
            "--student",
            &files[1],
            "--loss",
            "fkl",
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.starts_with("error: ") && !err.contains("panicked"),
            "{err}"
        );
        for n in needles {
            assert!(err.contains(n), "expected '{n}' in: {err}");
        }
    }
    let (code, _, err) = pocl(&[
        "kd-loss",
        "--teacher",
        &p("t.safetensors"),
        "--student",
        &p("s.safetensors"),
        "--mask",
        &p("m.safetensors"),
        "--loss",
        "fkl",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("m.safetensors") && err.contains("'mask'"),
        "{err}"
    );
    let (code, _, err) = pocl(&[
        "kd-loss",
        "--teacher",
        &p("t.safetensors"),
        "--student",
        &p("s.safetensors"),
        "--loss",
        "kl",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("fkl, rkl, jsd, tvd, skl, srkl"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}
