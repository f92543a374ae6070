//! What the autograd graph keeps alive between a student's forward and its backward, counted by
//! a global allocator on the CPU (the graph is device-independent: the same tensors stay alive
//! on a GPU). The CUDA kernel set's ops recompute their intermediates in the backward
//! (`ops::recompute`), so a GPT-2 layer keeps its activations only: no [b, h, t, t] scores or
//! probabilities, no bf16 copies, not the MLP's product before its activation. The portable
//! composition, kept as the reference, keeps those; measuring it shows the count can see them.

use candle_core::{DType, Device, Tensor};
use pocl::backend::{Backend, Kernels, StudentPrecision};
use pocl::model::config::ModelConfig;
use pocl::model::init::{build_student, config_json, Shape};
use pocl::model::Input;

#[path = "../benches/common/counting_alloc.rs"]
#[allow(dead_code)]
mod counting_alloc;
use counting_alloc::Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

const B: usize = 2;
const T: usize = 256;
const D: usize = 32;
const HEADS: usize = 4;

/// Bytes kept by the graph after the forward of a GPT-2 student with `layers` layers.
fn kept(layers: usize, kernels: Kernels, precision: StudentPrecision) -> isize {
    let shape = Shape {
        hidden: D,
        layers,
        heads: HEADS,
        kv_heads: HEADS,
        intermediate: 4 * D,
        max_positions: T,
    };
    let config = ModelConfig::from_json(config_json("gpt2", &shape, 64, 0).unwrap()).unwrap();
    let model = build_student(config, 7, precision, &Backend::cpu_with(kernels)).unwrap();
    let ids: Vec<u32> = (0..B * T).map(|i| (i * 7 % 64) as u32).collect();
    let ids = Tensor::from_vec(ids, (B, T), &Device::Cpu).unwrap();
    let positions: Vec<u32> = (0..B * T).map(|i| (i % T) as u32).collect();
    let positions = Tensor::from_vec(positions, (B, T), &Device::Cpu).unwrap();
    let mask = Tensor::ones((B, T), DType::U32, &Device::Cpu).unwrap();
    let input = Input {
        ids: &ids,
        positions: &positions,
        key_mask: &mask,
    };
    let before = counting_alloc::live();
    let loss = model
        .hidden(&input, None)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let kept = counting_alloc::live() - before;
    // The backward runs from what was kept.
    let grads = model.params().grads(&loss.backward().unwrap()).unwrap();
    assert!(
        grads.iter().all(Option::is_some),
        "{kernels:?}: a parameter got no gradient"
    );
    kept
}

/// Bytes kept per layer: the difference between a 3-layer and a 1-layer model, halved, after a
/// first run has made the matmul's per-thread packing buffers (they stay allocated).
fn per_layer(kernels: Kernels, precision: StudentPrecision) -> f64 {
    kept(1, kernels, precision);
    (kept(3, kernels, precision) - kept(1, kernels, precision)) as f64 / 2.0
}

/// One test, so that no other test allocates while the count runs.
#[test]
fn the_cuda_kernel_set_keeps_activations_only() {
    let unit = (B * T * D * 4) as f64; // one [b, t, d] f32 tensor
    let scores = (B * HEADS * T * T * 4) as f64; // one [b, h, t, t] f32 tensor = 32 units
    for precision in [StudentPrecision::Bf16Mixed, StudentPrecision::F32] {
        let cuda = per_layer(Kernels::Cuda, precision);
        let portable = per_layer(Kernels::Portable, precision);
        eprintln!(
            "{precision:?}: per layer, cuda {:.1} units, portable {:.1} units ({} B a unit)",
            cuda / unit,
            portable / unit,
            unit
        );
        // The instrument sees the portable composition's scores and probabilities.
        assert!(
            portable > 2.0 * scores,
            "{precision:?}: portable {portable}"
        );
        // A GPT-2 layer keeps 14 units: each norm's output 1, qkv 3, attention 1, the
        // projections 1 each, GELU's output 4 (fc's is recomputed), the two residual sums 1
        // each. Nothing of [b, h, t, t] size, no bf16 copy.
        let budget = 14.5;
        assert!(
            cuda <= budget * unit,
            "{precision:?}: cuda keeps {} units",
            cuda / unit
        );
    }
}
