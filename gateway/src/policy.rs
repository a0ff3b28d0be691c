//! Authorization policy: data, loaded from TOML and replaceable at run time.
//!
//! Which issuers each area accepts; which cards carry which concession from which date (the
//! social security card takes on concession functions by the card's home area, one area in
//! 2025 to all 41 by 2027, and a card that carries one is honoured at every gate); how each
//! concession is priced, by grade, and counted against a yearly allowance; the metro pass-back
//! window, fare estimates, what to do when the card directory is down, and what a gate may
//! approve while it cannot reach a gateway.

use crate::card::CardRecord;
use chrono::{Datelike, NaiveDate};
use serde::Deserialize;
use std::collections::HashMap;
use tapgate_city::MonthDay;
use tapgate_protocol::{AreaCode, Concession, Issuer, IssuerSet, Mode, OfflineRules};

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

/// Which home areas a rollout step covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AreaSet {
    All,
    Some(Vec<AreaCode>),
}

impl AreaSet {
    fn contains(&self, area: Option<AreaCode>) -> bool {
        match self {
            AreaSet::All => true,
            AreaSet::Some(areas) => area.is_some_and(|a| areas.contains(&a)),
        }
    }
}

/// From `from` on, cards of `issuers` whose home area is in `home_areas` carry `concessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutStep {
    pub concessions: Vec<Concession>,
    pub issuers: Vec<Issuer>,
    pub home_areas: AreaSet,
    pub from: NaiveDate,
}

/// When a yearly allowance starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Renewal {
    /// On 1 January.
    #[serde(rename = "january_1")]
    January1,
    /// On the holder's birthday (the card's `renews_on`); on 1 January for a card without one.
    Birthday,
}

/// A yearly number of counted rides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub rides: u32,
    pub renewal: Renewal,
    /// Rides one top-up adds (`tapgate cards top-up`).
    pub top_up: u32,
}

impl Allowance {
    /// The first day of the allowance period `today` falls in.
    pub fn period_start(&self, renews_on: Option<MonthDay>, today: NaiveDate) -> NaiveDate {
        let renews_on = match self.renewal {
            Renewal::January1 => None,
            Renewal::Birthday => renews_on,
        }
        .unwrap_or(MonthDay::new(1, 1).expect("1 January"));
        let this_year = renews_on.in_year(today.year());
        if this_year <= today {
            this_year
        } else {
            renews_on.in_year(today.year() - 1)
        }
    }

    /// The card's rides left in the period starting `period`: a count from an earlier period
    /// has lapsed and the allowance starts afresh.
    pub fn rides_left(&self, card: &CardRecord, period: NaiveDate) -> u32 {
        if card.rides_period.is_some_and(|counted| counted < period) {
            self.rides
        } else {
            card.rides_left
        }
    }
}

/// How a concession is applied once a card carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcessionRule {
    /// Share of the fare the rider pays, in percent (0 = free).
    pub pay_percent: u8,
    /// The share by the card's grade where grades pay differently; other grades, and cards
    /// without a grade, pay `pay_percent`.
    pub grades: HashMap<u8, u8>,
    /// Each ride uses one from the card's yearly allowance; without one, rides are not counted.
    pub allowance: Option<Allowance>,
    /// Modes the concession covers.
    pub modes: Vec<Mode>,
}

impl ConcessionRule {
    pub fn pay_percent_for(&self, grade: Option<u8>) -> u8 {
        grade
            .and_then(|g| self.grades.get(&g))
            .copied()
            .unwrap_or(self.pay_percent)
    }
}

/// The whole authorization policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub pass_back_window_ms: u64,
    /// A second tap of one card on one bus within this time is not charged again.
    pub bus_double_tap_window_ms: u64,
    pub degraded_mode: DegradedMode,
    pub fares: FareEstimates,
    pub default_issuers: Vec<Issuer>,
    pub area_issuers: HashMap<AreaCode, Vec<Issuer>>,
    pub concession_rules: HashMap<Concession, ConcessionRule>,
    pub rollout: Vec<RolloutStep>,
    /// What gates may approve while they cannot reach a gateway; sent to version-2 gates.
    pub offline: OfflineRules,
}

impl Policy {
    pub fn issuer_accepted(&self, area: AreaCode, issuer: Issuer) -> bool {
        self.area_issuers
            .get(&area)
            .unwrap_or(&self.default_issuers)
            .contains(&issuer)
    }

    /// Whether `card` carries its concession on `date`: the rollout loads concessions onto
    /// cards by issuer and home area, whichever gate the card is tapped at.
    pub fn carries(&self, card: &CardRecord, date: NaiveDate) -> bool {
        card.concession != Concession::None
            && self.rollout.iter().any(|step| {
                step.from <= date
                    && step.concessions.contains(&card.concession)
                    && step.issuers.contains(&card.issuer)
                    && step.home_areas.contains(card.home_area)
            })
    }

    /// The rule for the card's concession if the card carries it on `date` and it covers
    /// `mode`. The gate's area plays no part: a card that carries a concession has it in all
    /// 41 areas.
    pub fn honoured(
        &self,
        card: &CardRecord,
        mode: Mode,
        date: NaiveDate,
    ) -> Option<&ConcessionRule> {
        let rule = self.concession_rules.get(&card.concession)?;
        (rule.modes.contains(&mode) && self.carries(card, date)).then_some(rule)
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
    bus_double_tap_window_s: u64,
    degraded_mode: DegradedMode,
    fares: FareEstimates,
    issuers: RawIssuers,
    concessions: HashMap<String, RawConcessionRule>,
    #[serde(default)]
    rollout: Vec<RawRollout>,
    /// Without it, gates approve nothing offline.
    offline: Option<RawOffline>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOffline {
    issuers: Vec<String>,
    max_fare_fen: u32,
    max_offline_s: u32,
}

/// The longest a gate may decide offline: a day. Longer would let a stolen gate or a lost
/// card's rider go unchecked for days.
const MAX_OFFLINE_S: u32 = 24 * 3600;

impl RawOffline {
    fn validate(self) -> Result<OfflineRules, PolicyError> {
        if self.max_fare_fen > MAX_ESTIMATE_FEN {
            return Err(invalid(
                "offline.max_fare_fen",
                format!("{} fen is more than {MAX_ESTIMATE_FEN}", self.max_fare_fen),
            ));
        }
        if self.max_offline_s > MAX_OFFLINE_S {
            return Err(invalid(
                "offline.max_offline_s",
                format!("{} s is longer than a day", self.max_offline_s),
            ));
        }
        Ok(OfflineRules {
            issuers: IssuerSet::of(&issuers(&self.issuers)?),
            max_fare_fen: self.max_fare_fen,
            max_offline_s: self.max_offline_s,
        })
    }
}

/// The rules without an `[offline]` section: nothing is approved offline.
const NO_OFFLINE: OfflineRules = OfflineRules {
    issuers: IssuerSet::EMPTY,
    max_fare_fen: 0,
    max_offline_s: 0,
};

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
    #[serde(default)]
    grades: HashMap<String, u8>,
    allowance: Option<u32>,
    renewal: Option<Renewal>,
    top_up: Option<u32>,
    modes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    concessions: Vec<String>,
    issuers: Vec<String>,
    /// `"all"` or a list of area codes.
    home_areas: toml::Value,
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
/// The largest yearly allowance or top-up: a ride every hour of the year, far above any
/// published allowance, and small enough for every count to fit the answer's rides-left field.
const MAX_ALLOWANCE: u32 = 8_760;
/// The longest pass-back or double-tap window: a day.
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

impl RawConcessionRule {
    fn validate(self, name: &str) -> Result<ConcessionRule, PolicyError> {
        if self.pay_percent > 100 {
            return Err(invalid(
                format!("concessions.{name}.pay_percent"),
                format!("{} % is more than 100", self.pay_percent),
            ));
        }
        let key = |field: &str| format!("concessions.{name}.{field}");
        let mut grades = HashMap::new();
        for (grade, percent) in &self.grades {
            let Some(grade) = grade.parse::<u8>().ok().filter(|g| *g > 0) else {
                return Err(invalid(
                    key("grades"),
                    format!("`{grade}` is not a grade (1, 2, …)"),
                ));
            };
            if *percent > 100 {
                return Err(invalid(
                    key("grades"),
                    format!("grade {grade} pays {percent} %, more than 100"),
                ));
            }
            grades.insert(grade, *percent);
        }
        let allowance = match (self.allowance, self.renewal, self.top_up) {
            (None, None, None) => None,
            (Some(rides), Some(renewal), Some(top_up)) => {
                if rides > MAX_ALLOWANCE || top_up > MAX_ALLOWANCE {
                    return Err(invalid(
                        key("allowance"),
                        format!("allowance and top-up are at most {MAX_ALLOWANCE} rides"),
                    ));
                }
                Some(Allowance {
                    rides,
                    renewal,
                    top_up,
                })
            }
            _ => {
                return Err(invalid(
                    key("allowance"),
                    "a counted concession needs `allowance`, `renewal` and `top_up` together",
                ));
            }
        };
        let modes = self
            .modes
            .iter()
            .map(|m| {
                Mode::from_label(m).ok_or_else(|| PolicyError::Unknown {
                    kind: "mode",
                    value: m.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ConcessionRule {
            pay_percent: self.pay_percent,
            grades,
            allowance,
            modes,
        })
    }
}

impl RawPolicy {
    fn validate(self) -> Result<Policy, PolicyError> {
        self.fares.check()?;
        for (key, seconds) in [
            ("pass_back_window_s", self.pass_back_window_s),
            ("bus_double_tap_window_s", self.bus_double_tap_window_s),
        ] {
            if seconds > MAX_PASS_BACK_S {
                return Err(invalid(key, format!("{seconds} s is longer than a day")));
            }
        }
        let mut area_issuers = HashMap::new();
        for (code, list) in &self.issuers.areas {
            area_issuers.insert(area(code)?, issuers(list)?);
        }
        let mut concession_rules = HashMap::new();
        for (name, rule) in self.concessions {
            concession_rules.insert(concession(&name)?, rule.validate(&name)?);
        }
        let mut rollout = Vec::new();
        for step in self.rollout {
            let home_areas = match &step.home_areas {
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
                concessions: step
                    .concessions
                    .iter()
                    .map(|c| concession(c))
                    .collect::<Result<_, _>>()?,
                issuers: issuers(&step.issuers)?,
                home_areas,
                from: step.from,
            });
        }
        Ok(Policy {
            pass_back_window_ms: self.pass_back_window_s.saturating_mul(1000),
            bus_double_tap_window_ms: self.bus_double_tap_window_s.saturating_mul(1000),
            degraded_mode: self.degraded_mode,
            fares: self.fares,
            default_issuers: issuers(&self.issuers.default)?,
            area_issuers,
            concession_rules,
            rollout,
            offline: match self.offline {
                Some(offline) => offline.validate()?,
                None => NO_OFFLINE,
            },
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
            (
                "max_offline_s = 1800",
                "max_offline_s = 90000",
                "offline.max_offline_s",
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

    #[test]
    fn without_an_offline_section_nothing_is_approved_offline() {
        let shipped = Policy::embedded_default().offline;
        assert!(shipped.issuers.contains(Issuer::ChongqingSsc) && shipped.max_offline_s > 0);
        let start = DEFAULT_POLICY_TOML.find("[offline]").unwrap();
        let end = start + DEFAULT_POLICY_TOML[start..].find("\n\n").unwrap();
        let text = format!(
            "{}{}",
            &DEFAULT_POLICY_TOML[..start],
            &DEFAULT_POLICY_TOML[end..]
        );
        assert_eq!(Policy::from_toml(&text).unwrap().offline, NO_OFFLINE);
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn shipped_policy_loads_social_security_cards_by_home_area_from_one_to_all() {
        let p = Policy::embedded_default();
        let card = |issuer, home| CardRecord {
            card_id: 1,
            state: crate::card::CardState::Active,
            issuer,
            concession: Concession::Elder,
            grade: None,
            home_area: Some(AreaCode(home)),
            rides_left: 0,
            rides_period: None,
            renews_on: None,
            expires_on: None,
        };
        let yuzhong = card(Issuer::ChongqingSsc, 500103);
        let wanzhou = card(Issuer::ChongqingSsc, 500101);
        assert!(!p.carries(&yuzhong, date(2025, 12, 30)));
        assert!(p.carries(&yuzhong, date(2025, 12, 31)));
        assert!(!p.carries(&wanzhou, date(2027, 12, 30)));
        assert!(p.carries(&wanzhou, date(2027, 12, 31)));
        // The city's own elder card has worked city-wide since 2025-09-01.
        let city_card = card(Issuer::ChongqingCityCard, 500101);
        assert!(!p.carries(&city_card, date(2025, 8, 31)));
        assert!(p.carries(&city_card, date(2025, 9, 1)));
        // Other issuers' concessions are not Chongqing's to honour.
        assert!(!p.carries(&card(Issuer::TUnion, 500103), date(2028, 1, 1)));
        // A concession not covering the mode is not honoured even when carried.
        assert!(
            p.honoured(&yuzhong, Mode::Ferry, date(2026, 6, 1))
                .is_none()
        );
        assert!(p.honoured(&yuzhong, Mode::Bus, date(2026, 6, 1)).is_some());
    }

    #[test]
    fn allowance_periods_start_on_1_january_or_the_holders_day() {
        let mut allowance = Allowance {
            rides: 1200,
            renewal: Renewal::January1,
            top_up: 300,
        };
        let birthday = MonthDay::new(2, 29);
        assert_eq!(
            allowance.period_start(birthday, date(2026, 2, 27)),
            date(2026, 1, 1)
        );
        allowance.renewal = Renewal::Birthday;
        assert_eq!(
            allowance.period_start(birthday, date(2026, 2, 27)),
            date(2025, 2, 28)
        );
        assert_eq!(
            allowance.period_start(birthday, date(2026, 2, 28)),
            date(2026, 2, 28)
        );
        assert_eq!(
            allowance.period_start(birthday, date(2028, 2, 29)),
            date(2028, 2, 29)
        );
        assert_eq!(
            allowance.period_start(None, date(2026, 2, 27)),
            date(2026, 1, 1)
        );
    }

    #[test]
    fn a_counted_concession_needs_its_allowance_renewal_and_top_up() {
        let text = DEFAULT_POLICY_TOML.replace("top_up = 300\n", "");
        match Policy::from_toml(&text) {
            Err(PolicyError::Invalid { key, .. }) => assert_eq!(key, "concessions.elder.allowance"),
            other => panic!("{other:?}"),
        }
        let text = DEFAULT_POLICY_TOML.replace("\"3\" = 50", "\"x\" = 50");
        match Policy::from_toml(&text) {
            Err(PolicyError::Invalid { key, .. }) => assert_eq!(key, "concessions.disabled.grades"),
            other => panic!("{other:?}"),
        }
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
