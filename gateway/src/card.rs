//! What the gateway knows about a card and about its recent use at this node.

pub use tapgate_city::{CardRecord, CardState};
pub use tapgate_protocol::crypto::CardPseudonymizer;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_labels_round_trip() {
        for s in CardState::ALL {
            assert_eq!(CardState::from_label(s.label()), Some(s));
        }
    }
}
