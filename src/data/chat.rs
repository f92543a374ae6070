//! A model's own chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja
//! beside it), rendered with minijinja the way transformers' `apply_chat_template` renders it, and
//! conversations turned into (prompt, response) pairs for training.

use super::{Sample, Template};
use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special-token variables transformers passes to it.
pub struct ChatTemplate {
    source: String,
    /// Where the template came from, for error lines.
    pub file: PathBuf,
    /// `bos_token`, `eos_token`, ... by name (transformers' `special_tokens_map`).
    tokens: BTreeMap<String, String>,
}

/// The names transformers passes as template variables (its SPECIAL_TOKENS_ATTRIBUTES).
const TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl ChatTemplate {
    pub fn new(source: impl Into<String>, file: PathBuf, tokens: BTreeMap<String, String>) -> Self {
        ChatTemplate {
            source: source.into(),
            file,
            tokens,
        }
    }

    /// Reads the template of a model directory (or the directory holding a tokenizer file):
    /// chat_template.jinja wins over tokenizer_config.json's `chat_template`, as in transformers.
    /// `Ok(None)` when the model has none.
    pub fn load(model_dir: &Path) -> Result<Option<ChatTemplate>> {
        // A .gguf teacher or student is read through its conversion, as every model is.
        let model_dir = crate::model::gguf::model_dir(model_dir)?;
        let dir = if model_dir.is_dir() {
            &model_dir
        } else {
            model_dir.parent().unwrap_or(Path::new("."))
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("{}: malformed JSON", cfg_path.display()))?,
            Err(_) => Json::Null,
        };
        let mut tokens = BTreeMap::new();
        for key in TOKEN_KEYS {
            // A token is a string or an AddedToken object with its text in "content".
            let text = match cfg.get(key) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(String::from),
                _ => None,
            };
            if let Some(t) = text {
                tokens.insert(key.to_string(), t);
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?;
            return Ok(Some(ChatTemplate::new(source, jinja, tokens)));
        }
        match cfg.get("chat_template") {
            Some(Json::String(s)) => Ok(Some(ChatTemplate::new(s.clone(), cfg_path, tokens))),
            // Several named templates: transformers uses the one named "default".
            Some(Json::Array(list)) => {
                let default = list.iter().find(|t| t["name"] == "default");
                match default.and_then(|t| t["template"].as_str()) {
                    Some(s) => Ok(Some(ChatTemplate::new(s, cfg_path, tokens))),
                    None => bail!(
                        "{}: chat_template: a list without a template named \"default\"",
                        cfg_path.display()
                    ),
                }
            }
            Some(Json::Null) | None => Ok(None),
            Some(_) => bail!("{}: chat_template: expected a string", cfg_path.display()),
        }
    }

    /// [`ChatTemplate::load`] for `data.template = "chat"`, where a model without one is an error.
    pub fn require(model_dir: &Path) -> Result<ChatTemplate> {
        ChatTemplate::load(model_dir)?.ok_or_else(|| {
            anyhow!(
                "{}: the model has no chat template (no chat_template in tokenizer_config.json, \
                 no chat_template.jinja) but data.template = \"chat\"",
                model_dir.display()
            )
        })
    }

    /// Renders `messages` as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does. Errors name the template's file.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_inner(messages, add_generation_prompt)
            .map_err(|e| {
                anyhow!(
                    "{}: the chat template fails to render: {e}",
                    self.file.display()
                )
            })
    }

    fn render_inner(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, minijinja::Error> {
        let mut env = Environment::new();
        // transformers' environment: trim_blocks and lstrip_blocks on, loop controls, Python
        // string methods (.strip(), .startswith(), ...), raise_exception, strftime_now.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                // In the order transformers' dicts have (the order `tojson` writes).
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut ctx: BTreeMap<String, Value> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from(msgs));
        // transformers passes these as None when there are none (`tools is defined` is true).
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let tmpl = env.template_from_str(&self.source)?;
        tmpl.render(Value::from(ctx))
    }

    /// The text the template puts after an assistant message's content (e.g. "<|im_end|>\n"):
    /// a one-turn conversation is rendered and what follows the assistant's content is taken.
    pub fn end_of_turn(&self) -> Result<String> {
        const MARK: &str = "\u{1}pocl-end-of-turn-probe\u{1}";
        let text = self.render(
            &[Message::new("user", "Hi"), Message::new("assistant", MARK)],
            false,
        )?;
        match text.rfind(MARK) {
            Some(i) => Ok(text[i + MARK.len()..].to_string()),
            None => bail!(
                "{}: the chat template does not render the assistant's message",
                self.file.display()
            ),
        }
    }

    /// A conversation as a training pair: the prompt is everything before the LAST assistant
    /// turn, rendered with add_generation_prompt; the response is that turn's content, to be
    /// followed by
    /// the template's end-of-turn text (kept apart, see [`Sample::end_of_turn`]). Errors are
    /// messages for the caller to place (file, line).
    pub fn split(&self, messages: &[Message]) -> Result<(String, String)> {
        let last = messages
            .iter()
            .rposition(|m| m.role == "assistant")
            .ok_or_else(|| anyhow!("the conversation has no assistant turn"))?;
        let prompt = self.render(&messages[..last], true)?;
        Ok((prompt, messages[last].content.clone()))
    }
}

/// Readies a data file's samples for `template`. With [`Template::Chat`] each sample's prompt is
/// rendered with the chat template of `model` (a conversation record: all turns before its last
/// assistant turn; an instruction record: `system` if given, then a user turn of instruction and
/// input) and its end-of-turn text set; with another template a conversation record is refused.
/// Errors name `file` and the record's line.
pub fn prepare(
    samples: &mut [Sample],
    template: Template,
    system: Option<&str>,
    model: &Path,
    file: &Path,
) -> Result<()> {
    let file = file.display();
    if template != Template::Chat {
        if system.is_some() {
            bail!("{file}: a system message (data.system, --system) needs the chat template");
        }
        if let Some(s) = samples.iter().find(|s| !s.messages.is_empty()) {
            bail!(
                "{file}:{}: a conversation record needs data.template = \"chat\" (the model's \
                 own chat template renders it)",
                s.id
            );
        }
        return Ok(());
    }
    let chat = ChatTemplate::require(model)?;
    // The trailing newline ChatML puts after <|im_end|> separates turns; it is not generated.
    let end_of_turn = chat.end_of_turn()?.trim_end().to_string();
    for s in samples.iter_mut() {
        let messages = if s.messages.is_empty() {
            // Processed records carry only a rendered prompt: it becomes the user's turn.
            let user = match (&s.prompt, s.instruction.is_empty(), s.input.is_empty()) {
                (Some(p), true, _) => p.clone(),
                (_, _, true) => s.instruction.clone(),
                _ => format!("{}\n\n{}", s.instruction, s.input),
            };
            {
                let system = system.map(|t| Message::new("system", t));
                let turns = [
                    Message::new("user", user),
                    Message::new("assistant", s.response.clone()),
                ];
                system.into_iter().chain(turns).collect()
            }
        } else {
            s.messages.clone()
        };
        let (prompt, response) = chat
            .split(&messages)
            .map_err(|e| anyhow!("{file}:{}: {e:#}", s.id))?;
        s.prompt = Some(prompt);
        s.response = response;
        s.end_of_turn = end_of_turn.clone();
    }
    Ok(())
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// whose separators (", " and ": ") and unescaped HTML characters differ from minijinja's own.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    use serde::Serialize;
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let bad =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value
                .serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
                .map_err(bad)?;
        }
        None => value
            .serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, PySpaced,
            ))
            .map_err(bad)?,
    }
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

/// Python's default JSON separators: ", " between items, ": " after keys.
struct PySpaced;

impl serde_json::ser::Formatter for PySpaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `strftime_now(format)`: the current local time formatted (UTC here: no time-zone
/// database is needed for training prompts, where the date only fills a system line).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    // The directives real templates use (Llama 3.x: "%d %b %Y"); others are left as written.
    format
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_723 + 59), (2024, 2, 29));
    }
}
