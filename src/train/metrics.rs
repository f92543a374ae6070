//! metrics.jsonl: one JSON object per line for every stage start, optimiser step and dev
//! evaluation of a run. A checkpoint records how many lines had been written
//! (`TrainState::metrics_lines`); a resumed run first drops any later ones, so an interrupted
//! and resumed run ends with the same lines as an uninterrupted one.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metrics file of the run in `run_dir`.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("metrics.jsonl")
}

/// Appends one record to the run's metrics file.
pub fn append(run_dir: &Path, record: &serde_json::Value) -> Result<()> {
    let path = path(run_dir);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{record}")?;
    Ok(())
}

/// Keeps the first `lines` records: those written before the checkpoint a run resumes from.
pub fn truncate(run_dir: &Path, lines: usize) -> Result<()> {
    let path = path(run_dir);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text.lines().take(lines).collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::write_atomic(&path, out.as_bytes())
}
