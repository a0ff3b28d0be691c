//! Authorization policy: data, loaded from TOML and replaceable at run time.
//!
//! Which issuers each area accepts, which areas honour which concession from which date (the
//! rollout of concessions onto the social security card runs area by area from 2025 to 2027),
//! the metro pass-back window, fare estimates, and what to do when the card directory is down.

use chrono::NaiveDate;
use serde::Deserialize;
use std::collections::HashMap;
use tapgate_protocol::{AreaCode, Concession, Issuer, Mode};

/// The policy shipped with tapgate; `policy.example.toml` at the repository root is the same
/// text, documented for operators.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../policy.example.toml");

/// What to answer for a card that is not cached while the card directory cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DegradedMode {
    /// Deny with reason `directory_unavailable`.
    Deny,
    /// Accept the ride at the full fare ("first-ride risk"), recorded like any approval so
    /// settlement can recover it; concessions are not applied since they cannot be checked.
    FirstRide,
}

/// Fare estimates in fen, answered to the gate. Settlement computes the real fare.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FareEstimates {
    pub bus: u32,
    pub ferry: u32,
    pub cableway: u32,
    /// Metro entry: the minimum fare. An exit with no known entry: the maximum.
    pub metro_min: u32,
    pub metro_max: u32,
    pub intercity_rail_min: u32,
    pub intercity_rail_max: u32,
}

impl FareEstimates {
    pub fn flat_or_min(&self, mode: Mode) -> u32 {
        match mode {
            Mode::Bus => self.bus,
            Mode::Ferry => self.ferry,
            Mode::Cableway => self.cableway,
            Mode::Metro => self.metro_min,
            Mode::IntercityRail => self.intercity_rail_min,
        }
    }

    pub fn max(&self, mode: Mode) -> u32 {
        match mode {
            Mode::Metro => self.metro_max,
            Mode::IntercityRail => self.intercity_rail_max,
            other => self.flat_or_min(other),
        }
    }
}

/// Which areas a rollout step covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AreaSet {
    All,
    Some(Vec<AreaCode>),
}

impl AreaSet {
    fn contains(&self, area: AreaCode) -> bool {
        match self {
            AreaSet::All => true,
            AreaSet::Some(areas) => areas.contains(&area),
        }
    }
}

/// From `from` on, `concession` is honoured in `areas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutStep {
    pub concession: Concession,
    pub areas: AreaSet,
    pub from: NaiveDate,
}

/// How a concession is applied once honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcessionRule {
    /// Share of the fare the rider pays, in percent (0 = free).
    pub pay_percent: u8,
    /// Whether each ride uses one from the card's yearly allowance (the elder card's 1,200).
    pub counted: bool,
    /// Modes the concession covers.
    pub modes: Vec<Mode>,
}

/// The whole authorization policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub pass_back_window_ms: u64,
    pub degraded_mode: DegradedMode,
    pub fares: FareEstimates,
    pub default_issuers: Vec<Issuer>,
    pub area_issuers: HashMap<AreaCode, Vec<Issuer>>,
    /// Issuers whose cards' concessions Chongqing honours.
    pub concession_issuers: Vec<Issuer>,
    pub concession_rules: HashMap<Concession, ConcessionRule>,
    pub rollout: Vec<RolloutStep>,
}

impl Policy {
    pub fn issuer_accepted(&self, area: AreaCode, issuer: Issuer) -> bool {
        self.area_issuers
            .get(&area)
            .unwrap_or(&self.default_issuers)
            .contains(&issuer)
    }

    /// The rule for `concession` if it is honoured for `issuer` in `area`, on `mode`, on `date`.
    pub fn honoured(
        &self,
        concession: Concession,
        issuer: Issuer,
        area: AreaCode,
        mode: Mode,
        date: NaiveDate,
    ) -> Option<&ConcessionRule> {
        if concession == Concession::None || !self.concession_issuers.contains(&issuer) {
            return None;
        }
        let rule = self.concession_rules.get(&concession)?;
        let rolled_out = self
            .rollout
            .iter()
            .any(|s| s.concession == concession && s.from <= date && s.areas.contains(area));
        (rolled_out && rule.modes.contains(&mode)).then_some(rule)
    }

    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
        raw.validate()
    }

    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_POLICY_TOML).expect("the shipped policy is valid")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML for its schema: {0}")]
    Toml(String),
    #[error("policy names unknown {kind} `{value}`")]
    Unknown { kind: &'static str, value: String },
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    pass_back_window_s: u64,
    degraded_mode: DegradedMode,
    fares: FareEstimates,
    issuers: RawIssuers,
    concession_issuers: Vec<String>,
    concessions: HashMap<String, RawConcessionRule>,
    #[serde(default)]
    rollout: Vec<RawRollout>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuers {
    default: Vec<String>,
    #[serde(default)]
    areas: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConcessionRule {
    pay_percent: u8,
    counted: bool,
    modes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    concession: String,
    /// `"all"` or a list of area codes.
    areas: toml::Value,
    from: NaiveDate,
}

fn issuer(label: &str) -> Result<Issuer, PolicyError> {
    Issuer::from_label(label).ok_or_else(|| PolicyError::Unknown {
        kind: "issuer",
        value: label.to_owned(),
    })
}

fn issuers(labels: &[String]) -> Result<Vec<Issuer>, PolicyError> {
    labels.iter().map(|l| issuer(l)).collect()
}

fn area(text: &str) -> Result<AreaCode, PolicyError> {
    text.parse::<u32>()
        .ok()
        .map(AreaCode)
        .filter(|code| code.area().is_some())
        .ok_or_else(|| PolicyError::Unknown {
            kind: "area",
            value: text.to_owned(),
        })
}

fn concession(label: &str) -> Result<Concession, PolicyError> {
    Concession::from_label(label).ok_or_else(|| PolicyError::Unknown {
        kind: "concession",
        value: label.to_owned(),
    })
}

/// The most a fare estimate may be, in fen (10,000 yuan), as for the fare tables.
const MAX_ESTIMATE_FEN: u32 = 1_000_000;
/// The longest pass-back window: a day.
const MAX_PASS_BACK_S: u64 = 24 * 3600;

fn invalid(key: impl Into<String>, why: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

impl FareEstimates {
    fn check(&self) -> Result<(), PolicyError> {
        for (key, fen) in [
            ("fares.bus", self.bus),
            ("fares.ferry", self.ferry),
            ("fares.cableway", self.cableway),
            ("fares.metro_min", self.metro_min),
            ("fares.metro_max", self.metro_max),
            ("fares.intercity_rail_min", self.intercity_rail_min),
            ("fares.intercity_rail_max", self.intercity_rail_max),
        ] {
            if fen > MAX_ESTIMATE_FEN {
                return Err(invalid(
                    key,
                    format!("{fen} fen is more than {MAX_ESTIMATE_FEN}"),
                ));
            }
        }
        if self.metro_min > self.metro_max {
            return Err(invalid(
                "fares.metro_min",
                format!(
                    "{} is more than metro_max {}",
                    self.metro_min, self.metro_max
                ),
            ));
        }
        if self.intercity_rail_min > self.intercity_rail_max {
            return Err(invalid(
                "fares.intercity_rail_min",
                format!(
                    "{} is more than intercity_rail_max {}",
                    self.intercity_rail_min, self.intercity_rail_max
                ),
            ));
        }
        Ok(())
    }
}

impl RawPolicy {
    fn validate(self) -> Result<Policy, PolicyError> {
        self.fares.check()?;
        if self.pass_back_window_s > MAX_PASS_BACK_S {
            return Err(invalid(
                "pass_back_window_s",
                format!("{} s is longer than a day", self.pass_back_window_s),
            ));
        }
        let mut area_issuers = HashMap::new();
        for (code, list) in &self.issuers.areas {
            area_issuers.insert(area(code)?, issuers(list)?);
        }
        let mut concession_rules = HashMap::new();
        for (name, rule) in self.concessions {
            if rule.pay_percent > 100 {
                return Err(invalid(
                    format!("concessions.{name}.pay_percent"),
                    format!("{} % is more than 100", rule.pay_percent),
                ));
            }
            let modes = rule
                .modes
                .iter()
                .map(|m| {
                    Mode::from_label(m).ok_or_else(|| PolicyError::Unknown {
                        kind: "mode",
                        value: m.clone(),
                    })
                })
                .collect::<Result<_, _>>()?;
            concession_rules.insert(
                concession(&name)?,
                ConcessionRule {
                    pay_percent: rule.pay_percent,
                    counted: rule.counted,
                    modes,
                },
            );
        }
        let mut rollout = Vec::new();
        for step in self.rollout {
            let areas = match &step.areas {
                toml::Value::String(s) if s == "all" => AreaSet::All,
                toml::Value::Array(items) => AreaSet::Some(
                    items
                        .iter()
                        .map(|v| match v {
                            toml::Value::String(s) => area(s),
                            toml::Value::Integer(i) => area(&i.to_string()),
                            other => area(&other.to_string()),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => {
                    return Err(PolicyError::Unknown {
                        kind: "area set",
                        value: other.to_string(),
                    });
                }
            };
            rollout.push(RolloutStep {
                concession: concession(&step.concession)?,
                areas,
                from: step.from,
            });
        }
        Ok(Policy {
            pass_back_window_ms: self.pass_back_window_s.saturating_mul(1000),
            degraded_mode: self.degraded_mode,
            fares: self.fares,
            default_issuers: issuers(&self.issuers.default)?,
            area_issuers,
            concession_issuers: issuers(&self.concession_issuers)?,
            concession_rules,
            rollout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsense_in_the_policy_is_refused_with_its_key() {
        for (from, to, key) in [
            ("metro_max = 700", "metro_max = 100", "fares.metro_min"),
            (
                "[concessions.student]\npay_percent = 50",
                "[concessions.student]\npay_percent = 150",
                "concessions.student.pay_percent",
            ),
        ] {
            assert!(DEFAULT_POLICY_TOML.contains(from), "{from}");
            let text = DEFAULT_POLICY_TOML.replace(from, to);
            match Policy::from_toml(&text) {
                Err(PolicyError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{to}: {other:?}"),
            }
        }
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn shipped_policy_parses_and_rolls_elder_out_from_one_area_to_all() {
        let p = Policy::embedded_default();
        let yuzhong = AreaCode(500103);
        let wanzhou = AreaCode(500101);
        let honoured = |area, day| {
            p.honoured(
                Concession::Elder,
                Issuer::ChongqingSsc,
                area,
                Mode::Bus,
                day,
            )
            .is_some()
        };
        assert!(!honoured(yuzhong, date(2025, 8, 31)));
        assert!(honoured(yuzhong, date(2025, 9, 1)));
        assert!(!honoured(wanzhou, date(2026, 11, 29)));
        assert!(honoured(wanzhou, date(2027, 1, 1)));
    }

    #[test]
    fn unknown_names_are_rejected_with_what_was_wrong() {
        let bad = DEFAULT_POLICY_TOML.replace("\"t_union\"", "\"t_onion\"");
        assert_eq!(
            Policy::from_toml(&bad),
            Err(PolicyError::Unknown {
                kind: "issuer",
                value: "t_onion".into()
            })
        );
        assert!(matches!(
            Policy::from_toml("pass_back_window_s = \"x\""),
            Err(PolicyError::Toml(_))
        ));
    }
}
