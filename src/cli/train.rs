//! `pocl train`: one command runs a whole distillation (every curriculum stage) into a run
//! directory, or continues an interrupted one with `--resume`.

use anyhow::{bail, Result};
use clap::Args;
use pocl::config::Recipe;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    /// Recipe (TOML); not needed with --resume, which reuses the run's own recipe.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a recipe value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run directory (default: the recipe's `out`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in the run directory from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Recipe keys run.device / run.kernels.
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (recipe, run_dir) = resolve(&a)?;
    pocl::pipeline::run_recipe(recipe, &run_dir, a.resume)
}

fn resolve(a: &TrainArgs) -> Result<(Recipe, PathBuf)> {
    let sets: Vec<String> = a.sets.iter().cloned().chain(a.device.as_sets()).collect();
    if a.resume {
        let Some(dir) = a.out.clone().or_else(|| {
            a.config
                .as_ref()
                .and_then(|c| Recipe::load(c, &a.sets).ok())
                .and_then(|r| r.out)
        }) else {
            bail!("--resume needs the run directory (--out DIR)");
        };
        // The run's own recipe, as it started, so the resumed run is the same run; only the keys
        // that do not change what it computes may be overridden.
        return Ok((Recipe::load_for_resume(&dir, &sets)?, dir));
    }
    let Some(config) = &a.config else {
        bail!("give --config RECIPE.toml (or --resume --out RUN_DIR)")
    };
    let recipe = Recipe::load(config, &sets)?;
    let Some(dir) = a.out.clone().or_else(|| recipe.out.clone()) else {
        bail!(
            "{}: no run directory: set `out` in the recipe or pass --out",
            config.display()
        );
    };
    // The recipe's folder holds the user's files (a run directory's own recipe.toml aside).
    let recipe_dir = config.parent().filter(|p| !p.as_os_str().is_empty());
    if pocl::output::same_path(&dir, recipe_dir.unwrap_or(Path::new("."))) {
        bail!(
            "out {}: is the recipe's own directory; give a directory for the run",
            dir.display()
        );
    }
    Ok((recipe, dir))
}
