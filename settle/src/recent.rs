//! Which taps of a card have been booked already: a tap's identity is its gate and the gate's
//! sequence number, whatever gateway journaled it.
//!
//! A gate that fails over resends its unanswered taps to another gateway, and a gate set up
//! against two gateways sends each tap to both; either way one tap can sit in two journals and
//! reach its partition twice. Both copies carry the same card, so they meet in the same
//! partition and the same card's state: remembering the last [`RECENT_TAPS`] tap ids of every
//! card is enough to book each tap once, in bounded space, without a lookup on the tap path.
//! A copy that arrives after more than that many later taps of its card would be booked again;
//! `tapgate settle reconcile` would then show it as duplicated.

use std::collections::VecDeque;
use tapgate_journal::JournalRecord;

/// How many of a card's latest tap ids are remembered: more than two days of an ordinary
/// rider's taps.
pub const RECENT_TAPS: usize = 16;

const RECENT_TAPS_VERSION: u8 = 1;

/// The latest tap ids (terminal, sequence) of one card, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentTaps {
    ids: VecDeque<(u64, u64)>,
}

impl RecentTaps {
    /// True the first time a tap is seen (and remembers it); false for a copy of a tap booked
    /// before.
    pub fn first_time(&mut self, record: &JournalRecord) -> bool {
        let id = (record.terminal_id, record.tap.sequence);
        if self.ids.contains(&id) {
            return false;
        }
        if self.ids.len() == RECENT_TAPS {
            self.ids.pop_front();
        }
        self.ids.push_back(id);
        true
    }

    pub fn encode(&self) -> Vec<u8> {
        use bytes::BufMut;
        let mut out = Vec::with_capacity(2 + self.ids.len() * 16);
        out.put_u8(RECENT_TAPS_VERSION);
        out.put_u8(self.ids.len() as u8);
        for (terminal, sequence) in &self.ids {
            out.put_u64(*terminal);
            out.put_u64(*sequence);
        }
        out
    }

    pub fn decode(mut p: &[u8]) -> Option<Self> {
        use bytes::Buf;
        if p.try_get_u8().ok()? != RECENT_TAPS_VERSION {
            return None;
        }
        let n = usize::from(p.try_get_u8().ok()?);
        if n > RECENT_TAPS {
            return None;
        }
        let mut ids = VecDeque::with_capacity(RECENT_TAPS);
        for _ in 0..n {
            ids.push_back((p.try_get_u64().ok()?, p.try_get_u64().ok()?));
        }
        p.is_empty().then_some(Self { ids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_protocol::{Concession, Issuer, Mode, Outcome, Reason, Tap, TapKind, TapResult};

    fn record(terminal_id: u64, sequence: u64) -> JournalRecord {
        JournalRecord {
            terminal_id,
            tag: [0; 16],
            tap: Tap {
                sequence,
                card_id: 6_222_000_000_000_001,
                issuer: Issuer::ChongqingSsc,
                kind: TapKind::Flat,
                line: 1,
                stop: 1,
                gate_time_ms: 1_000,
            },
            server_time_ms: 2_000,
            area: 500103,
            mode: Mode::Bus,
            operator: 1,
            result: TapResult {
                sequence,
                outcome: Outcome::Approve,
                reason: Reason::Approved,
                concession: Concession::None,
                fare_fen: 200,
                rides_left: 0,
            },
        }
    }

    #[test]
    fn a_copy_is_refused_and_the_memory_stays_bounded() {
        let mut recent = RecentTaps::default();
        assert!(recent.first_time(&record(7, 1)));
        assert!(!recent.first_time(&record(7, 1)));
        // Same sequence at another gate: another tap.
        assert!(recent.first_time(&record(8, 1)));
        for sequence in 2..100 {
            assert!(recent.first_time(&record(7, sequence)));
        }
        assert_eq!(recent.ids.len(), RECENT_TAPS);
        assert!(!recent.first_time(&record(7, 99)));
        // Forgotten once sixteen later taps have passed.
        assert!(recent.first_time(&record(7, 1)));
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let mut recent = RecentTaps::default();
        for sequence in 0..5 {
            recent.first_time(&record(3, sequence));
        }
        let bytes = recent.encode();
        assert_eq!(RecentTaps::decode(&bytes), Some(recent));
        assert_eq!(RecentTaps::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(RecentTaps::decode(&[9, 0]), None);
    }
}
