//! Instruction data: JSONL formats, the prompt template, tokenization rules, batching and masks,
//! and the built-in synthetic benchmark.

pub mod jsonl;
