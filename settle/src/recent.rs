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

use tapgate_journal::JournalRecord;

/// How many of a card's latest tap ids are remembered: more than two days of an ordinary
/// rider's taps.
pub const RECENT_TAPS: usize = 16;

const RECENT_TAPS_VERSION: u8 = 1;

/// The latest tap ids (terminal, sequence) of one card, in a ring kept inline: settlement
/// copies a card's state out of the store and back once per batch that touches it, so the copy
/// must not allocate.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecentTaps {
    ids: [(u64, u64); RECENT_TAPS],
    len: u8,
    /// Where the oldest id sits once the ring is full (the next one to be replaced).
    oldest: u8,
}

impl RecentTaps {
    /// True the first time a tap is seen (and remembers it); false for a copy of a tap booked
    /// before.
    pub fn first_time(&mut self, record: &JournalRecord) -> bool {
        let id = (record.terminal_id, record.tap.sequence);
        let len = usize::from(self.len);
        if self.ids[..len].contains(&id) {
            return false;
        }
        if len < RECENT_TAPS {
            self.ids[len] = id;
            self.len += 1;
        } else {
            let oldest = usize::from(self.oldest);
            self.ids[oldest] = id;
            self.oldest = ((oldest + 1) % RECENT_TAPS) as u8;
        }
        true
    }

    /// The remembered ids, oldest first.
    fn oldest_first(&self) -> impl Iterator<Item = &(u64, u64)> {
        let (newer, older) = self.ids[..usize::from(self.len)].split_at(usize::from(self.oldest));
        older.iter().chain(newer)
    }

    pub fn encode(&self) -> Vec<u8> {
        use bytes::BufMut;
        let mut out = Vec::with_capacity(2 + usize::from(self.len) * 16);
        out.put_u8(RECENT_TAPS_VERSION);
        out.put_u8(self.len);
        for (terminal, sequence) in self.oldest_first() {
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
        let n = p.try_get_u8().ok()?;
        if usize::from(n) > RECENT_TAPS {
            return None;
        }
        let mut recent = Self {
            len: n,
            ..Self::default()
        };
        for id in &mut recent.ids[..usize::from(n)] {
            *id = (p.try_get_u64().ok()?, p.try_get_u64().ok()?);
        }
        p.is_empty().then_some(recent)
    }
}

/// Equal when the same ids are remembered in the same order, wherever the ring starts.
impl PartialEq for RecentTaps {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.oldest_first().eq(other.oldest_first())
    }
}

impl Eq for RecentTaps {}

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
            pay_percent: 100,
            repeat_boarding: false,
            uploaded_ms: None,
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
        assert_eq!(usize::from(recent.len), RECENT_TAPS);
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
        // Once the ring has wrapped, the bytes still run oldest first, and the copy read back
        // (whose ring starts at its beginning) forgets the same tap next.
        for sequence in 5..21 {
            recent.first_time(&record(3, sequence));
        }
        let mut decoded = RecentTaps::decode(&recent.encode()).expect("decodes");
        assert_eq!(decoded, recent);
        assert_eq!(decoded.oldest_first().next(), Some(&(3, 5)));
        assert!(decoded.first_time(&record(3, 21)) && recent.first_time(&record(3, 21)));
        assert_eq!(decoded, recent);
        assert!(decoded.first_time(&record(3, 5)));
        assert_eq!(RecentTaps::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(RecentTaps::decode(&[9, 0]), None);
    }
}
