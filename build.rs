//! With the `cuda` feature: compiles pocl's CUDA kernels (src/ops/cuda/*.cu) to PTX with the
//! toolkit's nvcc, for `src/ops/cuda.rs` to embed. Without the feature it does nothing, so the
//! CPU build needs no CUDA toolkit. The toolkit comes from tools/cuda-toolkit.sh (see README,
//! "GPU"), which sets NVCC and CUDA_COMPUTE_CAP as candle's own build needs them too.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 6] = ["kd_rows", "optim", "norm", "softmax", "embed", "act"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let dir = PathBuf::from("src/ops/cuda");
    for f in std::fs::read_dir(&dir).expect("src/ops/cuda").flatten() {
        println!("cargo:rerun-if-changed={}", f.path().display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // The GPU generation the PTX targets: plain compute_XX (not 90a), so the driver can JIT it
    // for that GPU and any newer one.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| {
        panic!("CUDA_COMPUTE_CAP is not set (e.g. 90 for H100/H200, 80 for A100); source the exports of tools/cuda-toolkit.sh")
    });
    let cap: u32 = cap
        .trim()
        .trim_start_matches("sm_")
        .trim_end_matches('a')
        .parse()
        .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP = {cap:?} is not a number like 90"));
    for k in KERNELS {
        let src = dir.join(format!("{k}.cu"));
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} ({e}); install the toolkit with tools/cuda-toolkit.sh and source its exports")
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
