//! The model's context length (`max_positions`): the one rule for sequences that would need a
//! position beyond it. Learned position tables (GPT-2, OPT) have no row there, and rotary
//! models were never trained there, so no command builds such a position:
//! - generation ([`generation_budget`], applied per row by `model::generate`): a prompt keeps
//!   its last tokens (the continuation depends on the end of the prompt, where the template's
//!   answer header is) and the answer stops at the model's last position; the row's budget
//!   depends only on its own prompt, so batching does not change results;
//! - teacher-forced sequences (training, dev loss, the measurer's cross-entropy:
//!   [`fit_sequences`]): `max_len` is lowered to the positions, `max_prompt_len` with it.
//!
//! Each adjustment is announced by one notice line per process ([`notice_once`]).

use std::collections::HashSet;
use std::sync::Mutex;

/// Positions a prompt of `prompt` tokens and `new` generated tokens use: the last generated
/// token is never fed back to the model.
pub fn positions_used(prompt: usize, new: usize) -> usize {
    prompt + new.saturating_sub(1)
}

/// For a prompt of `prompt` tokens and up to `max_new` new ones on a model of `positions`
/// positions: (prompt tokens kept, counted from its end; new tokens allowed). Unchanged when it
/// fits. Otherwise the answer keeps its length if that leaves the prompt at least half the
/// positions; else the prompt is cut to half the positions and the answer gets the rest.
pub fn generation_budget(positions: usize, prompt: usize, max_new: usize) -> (usize, usize) {
    let positions = positions.max(1);
    if positions_used(prompt, max_new) <= positions {
        return (prompt, max_new);
    }
    let half = (positions / 2).max(1);
    let keep = if max_new <= half {
        positions + 1 - max_new.max(1)
    } else {
        prompt.min(half)
    };
    let keep = keep.min(prompt);
    (keep, (positions + 1 - keep).min(max_new))
}

/// Settings lowered to fit a model of `positions` positions, each change recorded under the
/// name the user set it by (a recipe key or a flag), announced by [`Limits::notice`] on one line.
pub struct Limits {
    positions: usize,
    changes: Vec<(String, usize, usize)>,
}

impl Limits {
    pub fn new(positions: usize) -> Self {
        Limits {
            positions,
            changes: Vec::new(),
        }
    }

    fn set(&mut self, key: &str, value: &mut usize, to: usize) {
        if to != *value {
            self.changes.push((key.to_string(), *value, to));
            *value = to;
        }
    }

    /// Teacher-forced sequences (`max_len` tokens, prompts of `max_prompt_len`): `max_len` is
    /// lowered to the positions, and the prompt to half of them when it would leave no room.
    pub fn sequences(
        &mut self,
        (prompt_key, max_prompt_len): (&str, &mut usize),
        (len_key, max_len): (&str, &mut usize),
    ) {
        if *max_len <= self.positions {
            return;
        }
        let len = self.positions.max(2);
        if *max_prompt_len >= len {
            self.set(prompt_key, max_prompt_len, len / 2);
        }
        self.set(len_key, max_len, len);
    }

    /// Answers of up to `max_new` tokens to prompts of up to `max_prompt_len` tokens
    /// ([`generation_budget`] of the longest prompt).
    pub fn new_tokens(&mut self, key: &str, max_prompt_len: usize, max_new: &mut usize) {
        let (keep, new) = generation_budget(self.positions, max_prompt_len, *max_new);
        if keep == max_prompt_len {
            self.set(key, max_new, new);
        }
    }

    /// The changes as one notice line (printed once per process), if there were any.
    pub fn notice(&self) {
        if self.changes.is_empty() {
            return;
        }
        let list: Vec<String> = self
            .changes
            .iter()
            .map(|(k, from, to)| format!("{k} {from} -> {to}"))
            .collect();
        notice_once(&format!(
            "the model has {} positions: lowered {}",
            self.positions,
            list.join(", ")
        ));
    }
}

/// Prints `notice: {text}` on stderr the first time this text is given in this process.
pub fn notice_once(text: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen
        .get_or_insert_with(HashSet::new)
        .insert(text.to_string())
    {
        eprintln!("notice: {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_never_pass_the_last_position() {
        for positions in 1..40 {
            for prompt in 1..60 {
                for max_new in 1..60 {
                    let (keep, new) = generation_budget(positions, prompt, max_new);
                    assert!(keep >= 1 && keep <= prompt && new >= 1 && new <= max_new);
                    assert!(
                        positions_used(keep, new) <= positions,
                        "{positions} {prompt} {max_new}"
                    );
                    if positions_used(prompt, max_new) <= positions {
                        assert_eq!((keep, new), (prompt, max_new));
                    }
                }
            }
        }
        // The case: 128 positions, 256-token prompts, 256 new tokens.
        assert_eq!(generation_budget(128, 256, 256), (64, 65));
        assert_eq!(generation_budget(128, 10, 256), (10, 119));
        assert_eq!(generation_budget(128, 256, 32), (97, 32));
    }

    #[test]
    fn sequences_fit_the_positions() {
        let (mut p, mut l, mut n) = (64, 128, 32);
        let mut lim = Limits::new(128);
        lim.sequences(("p", &mut p), ("l", &mut l));
        lim.new_tokens("n", p, &mut n);
        assert_eq!((p, l, n, lim.changes.len()), (64, 128, 32, 0));
        let (mut p, mut l, mut n) = (256, 512, 256);
        lim.sequences(("p", &mut p), ("l", &mut l));
        lim.new_tokens("n", p, &mut n);
        assert_eq!((p, l, n), (64, 128, 65));
        assert_eq!(lim.changes.len(), 3);
        let (mut p, mut l) = (100, 512);
        lim.sequences(("p", &mut p), ("l", &mut l));
        assert_eq!((p, l), (100, 128));
    }
}
