//! What a run directory guarantees beyond its checkpoints: one run at a time (an exclusive lock),
//! no debris of killed processes, and inputs that cannot change under a run (content hashes of
//! data, models and difficulty scores, recorded in `inputs.json` and checked on `--resume`).

use crate::config::Recipe;
use crate::{remove_debris, temp_owner};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";
pub const INPUTS_FILE: &str = "inputs.json";
/// The cached difficulty scores of a run that measured them itself.
pub const SCORES_FILE: &str = "scores.jsonl";
/// What a run directory may hold besides debris; anything else means it is not one.
const RUN_FILES: &[&str] = &[
    LOCK_FILE,
    INPUTS_FILE,
    SCORES_FILE,
    "recipe.toml",
    "metrics.jsonl",
    "checkpoints",
];

/// An exclusive lock on a run directory, held while the value lives. It is a flock(2) on
/// `RUN/.lock` (std's `File::try_lock`), so the kernel releases it when the holder dies, even by
/// SIGKILL: a killed run never blocks the next one.
pub struct RunLock {
    _file: File,
}

/// Locks `run_dir` (created if missing) for this process, or fails naming the pid that holds it.
pub fn lock(run_dir: &Path) -> Result<RunLock> {
    crate::create_dir_all(run_dir).context("the run directory")?;
    let path = run_dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok();
            bail!(
                "{}: another pocl run is using this directory (pid {}); wait for it to end or choose another directory",
                run_dir.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    file.set_len(0)
        .and_then(|_| write!(file, "{}", std::process::id()))
        .and_then(|_| file.flush())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(RunLock { _file: file })
}

/// Removes the temporaries that killed writers left in `run_dir` and its checkpoints folder.
/// Called under the run's lock: no other process writes there, and this process has not
/// started writing, so a temporary of our own pid (an earlier failed call) is debris too.
pub fn clean_debris(run_dir: &Path) -> Result<()> {
    remove_debris(run_dir)?;
    remove_debris(&run_dir.join("checkpoints"))
}

/// Refuses to start a run in a directory that holds something other than a run (the recipe's
/// own folder, a model, the current directory): nothing of the user's is mixed into or lost.
pub fn check_is_run_dir(run_dir: &Path) -> Result<()> {
    if run_dir.exists() && !run_dir.is_dir() {
        bail!(
            "{}: is a file, not a run directory; choose a new or empty directory for the run",
            run_dir.display()
        );
    }
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(()); // missing: created by the lock
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !RUN_FILES.contains(&name.as_str()) && temp_owner(&name).is_none() {
            bail!(
                "{}: not a run directory (it holds {name}); choose a new or empty directory for the run",
                run_dir.display()
            );
        }
    }
    Ok(())
}

/// A file's (or model directory's) path and content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub path: PathBuf,
    pub sha256: String,
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    std::io::copy(&mut f, h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(())
}

/// SHA-256 of a file, or of a directory's visible files (names, sizes and contents, in name
/// order; subdirectories are not part of a model).
pub fn fingerprint(path: &Path) -> Result<Fingerprint> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| !n.as_encoded_bytes().starts_with(b"."))
            })
            .collect();
        files.sort();
        for f in files {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(len.to_le_bytes());
            hash_file(&mut h, &f)?;
        }
    } else {
        hash_file(&mut h, path)?;
    }
    let digest = h.finalize();
    Ok(Fingerprint {
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// The inputs of a run by recipe key (`data.train`, `model.student`, ...), plus the run's own
/// `scores.jsonl` once measured (with `measured_for`: what the scores were measured from).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    pub files: BTreeMap<String, Fingerprint>,
    /// Hash of the measurement's inputs and settings when `scores.jsonl` was written.
    #[serde(default)]
    pub measured_for: Option<String>,
}

impl Inputs {
    /// Hashes every input file and model directory the recipe names.
    pub fn of(recipe: &Recipe) -> Result<Inputs> {
        let mut files = BTreeMap::new();
        let mut add = |key: &str, p: Option<&PathBuf>| -> Result<()> {
            if let Some(p) = p {
                files.insert(key.to_string(), fingerprint(p).context(key.to_string())?);
            }
            Ok(())
        };
        add("data.train", Some(&recipe.data.train))?;
        add("data.dev", recipe.data.dev.as_ref())?;
        add("model.student", Some(&recipe.model.student))?;
        if recipe.objective.loss.needs_teacher() {
            add("model.teacher", recipe.model.teacher.as_ref())?;
        }
        if recipe.curriculum.kind.needs_scores() {
            add("curriculum.scores", recipe.curriculum.scores.as_ref())?;
        }
        Ok(Inputs {
            files,
            measured_for: None,
        })
    }

    /// What difficulty scores measured now would depend on: the training data, the student,
    /// and the measurement's recipe keys.
    pub fn measurement_key(&self, recipe: &Recipe) -> String {
        let c = &recipe.curriculum;
        let d = &recipe.data;
        let hash = |k: &str| self.files.get(k).map(|f| f.sha256.as_str()).unwrap_or("");
        let text = format!(
            "{} {} {} {} {} {:?} {} {} {} {} {} {}{}",
            hash("data.train"),
            hash("data.dev"),
            hash("model.student"),
            c.stages,
            c.rrf_k,
            c.metric,
            c.score_max_new_tokens,
            d.format,
            d.template,
            d.max_prompt_len,
            d.max_len,
            d.dev_size,
            d.system_key()
        );
        let digest = Sha256::digest(text.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn inputs_path(run_dir: &Path) -> PathBuf {
    run_dir.join(INPUTS_FILE)
}

/// The inputs recorded in `run_dir`, if any.
pub fn recorded(run_dir: &Path) -> Result<Option<Inputs>> {
    let path = inputs_path(run_dir);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let inputs = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid inputs record", path.display()))?;
    Ok(Some(inputs))
}

/// Records `inputs` in `run_dir` (atomically).
pub fn record(run_dir: &Path, inputs: &Inputs) -> Result<()> {
    crate::write_atomic(
        &inputs_path(run_dir),
        serde_json::to_string_pretty(inputs)?.as_bytes(),
    )
}

/// Refuses to continue a run whose inputs differ from those it started with, naming the first
/// changed file. Runs recorded before `inputs.json` existed are not checked.
pub fn check_unchanged(run_dir: &Path, now: &Inputs) -> Result<()> {
    let Some(then) = recorded(run_dir)? else {
        eprintln!(
            "{}: no {INPUTS_FILE} (a run of an older pocl): inputs not checked",
            run_dir.display()
        );
        return Ok(());
    };
    for (key, was) in &then.files {
        match now.files.get(key) {
            Some(is) if is.sha256 == was.sha256 => {}
            Some(is) => bail!(
                "{key}: {} changed since the run started (content hash differs); restore it, or start a new run in another directory",
                is.path.display()
            ),
            None => bail!(
                "{key}: the run started with {}, the recipe now has none",
                was.path.display()
            ),
        }
    }
    if let Some(key) = now.files.keys().find(|k| !then.files.contains_key(*k)) {
        bail!("{key}: not an input of the run when it started; it cannot be added on resume");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognised() {
        assert_eq!(temp_owner(".last.tmp1234"), Some(1234));
        assert_eq!(temp_owner(".metrics.jsonl.tmp77"), Some(77));
        assert_eq!(temp_owner("last.tmp1234"), None);
        assert_eq!(temp_owner(".last.old"), None);
        assert_eq!(temp_owner(".lock"), None);
    }

    #[test]
    fn fingerprint_is_sha256() {
        let dir = std::env::temp_dir().join(format!("pocl-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("abc.txt");
        std::fs::write(&f, "abc").unwrap();
        // FIPS 180-2 test vector.
        assert_eq!(
            fingerprint(&f).unwrap().sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = fingerprint(&dir).unwrap();
        std::fs::write(&f, "abd").unwrap();
        assert_ne!(fingerprint(&dir).unwrap().sha256, a.sha256);
        std::fs::remove_dir_all(&dir).ok();
    }
}
