//! Instruction data in JSONL: Dolly, Alpaca and the processed DistiLLM/POCL form, detected per file
//! (or forced), validated line by line with errors that name the file, the line and the field.

use super::jsonl::{read_json_lines, LineError};
use super::{Message, Sample};
use anyhow::{anyhow, bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};
use std::path::Path;

/// The record layouts pocl reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// databricks-dolly-15k: `instruction`, `context`, `response`, `category`.
    Dolly,
    /// Stanford Alpaca: `instruction`, `input`, `output`.
    Alpaca,
    /// DistiLLM/POCL processed data: a rendered `prompt` and its `output` (a string, or a list of
    /// acceptable answers in test sets), optionally with `instruction` / `input`.
    Processed,
    /// OpenAI-style conversations: `{"messages": [{"role": ..., "content": ...}, ...]}`.
    Messages,
    /// ShareGPT conversations: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`.
    ShareGpt,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "dolly" => Ok(Format::Dolly),
            "alpaca" => Ok(Format::Alpaca),
            "processed" | "prompt-output" | "distillm" | "pocl" => Ok(Format::Processed),
            "messages" | "openai" => Ok(Format::Messages),
            "sharegpt" => Ok(Format::ShareGpt),
            _ => bail!(
                "unknown data format {s:?}: expected dolly, alpaca, processed, messages or sharegpt"
            ),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Dolly => "dolly",
            Format::Alpaca => "alpaca",
            Format::Processed => "processed",
            Format::Messages => "messages",
            Format::ShareGpt => "sharegpt",
        })
    }
}

impl Format {
    /// Guesses the layout from one record's keys: `prompt` means processed, `response` Dolly,
    /// `output` Alpaca.
    pub fn detect(obj: &Map<String, Value>) -> Option<Format> {
        if obj.contains_key("messages") {
            Some(Format::Messages)
        } else if obj.contains_key("conversations") {
            Some(Format::ShareGpt)
        } else if obj.contains_key("prompt") {
            Some(Format::Processed)
        } else if obj.contains_key("response") {
            Some(Format::Dolly)
        } else if obj.contains_key("output") {
            Some(Format::Alpaca)
        } else {
            None
        }
    }
}

/// How to read a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Force a format instead of detecting it from the first record.
    pub format: Option<Format>,
    /// Skip bad records (and report them) instead of failing on the first one.
    pub skip_bad: bool,
}

/// The samples of one file and what was skipped.
#[derive(Debug)]
pub struct Loaded {
    pub format: Format,
    pub samples: Vec<Sample>,
    /// Records left out with `skip_bad` (empty otherwise), each naming its file, line and cause.
    pub skipped: Vec<LineError>,
}

impl Loaded {
    /// One line for the user, e.g. "data.jsonl: 3 bad records skipped (first: ...)".
    pub fn skipped_summary(&self) -> Option<String> {
        let first = self.skipped.first()?;
        Some(format!(
            "{} bad record(s) skipped (first: {first})",
            self.skipped.len()
        ))
    }
}

/// Loads instruction samples from a JSONL file. Every sample's id is its 1-based line number, so
/// ids stay stable when records are skipped, filtered or reordered. An empty file, a file with no
/// usable record, or (without `skip_bad`) any bad record is an error naming file, line and field.
pub fn load_jsonl(path: &Path, opts: LoadOptions) -> Result<Loaded> {
    let file = path.display().to_string();
    let lines = read_json_lines(path, true)?;
    let mut format = opts.format;
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for line in lines {
        let parsed = line.and_then(|l| {
            let err = |message: String| LineError { file: file.clone(), line: l.line, message };
            let Value::Object(obj) = &l.value else {
                return Err(err("expected a JSON object".into()));
            };
            let fmt = match format {
                Some(f) => f,
                None => Format::detect(obj).ok_or_else(|| {
                    err("cannot detect the data format: expected Dolly (instruction, context, response), \
                         Alpaca (instruction, input, output), processed (prompt, output), messages or \
                         conversations fields; \
                         or force one with the format option"
                        .into())
                })?,
            };
            // The first good record fixes the format of the whole file.
            format = Some(fmt);
            parse_record(obj, fmt, l.line as u64).map_err(err)
        });
        match parsed {
            Ok(s) => samples.push(s),
            Err(e) if opts.skip_bad => skipped.push(e),
            Err(e) => return Err(anyhow!(e)),
        }
    }
    if samples.is_empty() {
        match skipped.first() {
            Some(e) => bail!(
                "{file}: no usable record ({} skipped; first: {e})",
                skipped.len()
            ),
            None => bail!("{file}: no records"),
        }
    }
    Ok(Loaded {
        format: format.expect("set by the first sample"),
        samples,
        skipped,
    })
}

fn field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    required: bool,
) -> Result<Option<&'a str>, String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(Some(s)),
        // An explicit null in an optional field (e.g. Dolly's context) means "empty".
        Some(Value::Null) if !required => Ok(None),
        Some(v) => Err(format!(
            "field \"{name}\": expected a string, found {}",
            kind(v)
        )),
        None if required => Err(format!("field \"{name}\": missing")),
        None => Ok(None),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_record(obj: &Map<String, Value>, format: Format, id: u64) -> Result<Sample, String> {
    let opt = |name| field(obj, name, false).map(|s| s.unwrap_or("").to_string());
    let req = |name| field(obj, name, true).map(|s| s.unwrap_or("").to_string());
    Ok(match format {
        Format::Dolly => {
            let mut s = Sample::new(id, req("instruction")?, opt("context")?, req("response")?);
            s.category = opt("category")?;
            s
        }
        Format::Alpaca => Sample::new(id, req("instruction")?, opt("input")?, req("output")?),
        Format::Processed => {
            let prompt = req("prompt")?;
            // Test sets of the processed form may list several acceptable outputs.
            let (response, extra) = match obj.get("output") {
                Some(Value::Array(a)) if !a.is_empty() => {
                    let all: Vec<String> = a
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            v.as_str().map(str::to_string).ok_or_else(|| {
                                format!(
                                    "field \"output\"[{i}]: expected a string, found {}",
                                    kind(v)
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    (all[0].clone(), all[1..].to_vec())
                }
                Some(Value::Array(_)) => return Err("field \"output\": empty list".into()),
                _ => (req("output")?, Vec::new()),
            };
            let mut s = Sample::new(id, opt("instruction")?, opt("input")?, response);
            s.prompt = Some(prompt);
            s.extra_references = extra;
            s
        }
        Format::Messages => conversation(obj, id, "messages", "role", "content", |r| Some(r))?,
        Format::ShareGpt => conversation(obj, id, "conversations", "from", "value", |r| match r {
            "human" | "user" => Some("user"),
            "gpt" | "assistant" => Some("assistant"),
            "system" => Some("system"),
            _ => None,
        })?,
    })
}

/// A conversation record: a list of turns under `list`, each an object with a role under `role`
/// (mapped by `map_role`; None = unknown) and its text under `text`. The sample's response is the
/// last assistant turn (the prompt is rendered later with the model's chat template), so a
/// conversation without one is refused here.
fn conversation(
    obj: &Map<String, Value>,
    id: u64,
    list: &str,
    role: &str,
    text: &str,
    map_role: impl Fn(&str) -> Option<&str>,
) -> Result<Sample, String> {
    let Some(Value::Array(turns)) = obj.get(list) else {
        return Err(match obj.get(list) {
            None => format!("field \"{list}\": missing"),
            Some(v) => format!("field \"{list}\": expected a list, found {}", kind(v)),
        });
    };
    let mut messages = Vec::with_capacity(turns.len());
    for (i, t) in turns.iter().enumerate() {
        let Value::Object(t) = t else {
            return Err(format!(
                "field \"{list}\"[{i}]: expected an object, found {}",
                kind(t)
            ));
        };
        let at = |e: String| format!("field \"{list}\"[{i}].{e}");
        let r = field(t, role, true).map_err(at)?.unwrap_or("");
        let r = map_role(r)
            .ok_or_else(|| format!("field \"{list}\"[{i}].\"{role}\": unknown role {r:?}"))?;
        let c = field(t, text, true).map_err(at)?.unwrap_or("");
        messages.push(Message::new(r, c));
    }
    let last = messages
        .iter()
        .rposition(|m| m.role == "assistant")
        .ok_or_else(|| format!("field \"{list}\": the conversation has no assistant turn"))?;
    let user = messages[..last].iter().rev().find(|m| m.role == "user");
    let mut s = Sample::new(
        id,
        user.map(|m| m.content.clone()).unwrap_or_default(),
        "",
        messages[last].content.clone(),
    );
    s.messages = messages;
    Ok(s)
}

/// A seeded split of one file's samples into (train, dev, test): the samples are shuffled with
/// ChaCha8(seed), the first `n_dev` go to dev, the next `n_test` to test, the rest to train. Each
/// part keeps file order (sorted by id) so that the split is easy to inspect.
pub fn seeded_split(
    samples: Vec<Sample>,
    n_dev: usize,
    n_test: usize,
    seed: u64,
) -> Result<(Vec<Sample>, Vec<Sample>, Vec<Sample>)> {
    if n_dev + n_test >= samples.len() {
        bail!(
            "cannot take {n_dev} dev + {n_test} test samples from {} and leave any for training",
            samples.len()
        );
    }
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut part = vec![0u8; samples.len()];
    for (rank, &i) in order.iter().enumerate() {
        part[i] = if rank < n_dev {
            1
        } else if rank < n_dev + n_test {
            2
        } else {
            0
        };
    }
    let (mut train, mut dev, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (s, p) in samples.into_iter().zip(part) {
        match p {
            1 => dev.push(s),
            2 => test.push(s),
            _ => train.push(s),
        }
    }
    Ok((train, dev, test))
}

/// Writes samples as Dolly-format JSONL (atomically).
pub fn write_dolly_jsonl(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::new();
    for s in samples {
        let v = serde_json::json!({
            "instruction": s.instruction,
            "context": s.input,
            "response": s.response,
            "category": s.category,
        });
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    crate::write_atomic(path, out.as_bytes())
}
