//! pocl-kd: knowledge distillation of causal language models with the POCL curriculum.
//!
//! Module map (each concept lives under its own name):
//! - [`model`]: Hugging Face causal-LM families (GPT-2, OPT, Llama/Qwen2/Qwen3), weights, generation.
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate.
//! - [`ops`]: differentiable building blocks and fused CPU kernels with backward.
//! - [`kd`]: the distillation objective (loss kinds, divergences, a stage's temperature and KD
//!   weight, CE mixing).
//! - [`data`]: instruction data, the prompt template, batching and masks, the built-in benchmark.
//! - [`eval`]: ROUGE-L (rouge-score compatible) and the evaluation protocol.
//! - [`curriculum`]: the difficulty measurer, rank fusion and the stage schedule.
//! - [`config`]: TOML recipes, validated, with the paper's defaults.
//! - [`train`]: the trainer (loop, one optimiser step, dev evaluation, metrics, checkpoints), the
//!   optimiser and the data splits.
//! - [`pipeline`]: what the `pocl` commands and the demo share: loading a model (in a
//!   [`pipeline::Precision`]) with its tokenizer and EOS ids, measuring difficulty, running a recipe.
//! - [`demo`]: the paper's experiment end to end on the built-in benchmark.
//! - [`doctor`]: the self-test of `pocl doctor` (a device and kernel set against the CPU's).
//! - [`output`]: where commands write (no input overwritten, no directory replaced unasked).
//!
//! The `pocl` binary's command-line interface (`src/cli/`) lives outside the library and only
//! calls into it.

pub mod backend;
pub mod cache;
pub mod config;
pub mod curriculum;
pub mod data;
pub mod demo;
pub mod doctor;
pub mod eval;
pub mod finite;
pub mod kd;
pub mod model;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod tokenizer;
pub mod train;

/// Writes `bytes` to `path` atomically: a temporary sibling file is written, synced and renamed,
/// so a crash never leaves a half-written result behind.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .context("output path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).with_context(|| {
            format!(
                "cannot write {}: cannot create {}{}",
                path.display(),
                tmp.display(),
                not_a_directory(dir)
            )
        })?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {} (via {})", path.display(), tmp.display()))?;
        f.sync_all().ok();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        // A failed write (full disk, read-only target) leaves no temporary beside the target.
        std::fs::remove_file(&tmp).ok();
    }
    written
}

/// The pid in a temporary name `.NAME.tmpPID` (what `write_atomic` and `model::save` use).
pub(crate) fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp")?;
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    // kill(pid, 0) probes without signalling; EPERM means the process exists (another user's).
    // SAFETY: signal 0 sends nothing; the call only reads the process table.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes from `dir` the temporaries (`.NAME.tmpPID`) of processes that no longer run, and
/// this process's own (call it before this process writes there). A missing `dir` is fine.
pub fn remove_debris(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if pid != me && alive(pid) {
            continue;
        }
        let p = e.path();
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.with_context(|| format!("cannot remove stale {}", p.display()))?;
        eprintln!("removed {} (left by a killed process)", p.display());
    }
    Ok(())
}

/// Creates `dir` and its parents; the error names the path, and the ancestor that is a file when
/// that is the cause (the OS only says "File exists" or "Not a directory").
pub fn create_dir_all(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the directory {}{}: {e}",
            dir.display(),
            not_a_directory(dir)
        )
    })
}

/// " (X is a file, not a directory)" for the nearest existing ancestor of `path` (itself
/// included) that is not a directory, or "".
fn not_a_directory(path: &std::path::Path) -> String {
    path.ancestors()
        .find(|a| a.exists())
        .filter(|a| !a.is_dir())
        .map_or(String::new(), |a| {
            format!(" ({} is a file, not a directory)", a.display())
        })
}
