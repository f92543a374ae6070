//! Resumable checkpoints: an HF model directory (loadable by transformers) that also holds the
//! optimiser moments (`optimizer.safetensors`) and the trainer's position (`trainer_state.json`).
//! The whole directory is assembled under a temporary name and renamed into place, so a kill at
//! any moment leaves either the previous checkpoint or the new one, never a mixture.

use super::optim::AdamW;
use crate::model::{self, CausalLm};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// The resumable checkpoint of the run in `run_dir`, replaced as training goes.
pub fn last_checkpoint(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints/last")
}

/// The checkpoint with the best dev ROUGE-L (or dev loss) so far.
pub fn best_checkpoint(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints/best")
}

/// Readies `run_dir` for a new run, or for continuing the one there when `resume` is set:
/// repairs a checkpoint replacement that was interrupted, and refuses to resume nothing or to mix
/// a new run into an old one.
pub fn prepare_run_dir(run_dir: &Path, resume: bool) -> Result<()> {
    crate::create_dir_all(run_dir).context("the run directory")?;
    let last = last_checkpoint(run_dir);
    model::recover_dir(&last)?;
    model::recover_dir(&best_checkpoint(run_dir))?;
    if resume && !last.join(STATE_FILE).is_file() {
        bail!(
            "{}: nothing to resume (no checkpoint in {})",
            run_dir.display(),
            last.display()
        );
    }
    if !resume && last.exists() {
        bail!(
            "{}: already holds a run; pass --resume to continue it or choose another directory",
            run_dir.display()
        );
    }
    Ok(())
}

/// A seeded RNG's exact position, so a resumed run draws the same numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    /// u128 word position, as a decimal string (JSON numbers are not that wide).
    pub word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(
            self.word_pos
                .parse()
                .map_err(|_| anyhow!("bad rng word_pos {}", self.word_pos))?,
        );
        Ok(rng)
    }
}

/// Writes a checkpoint of `model` + optimiser + `state` (any serialisable trainer state).
pub fn save<S: Serialize>(
    dir: &Path,
    model: &dyn CausalLm,
    side_files_from: &Path,
    opt: &AdamW,
    state: &S,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let dev = &Device::Cpu;
    for s in &opt.slots {
        let (m, v) = s.moments.to_host()?;
        let n = m.len();
        tensors.push((format!("{}.exp_avg", s.name), Tensor::from_vec(m, n, dev)?));
        tensors.push((
            format!("{}.exp_avg_sq", s.name),
            Tensor::from_vec(v, n, dev)?,
        ));
    }
    tensors.push(("step".into(), Tensor::new(&[opt.step as f32], dev)?));
    let meta = HashMap::from([("step".to_string(), opt.step.to_string())]);
    let opt_bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?;
    let state_bytes = serde_json::to_vec_pretty(state)?;
    model::save_with(
        model,
        dir,
        Some(side_files_from),
        &[(OPTIMIZER_FILE, opt_bytes), (STATE_FILE, state_bytes)],
    )
    .with_context(|| format!("saving checkpoint {}", dir.display()))
}

/// Restores the optimiser moments and step saved by [`save`] into `opt` (same parameter names).
pub fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: corrupt: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok());
    opt.step = step.ok_or_else(|| anyhow!("{}: missing step", path.display()))?;
    for s in &mut opt.slots {
        let n = s.moments.len();
        let read = |suffix: &str| -> Result<Vec<f32>> {
            let name = format!("{}.{suffix}", s.name);
            let view = st
                .tensor(&name)
                .map_err(|_| anyhow!("{}: missing {name}", path.display()))?;
            if view.dtype() != safetensors::Dtype::F32 || view.data().len() != n * 4 {
                bail!("{}: {name} has the wrong size", path.display());
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect())
        };
        let (m, v) = (read("exp_avg")?, read("exp_avg_sq")?);
        s.moments.set(m, v)?;
    }
    Ok(())
}

/// Reads the trainer state saved by [`save`].
pub fn load_state<S: for<'de> Deserialize<'de>>(dir: &Path) -> Result<S> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid trainer state", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rng_state_round_trips_mid_stream() {
        let mut a = ChaCha8Rng::seed_from_u64(42);
        for _ in 0..13 {
            a.random::<u32>();
        }
        let s = RngState::of(&a);
        let json = serde_json::to_string(&s).unwrap();
        let mut b = serde_json::from_str::<RngState>(&json)
            .unwrap()
            .restore()
            .unwrap();
        let xa: Vec<u64> = (0..5).map(|_| a.random()).collect();
        let xb: Vec<u64> = (0..5).map(|_| b.random()).collect();
        assert_eq!(xa, xb);
    }
}
