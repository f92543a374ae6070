//! Evaluation metrics: ROUGE-L identical to Google's rouge-score (with NLTK's Porter stemmer)
//! and DistiLLM's exact match.

pub mod evaluate;
pub mod porter;
pub mod rouge;

pub use rouge::{exact_match, rouge_l, rouge_l_multi, score_corpus, tokenize, CorpusScores};
