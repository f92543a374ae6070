//! `pocl bench cache-fidelity`: how far the teacher cache's sparse loss (top-K + rest, through
//! the cache's own f16 encoding) is from the full-vocabulary loss, per K, temperature and
//! divergence, on a recipe's teacher, student and data.

use anyhow::{Context, Result};
use clap::Args;
use pocl::cache::{LiveSparse, SparseTeacher};
use pocl::config::Recipe;
use pocl::data::{collate, counted_rows};
use pocl::kd::divergence::{divergence_row, RowScratch};
use pocl::kd::sparse::sparse_divergence_row;
use pocl::kd::Divergence;
use pocl::model::Input;
use std::path::PathBuf;

#[derive(Args)]
pub struct FidelityArgs {
    /// A recipe (a run directory's recipe.toml works): teacher, student, data, template.
    #[arg(long)]
    pub config: PathBuf,
    /// Values of K to measure.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64,128")]
    pub ks: Vec<usize>,
    /// Samples of the training file to measure on.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
}

pub fn run(a: FidelityArgs) -> Result<()> {
    let r = Recipe::load(&a.config, &[])?;
    let backend = r.run.backend()?;
    let tdir = r.model.teacher.clone().context("model.teacher: required")?;
    let vocab = pocl::pipeline::kd_vocab_of_dirs(&tdir, &r.model.student)?;
    let teacher = pocl::model::load_frozen(&tdir, &backend)?;
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
    // Per (K, T, divergence): (Σ sparse, Σ dense) over every counted token.
    for &k in &a.ks {
        let k = k.min(vocab);
        for &t in &temps {
            let mut sums = vec![(0.0, 0.0); divs.len()];
            let live = LiveSparse {
                teacher: teacher.as_ref(),
                vocab,
                top_k: k,
            };
            for e in ex {
                let b = collate(&[e], 0)?.to_device(&backend.device)?;
                let targets = live.targets(&b, t)?;
                let input = Input {
                    ids: &b.input_ids,
                    positions: &b.position_ids,
                    key_mask: &b.attention_mask,
                };
                let tl = teacher.logits(&input, None)?.narrow(2, 0, vocab)?.get(0)?;
                let sl = student.logits(&input, None)?.narrow(2, 0, vocab)?.get(0)?;
                let mut sc = RowScratch::new(vocab);
                for (row, i) in counted_rows(e).enumerate() {
                    let (z, s) = (tl.get(i)?.to_vec1::<f32>()?, sl.get(i)?.to_vec1::<f32>()?);
                    for (d, sum) in divs.iter().zip(sums.iter_mut()) {
                        let sp = sparse_divergence_row(
                            *d,
                            targets.row(row),
                            &s,
                            1.0 / t,
                            &mut sc,
                            None,
                        )?;
                        let de = divergence_row(*d, &z, &s, 1.0 / t, &mut sc, None)?;
                        sum.0 += sp;
                        sum.1 += de;
                    }
                }
            }
            let errs: serde_json::Map<String, serde_json::Value> = divs
                .iter()
                .zip(&sums)
                .map(|(d, (sp, de))| (d.name().to_string(), ((sp - de) / de).abs().into()))
                .collect();
            println!(
                "{}",
                serde_json::json!({"bench": "cache-fidelity", "k": k, "temperature": t, "samples": ex.len(), "relative_error": errs})
            );
        }
    }
    Ok(())
}
