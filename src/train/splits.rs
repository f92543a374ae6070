//! The tokenized train and dev sets a recipe names (the dev set split off the training file,
//! seeded, when the recipe gives none). Skipped and truncated samples are reported, never hidden.

use crate::config::Recipe;
use crate::data::{
    encode_samples, load_jsonl, seeded_split, EncodeOptions, Example, Format, LoadOptions, Sample,
    Template,
};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::Path;

pub struct Splits {
    pub train: Vec<Example>,
    /// Acceptable answers of each training example (for the difficulty measurer).
    pub train_references: Vec<Vec<String>>,
    pub dev: Vec<Example>,
    pub dev_references: Vec<Vec<String>>,
}

pub fn encode_options(recipe: &Recipe) -> Result<EncodeOptions> {
    let d = &recipe.data;
    let template: Template = d.template.parse().context("data.template")?;
    Ok(EncodeOptions {
        template,
        max_prompt_len: d.max_prompt_len,
        max_len: d.max_len,
    })
}

pub fn load_options(recipe: &Recipe) -> Result<LoadOptions> {
    let format = match recipe.data.format.as_str() {
        "auto" => None,
        f => Some(f.parse::<Format>().context("data.format")?),
    };
    Ok(LoadOptions {
        format,
        skip_bad: recipe.data.skip_bad,
    })
}

/// Reads a data file, reporting skipped records on stderr.
pub fn read_samples(path: &Path, opts: LoadOptions) -> Result<Vec<Sample>> {
    let loaded = load_jsonl(path, opts)?;
    if let Some(s) = loaded.skipped_summary() {
        eprintln!("{}: {s}", path.display());
    }
    Ok(loaded.samples)
}

/// A recipe's data file read and readied for its template (the chat template of the student,
/// whose tokenizer encodes the data).
pub fn read_recipe_samples(recipe: &Recipe, path: &Path) -> Result<Vec<Sample>> {
    let mut samples = read_samples(path, load_options(recipe)?)?;
    let template = encode_options(recipe)?.template;
    let system = recipe.data.system.as_deref();
    crate::data::chat::prepare(&mut samples, template, system, &recipe.model.student, path)?;
    Ok(samples)
}

/// Tokenizes samples; returns the examples and the references of each, in the same order.
pub fn encode(
    tok: &Tokenizer,
    samples: &[Sample],
    opts: &EncodeOptions,
    what: &str,
) -> Result<(Vec<Example>, Vec<Vec<String>>)> {
    let enc = encode_samples(tok, samples, opts)?;
    if let Some(s) = enc.summary() {
        eprintln!("{what}: {s}");
    }
    if enc.examples.is_empty() {
        bail!("{what}: no usable samples");
    }
    let by_id: std::collections::HashMap<u64, &Sample> =
        samples.iter().map(|s| (s.id, s)).collect();
    let refs = enc
        .examples
        .iter()
        .map(|e| {
            by_id[&e.id]
                .references()
                .into_iter()
                .map(String::from)
                .collect()
        })
        .collect();
    Ok((enc.examples, refs))
}

impl Splits {
    pub fn load(recipe: &Recipe, tok: &Tokenizer) -> Result<Self> {
        let eo = encode_options(recipe)?;
        let samples = read_recipe_samples(recipe, &recipe.data.train)?;
        let (train, dev) = match &recipe.data.dev {
            Some(dev) => (samples, read_recipe_samples(recipe, dev)?),
            None if recipe.data.dev_size == 0 => (samples, vec![]),
            None => {
                let (train, dev, _) = seeded_split(samples, recipe.data.dev_size, 0, recipe.seed)
                    .with_context(|| {
                    format!("data.dev_size: splitting {}", recipe.data.train.display())
                })?;
                (train, dev)
            }
        };
        let (train, train_references) =
            encode(tok, &train, &eo, &recipe.data.train.display().to_string())?;
        let (dev, dev_references) = if dev.is_empty() {
            (vec![], vec![])
        } else {
            encode(tok, &dev, &eo, "dev")?
        };
        Ok(Splits {
            train,
            train_references,
            dev,
            dev_references,
        })
    }
}
