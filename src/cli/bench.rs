//! `pocl bench`: the standard workloads of `../shared/bench/peer_torch.py`, measured the same way
//! (warm-up, then the mean of several repetitions; one JSON line per measurement with the peer's
//! field names), so ratios against PyTorch come from one machine in one sitting.

use anyhow::Result;
use clap::{Args, Subcommand};
use pocl::backend::{Backend, StudentPrecision};
use pocl::cache::{build, BuildOptions, Identity, SparseTeacher, TeacherCache};
use pocl::data::{collate, Example};
use pocl::kd::{Divergence, Mix, Objective};
use pocl::model::config::ModelConfig;
use pocl::model::generate::{generate, GenerationConfig};
use pocl::model::init::{build_student, build_with, config_json, Shape};
use pocl::model::{CausalLm, Matrices};
use pocl::pipeline::Precision;
use pocl::train::optim::{AdamW, AdamWConfig};
use pocl::train::step::{self, Phase};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Instant;

const VOCAB: usize = 50257;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One KD optimiser step, fkl, clip, AdamW. `--workload standard`: GPT-2-small teacher (124M)
    /// -> 6-layer d=512 student, batch 4 x 128. `--workload large` (peer_torch.py kd-step-large,
    /// for GPUs): GPT-2-XL-shape bf16 teacher (1.56B) -> GPT-2-shape student (124M), 16 x 512.
    KdStep(BenchArgs),
    /// The teacher cache's loss against the full-vocabulary loss, per K and temperature, on a
    /// recipe's models and data (relative error of the summed loss, per divergence).
    CacheFidelity(super::cache_fidelity::FidelityArgs),
    /// Greedy decoding of the standard student: 32-token prompt, 96 new tokens, batch 1 and 8.
    Generate(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed repetitions after the warm-up.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// kd-step: the teacher's matrices in "f32" or "bf16" (recipe key model.teacher_dtype);
    /// default as the peer: f32 for the standard workload, bf16 for the large one.
    #[arg(long, value_enum)]
    pub teacher_dtype: Option<Precision>,
    /// kd-step: the student's linear layers in "f32" or "bf16-mixed" (torch.autocast's bf16
    /// products, f32 master weights; recipe key model.student_precision); default: the
    /// device's (f32 on the CPU, bf16-mixed on a GPU, as the peer's autocast student).
    #[arg(long, value_enum)]
    pub student_precision: Option<StudentPrecision>,
    /// kd-step: the model pair and batch (see the command's help).
    #[arg(long, value_enum, default_value_t = Workload::Standard)]
    pub workload: Workload,
    /// generate: the decoded model's matrices in "f32" (as the peer) or "bf16" (frozen, packed).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// kd-step: read the teacher's top-64 targets from a teacher cache (built first, in a
    /// temporary directory) instead of running the teacher; the teacher is dropped before the
    /// timed steps and the peak-RSS mark is reset, so max_rss_mib is without the teacher.
    #[arg(long)]
    pub teacher_cache: bool,
    /// kd-step: also time each model op (`ops::profile`: the forward ops, the backward of
    /// pocl's CPU ops, the parts of the fused KD head; the device is synchronised around every
    /// op, so the step itself runs slower) and print the seconds per step by phase and op as
    /// "profile"; "other" is the rest of the phase (candle's own ops, autograd).
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

/// The kd-step workloads of `../shared/bench/peer_torch.py`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// kd-step: the CPU-sized pair.
    Standard,
    /// kd-step-large: the paper's GPT-2 XL -> GPT-2 pair at its batch size (a GPU workload; it
    /// runs on the CPU too, slowly, and needs ~12 GB of memory there).
    Large,
}

/// A kd-step workload's numbers: (hidden, layers, heads) of teacher and student, batch,
/// sequence length, prompt tokens per sequence (masked), the teacher's default dtype, and the
/// JSON `bench` name (the peer's).
struct KdWorkload {
    teacher: (usize, usize, usize),
    student: (usize, usize, usize),
    batch: usize,
    seq: usize,
    prompt: usize,
    max_positions: usize,
    teacher_dtype: Precision,
    name: &'static str,
}

impl Workload {
    fn kd(self) -> KdWorkload {
        match self {
            Workload::Standard => KdWorkload {
                teacher: (768, 12, 12),
                student: (512, 6, 8),
                batch: 4,
                seq: 128,
                prompt: 32,
                max_positions: 512,
                teacher_dtype: Precision::F32,
                name: "kd-step",
            },
            // peer_torch.py: n_positions 1024, 16 x 512, mask[:, :128] = 0.
            Workload::Large => KdWorkload {
                teacher: (1600, 48, 25),
                student: (768, 12, 12),
                batch: 16,
                seq: 512,
                prompt: 128,
                max_positions: 1024,
                teacher_dtype: Precision::Bf16,
                name: "kd-step-large",
            },
        }
    }
}

fn gpt2(
    (hidden, layers, heads): (usize, usize, usize),
    max_positions: usize,
    seed: u64,
    frozen: bool,
    matrices: Matrices,
    backend: &Backend,
) -> Result<Box<dyn CausalLm>> {
    let config = gpt2_config((hidden, layers, heads), max_positions)?;
    build_with(config, seed, frozen, matrices, backend)
}

fn gpt2_config(
    (hidden, layers, heads): (usize, usize, usize),
    max_positions: usize,
) -> Result<ModelConfig> {
    let shape = Shape {
        hidden,
        layers,
        heads,
        kv_heads: heads,
        intermediate: 0,
        max_positions,
    };
    ModelConfig::from_json(config_json("gpt2", &shape, VOCAB, 50256)?)
}

fn max_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// MiB of device memory in use on a GPU (total − free, as the driver counts it); None on the
/// CPU.
fn gpu_used_mib(dev: &candle_core::Device) -> Option<f64> {
    match dev {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some((total - free) as f64 / (1 << 20) as f64)
        }
        _ => None,
    }
}

fn random_ids(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect()
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let a = match cmd {
        BenchCommand::CacheFidelity(f) => return super::cache_fidelity::run(f),
        BenchCommand::KdStep(ref a) | BenchCommand::Generate(ref a) => a,
    };
    let threads = a.threads.unwrap_or_else(num_cpus_or_2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let backend = a.device.backend()?;
    let dev = &backend.device;
    match cmd {
        BenchCommand::KdStep(a) => {
            let w = a.workload.kd();
            let teacher_dtype = a.teacher_dtype.unwrap_or(w.teacher_dtype);
            let matrices = pocl::pipeline::teacher_matrices(teacher_dtype);
            let teacher = gpt2(w.teacher, w.max_positions, 1, true, matrices, &backend)?;
            let student_precision = backend.student_precision(a.student_precision);
            let student = build_student(
                gpt2_config(w.student, w.max_positions)?,
                2,
                student_precision,
                &backend,
            )?;
            let (b, t) = (w.batch, w.seq);
            // Sequences of t + 1 tokens, the first `prompt` + 1 of them the prompt: rows
            // prompt..t-1 of each sequence count (standard: 32..127; large: 128..511).
            let examples: Vec<Example> = (0..b as u64)
                .map(|id| Example {
                    id,
                    prompt_ids: random_ids(&mut rng, w.prompt + 1),
                    response_ids: random_ids(&mut rng, t - w.prompt),
                })
                .collect();
            // One micro-batch of the whole batch, through training's own step.
            let micro = [collate(&examples.iter().collect::<Vec<_>>(), 0)?.to_device(dev)?];
            let mut teacher = Some(teacher);
            let cache_dir =
                std::env::temp_dir().join(format!("pocl-bench-cache-{}", std::process::id()));
            let cache = if a.teacher_cache {
                let identity = Identity {
                    teacher: "bench".into(),
                    tokenizer: "bench".into(),
                    data: "bench".into(),
                    template: "bench".into(),
                    vocab: VOCAB,
                    top_k: pocl::cache::DEFAULT_TOP_K,
                    sampled: 0,
                    temperatures: vec![1.0],
                };
                std::fs::remove_dir_all(&cache_dir).ok();
                let opts = BuildOptions {
                    identity: identity.clone(),
                    examples_per_shard: b,
                    batch_size: b,
                    pad_id: 0,
                };
                build(
                    &cache_dir,
                    teacher.as_deref().expect("loaded"),
                    &examples,
                    &opts,
                )?;
                teacher = None;
                // Linux: "5" resets the peak-RSS mark (VmHWM), so the teacher's pages do not count.
                std::fs::write("/proc/self/clear_refs", "5").ok();
                Some(TeacherCache::open(&cache_dir, &identity)?)
            } else {
                None
            };
            let models = step::Models {
                student: student.as_ref(),
                teacher: teacher.as_deref(),
                sparse_teacher: cache.as_ref().map(|c| c as &dyn SparseTeacher),
                objective: Objective {
                    kernels: backend.kernels,
                    ..Objective::new(Divergence::Fkl)
                },
                kd_vocab: VOCAB,
            };
            let mix = Mix {
                temperature: 1.0,
                kd_weight: 1.0,
            };
            let mut opt = AdamW::new(
                student.params().iter(),
                AdamWConfig {
                    lr: 1e-4,
                    weight_decay: 0.01,
                    ..Default::default()
                },
                backend.kernels,
            )?;
            // Seconds per phase, summed over the timed steps (the breakdown in the JSON line).
            let mut phases = [0f64; 5];
            // With --profile: seconds per (phase, op), summed over the timed steps.
            let mut by_op: Vec<BTreeMap<&'static str, f64>> = vec![BTreeMap::new(); 5];
            let mut seen = BTreeMap::new();
            pocl::ops::profile::enable(a.profile);
            // The most device memory seen in use after any phase (GPU only).
            let mut gpu_mib = 0f64;
            let mut timed_step = |phases: &mut [f64; 5],
                                  by_op: &mut Vec<BTreeMap<&'static str, f64>>,
                                  gpu_mib: &mut f64|
             -> Result<()> {
                let mut clock = Instant::now();
                // A failed synchronisation (a kernel fault) is kept and reported after the step.
                let mut sync_error = None;
                let mut lap = |p: Phase| {
                    // A GPU runs the phase's kernels asynchronously: the phase ends when they do.
                    if let Err(e) = dev.synchronize() {
                        sync_error.get_or_insert(e);
                    }
                    phases[p as usize] += clock.elapsed().as_secs_f64();
                    *gpu_mib = gpu_mib.max(gpu_used_mib(dev).unwrap_or(0.0));
                    if a.profile {
                        // What the ops added since the last phase ended is this phase's.
                        for (op, (secs, _)) in pocl::ops::profile::totals() {
                            let before = seen.insert(op, secs).unwrap_or(0.0);
                            *by_op[p as usize].entry(op).or_insert(0.0) += secs - before;
                        }
                    }
                    clock = Instant::now();
                };
                step::optimizer_step(&models, &mut opt, &micro, mix, 1e-4, 1.0, &mut lap)?;
                if let Some(e) = sync_error {
                    return Err(e.into());
                }
                // A GPU runs the step's last kernels asynchronously: the step ends when they do.
                dev.synchronize()?;
                Ok(())
            };
            for _ in 0..2 {
                timed_step(&mut phases, &mut by_op, &mut gpu_mib)?;
            }
            phases = [0.0; 5];
            by_op.iter_mut().for_each(|m| m.clear());
            gpu_mib = 0.0;
            pocl::backend::reset_peak_memory(dev);
            let t0 = Instant::now();
            for _ in 0..a.reps {
                timed_step(&mut phases, &mut by_op, &mut gpu_mib)?;
            }
            pocl::ops::profile::enable(false);
            let breakdown: serde_json::Map<String, serde_json::Value> = Phase::ALL
                .iter()
                .map(|p| p.name())
                .zip(phases)
                .map(|(n, s)| {
                    (
                        n.to_string(),
                        ((s / a.reps as f64 * 1e3).round() / 1e3).into(),
                    )
                })
                .collect();
            let dt = t0.elapsed().as_secs_f64() / a.reps as f64;
            let mut line = serde_json::json!({"peer": format!("pocl {}", env!("CARGO_PKG_VERSION")), "bench": w.name, "threads": threads, "teacher_dtype": teacher_dtype, "student_precision": student_precision.to_string(), "teacher_cache": a.teacher_cache, "backend": backend.label(), "kernel": kernel_label(matrices, &backend)?,
                    "seconds_per_step": (dt * 1e4).round() / 1e4, "tokens_per_second": ((b * t) as f64 / dt * 10.0).round() / 10.0,
                    "max_rss_mib": max_rss_mib().round(), "phase_seconds": breakdown});
            if a.profile {
                let per_step = |s: f64| (s / a.reps as f64 * 1e4).round() / 1e4;
                let mut profile = serde_json::Map::new();
                for (p, ops) in Phase::ALL.iter().zip(&by_op) {
                    let mut m: serde_json::Map<String, serde_json::Value> = ops
                        .iter()
                        .map(|(op, s)| (op.to_string(), per_step(*s).into()))
                        .collect();
                    let other = phases[*p as usize] - ops.values().sum::<f64>();
                    m.insert("other".into(), per_step(other).into());
                    profile.insert(p.name().into(), m.into());
                }
                line["profile"] = profile.into();
            }
            if let Some(peak) = pocl::backend::peak_memory(dev) {
                // As the peer's torch.cuda.max_memory_allocated over its timed steps: the most
                // memory pocl's tensors held at once.
                line["max_gpu_mib"] = (peak as f64 / (1 << 20) as f64).round().into();
                line["gpu_mib_source"] =
                    "the CUDA memory pool's high-water mark over the timed steps".into();
            }
            if !dev.is_cpu() {
                // The driver's count for the whole GPU (context, cuBLAS workspaces and the
                // pool's reserve included), sampled after each phase.
                line["max_gpu_device_mib"] = gpu_mib.round().into();
            }
            println!("{line}");
            std::fs::remove_dir_all(&cache_dir).ok();
        }
        BenchCommand::CacheFidelity(_) => unreachable!("handled above"),
        BenchCommand::Generate(a) => {
            // As `pocl generate` loads a model (`pipeline::load_frozen`).
            let matrices = pocl::pipeline::frozen_matrices(a.dtype);
            let student = gpt2((512, 6, 8), 512, 2, true, matrices, &backend)?;
            for bs in [1usize, 8] {
                let prompts: Vec<Vec<u32>> = (0..bs).map(|_| random_ids(&mut rng, 32)).collect();
                // No EOS: every row produces all 96 tokens, as min_new_tokens does for the peer.
                let cfg = GenerationConfig::greedy(96, vec![]);
                generate(student.as_ref(), &prompts, &cfg)?;
                let t0 = Instant::now();
                for _ in 0..a.reps {
                    generate(student.as_ref(), &prompts, &cfg)?;
                }
                let dt = t0.elapsed().as_secs_f64() / a.reps as f64;
                println!(
                    "{}",
                    serde_json::json!({"peer": format!("pocl {}", env!("CARGO_PKG_VERSION")), "bench": "generate", "batch": bs, "dtype": a.dtype, "backend": backend.label(), "kernel": kernel_label(matrices, &backend)?,
                        "threads": threads, "new_tokens_per_second": ((bs * 96) as f64 / dt * 10.0).round() / 10.0,
                        "max_rss_mib": max_rss_mib().round()})
                );
            }
        }
    }
    Ok(())
}

/// What multiplies the matrices kept as `matrices`: the bf16 kernel chosen for this CPU
/// (`ops::bf16::selected_kernel`: "amx", "avx512bf16", "f32-widen" or "portable") for bf16 on
/// pocl's fused CPU kernels, "bf16-tensor" for bf16 on the portable backend (candle's matmul),
/// "f32-packed" for a teacher's f32 panels (`ops::bf16::Element::F32`), "f32" for f32 tensors.
fn kernel_label(matrices: Matrices, backend: &Backend) -> Result<&'static str> {
    use pocl::backend::Kernels;
    Ok(match (matrices, backend.kernels) {
        (Matrices::Bf16, Kernels::Fused) => pocl::ops::bf16::selected_kernel()?.name(),
        (Matrices::Bf16, Kernels::Portable) => "bf16-tensor",
        (Matrices::Bf16, Kernels::Cuda) => "bf16-cuda",
        (m, k) if m.packs_f32(k) => "f32-packed",
        _ => "f32",
    })
}

fn num_cpus_or_2() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
