//! Instruction data: JSONL formats ([`format`]), the prompt template ([`template`]), the
//! tokenization rules, batching and masks ([`batch`], the one place that decides them), and the
//! built-in synthetic benchmark ([`synthetic`]), SeqKD data from a teacher's answers ([`seqkd`]).

pub mod batch;
pub mod chat;
pub mod format;
pub mod jsonl;
pub mod seqkd;
pub mod synthetic;
pub mod template;

pub use batch::{
    collate, counted_rows, encode_sample, encode_samples, prompt_ids, Batch, EncodeOptions,
    Encoded, Example, SkipReason,
};
pub use chat::{ChatTemplate, Message};
pub use format::{load_jsonl, seeded_split, Format, LoadOptions, Loaded};
pub use template::Template;

/// One instruction-following sample as read from a file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Stable id: the record's 1-based line number in its file (survives skipping bad records,
    /// filtering and curriculum reordering).
    pub id: u64,
    pub instruction: String,
    /// Dolly's `context` or Alpaca's `input`; empty when absent.
    pub input: String,
    /// The reference response (Dolly `response`, Alpaca/processed `output`).
    pub response: String,
    /// Dolly's `category` (the synthetic benchmark stores its task family there); may be empty.
    pub category: String,
    /// A pre-rendered prompt (processed DistiLLM/POCL data): used verbatim instead of the template.
    pub prompt: Option<String>,
    /// Further acceptable answers for evaluation (processed test sets with a list of outputs);
    /// ROUGE-L takes the best over `response` and these.
    pub extra_references: Vec<String>,
    /// The turns of a conversation record (messages / ShareGPT formats); empty otherwise. The
    /// prompt and response are rendered from them with the model's chat template.
    pub messages: Vec<Message>,
    /// Text trained after the response but not part of it as a reference: the chat template's
    /// end-of-turn token (empty for other templates).
    pub end_of_turn: String,
}

impl Sample {
    pub fn new(
        id: u64,
        instruction: impl Into<String>,
        input: impl Into<String>,
        response: impl Into<String>,
    ) -> Self {
        Sample {
            id,
            instruction: instruction.into(),
            input: input.into(),
            response: response.into(),
            ..Default::default()
        }
    }

    /// All acceptable answers: the response first, then any extra references.
    pub fn references(&self) -> Vec<&str> {
        std::iter::once(self.response.as_str())
            .chain(self.extra_references.iter().map(String::as_str))
            .collect()
    }
}
