//! What the gateway knows about a card and about its recent use at this node.

pub use tapgate_city::{CardRecord, CardState};

/// The entry a card made into a paid area (metro, intercity rail) and has not yet left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenEntry {
    pub terminal_area: u32,
    pub line: u16,
    pub stop: u16,
    pub at_ms: u64,
}

/// A card's last charged boarding of a bus: the vehicle's gate and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boarding {
    pub terminal_id: u64,
    pub at_ms: u64,
}

/// Per-card state this gateway node keeps between taps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CardActivity {
    pub open_entry: Option<OpenEntry>,
    pub last_boarding: Option<Boarding>,
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
