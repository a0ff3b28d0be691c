//! What each simulated gate taps, decided by a seeded generator so the same seed gives the same
//! taps on every run: random cards of the synthetic population (so lost, cancelled, elder,
//! Sichuan and T-Union cards appear in their population shares), metro and rail gates pairing
//! each entry with a later exit, and optional shares of misbehaviour.

use crate::fraud::ScriptedTap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tapgate_city::population::PopulationSpec;
use tapgate_city::{CardState, TerminalRecord};
use tapgate_protocol::{Tap, TapKind};

/// Shares of taps sent wrongly on purpose, each a fraction of 1.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Tag corrupted: the gateway answers `bad_mac` and closes; the gate reconnects.
    pub bad_mac: f64,
    /// An old sequence number: the gateway answers `replay` and closes; the gate reconnects.
    pub replay: f64,
    /// The previous frame sent again, byte for byte: answered with the first answer.
    pub resend: f64,
}

/// What to send next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Tap(Tap),
    /// `Tap` with its tag corrupted.
    BadMac(Tap),
    /// A sequence the gateway has long passed.
    Replay(Tap),
    /// The last frame again.
    Resend,
}

/// Taps riding at once on one metro gate: entries waiting for their exit.
const RIDING: usize = 64;

/// One gate's tap generator.
pub struct GateWorkload {
    rng: ChaCha8Rng,
    population: PopulationSpec,
    cards: u64,
    terminal: TerminalRecord,
    faults: Faults,
    riding: VecDeque<u64>,
    line: u16,
    home: Option<Home>,
    /// Injected misuse this gate sends among its ordinary taps ([`crate::fraud`]).
    script: VecDeque<ScriptedTap>,
    /// From this gate time (Unix ms) on, the reader is broken: half its taps carry card numbers
    /// outside the population.
    broken_from_ms: Option<u64>,
}

/// Ordinary riders who ride like people: the cards whose population index is `position` modulo
/// `stride` use this gate, cards in good standing only, none of them one the fraud plan uses.
struct Home {
    position: u64,
    stride: u64,
    avoid: Arc<HashSet<u64>>,
    /// Taps each home rider has made in this run (a metro entry counts its exit too).
    taps: HashMap<u64, u32>,
    /// Taps given to riders already past [`RIDER_TAPS`]: a run too long or too fast for this
    /// gate's riders to ride like people.
    over_budget: u64,
}

/// Taps one ordinary rider makes in a run at most: a day's commute with a change of bus each
/// way. A load compresses a day into seconds, so riders allowed more would, within the run,
/// ride faster than any person and set off the velocity and concession rules.
pub const RIDER_TAPS: u32 = 4;

/// Draws of a home card before one that fits is taken anyway: a slice of the population with
/// no card in good standing is not worth a loop.
const HOME_DRAWS: usize = 64;

impl GateWorkload {
    pub fn new(
        seed: u64,
        population: &PopulationSpec,
        terminal: TerminalRecord,
        faults: Faults,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ terminal.terminal_id.rotate_left(32));
        let line = rng.random_range(1..=20);
        Self {
            rng,
            population: population.clone(),
            cards: population.cards.max(1),
            terminal,
            faults,
            riding: VecDeque::with_capacity(RIDING),
            line,
            home: None,
            script: VecDeque::new(),
            broken_from_ms: None,
        }
    }

    /// Breaks this gate's reader from gate time `from_ms` on ([`crate::fraud::Pattern`]).
    pub fn broken_from(mut self, from_ms: u64) -> Self {
        self.broken_from_ms = Some(from_ms);
        self
    }

    /// Ordinary riders from this gate's share of the population (gate `position` of `stride`),
    /// in good standing and not in `avoid`; `script` is injected misuse sent among them.
    pub fn with_home_riders(
        mut self,
        position: u64,
        stride: u64,
        avoid: Arc<HashSet<u64>>,
        script: VecDeque<ScriptedTap>,
    ) -> Self {
        self.home = Some(Home {
            position,
            stride: stride.max(1),
            avoid,
            taps: HashMap::new(),
            over_budget: 0,
        });
        self.script = script;
        self
    }

    /// The injections with scripted taps this gate has not sent.
    pub fn unsent_injections(&self) -> impl Iterator<Item = usize> + '_ {
        self.script.iter().map(|s| s.injection)
    }

    /// The next action; `sequence` is the tap's sequence number, `can_resend` whether a previous
    /// frame exists that was answered.
    pub fn next(&mut self, sequence: u64, gate_time_ms: u64, can_resend: bool) -> Action {
        let roll: f64 = self.rng.random();
        if can_resend && roll < self.faults.resend {
            return Action::Resend;
        }
        let tap = self.tap(sequence, gate_time_ms);
        let roll = roll - self.faults.resend;
        if (0.0..self.faults.bad_mac).contains(&roll) {
            Action::BadMac(tap)
        } else if (self.faults.bad_mac..self.faults.bad_mac + self.faults.replay).contains(&roll)
            && sequence > 1
        {
            Action::Replay(Tap { sequence: 1, ..tap })
        } else {
            Action::Tap(tap)
        }
    }

    /// A card for an ordinary rider making `taps` taps: any card, or one of this gate's home
    /// riders' with taps left in its budget.
    fn ordinary_card(&mut self, taps: u32) -> u64 {
        let first = tapgate_city::population::FIRST_CARD_ID;
        let Some(home) = &mut self.home else {
            return first + self.rng.random_range(0..self.cards);
        };
        let slice = (self.cards.saturating_sub(home.position))
            .div_ceil(home.stride)
            .max(1);
        // A rider in good standing with taps left; else one in good standing past its budget
        // (counted); else, in a slice with none in good standing, whoever was drawn last.
        let mut drawn = first + home.position;
        let mut past_budget = None;
        let mut within_budget = None;
        for _ in 0..HOME_DRAWS {
            let index = home.position + home.stride * self.rng.random_range(0..slice);
            drawn = first + index;
            if self.population.card(index).state != CardState::Active || home.avoid.contains(&drawn)
            {
                continue;
            }
            if home.taps.get(&drawn).copied().unwrap_or(0) + taps <= RIDER_TAPS {
                within_budget = Some(drawn);
                break;
            }
            past_budget.get_or_insert(drawn);
        }
        let card = within_budget.or(past_budget).unwrap_or(drawn);
        if within_budget.is_none() {
            home.over_budget += u64::from(taps);
        }
        *home.taps.entry(card).or_default() += taps;
        card
    }

    /// Taps given to home riders beyond their budget ([`RIDER_TAPS`]).
    pub fn over_budget(&self) -> u64 {
        self.home.as_ref().map_or(0, |h| h.over_budget)
    }

    fn tap(&mut self, sequence: u64, gate_time_ms: u64) -> Tap {
        if self.broken_from_ms.is_some_and(|from| gate_time_ms >= from) && self.rng.random_bool(0.5)
        {
            let garbage = tapgate_city::population::FIRST_CARD_ID
                + self.cards
                + self.rng.random_range(0..1_000_000);
            let kind = if self.terminal.mode.needs_exit_tap() {
                TapKind::Entry
            } else {
                TapKind::Flat
            };
            return self.tap_of(sequence, gate_time_ms, garbage, kind);
        }
        if !self.script.is_empty() && self.rng.random_bool(0.5) {
            let scripted = self.script.pop_front().expect("not empty");
            return self.tap_of(sequence, gate_time_ms, scripted.card, scripted.kind);
        }
        let (kind, card_id) = if self.terminal.mode.needs_exit_tap() {
            let exit_due = self.riding.len() >= RIDING
                || (!self.riding.is_empty() && self.rng.random_bool(0.5));
            match exit_due.then(|| self.riding.pop_front()).flatten() {
                Some(card) => (TapKind::Exit, card),
                None => {
                    let card = self.ordinary_card(2);
                    self.riding.push_back(card);
                    (TapKind::Entry, card)
                }
            }
        } else {
            (TapKind::Flat, self.ordinary_card(1))
        };
        self.tap_of(sequence, gate_time_ms, card_id, kind)
    }

    fn tap_of(&mut self, sequence: u64, gate_time_ms: u64, card_id: u64, kind: TapKind) -> Tap {
        let issuer = self
            .population
            .card(card_id - tapgate_city::population::FIRST_CARD_ID)
            .issuer;
        Tap {
            sequence,
            card_id,
            issuer,
            kind,
            line: self.line,
            stop: self.rng.random_range(1..=40),
            gate_time_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_protocol::{AreaCode, Mode};

    fn metro() -> TerminalRecord {
        TerminalRecord {
            terminal_id: 42,
            area: AreaCode(500103),
            mode: Mode::Metro,
            operator: 2,
        }
    }

    #[test]
    fn same_seed_same_taps() {
        let p = PopulationSpec::default();
        let mut a = GateWorkload::new(7, &p, metro(), Faults::default());
        let mut b = GateWorkload::new(7, &p, metro(), Faults::default());
        for s in 1..100 {
            assert_eq!(a.next(s, 0, true), b.next(s, 0, true));
        }
    }

    #[test]
    fn metro_exits_follow_entries_of_the_same_cards() {
        let p = PopulationSpec::default();
        let mut w = GateWorkload::new(1, &p, metro(), Faults::default());
        let mut open = std::collections::HashSet::new();
        let mut exits = 0;
        for s in 1..1000 {
            let Action::Tap(t) = w.next(s, 0, false) else {
                panic!("no faults configured")
            };
            match t.kind {
                TapKind::Entry => assert!(open.insert(t.card_id)),
                TapKind::Exit => {
                    assert!(open.remove(&t.card_id), "exit without entry");
                    exits += 1;
                }
                TapKind::Flat => panic!("metro gates do not tap flat"),
            }
        }
        assert!(exits > 300);
    }

    #[test]
    fn fault_shares_are_roughly_kept() {
        let p = PopulationSpec::default();
        let faults = Faults {
            bad_mac: 0.1,
            replay: 0.1,
            resend: 0.1,
        };
        let mut w = GateWorkload::new(3, &p, metro(), faults);
        let (mut bad, mut replay, mut resend) = (0, 0, 0);
        for s in 2..10_002 {
            match w.next(s, 0, true) {
                Action::BadMac(_) => bad += 1,
                Action::Replay(_) => replay += 1,
                Action::Resend => resend += 1,
                Action::Tap(_) => {}
            }
        }
        for n in [bad, replay, resend] {
            assert!((800..1200).contains(&n), "{bad} {replay} {resend}");
        }
    }
}
