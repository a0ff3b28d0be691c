//! Card and terminal directories: where card records live, and how changes to them reach every
//! gateway's cache.
//!
//! Two implementations behind one type: [`Directory::Redis`] for production, and
//! [`Directory::Embedded`], an in-process store for the zero-setup demo and for tests.
//!
//! Redis key schema (`P` is the configured key prefix, `tapgate` by default; `GG` is the id's
//! change group, [`change_group`], two digits from `00` to `15`):
//!
//! | key                          | type   | fields |
//! |------------------------------|--------|--------|
//! | `P:{gGG}:card:ID`            | hash   | `state` (active/lost/cancelled/blocked), `issuer` (cq_ssc/cq_city/sc_tianfutong/t_union), `concession` (none/elder/disabled/veteran/student), `rides` (counted rides left), `expires` (YYYY-MM-DD or empty) |
//! | `P:{gGG}:terminal:ID`        | hash   | `area` (six-digit code), `mode` (bus/metro/ferry/cableway/intercity_rail), `operator` (number) |
//! | `P:{gGG}:decided:ID`         | hash   | the gate's latest decided taps, shared by every gateway: field = sequence mod twice the resend window, value = the tap's journal record |
//! | `P:{gGG}:changes`            | stream | one entry per change in the group: `id` and the card's new fields, or `deleted` = 1; for a gate, `terminal` and its new fields, or `deleted` = 1 |
//!
//! Why this is safe on a Redis Cluster: the braces are the hash tag, so a group's cards, gates
//! and change stream share one slot. Every change is written with its stream entry in one
//! MULTI/EXEC of its group, which a cluster accepts and which a master failover keeps or loses
//! whole (replication keeps a slot's writes in order). Counted rides are taken by a script on
//! the card's key alone. Gateways follow all sixteen streams, each with XREAD BLOCK from the
//! last entry they applied, so a gateway that was disconnected reads what it missed when it
//! reconnects; plain pub/sub would have dropped it. If a stream was trimmed past that point, or
//! came back without it (a failover that lost the newest entries, or a restart without
//! persistence), the gateway drops its whole cache instead.

use crate::card::{CardRecord, CardState};
use crate::decide::CountedRide;
pub use crate::decide::RideClaim;
use crate::deny::DenyEvent;
use std::sync::Arc;
use tapgate_journal::JournalRecord;
use tapgate_runtime::redis_target::bounded_error;
use tokio::sync::mpsc;

pub use tapgate_city::TerminalRecord;

mod deny_feed;
mod embedded;
mod feed;
mod redis_directory;
pub use embedded::EmbeddedDirectory;
pub use redis_directory::{
    DirectoryHealth, RedisDirectory, RedisSettings, card_fields, parse_card,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("card directory unreachable: {0}")]
    Unavailable(String),
    #[error("card directory holds a malformed record for {key}: {detail}")]
    Malformed { key: String, detail: String },
    #[error(
        "the change was written, but only {acked} of the {wanted} replicas asked for held it after {waited_ms} ms; a failover of its master now could lose it: check it, and write it again if it is gone"
    )]
    NotReplicated {
        wanted: u16,
        acked: u16,
        waited_ms: u64,
    },
    #[error(
        "the card's state was written and every gateway acts on it, but the deny list that gates deciding alone use was not updated ({0}); write the state again to update it"
    )]
    DenyListBehind(String),
}

impl From<redis::RedisError> for DirectoryError {
    fn from(e: redis::RedisError) -> Self {
        DirectoryError::Unavailable(bounded_error(&e))
    }
}

/// One change to a card record, as every cache receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardChange {
    pub card_id: u64,
    /// The new record; `None` when the card was deleted.
    pub record: Option<CardRecord>,
}

/// One change to a gate's provisioning, as every gateway receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalChange {
    pub terminal_id: u64,
    /// The new record; `None` when the gate was revoked.
    pub record: Option<TerminalRecord>,
}

/// What a gateway receives from the directory's change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeEvent {
    Changed(CardChange),
    TerminalChanged(TerminalChange),
    /// Changes were missed and cannot be recovered: forget every cached card and gate.
    Resync,
}

/// Bound of the channel between a change feed and its cache.
const CHANGE_CHANNEL: usize = 4096;
/// Approximate length the change stream is trimmed to.
const CHANGE_STREAM_MAXLEN: usize = 1_000_000;

#[derive(Clone)]
pub enum Directory {
    Embedded(Arc<EmbeddedDirectory>),
    Redis(RedisDirectory),
}

impl Directory {
    pub async fn card(&self, card_id: u64) -> Result<Option<CardRecord>, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.card(card_id)),
            Directory::Redis(d) => d.card(card_id).await,
        }
    }

    pub async fn terminal(
        &self,
        terminal_id: u64,
    ) -> Result<Option<TerminalRecord>, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.terminal(terminal_id)),
            Directory::Redis(d) => d.terminal(terminal_id).await,
        }
    }

    /// Writes a card record and publishes the change.
    pub async fn put_card(&self, record: CardRecord) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                d.put_card(record);
                Ok(())
            }
            Directory::Redis(d) => d.put_cards(&[record]).await,
        }
    }

    /// Sets a card's state alone (a loss report, a block, an unblock) and publishes the record
    /// as a change; the rest of the record, the counted rides the gateways are taking among
    /// them, is left as it is. `None` when the card is not in the directory.
    pub async fn set_state(
        &self,
        card_id: u64,
        state: CardState,
    ) -> Result<Option<CardRecord>, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.set_state(card_id, state)),
            Directory::Redis(d) => d.set_state(card_id, state).await,
        }
    }

    pub async fn put_cards(&self, records: &[CardRecord]) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                records.iter().for_each(|r| d.put_card(*r));
                Ok(())
            }
            Directory::Redis(d) => d.put_cards(records).await,
        }
    }

    pub async fn put_terminals(&self, records: &[TerminalRecord]) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                records.iter().for_each(|r| d.put_terminal(*r));
                Ok(())
            }
            Directory::Redis(d) => d.put_terminals(records).await,
        }
    }

    /// Takes a gate out of service everywhere: refused at its next Hello, and every gateway
    /// following the change feed closes the sessions it has open.
    pub async fn revoke_terminal(&self, terminal_id: u64) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                d.revoke_terminal(terminal_id);
                Ok(())
            }
            Directory::Redis(d) => d.revoke_terminal(terminal_id).await,
        }
    }

    /// Takes one ride from the card's counted concession allowance, atomically and never below
    /// zero, whichever gateway asks: the directory's count decides which tap used the last
    /// ride. Not published as a change: every gateway asks the directory for each counted ride.
    /// The count is the period's: a count from an earlier period has lapsed and the ride is
    /// taken from a fresh allowance.
    pub async fn take_counted_ride(
        &self,
        card_id: u64,
        ride: CountedRide,
    ) -> Result<RideClaim, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.take_counted_ride(card_id, ride)),
            Directory::Redis(d) => d.take_counted_ride(card_id, ride).await,
        }
    }

    /// Adds `rides` to the card's allowance in the period of `ride` (a top-up on the holder's
    /// request), atomically with the gateways' rides, and publishes the new count as a change.
    /// `None` when the card is not in the directory.
    pub async fn top_up(
        &self,
        card_id: u64,
        ride: CountedRide,
        rides: u32,
    ) -> Result<Option<u32>, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.top_up(card_id, ride, rides)),
            Directory::Redis(d) => d.top_up(card_id, ride, rides).await,
        }
    }

    /// How the directory's Redis looks, for readiness; `None` for the embedded directory, which
    /// cannot fail.
    pub fn health(&self) -> Option<Arc<DirectoryHealth>> {
        match self {
            Directory::Embedded(_) => None,
            Directory::Redis(d) => Some(d.health.clone()),
        }
    }

    /// Whether other gateways can see what this one shares: only through Redis.
    pub fn shares_decisions(&self) -> bool {
        matches!(self, Directory::Redis(_))
    }

    /// Shares decided taps with every gateway of the directory, so a gate that moves to another
    /// gateway and resends a tap gets the first decision. Each gate keeps its last `slots`
    /// decisions (a ring by sequence number).
    pub async fn share_decisions(
        &self,
        records: &[JournalRecord],
        slots: u16,
    ) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(_) => Ok(()),
            Directory::Redis(d) => d.share_decisions(records, slots).await,
        }
    }

    /// The decisions other gateways shared for a gate, any order.
    pub async fn shared_decisions(
        &self,
        terminal_id: u64,
    ) -> Result<Vec<JournalRecord>, DirectoryError> {
        match self {
            Directory::Embedded(_) => Ok(Vec::new()),
            Directory::Redis(d) => d.shared_decisions(terminal_id).await,
        }
    }

    /// Starts following the deny list: first the whole list, then each change in order, and
    /// the whole list again whenever changes may have been missed.
    pub async fn follow_deny_list(&self) -> mpsc::Receiver<DenyEvent> {
        match self {
            Directory::Embedded(d) => d.follow_deny_list(),
            Directory::Redis(d) => d.follow_deny_list().await,
        }
    }

    /// Starts following card changes. The receiver gets every change made after this call; if
    /// Redis cannot be reached now, the feed starts when it can, with a `Resync` first.
    pub async fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
        match self {
            Directory::Embedded(d) => d.follow_changes(),
            Directory::Redis(d) => d.follow_changes().await,
        }
    }
}

/// How many change groups the directory's keys are spread over. Each group is one hash slot
/// holding its cards, its gates and its change stream, so a record and the change entry that
/// announces it are written in one MULTI/EXEC on any Redis; every gateway follows all groups.
/// Fixed: changing it moves every key.
pub const CHANGE_GROUPS: u16 = 16;

/// The change group of a card or gate id.
pub fn change_group(id: u64) -> u16 {
    // The low digits of card numbers are sequential; mix before taking the group.
    ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % u64::from(CHANGE_GROUPS)) as u16
}

#[cfg(test)]
mod tests {
    use super::feed::stream_id_after;
    use super::*;
    use chrono::NaiveDate;
    use std::collections::HashMap;
    use tapgate_protocol::{AreaCode, Concession, Issuer};

    #[test]
    fn card_fields_round_trip() {
        let record = CardRecord {
            card_id: 7,
            state: CardState::Blocked,
            issuer: Issuer::TUnion,
            concession: Concession::Elder,
            grade: Some(3),
            home_area: Some(AreaCode(500101)),
            rides_left: 1200,
            rides_period: NaiveDate::from_ymd_opt(2026, 1, 1),
            renews_on: tapgate_city::MonthDay::new(2, 29),
            expires_on: NaiveDate::from_ymd_opt(2030, 12, 31),
        };
        let fields: HashMap<String, String> = card_fields(&record)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(parse_card(7, &fields), Ok(record));
    }

    #[test]
    fn malformed_card_fields_say_what_is_wrong() {
        let mut fields: HashMap<String, String> = [("state", "gone"), ("issuer", "cq_ssc")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        assert_eq!(parse_card(1, &fields), Err("unknown state `gone`".into()));
        fields.insert("state".into(), "active".into());
        fields.insert("expires".into(), "31/12/2030".into());
        assert!(parse_card(1, &fields).unwrap_err().contains("YYYY-MM-DD"));
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id_after("10-0", "9-5"));
        assert!(stream_id_after("9-10", "9-9"));
        assert!(!stream_id_after("9-9", "9-9"));
    }
}
