//! Reciprocal rank fusion of the difficulty metrics and the partition into buckets (POCL.md §2).
//!
//! rank_R orders by ROUGE-L descending, rank_L by cross-entropy ascending (1 = easiest for both);
//! score = Σ 1/(k + rank) over the chosen metrics; samples are sorted by score descending
//! (easiest first). Every tie (equal metric values, equal scores) is broken by the sample's input
//! position, so the result is deterministic.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Rouge,
    Ce,
    Both,
}

impl std::str::FromStr for Metric {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "rouge" => Ok(Metric::Rouge),
            "ce" => Ok(Metric::Ce),
            "both" => Ok(Metric::Both),
            _ => anyhow::bail!("unknown difficulty metric \"{s}\" (rouge, ce, both)"),
        }
    }
}

/// One sample's measured difficulty and its place in the curriculum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub id: u64,
    /// ROUGE-L F1 ×100 of the student's greedy answer.
    pub rouge: f64,
    /// Mean teacher-forced cross-entropy of the reference response.
    pub ce: f64,
    pub rank_rouge: usize,
    pub rank_ce: usize,
    pub rrf: f64,
    pub bucket: usize,
}

/// Ordinal ranks (1-based) of `keys` under `order`, ties broken by position.
fn ranks(n: usize, cmp: impl Fn(usize, usize) -> std::cmp::Ordering) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| cmp(a, b).then(a.cmp(&b)));
    let mut rank = vec![0; n];
    for (r, &i) in idx.iter().enumerate() {
        rank[i] = r + 1;
    }
    rank
}

/// Fuses the metrics of `(id, rouge, ce)` samples and returns them easiest first with their
/// bucket (0..buckets). A NaN metric counts as the hardest value.
pub fn fuse(samples: &[(u64, f64, f64)], metric: Metric, k: f64, buckets: usize) -> Vec<Scored> {
    let n = samples.len();
    let hard_last = |x: f64, worst: f64| if x.is_nan() { worst } else { x };
    let rouge: Vec<f64> = samples
        .iter()
        .map(|s| hard_last(s.1, f64::NEG_INFINITY))
        .collect();
    let ce: Vec<f64> = samples
        .iter()
        .map(|s| hard_last(s.2, f64::INFINITY))
        .collect();
    let rank_rouge = ranks(n, |a, b| rouge[b].total_cmp(&rouge[a]));
    let rank_ce = ranks(n, |a, b| ce[a].total_cmp(&ce[b]));
    let rrf: Vec<f64> = (0..n)
        .map(|i| {
            let r = 1.0 / (k + rank_rouge[i] as f64);
            let l = 1.0 / (k + rank_ce[i] as f64);
            match metric {
                Metric::Rouge => r,
                Metric::Ce => l,
                Metric::Both => r + l,
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| rrf[b].total_cmp(&rrf[a]).then(a.cmp(&b)));
    order
        .iter()
        .enumerate()
        .map(|(pos, &i)| Scored {
            id: samples[i].0,
            rouge: samples[i].1,
            ce: samples[i].2,
            rank_rouge: rank_rouge[i],
            rank_ce: rank_ce[i],
            rrf: rrf[i],
            bucket: bucket_of(pos, n, buckets),
        })
        .collect()
}

/// Bucket of the sample at sorted position `pos`: equal buckets of n / S, the remainder going to
/// the last bucket.
pub fn bucket_of(pos: usize, n: usize, buckets: usize) -> usize {
    let size = (n / buckets).max(1);
    (pos / size).min(buckets - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_ranks_and_scores() {
        // id, rouge, ce: sample 2 is best on both, sample 0 worst on both.
        let s = [
            (10, 5.0, 3.0),
            (11, 20.0, 2.0),
            (12, 50.0, 1.0),
            (13, 20.0, 2.5),
        ];
        let f = fuse(&s, Metric::Both, 60.0, 2);
        let ids: Vec<u64> = f.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![12, 11, 13, 10]);
        // Tied ROUGE (11 and 13): the earlier sample gets the better rank.
        let r11 = f.iter().find(|x| x.id == 11).unwrap();
        let r13 = f.iter().find(|x| x.id == 13).unwrap();
        assert_eq!((r11.rank_rouge, r13.rank_rouge), (2, 3));
        assert!((f[0].rrf - 2.0 / 61.0).abs() < 1e-15);
        assert_eq!(
            f.iter().map(|x| x.bucket).collect::<Vec<_>>(),
            vec![0, 0, 1, 1]
        );
    }

    #[test]
    fn single_metric_ablations() {
        // ROUGE says 0 is easiest, CE says 1 is.
        let s = [(0, 90.0, 5.0), (1, 10.0, 0.5)];
        assert_eq!(fuse(&s, Metric::Rouge, 60.0, 1)[0].id, 0);
        assert_eq!(fuse(&s, Metric::Ce, 60.0, 1)[0].id, 1);
        // Equal fused scores: input order decides.
        assert_eq!(fuse(&s, Metric::Both, 60.0, 1)[0].id, 0);
    }

    #[test]
    fn buckets_put_the_remainder_last() {
        let b: Vec<usize> = (0..10).map(|p| bucket_of(p, 10, 4)).collect();
        assert_eq!(b, vec![0, 0, 1, 1, 2, 2, 3, 3, 3, 3]);
        let b: Vec<usize> = (0..3).map(|p| bucket_of(p, 3, 4)).collect();
        assert_eq!(b, vec![0, 1, 2], "fewer samples than buckets");
    }

    #[test]
    fn nan_is_hardest() {
        let s = [(0, f64::NAN, f64::NAN), (1, 1.0, 9.0)];
        assert_eq!(fuse(&s, Metric::Both, 60.0, 2)[1].id, 0);
    }
}
