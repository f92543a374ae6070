//! The training schedule: stages, the data each stage sees, and the temperature and KD weight
//! of each stage (POCL.md §3). Every curriculum kind, the paper's method, its ablations and the
//! plain baseline, is one `Kind` of the same schedule, decided here.

use crate::kd::Mix;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Plain KD: all data, fixed temperature and KD weight, one stage.
    None,
    /// POCL: easy-to-hard buckets (Baby Step) with rising temperature and KD weight.
    Pocl,
    /// Buckets easy to hard, fixed temperature and KD weight.
    BabyStep,
    /// All data every stage, rising temperature and KD weight.
    TemperatureOnly,
    /// POCL's schedule on randomly formed buckets.
    RandomOrder,
    /// POCL's schedule, hardest bucket first.
    Anti,
}

impl Kind {
    /// Whether samples are ordered by measured difficulty (and so need the measurer).
    pub fn needs_scores(self) -> bool {
        matches!(self, Kind::Pocl | Kind::BabyStep | Kind::Anti)
    }

    /// Whether stages add buckets progressively (otherwise every stage sees all data).
    pub fn uses_buckets(self) -> bool {
        matches!(
            self,
            Kind::Pocl | Kind::BabyStep | Kind::RandomOrder | Kind::Anti
        )
    }

    /// Whether temperature and KD weight follow the rising per-stage schedule.
    pub fn rises(self) -> bool {
        matches!(
            self,
            Kind::Pocl | Kind::TemperatureOnly | Kind::RandomOrder | Kind::Anti
        )
    }
}

/// The resolved schedule; `stages` is 1 for `Kind::None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: Kind,
    pub stages: usize,
    /// Temperature of the first and last stage (linear in between); the fixed kinds use `t_start`.
    pub t_start: f64,
    pub t_end: f64,
    /// KD weight a of the first and last stage (linear in between); the fixed kinds use `a_end`.
    pub a_start: f64,
    pub a_end: f64,
}

/// What one stage trains on and with.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub index: usize,
    /// Buckets 0..=b are active; `None` means all data (kinds without buckets).
    pub last_bucket: Option<usize>,
    /// The stage's temperature and KD weight.
    pub mix: Mix,
}

fn lerp(a: f64, b: f64, s: usize, n: usize) -> f64 {
    if n <= 1 {
        a
    } else {
        a + (b - a) * s as f64 / (n - 1) as f64
    }
}

impl Schedule {
    pub fn stage(&self, s: usize) -> Stage {
        let n = self.stages;
        let (temperature, kd_weight) = if self.kind.rises() {
            (
                lerp(self.t_start, self.t_end, s, n),
                lerp(self.a_start, self.a_end, s, n),
            )
        } else {
            (self.t_start, self.a_end)
        };
        let last_bucket = self.kind.uses_buckets().then_some(s);
        Stage {
            index: s,
            last_bucket,
            mix: Mix {
                temperature,
                kd_weight,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paper(kind: Kind) -> Schedule {
        Schedule {
            kind,
            stages: 4,
            t_start: 1.0,
            t_end: 2.0,
            a_start: 0.7,
            a_end: 1.0,
        }
    }

    #[test]
    fn pocl_defaults_are_the_papers() {
        let s = paper(Kind::Pocl);
        let st: Vec<Stage> = (0..4).map(|i| s.stage(i)).collect();
        let t: Vec<f64> = st.iter().map(|x| x.mix.temperature).collect();
        let a: Vec<f64> = st.iter().map(|x| x.mix.kd_weight).collect();
        let b: Vec<Option<usize>> = st.iter().map(|x| x.last_bucket).collect();
        for (got, want) in t.iter().zip([1.0, 4.0 / 3.0, 5.0 / 3.0, 2.0]) {
            assert!((got - want).abs() < 1e-12);
        }
        for (got, want) in a.iter().zip([0.7, 0.8, 0.9, 1.0]) {
            assert!((got - want).abs() < 1e-12);
        }
        assert_eq!(b, vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn ablations_change_one_thing_each() {
        let bs = paper(Kind::BabyStep);
        assert_eq!(
            (bs.stage(0).mix.temperature, bs.stage(3).mix.temperature),
            (1.0, 1.0)
        );
        assert_eq!(bs.stage(1).last_bucket, Some(1));
        let to = paper(Kind::TemperatureOnly);
        assert_eq!(to.stage(0).last_bucket, None, "all data from the start");
        assert_eq!(to.stage(3).mix.temperature, 2.0);
        assert!(Kind::Anti.needs_scores() && !Kind::RandomOrder.needs_scores());
        let none = Schedule {
            stages: 1,
            ..paper(Kind::None)
        };
        assert_eq!(
            none.stage(0),
            Stage {
                index: 0,
                last_bucket: None,
                mix: Mix {
                    temperature: 1.0,
                    kd_weight: 1.0
                }
            }
        );
    }
}
