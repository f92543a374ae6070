//! Prompt templates. `Alpaca` is the one of POCL/DistiLLM (POCL.md §5), byte for byte; `Plain`
//! is a short template for tiny models where the Alpaca preamble would dominate the sequence.

use super::Sample;
use anyhow::{bail, Result};

const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. \
Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";
const ALPACA_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides \
further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\
\n\n### Input:\n{input}\n\n### Response:\n";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Template {
    /// The Alpaca template of the paper, with and without an input section.
    #[default]
    Alpaca,
    /// `{instruction}\n` or `{instruction}\n{input}\n`, then `Answer:\n` (no preamble; ends with a
    /// newline like Alpaca so that BPE does not merge the prompt's end into the response).
    Plain,
    /// The model's own chat template ([`super::chat`]): prompts are rendered when the data is
    /// prepared ([`super::chat::prepare`]) and stored in `Sample::prompt`.
    Chat,
}

impl std::str::FromStr for Template {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "alpaca" => Ok(Template::Alpaca),
            "plain" => Ok(Template::Plain),
            "chat" => Ok(Template::Chat),
            _ => bail!("unknown prompt template {s:?}: expected alpaca, plain or chat"),
        }
    }
}

impl Template {
    /// Renders the prompt text for an instruction and an optional input. As in DistiLLM, an
    /// input counts as present when it is non-empty (whitespace included).
    pub fn render(&self, instruction: &str, input: &str) -> String {
        match self {
            // Plain replace, not format!, so braces inside the data are left alone.
            Template::Alpaca if input.is_empty() => {
                ALPACA_NO_INPUT.replace("{instruction}", instruction)
            }
            Template::Alpaca => {
                // Substitute the input first so an instruction containing "{input}" stays literal.
                let (head, tail) = ALPACA_INPUT.split_once("{instruction}").expect("template");
                format!("{head}{instruction}{}", tail.replace("{input}", input))
            }
            Template::Plain if input.is_empty() => format!("{instruction}\nAnswer:\n"),
            Template::Plain => format!("{instruction}\n{input}\nAnswer:\n"),
            // Chat prompts are rendered from the whole conversation by `chat::prepare`, never
            // from an instruction alone; the encoder refuses a chat sample left unprepared.
            Template::Chat => String::new(),
        }
    }

    /// The prompt of a sample: its pre-rendered prompt when the data has one (processed form),
    /// else the template applied to its instruction and input.
    pub fn prompt(&self, s: &Sample) -> String {
        match &s.prompt {
            Some(p) => p.clone(),
            None => self.render(&s.instruction, &s.input),
        }
    }
}
