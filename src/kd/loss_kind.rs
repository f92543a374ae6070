//! The loss a recipe asks for (`objective.loss`): one of the divergences, GKD (on-policy JSD), or
//! SFT (cross-entropy on the references alone). Parsed once, when the recipe is read; written
//! back under the same names.

use super::Divergence;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossKind {
    Fkl,
    Rkl,
    Jsd,
    Tvd,
    Skl,
    Srkl,
    /// On-policy JSD (GKD): part of the batches are answered by the student first.
    Gkd,
    /// Supervised fine-tuning: KD weight 0.
    Sft,
}

impl LossKind {
    pub const ALL: [LossKind; 8] = [
        LossKind::Fkl,
        LossKind::Rkl,
        LossKind::Jsd,
        LossKind::Tvd,
        LossKind::Skl,
        LossKind::Srkl,
        LossKind::Gkd,
        LossKind::Sft,
    ];

    /// Whether the loss compares the student with a teacher: every kind but SFT. SFT trains
    /// without one, at KD weight 0 in every stage (`config::Recipe::schedule`).
    pub fn needs_teacher(self) -> bool {
        self != LossKind::Sft
    }

    /// Whether part of the batches are answered by the student before the loss (GKD).
    pub fn on_policy(self) -> bool {
        self == LossKind::Gkd
    }

    /// The divergence the KD term uses: the kind's own, JSD for GKD, and for SFT (whose KD
    /// weight is 0) forward KL as a stand-in. `alpha` and `beta` are the recipe-wide values;
    /// each divergence takes only its own (α: skl, srkl; β: jsd).
    pub fn divergence(self, alpha: f64, beta: f64) -> anyhow::Result<Divergence> {
        let name = match self {
            LossKind::Gkd => "jsd",
            LossKind::Sft => "fkl",
            k => k.name(),
        };
        let alpha = matches!(name, "skl" | "srkl").then_some(alpha);
        let beta = (name == "jsd").then_some(beta);
        Divergence::parse(name, alpha, beta)
    }

    /// The name recipes use.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Fkl => "fkl",
            LossKind::Rkl => "rkl",
            LossKind::Jsd => "jsd",
            LossKind::Tvd => "tvd",
            LossKind::Skl => "skl",
            LossKind::Srkl => "srkl",
            LossKind::Gkd => "gkd",
            LossKind::Sft => "sft",
        }
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossKind {
    type Err = String;

    /// A loss name, in any case.
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim().to_ascii_lowercase();
        LossKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = LossKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown loss \"{s}\"; choose one of {}", names.join(", "))
            })
    }
}

impl Serialize for LossKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LossKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_the_choices() {
        for k in LossKind::ALL {
            assert_eq!(k.name().parse::<LossKind>(), Ok(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert_eq!(" SRKL ".parse::<LossKind>(), Ok(LossKind::Srkl));
        let e = "kl".parse::<LossKind>().unwrap_err();
        assert!(e.contains("\"kl\"") && e.contains("fkl, rkl, jsd, tvd, skl, srkl, gkd, sft"));
    }
}
