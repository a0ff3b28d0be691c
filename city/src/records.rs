//! The records of the card directory and the terminal register, as the gateway reads them and
//! the synthetic population writes them.

use chrono::NaiveDate;
use tapgate_protocol::{AreaCode, Concession, Issuer, Mode};

/// Lifecycle state of a card as the issuer's register has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardState {
    Active,
    /// Reported lost (挂失); must stop riding everywhere.
    Lost,
    Cancelled,
    /// Blocked by the operator or the issuer (fraud, unpaid balance).
    Blocked,
}

impl CardState {
    pub const ALL: [CardState; 4] = [
        CardState::Active,
        CardState::Lost,
        CardState::Cancelled,
        CardState::Blocked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CardState::Active => "active",
            CardState::Lost => "lost",
            CardState::Cancelled => "cancelled",
            CardState::Blocked => "blocked",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.label() == label)
    }
}

/// A card's record in the card directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardRecord {
    pub card_id: u64,
    pub state: CardState,
    pub issuer: Issuer,
    pub concession: Concession,
    /// Counted concession rides left this year (the elder allowance); unused for other kinds.
    pub rides_left: u32,
    /// Last day the card is valid (local date), if it expires.
    pub expires_on: Option<NaiveDate>,
}

/// A gate as provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalRecord {
    pub terminal_id: u64,
    pub area: AreaCode,
    pub mode: Mode,
    pub operator: u16,
}
