//! Line-oriented JSON reading shared by the data loaders and the metric commands: every error
//! names the file and the 1-based line.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// One non-blank line of a JSONL file, parsed, with its 1-based line number.
pub struct JsonLine {
    pub line: usize,
    pub value: serde_json::Value,
}

/// Why a line could not be read; `Display` gives `FILE:LINE: message`.
#[derive(Debug, Clone)]
pub struct LineError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for LineError {}

/// Reads `path` and parses each line as JSON. Blank lines (only whitespace) are skipped when
/// `skip_blank` (data files), otherwise they are errors (metric files, where every line is a
/// sample). A file with no lines at all is an error. Per-line failures (invalid UTF-8, malformed
/// JSON) are returned, not raised, so that callers can choose to skip them.
pub fn read_json_lines(
    path: &Path,
    skip_blank: bool,
) -> Result<Vec<std::result::Result<JsonLine, LineError>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = path.display().to_string();
    let mut out = Vec::new();
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        bail!("{file}: the file is empty");
    }
    let mut chunks: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if chunks.last().is_some_and(|c| c.is_empty()) {
        chunks.pop(); // the final newline does not start another line
    }
    for (i, raw) in chunks.into_iter().enumerate() {
        let line = i + 1;
        let err = |message: String| LineError {
            file: file.clone(),
            line,
            message,
        };
        let text = match std::str::from_utf8(raw) {
            // Tolerate Windows line ends and a UTF-8 byte-order mark (editors on Windows add them).
            Ok(t) => {
                let t = if line == 1 {
                    t.strip_prefix('\u{feff}').unwrap_or(t)
                } else {
                    t
                };
                t.strip_suffix('\r').unwrap_or(t)
            }
            Err(e) => {
                out.push(Err(err(format!(
                    "invalid UTF-8 at byte {} of the line",
                    e.valid_up_to()
                ))));
                continue;
            }
        };
        if text.trim().is_empty() {
            if skip_blank {
                continue;
            }
            out.push(Err(err(
                "blank line (expected one JSON value per line)".into()
            )));
            continue;
        }
        match serde_json::from_str(text) {
            Ok(value) => out.push(Ok(JsonLine { line, value })),
            Err(e) => out.push(Err(err(format!("malformed JSON: {e}")))),
        }
    }
    Ok(out)
}

/// Like [`read_json_lines`] but fails on the first bad line.
pub fn read_json_lines_strict(path: &Path, skip_blank: bool) -> Result<Vec<JsonLine>> {
    read_json_lines(path, skip_blank)?
        .into_iter()
        .map(|r| r.map_err(|e| anyhow!(e)))
        .collect()
}
