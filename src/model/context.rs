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

/// `(max_prompt_len, max_len)` of teacher-forced sequences on a model of `positions`
/// positions, and the notice to print when they had to be lowered.
pub fn fit_sequences(
    positions: usize,
    max_prompt_len: usize,
    max_len: usize,
) -> (usize, usize, Option<String>) {
    if max_len <= positions {
        return (max_prompt_len, max_len, None);
    }
    let len = positions.max(2);
    // The prompt keeps at most half when it would leave no room for the response.
    let prompt = if max_prompt_len < len {
        max_prompt_len
    } else {
        len / 2
    };
    let notice = format!(
        "the model has {positions} positions: sequences are cut to max_len {len} (was {max_len}){}",
        if prompt != max_prompt_len {
            format!(", prompts to max_prompt_len {prompt} (was {max_prompt_len})")
        } else {
            String::new()
        }
    );
    (prompt, len, Some(notice))
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
        assert_eq!(fit_sequences(128, 64, 128), (64, 128, None));
        let (p, l, n) = fit_sequences(128, 256, 512);
        assert_eq!((p, l), (64, 128));
        assert!(n.unwrap().contains("max_len 128"));
        assert_eq!(fit_sequences(128, 100, 512).0, 100);
    }
}
