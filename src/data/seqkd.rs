//! SeqKD data (the baseline that trains on a teacher's answers): the training samples with the
//! teacher's answer as their response. `pocl generate-data` produces the answers.

use super::Sample;
use crate::eval::evaluate::Generated;

/// The SeqKD samples and what was left out.
#[derive(Debug, Default)]
pub struct TeacherData {
    /// The input samples, in order, with the teacher's answer as response (instruction, context
    /// and category kept; extra references dropped: they belonged to the old response).
    pub samples: Vec<Sample>,
    /// Ids of the samples dropped for an empty (or whitespace-only) answer, which training would
    /// skip anyway (`SkipReason::EmptyResponse`).
    pub empty: Vec<u64>,
    /// Kept answers that ended at the token limit without an EOS.
    pub unfinished: usize,
    /// New tokens in the kept answers.
    pub tokens: usize,
}

/// Pairs samples with the teacher's answers (`answers[i]` answers `samples[i]`).
pub fn teacher_data(samples: &[Sample], answers: &[Generated], eos_ids: &[u32]) -> TeacherData {
    let mut d = TeacherData::default();
    for (s, g) in samples.iter().zip(answers) {
        if g.text.trim().is_empty() {
            d.empty.push(s.id);
            continue;
        }
        d.tokens += g.ids.len();
        d.unfinished += !g.ids.iter().any(|t| eos_ids.contains(t)) as usize;
        d.samples.push(Sample {
            response: g.text.clone(),
            extra_references: Vec::new(),
            ..s.clone()
        });
    }
    d
}
