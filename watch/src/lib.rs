//! Card-use watching (用卡行为监测预警): rules over the taps the gateways decided that raise
//! alerts operators can act on.
//!
//! [`Watcher`] is a pure state machine: it is fed taps in time order and answers each with the
//! alerts it raises, from the rules ([`Rules`], `watch.example.toml`) and what it remembers of
//! each card. It never names a card by its number: alerts carry the card's keyed pseudonym. It
//! holds only what the rules' windows need, and forgets a card once its last tap is older than
//! the longest window. [`store::AlertStore`] keeps alerts in Redis, bounded by age.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use tapgate_journal::JournalRecord;
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_protocol::{Concession, Mode, Outcome, Reason, TapKind};

pub mod live;
pub mod ops;
pub mod score;
pub mod store;
pub use tapgate_city::places::km_between;

/// The rules shipped with tapgate; `watch.example.toml` documents them.
pub const DEFAULT_RULES_TOML: &str = include_str!("../../watch.example.toml");

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;
/// Chongqing is UTC+8.
const LOCAL_OFFSET_MS: u64 = 8 * 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VelocityRule {
    pub taps: usize,
    pub minutes: u64,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRule {
    pub minutes: u64,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConcessionRule {
    pub rides_per_day: u32,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TravelRule {
    pub max_kmh: f64,
    pub slack_km: f64,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeniedRetryRule {
    pub tries: usize,
    pub minutes: u64,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GateDenialRule {
    pub window_minutes: u64,
    pub min_taps: u32,
    pub floor_percent: u32,
    pub factor: u32,
    pub severity: Severity,
}

/// The watching rules, as data.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    pub velocity: VelocityRule,
    pub travel: TravelRule,
    pub clone: CloneRule,
    pub denied_retry: DeniedRetryRule,
    pub concession: ConcessionRule,
    pub gate_denials: GateDenialRule,
    /// What to do about a card besides alerting; nothing unless configured.
    #[serde(default)]
    pub actions: Actions,
}

/// The rules whose alerts put the card on the watch list, or block it as `tapgate cards block`
/// does. Off by default: a false alarm of a blocking rule stops a rider at the gate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Actions {
    #[serde(default)]
    pub watch: Vec<Rule>,
    #[serde(default)]
    pub block: Vec<Rule>,
}

/// What is done about a card an alert names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Watch,
    Block,
}

impl Rules {
    /// The action configured for an alert: blocking wins over watching; none for a gate's
    /// alert, which names no card.
    pub fn action_for(&self, alert: &Alert) -> Option<Action> {
        alert.card_id?;
        if self.actions.block.contains(&alert.rule) {
            Some(Action::Block)
        } else if self.actions.watch.contains(&alert.rule) {
            Some(Action::Watch)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("watch rules: {0}")]
pub struct RulesError(String);

/// The most taps the velocity rule may count, and the longest window of any rule: bounds on
/// what the watcher keeps per card.
const MAX_VELOCITY_TAPS: usize = 1_000;
const MAX_WINDOW_MINUTES: u64 = 24 * 60;

impl Rules {
    /// Reads and checks rules; every problem is named by its key.
    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let rules: Rules = toml::from_str(text).map_err(|e| RulesError(e.to_string()))?;
        let mut problems = Vec::new();
        if !(2..=MAX_VELOCITY_TAPS).contains(&rules.velocity.taps) {
            problems.push(format!("velocity.taps: 2 to {MAX_VELOCITY_TAPS}"));
        }
        if !(2..=MAX_VELOCITY_TAPS).contains(&rules.denied_retry.tries) {
            problems.push(format!("denied_retry.tries: 2 to {MAX_VELOCITY_TAPS}"));
        }
        for (key, minutes) in [
            ("velocity.minutes", rules.velocity.minutes),
            ("clone.minutes", rules.clone.minutes),
            ("denied_retry.minutes", rules.denied_retry.minutes),
            (
                "gate_denials.window_minutes",
                rules.gate_denials.window_minutes,
            ),
        ] {
            if !(1..=MAX_WINDOW_MINUTES).contains(&minutes) {
                problems.push(format!("{key}: 1 to {MAX_WINDOW_MINUTES} minutes"));
            }
        }
        let t = &rules.travel;
        if !(t.max_kmh.is_finite()
            && t.max_kmh > 0.0
            && t.slack_km.is_finite()
            && t.slack_km >= 0.0)
        {
            problems.push("travel: max_kmh above 0 and slack_km at least 0, in km".into());
        }
        let g = &rules.gate_denials;
        if g.min_taps == 0 || !(1..=100).contains(&g.floor_percent) || g.factor == 0 {
            problems.push(
                "gate_denials: min_taps at least 1, floor_percent 1 to 100, factor at least 1"
                    .into(),
            );
        }
        if rules.concession.rides_per_day == 0 {
            problems.push("concession.rides_per_day: at least 1".into());
        }
        if problems.is_empty() {
            Ok(rules)
        } else {
            Err(RulesError(problems.join("; ")))
        }
    }

    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_RULES_TOML).expect("the shipped watch rules are valid")
    }

    /// The rules in the TOML file at `path`, or the shipped ones when there is none.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, RulesError> {
        let Some(path) = path else {
            return Ok(Self::embedded_default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| RulesError(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| RulesError(format!("{}: {}", path.display(), e.0)))
    }

    /// How much of the feeds a watcher taking over reads again to rebuild the windows: the
    /// longest window. Concession counts per day are not rebuilt past it.
    pub fn warm_up(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.longest_window_ms())
    }

    fn longest_window_ms(&self) -> u64 {
        [
            self.velocity.minutes,
            self.clone.minutes,
            self.denied_retry.minutes,
        ]
        .into_iter()
        .max()
        .unwrap_or(1)
            * MINUTE_MS
    }
}

/// A decided tap as the watcher needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub card: u64,
    pub gate: u64,
    pub area: u32,
    pub mode: Mode,
    pub kind: TapKind,
    pub concession: Concession,
    pub approved: bool,
    /// Why it was denied (`Approved` when it was not).
    pub reason: Reason,
    pub at_ms: u64,
}

impl From<&JournalRecord> for Observed {
    fn from(r: &JournalRecord) -> Self {
        Self {
            card: r.tap.card_id,
            gate: r.terminal_id,
            area: r.area,
            mode: r.mode,
            kind: r.tap.kind,
            concession: r.result.concession,
            approved: r.result.outcome == Outcome::Approve,
            reason: r.result.reason,
            at_ms: r.server_time_ms,
        }
    }
}

/// Which rule raised an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Velocity,
    ImpossibleTravel,
    Clone,
    DeniedRetry,
    Concession,
    GateDenials,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Velocity,
        Rule::ImpossibleTravel,
        Rule::Clone,
        Rule::DeniedRetry,
        Rule::Concession,
        Rule::GateDenials,
    ];

    /// The rule's place in [`Rule::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The rule's name, as in the rules file and in alerts.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Velocity => "velocity",
            Rule::ImpossibleTravel => "impossible_travel",
            Rule::Clone => "clone",
            Rule::DeniedRetry => "denied_retry",
            Rule::Concession => "concession",
            Rule::GateDenials => "gate_denials",
        }
    }
}

/// An alert as operators see it: the rule, how serious, which card (by pseudonym), where and
/// when, and the evidence in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: Rule,
    pub severity: Severity,
    /// The card's pseudonym; none for a rule about a gate.
    pub card: Option<String>,
    /// The card's number, for an action on the card only: never written out with the alert.
    #[serde(skip)]
    pub card_id: Option<u64>,
    pub gates: Vec<u64>,
    pub areas: Vec<u32>,
    pub first_ms: u64,
    pub last_ms: u64,
    pub evidence: String,
}

/// A card's taps within a rule's window, (time, gate, area), oldest first.
#[derive(Debug, Default)]
struct TapWindow(VecDeque<(u64, u64, u32)>);

impl TapWindow {
    /// Adds a tap and drops those `window_ms` or more before it, and the oldest beyond `cap`;
    /// returns how many are held.
    fn push(&mut self, tap: &Observed, window_ms: u64, cap: usize) -> usize {
        self.0.push_back((tap.at_ms, tap.gate, tap.area));
        while self
            .0
            .front()
            .is_some_and(|(t, _, _)| tap.at_ms.saturating_sub(*t) >= window_ms)
            || self.0.len() > cap
        {
            self.0.pop_front();
        }
        self.0.len()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn first_ms(&self) -> u64 {
        self.0.front().map_or(0, |(t, _, _)| *t)
    }

    /// The distinct gates and areas of the taps held.
    fn places(&self) -> (Vec<u64>, Vec<u32>) {
        let mut gates: Vec<u64> = self.0.iter().map(|(_, g, _)| *g).collect();
        let mut areas: Vec<u32> = self.0.iter().map(|(_, _, a)| *a).collect();
        gates.sort_unstable();
        gates.dedup();
        areas.sort_unstable();
        areas.dedup();
        (gates, areas)
    }
}

/// What the watcher remembers of one card.
#[derive(Debug, Default)]
struct CardWatch {
    /// Approved taps in the velocity rule's window.
    recent: TapWindow,
    /// The card's last paid-area entry not yet followed by an exit: (time, gate, area).
    open_entry: Option<(u64, u64, u32)>,
    /// The card's last approved tap: (time, gate, area).
    last_approved: Option<(u64, u64, u32)>,
    /// Denials of the card as lost, cancelled or blocked within the rule's window.
    denied: TapWindow,
    /// Concession rides on one local day: (day, rides).
    concession_day: (u64, u32),
    /// Until when each rule stays quiet for this card after it alerted (one alert per window).
    quiet_until: HashMap<Rule, u64>,
    last_ms: u64,
}

/// One gate's decided taps in the current window, and its usual share of denials.
#[derive(Debug, Default)]
struct GateWatch {
    window_start_ms: u64,
    taps: u32,
    denials: u32,
    /// The denied share of earlier windows, in percent, smoothed; `None` until one closed.
    usual_percent: Option<f64>,
    last_ms: u64,
}

/// The rules' state over every card seen, and the alerts they raise.
#[derive(Debug)]
pub struct Watcher {
    rules: Rules,
    pseudonyms: CardPseudonymizer,
    cards: HashMap<u64, CardWatch>,
    gates: HashMap<u64, GateWatch>,
    /// The latest tap time seen, for forgetting idle cards.
    now_ms: u64,
    next_sweep_ms: u64,
}

impl Watcher {
    pub fn new(rules: Rules, pseudonyms: CardPseudonymizer) -> Self {
        Self {
            rules,
            pseudonyms,
            cards: HashMap::new(),
            gates: HashMap::new(),
            now_ms: 0,
            next_sweep_ms: 0,
        }
    }

    /// Cards remembered: bounded by the cards that tapped within the longest window.
    pub fn cards_remembered(&self) -> usize {
        self.cards.len()
    }

    /// Feeds one decided tap (in time order) and returns the alerts it raises.
    pub fn observe(&mut self, tap: &Observed) -> Vec<Alert> {
        self.now_ms = self.now_ms.max(tap.at_ms);
        self.forget_idle();
        let rules = &self.rules;
        let mut alerts: Vec<Alert> =
            gate_denials(rules, self.gates.entry(tap.gate).or_default(), tap)
                .into_iter()
                .collect();
        let card = self.cards.entry(tap.card).or_default();
        card.last_ms = card.last_ms.max(tap.at_ms);
        let mut raised = Vec::new();
        if tap.approved {
            raised.extend(velocity(rules, card, tap));
            raised.extend(travel(rules, card, tap));
            raised.extend(clone(rules, card, tap));
            raised.extend(concession(rules, card, tap));
        } else {
            raised.extend(denied_retry(rules, card, tap));
        }
        for found in raised {
            if card
                .quiet_until
                .get(&found.rule)
                .is_some_and(|q| tap.at_ms < *q)
            {
                continue;
            }
            card.quiet_until
                .insert(found.rule, tap.at_ms + found.quiet_ms);
            alerts.push(Alert {
                rule: found.rule,
                severity: found.severity,
                card: Some(self.pseudonyms.pseudonym(tap.card)),
                card_id: Some(tap.card),
                gates: found.gates,
                areas: found.areas,
                first_ms: found.first_ms,
                last_ms: tap.at_ms,
                evidence: found.evidence,
            });
        }
        alerts
    }

    /// Drops the cards whose last tap is older than every rule's window, once per window.
    fn forget_idle(&mut self) {
        if self.now_ms < self.next_sweep_ms {
            return;
        }
        let keep = self.rules.longest_window_ms().max(DAY_MS);
        let now = self.now_ms;
        self.cards
            .retain(|_, c| now.saturating_sub(c.last_ms) < keep);
        self.gates
            .retain(|_, g| now.saturating_sub(g.last_ms) < keep);
        self.next_sweep_ms = now + self.rules.longest_window_ms();
    }
}

/// What a rule found about a card.
struct Finding {
    rule: Rule,
    severity: Severity,
    /// How long the rule then stays quiet for the card.
    quiet_ms: u64,
    gates: Vec<u64>,
    areas: Vec<u32>,
    /// When the evidence starts.
    first_ms: u64,
    evidence: String,
}

fn velocity(rules: &Rules, card: &mut CardWatch, tap: &Observed) -> Option<Finding> {
    let rule = &rules.velocity;
    let window = rule.minutes * MINUTE_MS;
    if card.recent.push(tap, window, rule.taps) < rule.taps {
        return None;
    }
    let first = card.recent.first_ms();
    let (gates, areas) = card.recent.places();
    let evidence = format!(
        "{} approved taps in {} minutes (the rule: {} within {})",
        card.recent.len(),
        tap.at_ms.saturating_sub(first).div_ceil(MINUTE_MS),
        rule.taps,
        rule.minutes
    );
    Some(Finding {
        rule: Rule::Velocity,
        severity: rule.severity,
        quiet_ms: window,
        gates,
        areas,
        first_ms: first,
        evidence,
    })
}

fn clone(rules: &Rules, card: &mut CardWatch, tap: &Observed) -> Option<Finding> {
    if !tap.mode.needs_exit_tap() {
        return None;
    }
    match tap.kind {
        TapKind::Exit => {
            card.open_entry = None;
            None
        }
        TapKind::Entry => {
            let earlier = card.open_entry.replace((tap.at_ms, tap.gate, tap.area));
            let (at, gate, area) = earlier?;
            let rule = &rules.clone;
            let window = rule.minutes * MINUTE_MS;
            if gate == tap.gate || tap.at_ms.saturating_sub(at) >= window {
                return None;
            }
            let evidence = format!(
                "entered at gate {} while its entry at gate {gate}, {} s earlier, was still open",
                tap.gate,
                tap.at_ms.saturating_sub(at) / 1000
            );
            Some(Finding {
                rule: Rule::Clone,
                severity: rule.severity,
                quiet_ms: window,
                gates: vec![gate, tap.gate],
                areas: vec![area, tap.area],
                first_ms: at,
                evidence,
            })
        }
        TapKind::Flat => None,
    }
}

fn travel(rules: &Rules, card: &mut CardWatch, tap: &Observed) -> Option<Finding> {
    let (at, gate, area) = card
        .last_approved
        .replace((tap.at_ms, tap.gate, tap.area))?;
    let rule = &rules.travel;
    let km = km_between(area, tap.area)? - rule.slack_km;
    let hours = tap.at_ms.saturating_sub(at) as f64 / 3_600_000.0;
    if km <= 0.0 || km <= rule.max_kmh * hours {
        return None;
    }
    let evidence = format!(
        "{:.0} km between area {area} and area {} in {} min: faster than {} km/h, after {} km of slack",
        km + rule.slack_km,
        tap.area,
        tap.at_ms.saturating_sub(at) / MINUTE_MS,
        rule.max_kmh,
        rule.slack_km
    );
    Some(Finding {
        rule: Rule::ImpossibleTravel,
        severity: rule.severity,
        quiet_ms: rules.longest_window_ms(),
        gates: vec![gate, tap.gate],
        areas: vec![area, tap.area],
        first_ms: at,
        evidence,
    })
}

fn denied_retry(rules: &Rules, card: &mut CardWatch, tap: &Observed) -> Option<Finding> {
    if !matches!(
        tap.reason,
        Reason::CardLost | Reason::CardCancelled | Reason::CardBlocked
    ) {
        return None;
    }
    let rule = &rules.denied_retry;
    let window = rule.minutes * MINUTE_MS;
    if card.denied.push(tap, window, MAX_VELOCITY_TAPS) < rule.tries {
        return None;
    }
    let first = card.denied.first_ms();
    let (gates, areas) = card.denied.places();
    let evidence = format!(
        "denied as {:?} {} times in {} min, at {} gates",
        tap.reason,
        card.denied.len(),
        tap.at_ms.saturating_sub(first) / MINUTE_MS,
        gates.len()
    );
    Some(Finding {
        rule: Rule::DeniedRetry,
        severity: rule.severity,
        quiet_ms: window,
        gates,
        areas,
        first_ms: first,
        evidence,
    })
}

/// Closes a gate's window when a tap falls past it, and alerts when the window's share of
/// denials is above the floor and `factor` times the gate's usual share.
fn gate_denials(rules: &Rules, gate: &mut GateWatch, tap: &Observed) -> Option<Alert> {
    let rule = &rules.gate_denials;
    let window = rule.window_minutes * MINUTE_MS;
    gate.last_ms = gate.last_ms.max(tap.at_ms);
    let mut alert = None;
    if tap.at_ms >= gate.window_start_ms + window {
        if gate.taps >= rule.min_taps {
            let share = f64::from(gate.denials) * 100.0 / f64::from(gate.taps);
            let usual = gate.usual_percent;
            let jumped = usual.is_some_and(|u| {
                share >= f64::from(rule.floor_percent) && share >= u * f64::from(rule.factor)
            });
            if jumped {
                alert = Some(Alert {
                    rule: Rule::GateDenials,
                    severity: rule.severity,
                    card: None,
                    card_id: None,
                    gates: vec![tap.gate],
                    areas: vec![tap.area],
                    first_ms: gate.window_start_ms,
                    last_ms: gate.window_start_ms + window,
                    evidence: format!(
                        "{:.0} % of {} taps denied in {} min; usually {:.1} %",
                        share,
                        gate.taps,
                        rule.window_minutes,
                        usual.unwrap_or_default()
                    ),
                });
            }
            gate.usual_percent = Some(usual.map_or(share, |u| u * 0.8 + share * 0.2));
        }
        gate.window_start_ms = tap.at_ms - (tap.at_ms - gate.window_start_ms) % window;
        gate.taps = 0;
        gate.denials = 0;
    }
    gate.taps += 1;
    if !tap.approved {
        gate.denials += 1;
    }
    alert
}

fn concession(rules: &Rules, card: &mut CardWatch, tap: &Observed) -> Option<Finding> {
    if tap.concession == Concession::None {
        return None;
    }
    let day = (tap.at_ms + LOCAL_OFFSET_MS) / DAY_MS;
    if card.concession_day.0 != day {
        card.concession_day = (day, 0);
    }
    card.concession_day.1 += 1;
    let rule = &rules.concession;
    if card.concession_day.1 <= rule.rides_per_day {
        return None;
    }
    let day_ends = (day + 1) * DAY_MS - LOCAL_OFFSET_MS;
    let evidence = format!(
        "{} {} rides today (the rule: at most {} a day)",
        card.concession_day.1,
        tap.concession.label(),
        rule.rides_per_day
    );
    Some(Finding {
        rule: Rule::Concession,
        severity: rule.severity,
        quiet_ms: day_ends.saturating_sub(tap.at_ms),
        gates: vec![tap.gate],
        areas: vec![tap.area],
        first_ms: tap.at_ms,
        evidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_939_200_000;
    const MIN: u64 = MINUTE_MS;

    fn watcher() -> Watcher {
        Watcher::new(Rules::embedded_default(), CardPseudonymizer::new([9; 16]))
    }

    #[test]
    fn every_rule_has_one_name_in_alerts_metrics_and_the_rules_file() {
        for (i, rule) in Rule::ALL.iter().enumerate() {
            assert_eq!(rule.index(), i);
            assert_eq!(
                serde_json::to_value(rule).unwrap(),
                serde_json::Value::String(rule.name().to_owned())
            );
        }
    }

    fn tap(card: u64, gate: u64, mode: Mode, kind: TapKind, at_ms: u64) -> Observed {
        Observed {
            card,
            gate,
            area: 500103,
            mode,
            kind,
            concession: Concession::None,
            approved: true,
            reason: Reason::Approved,
            at_ms,
        }
    }

    fn bus(card: u64, gate: u64, at_ms: u64) -> Observed {
        tap(card, gate, Mode::Bus, TapKind::Flat, at_ms)
    }

    fn feed(w: &mut Watcher, taps: &[Observed]) -> Vec<Alert> {
        taps.iter().flat_map(|t| w.observe(t)).collect()
    }

    #[test]
    fn a_card_tapped_more_often_than_the_rule_allows_alerts_once_per_window() {
        let mut w = watcher();
        let taps: Vec<_> = (0..20).map(|i| bus(1, 100 + i, T0 + i * 2 * MIN)).collect();
        let alerts = feed(&mut w, &taps);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].rule, Rule::Velocity);
        assert_eq!(alerts[0].gates.len(), 12);
        // Named by pseudonym, never by number.
        let named = CardPseudonymizer::new([9; 16]).pseudonym(1);
        assert_eq!(alerts[0].card.as_deref(), Some(named.as_str()));
        // An ordinary day: a dozen taps spread over the day raises nothing.
        let mut w = watcher();
        let day: Vec<_> = (0..12).map(|i| bus(2, 100, T0 + i * 70 * MIN)).collect();
        assert!(feed(&mut w, &day).is_empty());
    }

    #[test]
    fn two_open_entries_at_two_stations_minutes_apart_is_a_clone() {
        let mut w = watcher();
        let entry = |gate, at| tap(3, gate, Mode::Metro, TapKind::Entry, at);
        let alerts = feed(&mut w, &[entry(7, T0), entry(8, T0 + 3 * MIN)]);
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            (alerts[0].rule, alerts[0].severity),
            (Rule::Clone, Severity::Critical)
        );
        assert_eq!(alerts[0].gates, [7, 8]);
        // A forgotten exit, entering again an hour later, is not; nor an exit then an entry.
        let mut w = watcher();
        assert!(feed(&mut w, &[entry(7, T0), entry(8, T0 + 60 * MIN)]).is_empty());
        let exit = tap(3, 9, Mode::Metro, TapKind::Exit, T0 + MIN);
        let mut w = watcher();
        assert!(feed(&mut w, &[entry(7, T0), exit, entry(8, T0 + 2 * MIN)]).is_empty());
    }

    #[test]
    fn concession_rides_beyond_a_days_pattern_alert_and_the_next_day_starts_afresh() {
        let mut w = watcher();
        let elder = |i: u64, at| Observed {
            concession: Concession::Elder,
            ..bus(4, 100 + i, at)
        };
        // Eleven rides over a day, each far enough apart for the velocity rule.
        let day: Vec<_> = (0..11)
            .map(|i| elder(i, T0 - 8 * 60 * MIN + i * 70 * MIN))
            .collect();
        let alerts = feed(&mut w, &day);
        assert_eq!(
            alerts.iter().map(|a| a.rule).collect::<Vec<_>>(),
            [Rule::Concession]
        );
        let next_day = T0 + 24 * 60 * MIN;
        assert!(feed(&mut w, &[elder(0, next_day)]).is_empty());
    }

    #[test]
    fn a_denial_for_another_reason_raises_nothing_and_idle_cards_are_forgotten() {
        let mut w = watcher();
        let denied = Observed {
            approved: false,
            ..bus(5, 100, T0)
        };
        assert!(w.observe(&denied).is_empty());
        w.observe(&bus(6, 100, T0));
        assert_eq!(w.cards_remembered(), 2);
        w.observe(&bus(7, 100, T0 + 2 * DAY_MS));
        assert_eq!(w.cards_remembered(), 1, "cards 5 and 6 are forgotten");
    }

    #[test]
    fn a_card_in_wanzhou_then_yuzhong_ten_minutes_later_cannot_have_travelled() {
        let mut w = watcher();
        let at = |area, at_ms| Observed {
            area,
            ..bus(8, u64::from(area), at_ms)
        };
        let alerts = feed(&mut w, &[at(500101, T0), at(500103, T0 + 10 * MIN)]);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].rule, Rule::ImpossibleTravel);
        assert_eq!(alerts[0].areas, [500101, 500103]);
        // The same trip in four hours is possible; so is 渝中 to 江北 in ten minutes.
        let mut w = watcher();
        assert!(feed(&mut w, &[at(500101, T0), at(500103, T0 + 240 * MIN)]).is_empty());
        let mut w = watcher();
        assert!(feed(&mut w, &[at(500103, T0), at(500105, T0 + 10 * MIN)]).is_empty());
    }

    #[test]
    fn a_blocked_card_tried_again_is_named_with_where_it_was_tried() {
        let mut w = watcher();
        let denied = |gate, reason, at_ms| Observed {
            approved: false,
            reason,
            ..bus(9, gate, at_ms)
        };
        let first = w.observe(&denied(100, Reason::CardLost, T0));
        assert!(first.is_empty(), "one denial is a rider who had not heard");
        let again = w.observe(&denied(200, Reason::CardLost, T0 + 5 * MIN));
        assert_eq!(again.len(), 1);
        assert_eq!(
            (again[0].rule, &again[0].gates),
            (Rule::DeniedRetry, &vec![100, 200])
        );
        // Other denials (an expired card, a pass-back) are not this rule's.
        let mut w = watcher();
        let expired = [
            denied(100, Reason::CardExpired, T0),
            denied(200, Reason::CardExpired, T0 + MIN),
        ];
        assert!(feed(&mut w, &expired).is_empty());
    }

    #[test]
    fn a_gate_whose_denials_jump_is_named_once_it_has_a_usual_share() {
        let mut w = watcher();
        let at_gate = |i: u64, approved: bool, at_ms| Observed {
            approved,
            reason: if approved {
                Reason::Approved
            } else {
                Reason::UnknownCard
            },
            ..bus(1_000 + i, 77, at_ms)
        };
        // Two windows with 1 denial in 30, then one with 15 of 30 denied.
        let mut taps = Vec::new();
        for window in 0..3u64 {
            for i in 0..30u64 {
                let denied = if window < 2 { i == 0 } else { i % 2 == 0 };
                let at_ms = T0 + window * 10 * MIN + i * 10_000;
                taps.push(at_gate(window * 100 + i, !denied, at_ms));
            }
        }
        taps.push(at_gate(999, true, T0 + 30 * MIN + 1));
        let alerts: Vec<_> = feed(&mut w, &taps)
            .into_iter()
            .filter(|a| a.rule == Rule::GateDenials)
            .collect();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(
            (alerts[0].card.clone(), alerts[0].gates.clone()),
            (None, vec![77])
        );
        assert!(
            alerts[0].evidence.starts_with("50 % of 30 taps"),
            "{}",
            alerts[0].evidence
        );
    }

    #[test]
    fn actions_are_off_unless_configured_and_blocking_wins() {
        let mut w = watcher();
        let entry = |gate, at| tap(3, gate, Mode::Metro, TapKind::Entry, at);
        let alert = feed(&mut w, &[entry(7, T0), entry(8, T0 + MIN)]).remove(0);
        assert_eq!(Rules::embedded_default().action_for(&alert), None);
        let mut rules = Rules::embedded_default();
        rules.actions.watch = vec![Rule::Clone, Rule::Velocity];
        assert_eq!(rules.action_for(&alert), Some(Action::Watch));
        rules.actions.block = vec![Rule::Clone];
        assert_eq!(rules.action_for(&alert), Some(Action::Block));
        // The number stays out of what is written.
        let json = serde_json::to_string(&alert).unwrap();
        assert!(!json.contains("card_id"), "{json}");
    }

    #[test]
    fn rules_outside_their_bounds_are_refused_by_key() {
        let text = DEFAULT_RULES_TOML.replace("taps = 12", "taps = 1");
        let e = Rules::from_toml(&text).unwrap_err();
        assert!(e.to_string().contains("velocity.taps"), "{e}");
        assert!(Rules::from_toml("[velocity]\ntaps = 3").is_err());
    }
}
