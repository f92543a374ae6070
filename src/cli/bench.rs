//! `pocl bench`: the standard workloads of `../shared/bench/peer_torch.py`, measured the same way
//! (warm-up, then the mean of several repetitions; one JSON line per measurement with the peer's
//! field names), so ratios against PyTorch come from one machine in one sitting.

use anyhow::Result;
use clap::{Args, Subcommand};
use pocl::backend::Backend;
use pocl::cache::{build, BuildOptions, Identity, SparseTeacher, TeacherCache};
use pocl::data::{collate, Example};
use pocl::kd::{Divergence, Mix, Objective};
use pocl::model::config::ModelConfig;
use pocl::model::generate::{generate, GenerationConfig};
use pocl::model::init::{build_with, config_json, Shape};
use pocl::model::CausalLm;
use pocl::pipeline::Precision;
use pocl::train::optim::{AdamW, AdamWConfig};
use pocl::train::step::{self, Phase};
use rand::{Rng, SeedableRng};
use std::time::Instant;

const VOCAB: usize = 50257;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One KD optimiser step: GPT-2-small teacher (124M) -> 6-layer d=512 student, batch 4 x 128, fkl.
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
    /// kd-step: the teacher's matrices in "f32" (as the peer) or "bf16" (recipe key
    /// model.teacher_dtype). The student is f32 either way.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub teacher_dtype: Precision,
    /// generate: the decoded model's matrices in "f32" (as the peer) or "bf16" (frozen, packed).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// kd-step: read the teacher's top-64 targets from a teacher cache (built first, in a
    /// temporary directory) instead of running the teacher; the teacher is dropped before the
    /// timed steps and the peak-RSS mark is reset, so max_rss_mib is without the teacher.
    #[arg(long)]
    pub teacher_cache: bool,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

fn gpt2(
    hidden: usize,
    layers: usize,
    heads: usize,
    seed: u64,
    frozen: bool,
    bf16: bool,
    backend: &Backend,
) -> Result<Box<dyn CausalLm>> {
    let shape = Shape {
        hidden,
        layers,
        heads,
        kv_heads: heads,
        intermediate: 0,
        max_positions: 512,
    };
    build_with(
        ModelConfig::from_json(config_json("gpt2", &shape, VOCAB, 50256)?)?,
        seed,
        frozen,
        bf16,
        backend,
    )
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
            let bf16 = a.teacher_dtype == Precision::Bf16;
            let teacher = gpt2(768, 12, 12, 1, true, bf16, &backend)?;
            let student = gpt2(512, 6, 8, 2, false, false, &backend)?;
            let (b, t) = (4, 128);
            // Prompts of 33 tokens and responses of 96: rows 32..127 of each sequence count.
            let examples: Vec<Example> = (0..b as u64)
                .map(|id| Example {
                    id,
                    prompt_ids: random_ids(&mut rng, 33),
                    response_ids: random_ids(&mut rng, t + 1 - 33),
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
            let mut timed_step = |phases: &mut [f64; 5]| -> Result<()> {
                let mut clock = Instant::now();
                let mut lap = |p: Phase| {
                    phases[p as usize] += clock.elapsed().as_secs_f64();
                    clock = Instant::now();
                };
                step::optimizer_step(&models, &mut opt, &micro, mix, 1e-4, 1.0, &mut lap)?;
                Ok(())
            };
            for _ in 0..2 {
                timed_step(&mut phases)?;
            }
            phases = [0.0; 5];
            let t0 = Instant::now();
            for _ in 0..a.reps {
                timed_step(&mut phases)?;
            }
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
            println!(
                "{}",
                serde_json::json!({"peer": format!("pocl {}", env!("CARGO_PKG_VERSION")), "bench": "kd-step", "threads": threads, "teacher_dtype": a.teacher_dtype, "teacher_cache": a.teacher_cache, "backend": backend.label(), "kernel": kernel_label(a.teacher_dtype, &backend)?,
                    "seconds_per_step": (dt * 1e4).round() / 1e4, "tokens_per_second": ((b * t) as f64 / dt * 10.0).round() / 10.0,
                    "max_rss_mib": max_rss_mib().round(), "phase_seconds": breakdown})
            );
            std::fs::remove_dir_all(&cache_dir).ok();
        }
        BenchCommand::CacheFidelity(_) => unreachable!("handled above"),
        BenchCommand::Generate(a) => {
            let student = gpt2(512, 6, 8, 2, true, a.dtype == Precision::Bf16, &backend)?;
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
                    serde_json::json!({"peer": format!("pocl {}", env!("CARGO_PKG_VERSION")), "bench": "generate", "batch": bs, "dtype": a.dtype, "backend": backend.label(), "kernel": kernel_label(a.dtype, &backend)?,
                        "threads": threads, "new_tokens_per_second": ((bs * 96) as f64 / dt * 10.0).round() / 10.0,
                        "max_rss_mib": max_rss_mib().round()})
                );
            }
        }
    }
    Ok(())
}

/// What multiplies the matrices that are in `precision`: the bf16 kernel chosen for this CPU
/// (`ops::bf16::selected_kernel`: "amx", "avx512bf16", "f32-widen" or "portable") for bf16 on
/// pocl's fused CPU kernels, "bf16-tensor" for bf16 on the portable backend (candle's matmul),
/// "f32" for f32 weights.
fn kernel_label(precision: Precision, backend: &Backend) -> Result<&'static str> {
    Ok(match (precision, backend.kernels) {
        (Precision::Bf16, pocl::backend::Kernels::Fused) => {
            pocl::ops::bf16::selected_kernel()?.name()
        }
        (Precision::Bf16, pocl::backend::Kernels::Portable) => "bf16-tensor",
        _ => "f32",
    })
}

fn num_cpus_or_2() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
