//! `pocl cache-teacher`: run the teacher once over a data file and store its top-K targets
//! (`pocl::cache`); `pocl train` with `model.teacher_cache` then reads them.

use anyhow::{Context, Result};
use clap::Args;
use pocl::config::Recipe;
use std::path::PathBuf;

#[derive(Args)]
pub struct CacheTeacherArgs {
    /// Take teacher, student, data and template from this recipe (flags below override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a recipe value: --set section.key=value (repeatable; run.device / run.kernels
    /// choose where the teacher runs).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Teacher model directory.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// The student (its tokenizer encodes the data, its vocabulary bounds the compared width);
    /// default: the teacher.
    #[arg(long)]
    pub student: Option<PathBuf>,
    /// Training data file (JSONL).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Cached tokens per row.
    #[arg(long, default_value_t = pocl::cache::DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Of the --top-k slots, how many hold tokens sampled from the teacher's rest (at the
    /// hottest temperature) instead of the next most probable: the forward KL's rest is then
    /// estimated from them, unbiased at every temperature (README, "Teacher cache"); 0: the
    /// top K and one rest bucket. Default: 16 when the recipe's loss is fkl, else 0.
    #[arg(long)]
    pub sampled_rest: Option<usize>,
    /// Temperatures to store the exact log-sum-exp at (default: the recipe schedule's, exactly).
    #[arg(long, value_delimiter = ',')]
    pub temperatures: Option<Vec<f64>>,
    /// Samples per shard (the unit a killed build resumes from).
    #[arg(long, default_value_t = pocl::cache::DEFAULT_EXAMPLES_PER_SHARD)]
    pub examples_per_shard: usize,
    /// Cache directory (default: the recipe's model.teacher_cache).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: CacheTeacherArgs) -> Result<()> {
    let mut r = match &a.config {
        Some(c) => Recipe::load(c, &a.sets)?,
        None => Recipe::default(),
    };
    if let Some(t) = &a.teacher {
        r.model.teacher = Some(t.clone());
    }
    if let Some(d) = &a.data {
        r.data.train = d.clone();
    }
    if let Some(s) = &a.student {
        r.model.student = s.clone();
    }
    let teacher = r
        .model
        .teacher
        .clone()
        .context("give --teacher DIR (or --config)")?;
    if r.model.student.as_os_str().is_empty() {
        r.model.student = teacher.clone();
    }
    if r.data.train.as_os_str().is_empty() {
        anyhow::bail!("give --data FILE (or --config)");
    }
    let out = a
        .out
        .clone()
        .or(r.model.teacher_cache.clone())
        .context("give --out CACHE_DIR (or model.teacher_cache in the recipe)")?;
    let backend = r.run.backend()?;
    let vocab = pocl::pipeline::kd_vocab_of_dirs(&teacher, &r.model.student)?;
    let started = std::time::Instant::now();
    let (k, temps, eps) = (a.top_k, a.temperatures.clone(), a.examples_per_shard);
    let slots = pocl::cache::Slots {
        top_k: k,
        sampled: a
            .sampled_rest
            .unwrap_or_else(|| pocl::cache::default_sampled(&r).min(k.saturating_sub(1))),
        temperatures: temps,
    };
    pocl::cache::build_for_recipe(&r, &out, vocab, slots, eps, &backend)?;
    eprintln!(
        "teacher cache ready in {} ({:.1} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
