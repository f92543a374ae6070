//! Benchmark (not a timed test): the memory a GPT-2 student's autograd graph holds at the paper's
//! shape (GPT-2 124M, 16 x 512 tokens), counted on the CPU by a global allocator: the bytes kept
//! between the forward and the backward, and the peaks of both. The graph is device-independent,
//! so the CUDA kernel set run on the CPU (its ops' CPU sides) keeps what it keeps on a GPU.
//! One JSON line. About 80 s and 6 GB of memory with the CUDA set; the portable set needs ~70 GB.
//!
//! Run: cargo bench --bench student_memory [-- --kernels cuda|fused|portable]
//!      [--precision bf16-mixed|f32] [--batch 16] [--tokens 512]

use candle_core::{DType, Device, Tensor};
use pocl::backend::{Backend, Kernels, StudentPrecision};
use pocl::model::config::ModelConfig;
use pocl::model::init::{build_student, config_json, Shape};
use pocl::model::Input;

mod common;
use common::arg;
use common::counting_alloc::{self, Counting};

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let kernels = match arg("--kernels", "cuda".to_string()).as_str() {
        "cuda" => Kernels::Cuda,
        "fused" => Kernels::Fused,
        "portable" => Kernels::Portable,
        other => panic!("--kernels {other}: expected cuda, fused or portable"),
    };
    let precision: StudentPrecision = arg("--precision", "bf16-mixed".to_string())
        .parse()
        .expect("--precision bf16-mixed or f32");
    let (b, t) = (arg("--batch", 16usize), arg("--tokens", 512usize));
    let shape = Shape {
        hidden: 768,
        layers: 12,
        heads: 12,
        kv_heads: 12,
        intermediate: 3072,
        max_positions: 1024.max(t),
    };
    let config =
        ModelConfig::from_json(config_json("gpt2", &shape, 50257, 50256).unwrap()).unwrap();
    let model = build_student(config, 7, precision, &Backend::cpu_with(kernels)).unwrap();
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 50257) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let positions = Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap();
    let input = Input {
        ids: &ids,
        positions: &positions,
        key_mask: &mask,
    };
    let base = counting_alloc::reset_peak();
    let t0 = std::time::Instant::now();
    let loss = model
        .hidden(&input, None)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let kept = counting_alloc::live() - base;
    let forward_peak = counting_alloc::peak() - base;
    let grads = loss.backward().unwrap();
    let backward_peak = counting_alloc::peak() - base;
    drop(grads);
    let gb = |x: isize| (x as f64 / 1e7).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({"bench": "student_memory", "kernels": format!("{kernels:?}"),
            "precision": precision.to_string(), "batch": b, "tokens": t,
            "kept_after_forward_gb": gb(kept), "forward_peak_gb": gb(forward_peak),
            "backward_peak_gb": gb(backward_peak), "seconds": t0.elapsed().as_secs_f64().round()})
    );
}
