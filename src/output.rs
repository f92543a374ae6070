//! Where commands write: an output never replaces one of the command's own inputs, and a model
//! directory (or any file) already at `--out` is replaced only when the user says so (`--force`).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// `path` made absolute with symlinks resolved as far as it exists, so that `data.jsonl`,
/// `./data.jsonl` and a link to it compare equal.
fn identity(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => identity(parent).join(name),
        _ => abs,
    }
}

/// Whether `a` and `b` name the same file or directory (or would, once created).
pub fn same_path(a: &Path, b: &Path) -> bool {
    identity(a) == identity(b)
}

/// Refuses an output `out` (given as `flag`) that is one of `inputs` (each with its flag), or a
/// directory holding one: writing (or replacing) it would destroy what is being read.
pub fn refuse_input_as_output(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = identity(out);
    for (in_flag, input) in inputs {
        let i = identity(input);
        if i.starts_with(&o) {
            bail!(
                "{flag} {}: is the input given by {in_flag}; write the output elsewhere",
                out.display()
            );
        }
    }
    Ok(())
}

/// Refuses to write a new directory over something that exists at `out` (a regular file always;
/// a non-empty directory unless `force`).
pub fn check_new_dir(flag: &str, out: &Path, force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!(
            "{flag} {}: is a file, not a directory; choose another path",
            out.display()
        );
    }
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !force {
        bail!(
            "{flag} {}: already exists and is not empty; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_by_another_name_is_refused() {
        let dir = std::env::temp_dir().join(format!("pocl-output-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).unwrap();
        std::fs::write(dir.join("m/x"), "").unwrap();
        let data = dir.join("data.jsonl");
        std::fs::write(&data, "").unwrap();
        let same = dir.join("m/../data.jsonl");
        assert!(refuse_input_as_output("--out", &same, &[("--data", &data)]).is_err());
        assert!(
            refuse_input_as_output("--out", &dir.join("o.jsonl"), &[("--data", &data)]).is_ok()
        );
        // A directory output holding an input, and a new file beside a model's files.
        let (m, inside) = (dir.join("m"), dir.join("m/x"));
        assert!(refuse_input_as_output("--out", &m, &[("--data", &inside)]).is_err());
        assert!(refuse_input_as_output("--out", &dir.join("m/new"), &[("--model", &m)]).is_ok());
        assert!(check_new_dir("--out", &data, true).is_err());
        assert!(check_new_dir("--out", &dir.join("m"), false).is_err());
        assert!(check_new_dir("--out", &dir.join("m"), true).is_ok());
        assert!(check_new_dir("--out", &dir.join("new"), false).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
