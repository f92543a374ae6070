//! `pocl bench cache-fidelity`: how far the teacher cache's sparse loss (top-K + rest, through
//! the cache's own f16 encoding) is from the full-vocabulary loss, per K, temperature and
//! divergence, on a recipe's teacher, student and data.

use anyhow::{Context, Result};
use clap::Args;
use pocl::cache::measure_fidelity;
use pocl::config::Recipe;
use pocl::kd::Divergence;
use std::path::PathBuf;

#[derive(Args)]
pub struct FidelityArgs {
    /// A recipe (a run directory's recipe.toml works): teacher, student, data, template.
    #[arg(long)]
    pub config: PathBuf,
    /// Values of K to measure.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64,128")]
    pub ks: Vec<usize>,
    /// Of each K, how many slots hold tokens sampled from the rest (`cache-teacher
    /// --sampled-rest`): measured as K − M top tokens + M samples.
    #[arg(long, default_value_t = 0)]
    pub sampled_rest: usize,
    /// Samples of the training file to measure on.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
}

pub fn run(a: FidelityArgs) -> Result<()> {
    let r = Recipe::load(&a.config, &[])?;
    let backend = r.run.backend()?;
    let tdir = r.model.teacher.clone().context("model.teacher: required")?;
    let vocab = pocl::pipeline::kd_vocab_of_dirs(&tdir, &r.model.student)?;
    let teacher = pocl::pipeline::load_teacher(&tdir, r.model.teacher_dtype, &backend)?;
    let student = pocl::model::load_frozen(&r.model.student, &backend)?;
    let tok = pocl::tokenizer::Tokenizer::from_dir(&r.model.student, None)?;
    use pocl::train::splits;
    let samples = splits::read_recipe_samples(&r, &r.data.train)?;
    let (ex, _) = splits::encode(&tok, &samples, &splits::encode_options(&r)?, "data")?;
    let ex = &ex[..a.samples.min(ex.len())];
    let temps = pocl::cache::schedule_temperatures(&r);
    let divs: Vec<Divergence> = pocl::kd::DIVERGENCE_NAMES
        .iter()
        .map(|n| Divergence::parse(n, None, None))
        .collect::<Result<_>>()?;
    for &k in &a.ks {
        let k = k.min(vocab);
        let errs = measure_fidelity(
            teacher.as_ref(),
            student.as_ref(),
            ex,
            vocab,
            k,
            a.sampled_rest.min(k.saturating_sub(1)),
            &temps,
            &divs,
        )?;
        for (t, errs) in temps.iter().zip(errs) {
            let errs: serde_json::Map<String, serde_json::Value> = (divs.iter())
                .zip(errs)
                .map(|(d, e)| (d.name().to_string(), e.into()))
                .collect();
            println!(
                "{}",
                serde_json::json!({"bench": "cache-fidelity", "k": k, "sampled_rest": a.sampled_rest.min(k.saturating_sub(1)), "temperature": t, "samples": ex.len(), "relative_error": errs})
            );
        }
    }
    Ok(())
}
