//! Scoring the rules against ground truth: a load run that injected misuse on purpose knows
//! which cards it made misbehave and how (the load generator's `--fraud-cards`), so each rule's
//! alerts can be counted as caught misuse or false alarms.

use crate::{Alert, Rule};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};

/// One injected misuse: the rule that should catch it and the card it was done with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injected {
    pub rule: Rule,
    pub card: u64,
    #[serde(default)]
    pub gates: Vec<u64>,
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
    let injected_cards: HashSet<u64> = truth.iter().map(|i| i.card).collect();
    let scores = Rule::ALL
        .iter()
        .map(|&rule| {
            let cards: HashSet<u64> = truth
                .iter()
                .filter(|i| i.rule == rule)
                .map(|i| i.card)
                .collect();
            let mine: Vec<&Alert> = alerts.iter().filter(|a| a.rule == rule).collect();
            let on_injected = |a: &Alert| a.card_id.is_some_and(|c| cards.contains(&c));
            let caught: HashSet<u64> = mine
                .iter()
                .filter(|a| on_injected(a))
                .filter_map(|a| a.card_id)
                .collect();
            RuleScore {
                rule,
                injected: cards.len(),
                caught: caught.len(),
                alerts: mine.len(),
                true_alerts: mine.iter().filter(|a| on_injected(a)).count(),
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
                card: 1,
                gates: vec![],
            },
            Injected {
                rule: Rule::Velocity,
                card: 2,
                gates: vec![],
            },
            Injected {
                rule: Rule::Clone,
                card: 3,
                gates: vec![],
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
        assert_eq!(ordinary, BTreeSet::from([9]));
    }
}
