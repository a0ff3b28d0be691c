//! Card misuse injected into a load on purpose, with the ground truth of what was injected, so
//! the card-use watcher's rules can be scored (precision and recall per rule).
//!
//! A [`FraudPlan`] picks cards for each pattern from the population and scripts their taps onto
//! the connected gates; each gate sends its scripted taps among its ordinary ones. The ordinary
//! riders of such a run ride like people: each uses one home gate and a card in good standing,
//! and none of them carries a card the plan uses. So any alert on an ordinary rider is a false
//! alarm, and any injected card without its alert a miss.

use chrono::Datelike;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use tapgate_city::places::km_between;
use tapgate_city::population::{FIRST_CARD_ID, PopulationSpec};
use tapgate_city::{CardState, TerminalRecord};
use tapgate_protocol::{Concession, Issuer, Mode, TapKind};

/// The misuse patterns, named as the watcher's rules that should catch them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// One card tapped 13 times in quick succession: passed from hand to hand.
    Velocity,
    /// One card tapped in two areas over 100 km apart, moments apart.
    ImpossibleTravel,
    /// One card entering at two metro stations while its first entry is open.
    Clone,
    /// A lost, cancelled or blocked card tried at two gates.
    DeniedRetry,
    /// An elder card ridden 11 times in a day.
    Concession,
    /// A broken or tampered reader: from the middle of the run on, half its taps carry card
    /// numbers no card has, which the gateway denies.
    GateDenials,
}

/// One injected misuse: the card (none for a broken reader) and the gates it was tapped at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Injected {
    pub rule: Pattern,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card: Option<u64>,
    pub gates: Vec<u64>,
}

/// A scripted tap, and which injection it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptedTap {
    pub card: u64,
    pub kind: TapKind,
    pub injection: usize,
}

/// The injections of one run and the taps each gate sends for them.
#[derive(Debug, Clone, Default)]
pub struct FraudPlan {
    pub injected: Vec<Injected>,
    /// Scripted taps by gate (terminal id), in the order each gate sends them.
    pub scripts: BTreeMap<u64, VecDeque<ScriptedTap>>,
    /// Cards the plan uses: ordinary riders never draw them.
    pub cards: HashSet<u64>,
    /// Gates whose reader breaks in the middle of the run.
    pub broken: BTreeSet<u64>,
}

/// Farther apart than this, two areas' seats cannot be reached by transit within moments,
/// even after the travel rule's slack for gates far from their seat.
const FAR_KM: f64 = 100.0;
/// Closer than this, taps in two areas never look like impossible travel (the rule allows
/// 40 km of slack).
const NEAR_KM: f64 = 30.0;

impl FraudPlan {
    /// `per_pattern` injections of each pattern onto `gates` (the connected ones), cards chosen
    /// by `seed`. A pattern the gates cannot carry (no two metro gates for a clone, no two
    /// areas far apart for travel) is left out.
    pub fn new(
        seed: u64,
        population: &PopulationSpec,
        gates: &[TerminalRecord],
        per_pattern: usize,
    ) -> Self {
        let mut plan = FraudPlan::default();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0066_7261_7564);
        let by_mode = |mode: Mode| -> Vec<&TerminalRecord> {
            gates.iter().filter(|g| g.mode == mode).collect()
        };
        let buses = by_mode(Mode::Bus);
        let metros = by_mode(Mode::Metro);
        let near_buses = pair(&buses, |km| km < NEAR_KM);
        let near_metros = pair(&metros, |km| km < NEAR_KM);
        let far_buses = pair(&buses, |km| km > FAR_KM);
        let any_two = (gates.len() >= 2).then(|| (&gates[0], &gates[gates.len() - 1]));
        for round in 0..per_pattern {
            // Chongqing's own cards, which every area accepts: a card refused for its issuer
            // would be denied, not misused.
            let plain = |c: &tapgate_city::CardRecord| {
                c.state == CardState::Active
                    && c.concession == Concession::None
                    && c.issuer == Issuer::ChongqingSsc
            };
            if let Some((a, b)) = near_buses {
                // Alternating two gates: on one bus, quick repeats are one boarding.
                let card = plan.pick(population, &mut rng, plain);
                let taps = (0..13).map(|i| (if i % 2 == 0 { a } else { b }, TapKind::Flat));
                plan.inject(Pattern::Velocity, card, taps);
            }
            if let Some((a, b)) = far_buses {
                let card = plan.pick(population, &mut rng, plain);
                plan.inject(
                    Pattern::ImpossibleTravel,
                    card,
                    [(a, TapKind::Flat), (b, TapKind::Flat)],
                );
            }
            if let Some((a, b)) = near_metros {
                let card = plan.pick(population, &mut rng, plain);
                plan.inject(
                    Pattern::Clone,
                    card,
                    [(a, TapKind::Entry), (b, TapKind::Entry)],
                );
            }
            if let Some((a, b)) = any_two {
                let card = plan.pick(population, &mut rng, |c| c.state != CardState::Active);
                let kind = |g: &TerminalRecord| {
                    if g.mode.needs_exit_tap() {
                        TapKind::Entry
                    } else {
                        TapKind::Flat
                    }
                };
                plan.inject(Pattern::DeniedRetry, card, [(a, kind(a)), (b, kind(b))]);
            }
            // A station of its own for each card where there are enough: its eleven taps are
            // then sent as soon as the others.
            if let Some(station) = metros.get(round % metros.len().max(1)) {
                // The city's own elder cards carry the concession in every area (the shipped
                // policy's rollout); one with rides left for the day's eleven.
                let card = plan.pick(population, &mut rng, |c| {
                    c.state == CardState::Active
                        && c.concession == Concession::Elder
                        && c.issuer == Issuer::ChongqingCityCard
                        && c.rides_left >= 20
                        && c.expires_on.is_none_or(|d| d.year() >= 2028)
                });
                // Eleven metro taps at one station, entries and exits in turn: at one gate the
                // order holds, and a metro tap is never a bus's repeated boarding.
                let taps = (0..11).map(|i| {
                    let kind = if i % 2 == 0 {
                        TapKind::Entry
                    } else {
                        TapKind::Exit
                    };
                    (*station, kind)
                });
                plan.inject(Pattern::Concession, card, taps);
            }
            // A reader of its own for each instance, away from the gates above.
            if let Some(reader) = gates.get(gates.len() / 2 + round) {
                plan.broken.insert(reader.terminal_id);
                plan.injected.push(Injected {
                    rule: Pattern::GateDenials,
                    card: None,
                    gates: vec![reader.terminal_id],
                });
            }
        }
        plan
    }

    /// A card of the population that `fits` and that the plan does not use yet.
    fn pick(
        &mut self,
        population: &PopulationSpec,
        rng: &mut ChaCha8Rng,
        fits: impl Fn(&tapgate_city::CardRecord) -> bool,
    ) -> u64 {
        let cards = population.cards.max(1);
        let start = rng.random_range(0..cards);
        let card = (0..cards)
            .map(|i| population.card((start + i) % cards))
            .find(|c| fits(c) && !self.cards.contains(&c.card_id))
            .map_or(FIRST_CARD_ID + start, |c| c.card_id);
        self.cards.insert(card);
        card
    }

    fn inject<'g>(
        &mut self,
        rule: Pattern,
        card: u64,
        taps: impl IntoIterator<Item = (&'g TerminalRecord, TapKind)>,
    ) {
        let injection = self.injected.len();
        let mut gates = Vec::new();
        for (gate, kind) in taps {
            self.scripts
                .entry(gate.terminal_id)
                .or_default()
                .push_back(ScriptedTap {
                    card,
                    kind,
                    injection,
                });
            if !gates.contains(&gate.terminal_id) {
                gates.push(gate.terminal_id);
            }
        }
        self.injected.push(Injected {
            rule,
            card: Some(card),
            gates,
        });
    }

    /// The injections whose every tap was sent: all but those `unsent` names.
    pub fn sent(self, unsent: &BTreeSet<usize>) -> Vec<Injected> {
        self.injected
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !unsent.contains(i))
            .map(|(_, injected)| injected)
            .collect()
    }

    /// The gate's script, taken out of the plan for the gate to send.
    pub fn take_script(&mut self, gate: u64) -> VecDeque<ScriptedTap> {
        self.scripts.remove(&gate).unwrap_or_default()
    }
}

/// Two distinct gates whose areas' distance passes `fits`.
fn pair<'g>(
    gates: &[&'g TerminalRecord],
    fits: impl Fn(f64) -> bool,
) -> Option<(&'g TerminalRecord, &'g TerminalRecord)> {
    gates.iter().enumerate().find_map(|(i, a)| {
        gates[i + 1..].iter().find_map(|b| {
            km_between(a.area.0, b.area.0)
                .filter(|km| fits(*km))
                .map(|_| (*a, *b))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_protocol::AreaCode;

    fn gate(id: u64, area: u32, mode: Mode) -> TerminalRecord {
        TerminalRecord {
            terminal_id: id,
            area: AreaCode(area),
            mode,
            operator: 1,
        }
    }

    #[test]
    fn every_pattern_gets_its_own_cards_on_gates_that_fit_it() {
        let population = PopulationSpec {
            cards: 5_000,
            ..PopulationSpec::default()
        };
        // 渝中 and 江北 are near each other; 万州 is far from both.
        let gates = [
            gate(1, 500103, Mode::Bus),
            gate(2, 500105, Mode::Bus),
            gate(3, 500101, Mode::Bus),
            gate(4, 500103, Mode::Metro),
            gate(5, 500105, Mode::Metro),
        ];
        let plan = FraudPlan::new(7, &population, &gates, 2);
        assert_eq!(plan.injected.len(), 12);
        assert_eq!(plan.broken, BTreeSet::from([3, 4]));
        assert_eq!(
            plan.cards.len(),
            10,
            "every injection has a card of its own"
        );
        for injected in &plan.injected {
            let Some(card) = injected.card else {
                assert_eq!(injected.rule, Pattern::GateDenials);
                continue;
            };
            let card = population.card(card - FIRST_CARD_ID);
            match injected.rule {
                Pattern::DeniedRetry => assert_ne!(card.state, CardState::Active),
                Pattern::Concession => assert_eq!(card.concession, Concession::Elder),
                _ => assert_eq!(
                    (card.state, card.concession),
                    (CardState::Active, Concession::None)
                ),
            }
        }
        let travel = plan
            .injected
            .iter()
            .find(|i| i.rule == Pattern::ImpossibleTravel)
            .unwrap();
        assert!(travel.gates.contains(&3), "{travel:?}");
        let clone = plan
            .injected
            .iter()
            .find(|i| i.rule == Pattern::Clone)
            .unwrap();
        assert_eq!(clone.gates, [4, 5]);
        let scripted: usize = plan.scripts.values().map(VecDeque::len).sum();
        assert_eq!(scripted, 2 * (13 + 2 + 2 + 2 + 11));
    }
}
