//! Scoring the rules against ground truth: a load run that injected misuse on purpose knows
//! which cards it made misbehave and how (the load generator's `--fraud-cards`), so each rule's
//! alerts can be counted as caught misuse or false alarms.

use crate::{Alert, Rule};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};

/// One injected misuse: the rule that should catch it, the card it was done with (none for a
/// broken reader) and the gates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injected {
    pub rule: Rule,
    #[serde(default)]
    pub card: Option<u64>,
    #[serde(default)]
    pub gates: Vec<u64>,
}

impl Injected {
    /// Whether `alert` names this misuse: its card, or for a rule about a gate, its gate.
    fn named_by(&self, alert: &Alert) -> bool {
        alert.rule == self.rule
            && match self.card {
                Some(card) => alert.card_id == Some(card),
                None => self.gates.iter().any(|g| alert.gates.contains(g)),
            }
    }
}

/// How one rule did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleScore {
    pub rule: Rule,
    /// Cards injected for this rule.
    pub injected: usize,
    /// Of those, the ones this rule alerted on.
    pub caught: usize,
    /// Alerts this rule raised.
    pub alerts: usize,
    /// Of those, alerts on a card injected for this rule.
    pub true_alerts: usize,
}

impl RuleScore {
    /// Caught over injected; `None` with nothing injected.
    pub fn recall(&self) -> Option<f64> {
        (self.injected > 0).then(|| self.caught as f64 / self.injected as f64)
    }

    /// True alerts over alerts; `None` with no alert.
    pub fn precision(&self) -> Option<f64> {
        (self.alerts > 0).then(|| self.true_alerts as f64 / self.alerts as f64)
    }
}

/// Every rule's score, in [`Rule::ALL`] order, and the cards alerted on that no injection used
/// (false alarms on ordinary riders).
pub fn score(alerts: &[Alert], truth: &[Injected]) -> (Vec<RuleScore>, BTreeSet<u64>) {
    let injected_cards: HashSet<u64> = truth.iter().filter_map(|i| i.card).collect();
    let scores = Rule::ALL
        .iter()
        .map(|&rule| {
            let mine: Vec<&Injected> = truth.iter().filter(|i| i.rule == rule).collect();
            let raised: Vec<&Alert> = alerts.iter().filter(|a| a.rule == rule).collect();
            RuleScore {
                rule,
                injected: mine.len(),
                caught: mine
                    .iter()
                    .filter(|i| raised.iter().any(|a| i.named_by(a)))
                    .count(),
                alerts: raised.len(),
                true_alerts: raised
                    .iter()
                    .filter(|a| mine.iter().any(|i| i.named_by(a)))
                    .count(),
            }
        })
        .collect();
    let ordinary = alerts
        .iter()
        .filter_map(|a| a.card_id)
        .filter(|c| !injected_cards.contains(c))
        .collect();
    (scores, ordinary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Severity;

    fn alert(rule: Rule, card: u64) -> Alert {
        Alert {
            rule,
            severity: Severity::Warning,
            card: None,
            card_id: Some(card),
            gates: Vec::new(),
            areas: Vec::new(),
            first_ms: 0,
            last_ms: 0,
            evidence: String::new(),
        }
    }

    #[test]
    fn a_miss_lowers_recall_and_an_alert_on_anyone_else_lowers_precision() {
        let truth = [
            Injected {
                rule: Rule::Velocity,
                card: Some(1),
                gates: vec![],
            },
            Injected {
                rule: Rule::Velocity,
                card: Some(2),
                gates: vec![],
            },
            Injected {
                rule: Rule::Clone,
                card: Some(3),
                gates: vec![],
            },
            Injected {
                rule: Rule::GateDenials,
                card: None,
                gates: vec![40],
            },
        ];
        // Card 1 caught twice, card 2 missed; the clone card also set off velocity, and an
        // ordinary rider (9) set off clone.
        let alerts = [
            alert(Rule::Velocity, 1),
            alert(Rule::Velocity, 1),
            alert(Rule::Velocity, 3),
            alert(Rule::Clone, 3),
            alert(Rule::Clone, 9),
            // The broken reader named, and a sound one.
            Alert {
                card_id: None,
                gates: vec![40],
                ..alert(Rule::GateDenials, 0)
            },
            Alert {
                card_id: None,
                gates: vec![41],
                ..alert(Rule::GateDenials, 0)
            },
        ];
        let (scores, ordinary) = score(&alerts, &truth);
        let velocity = &scores[Rule::Velocity.index()];
        assert_eq!((velocity.injected, velocity.caught), (2, 1));
        assert_eq!((velocity.alerts, velocity.true_alerts), (3, 2));
        assert_eq!(velocity.recall(), Some(0.5));
        let clone = &scores[Rule::Clone.index()];
        assert_eq!(clone.recall(), Some(1.0));
        assert_eq!(clone.precision(), Some(0.5));
        assert_eq!(scores[Rule::Concession.index()].recall(), None);
        let gates = &scores[Rule::GateDenials.index()];
        assert_eq!((gates.recall(), gates.precision()), (Some(1.0), Some(0.5)));
        assert_eq!(ordinary, BTreeSet::from([9]));
    }
}
