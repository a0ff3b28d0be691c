//! What the gateway knows about a card and about its recent use at this node.

use chrono::{DateTime, NaiveDate};
pub use tapgate_city::{CardRecord, CardState};

/// The entry a card made into a paid area (metro, intercity rail) and has not yet left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenEntry {
    pub terminal_area: u32,
    pub line: u16,
    pub stop: u16,
    pub at_ms: u64,
}

/// Per-card state this gateway node keeps between taps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CardActivity {
    pub open_entry: Option<OpenEntry>,
}

/// Chongqing local date (UTC+8, no daylight saving) of a Unix-millisecond instant.
pub fn local_date(now_ms: u64) -> NaiveDate {
    const OFFSET_MS: i64 = 8 * 3600 * 1000;
    let local_ms = i64::try_from(now_ms).unwrap_or(i64::MAX - OFFSET_MS) + OFFSET_MS;
    DateTime::from_timestamp_millis(local_ms)
        .map(|t| t.date_naive())
        .unwrap_or(NaiveDate::MAX)
}

/// Shows a card id in logs without revealing it: a keyed SM3 digest, so lines about the same
/// card can be correlated by operators without the number being recoverable from the logs.
#[derive(Debug, Clone)]
pub struct CardPseudonymizer {
    salt: [u8; 16],
}

impl CardPseudonymizer {
    pub fn new(salt: [u8; 16]) -> Self {
        Self { salt }
    }

    pub fn pseudonym(&self, card_id: u64) -> String {
        let mut input = [0u8; 24];
        input[..16].copy_from_slice(&self.salt);
        input[16..].copy_from_slice(&card_id.to_be_bytes());
        let digest = tapgate_protocol::crypto::sm3(&input);
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_date_is_utc_plus_eight() {
        // 2026-11-29T15:59:59Z is 23:59:59 in Chongqing; one second later it is the next day.
        let before = 1_795_967_999_000;
        assert_eq!(
            local_date(before),
            NaiveDate::from_ymd_opt(2026, 11, 29).unwrap()
        );
        assert_eq!(
            local_date(before + 1000),
            NaiveDate::from_ymd_opt(2026, 11, 30).unwrap()
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_salt_and_hide_the_number() {
        let a = CardPseudonymizer::new([1; 16]);
        let b = CardPseudonymizer::new([2; 16]);
        let id = 6_222_000_123_456_789;
        assert_eq!(a.pseudonym(id), a.pseudonym(id));
        assert_ne!(a.pseudonym(id), b.pseudonym(id));
        assert!(!a.pseudonym(id).contains("6789"));
        assert_eq!(a.pseudonym(id).len(), 12);
    }

    #[test]
    fn state_labels_round_trip() {
        for s in CardState::ALL {
            assert_eq!(CardState::from_label(s.label()), Some(s));
        }
    }
}
