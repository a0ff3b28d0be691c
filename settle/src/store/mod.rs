//! Where settlement keeps its streams, checkpoints, leases, riders and ledgers.
//!
//! [`Store::Redis`] for production; [`Store::Memory`] for the embedded demo, with the same
//! semantics in one process (nothing survives the process, and the demo writes its ledger to a
//! file at the end).
//!
//! Redis key schema (`P` is the key prefix; `N` a partition number):
//!
//! | key                          | type   | what |
//! |------------------------------|--------|------|
//! | `P:settle:partitions`        | string | partition count, fixed at first use |
//! | `P:settle:members`           | zset   | live settlers by last heartbeat (server time, ms) |
//! | `P:settle:nodes`             | hash   | node → the journal id it ships from (for reconcile) |
//! | `P:settle:card-key`          | string | the key (32 hex digits) of the card pseudonyms in the per-card books, made once |
//! | `P:{pN}:taps`                | stream | shipped approved taps of partition N: `tap` = `TERMINAL-SEQUENCE`, `r` = the journal record; or a correction, `adjust` = JSON |
//! | `P:{pN}:forward:NODE`        | string | how far node NODE has shipped into partition N: `JOURNAL@SEGMENT:OFFSET` |
//! | `P:{pN}:counts`              | hash   | `shipped`, `settled`: taps of partition N, for the backlog |
//! | `P:{pN}:lease`               | string | token of the settler that owns partition N (expires) |
//! | `P:{pN}:watermark`           | string | last stream id of partition N applied |
//! | `P:{pN}:closed`              | string | the day through which partition N's books are closed (`YYYY-MM-DD`, only moves up) |
//! | `P:{pN}:rider:CARD`          | string | the card's fare-engine state (a card belongs to one partition) |
//! | `P:{pN}:recent:CARD`         | string | the card's latest tap ids, so a tap journaled by two gateways is booked once |
//! | `P:{pN}:ledger-taps`         | hash   | book day → approved taps settled |
//! | `P:{pN}:ledger:DAY`          | hash   | `AREA:OPERATOR:MODE:fen` / `:rides` |
//! | `P:{pN}:ledger-cards:DAY`    | hash   | `PSEUDONYM:fen` / `PSEUDONYM:rides`, the card's keyed pseudonym in 16 hex digits |
//! | `P:{pN}:clearing:DAY`        | hash   | `PAYER:PAYEE:fen` / `:rides` (regions `chongqing`, `sichuan`, `t_union`) |
//! | `P:{pN}:payables:DAY`        | hash   | `ISSUER:OPERATOR:fen` / `:rides`: what each card issuer owes each operator |
//! | `P:{pN}:concessions:DAY`     | hash   | `CONCESSION:OPERATOR:AREA:MODE:fen` (fare forgone) / `:rides` |
//! | `P:{pN}:transfers:DAY`       | hash   | `OPERATOR:AREA:MODE:fen` (discount granted) / `:rides` |
//! | `P:{pN}:lines:DAY`           | hash   | `OPERATOR:AREA:MODE:LINE:fen` / `:rides` |
//! | `P:{pN}:vehicles:DAY`        | hash   | `OPERATOR:GATE:fen` / `:rides`, flat rides by boarding gate |
//! | `P:{pN}:fare-tables`         | set    | digests of the fare tables that priced the ledgers, added with each batch |
//! | `P:{pN}:adjustments`         | stream | corrections booked (`a` = the correction as JSON, with the day booked): the audit trail |
//! | `P:{pN}:adjusted:TAP`        | string | the correction that settled tap TAP's maximum fare, so it is settled once |
//!
//! A book day (`DAY` above) is a settlement day `YYYY-MM-DD`, or `BOOKED~TAPPED` for the
//! late taps booked on day BOOKED that were tapped on the closed day TAPPED. The consumer
//! group on every partition stream is `settlers`.
//!
//! Why this is safe on a Redis Cluster: `{pN}` is a hash tag, so everything one partition owns
//! — its stream, the checkpoints shipped into it, its lease, watermark, riders and its share of
//! the books — is one slot. Every script touches one partition: a shipment moves one
//! partition's checkpoint with the entries it adds; a settler batch checks that partition's
//! lease and watermark and writes its acknowledgements, riders and ledger cells. A master
//! failover therefore keeps or loses a partition's state together (replication keeps a slot's
//! writes in order), and the forwarder and settlers recover from whatever consistent point it
//! went back to. Reports read every partition and merge the books.

use super::ledger::Ledger;
use super::recent::RecentTaps;
use crate::adjust::Adjustment;
use crate::fares::RiderState;
use chrono::NaiveDate;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tapgate_journal::{JournalPosition, JournalRecord};
use tapgate_protocol::crypto::CardPseudonymizer;
pub use tapgate_runtime::redis_target::EntryId;
use tapgate_runtime::redis_target::bounded_error;

mod memory;
mod redis_store;
pub use memory::{CARD_KEY_FILE, MemoryStore, card_key_file, read_card_key};
pub use redis_store::{RedisStore, ledger_increments, tap_id};

pub const GROUP: &str = "settlers";

/// Fields per HSCAN round trip when reading ledgers back.
const HSCAN_PAGE: usize = 10_000;

/// How far a node's forwarder has shipped, in which journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The journal's identity ([`tapgate_journal::journal_id`]).
    pub journal: String,
    pub position: JournalPosition,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.journal, self.position)
    }
}

impl std::str::FromStr for Checkpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (journal, position) = s
            .split_once('@')
            .ok_or_else(|| format!("checkpoint `{s}`: expected JOURNAL@SEGMENT:OFFSET"))?;
        Ok(Self {
            journal: journal.to_owned(),
            position: position.parse()?,
        })
    }
}

/// A stream entry as a settler receives it: a tap (`record`), a correction (`adjustment`),
/// or neither for an entry something else wrote, which is acknowledged and never applied.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub id: EntryId,
    pub record: Option<JournalRecord>,
    pub adjustment: Option<Box<Adjustment>>,
}

/// What settlement keeps about one card between batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardSettlement {
    pub fares: RiderState,
    /// The taps already booked, so a copy from another gateway's journal is not booked again.
    pub recent: RecentTaps,
}

/// One approved tap on its way to its partition's stream.
#[derive(Debug, Clone, Copy)]
pub struct ShippedTap {
    pub partition: u16,
    /// Where the record starts in its journal: a partition already past it does not take it
    /// again.
    pub position: JournalPosition,
    pub record: JournalRecord,
}

/// Where a reader of a partition's feed of decided taps (a watcher) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedFrom {
    /// The oldest entry the feed still holds.
    Start,
    /// The entries after this one.
    After(EntryId),
    /// The entries added at or after this time (ms since the epoch).
    Since(u64),
}

/// A decided tap as a partition's feed holds it.
#[derive(Debug, Clone, Copy)]
pub struct FedTap {
    pub id: EntryId,
    /// Its place among every entry ever fed to the partition, from 1: a reader whose next
    /// entry is not one past the last it saw missed the ones between (trimmed unread).
    pub ordinal: u64,
    pub record: JournalRecord,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shipped {
    Done,
    /// The checkpoint was not the one the batch was read from (another forwarder with the
    /// same node name, or a Redis that lost data); nothing was shipped. Resume from here.
    Moved(Option<Checkpoint>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// This settler no longer owns the partition; nothing was applied.
    LeaseLost,
    /// The watermark moved since it was read; nothing was applied. Read again.
    WatermarkMoved,
    /// Another settler had closed a day the batch would have booked on time: its clock is
    /// ahead of this one's. Nothing was applied; price again against the partition's record.
    DayClosed,
}

/// How far a partition's books are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The last stream entry applied.
    pub watermark: Option<EntryId>,
    /// The latest day the books are closed through, as the partition's batches recorded it.
    pub closed: Option<NaiveDate>,
}

/// One settler batch, applied whole or not at all.
#[derive(Debug, Clone)]
pub struct ApplyBatch {
    pub partition: u16,
    pub token: String,
    /// The watermark the batch was computed against.
    pub expected: Option<EntryId>,
    /// The last entry applied by this batch.
    pub watermark: EntryId,
    /// Every entry to acknowledge: the applied ones and redelivered ones already applied.
    pub acks: Vec<EntryId>,
    /// Entries older than this one are applied and can leave the stream.
    pub trim_below: EntryId,
    pub taps: u64,
    /// Every card of the batch with its fare-engine state and its latest tap ids after it.
    pub riders: Vec<(u64, CardSettlement)>,
    pub ledger: Ledger,
    /// Every day through this one is closed: the books were computed so, and the partition's
    /// record of its closed days moves up to it (never down) with the batch.
    pub closed: NaiveDate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("settlement store unreachable: {0}")]
    Unavailable(String),
    #[error("settlement store: {0}")]
    Malformed(String),
    #[error(
        "settlement store is set up for {stored} partitions, this process for {configured}; one card's taps would split across partitions"
    )]
    PartitionMismatch { stored: u16, configured: u16 },
    #[error(
        "the checkpoint of node `{node}` belongs to journal {theirs}, this gateway's journal is {ours}: two gateways share a node name. Give this one its own `[settlement] node`, or delete the key `forward:{node}` if journal {theirs} is retired"
    )]
    ForeignCheckpoint {
        node: String,
        theirs: String,
        ours: String,
    },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Unavailable(bounded_error(&e))
    }
}

#[derive(Clone)]
pub enum Store {
    Redis(RedisStore),
    Memory(Arc<MemoryStore>),
}

impl Store {
    /// Fixes the partition count on first use and creates the consumer groups.
    pub async fn init(&self, partitions: u16) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.init(partitions).await,
            Store::Memory(m) => m.init(partitions),
        }
    }

    pub async fn checkpoint(&self, node: &str) -> Result<Option<Checkpoint>, StoreError> {
        match self {
            Store::Redis(r) => r.checkpoint(node).await,
            Store::Memory(m) => Ok(m.lock().checkpoints.get(node).cloned()),
        }
    }

    /// Appends `taps` (partition, record) and moves the node's checkpoint from `expected` to
    /// `next`, atomically, if the checkpoint is still `expected`.
    pub async fn ship(
        &self,
        node: &str,
        expected: Option<&Checkpoint>,
        next: &Checkpoint,
        taps: &[ShippedTap],
        watch_feed: usize,
    ) -> Result<Shipped, StoreError> {
        match self {
            Store::Redis(r) => r.ship(node, expected, next, taps, watch_feed).await,
            // No watcher reads a gateway's own memory: it gets the approved taps only.
            Store::Memory(m) => Ok(m.ship(node, expected, next, taps)),
        }
    }

    /// Records that `node` ships from `journal`, so a reconcile can name a journal it was not
    /// given.
    pub async fn register_node(&self, node: &str, journal: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => {
                let _: () = redis::cmd("HSET")
                    .arg(r.key("settle:nodes"))
                    .arg(node)
                    .arg(journal)
                    .query_async(&mut r.conn())
                    .await?;
                Ok(())
            }
            Store::Memory(m) => {
                m.lock().nodes.insert(node.to_owned(), journal.to_owned());
                Ok(())
            }
        }
    }

    /// Every node that has shipped, with the journal it ships from.
    pub async fn nodes(&self) -> Result<BTreeMap<String, String>, StoreError> {
        match self {
            Store::Redis(r) => Ok(redis::cmd("HGETALL")
                .arg(r.key("settle:nodes"))
                .query_async(&mut r.conn())
                .await?),
            Store::Memory(m) => Ok(m.lock().nodes.clone().into_iter().collect()),
        }
    }

    /// Taps shipped and taps settled, over all nodes and settlers.
    pub async fn counts(&self) -> Result<(u64, u64), StoreError> {
        match self {
            Store::Redis(r) => r.counts().await,
            Store::Memory(m) => {
                let s = m.lock();
                Ok((s.shipped, s.settled))
            }
        }
    }

    /// Records a settler as alive and returns how many are.
    pub async fn heartbeat(&self, token: &str, ttl: Duration) -> Result<usize, StoreError> {
        match self {
            Store::Redis(r) => r.heartbeat(token, ttl).await,
            Store::Memory(m) => Ok(m.heartbeat(token, ttl)),
        }
    }

    /// Leaves the settlers' membership at an orderly stop, so the others count one settler
    /// fewer at their next lease round and take its partitions then, not when its heartbeat
    /// would have lapsed.
    pub async fn leave(&self, token: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.leave(token).await,
            Store::Memory(m) => {
                m.leave(token);
                Ok(())
            }
        }
    }

    /// Takes or renews the lease on a partition; false when another settler holds it.
    pub async fn lease(
        &self,
        partition: u16,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(r) => r.lease(partition, token, ttl).await,
            Store::Memory(m) => Ok(m.lease(partition, token, ttl)),
        }
    }

    pub async fn release(&self, partition: u16, token: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.release(partition, token).await,
            Store::Memory(m) => {
                m.release(partition, token);
                Ok(())
            }
        }
    }

    /// Entries delivered before and never acknowledged, oldest first, taken over by `consumer`.
    pub async fn pending(
        &self,
        partition: u16,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<Delivered>, StoreError> {
        match self {
            Store::Redis(r) => r.pending(partition, consumer, max).await,
            Store::Memory(m) => Ok(m.pending(partition, max)),
        }
    }

    /// New entries of the given partitions, waiting up to `block` for the first.
    pub async fn read_new(
        &self,
        partitions: &[u16],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<(u16, Vec<Delivered>)>, StoreError> {
        match self {
            Store::Redis(r) => r.read_new(partitions, consumer, max, block).await,
            Store::Memory(m) => Ok(m.read_new(partitions, max, block).await),
        }
    }

    /// Puts a correction on its card's partition stream, where one settler books it once.
    /// False, and nothing written, when the tap's maximum fare was settled by a correction
    /// before (a refund or a completed trip can be made once per tap).
    pub async fn submit_adjustment(
        &self,
        partition: u16,
        adjustment: &Adjustment,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(r) => r.submit_adjustment(partition, adjustment).await,
            Store::Memory(_) => Err(StoreError::Malformed(
                "corrections are made against a Redis settlement store; an embedded gateway's books are final when it stops".into(),
            )),
        }
    }

    /// What names cards in the per-card books: the key the settlers keep in the store, so
    /// every settler and every reconcile against the store names a card alike. An error when
    /// no settler has put one there yet.
    pub async fn card_pseudonyms(&self) -> Result<CardPseudonymizer, StoreError> {
        let key = match self {
            Store::Redis(r) => r.card_key(None).await?,
            Store::Memory(m) => Some(m.card_key()),
        };
        key.map(CardPseudonymizer::new).ok_or_else(|| {
            StoreError::Malformed(
                "the store holds no card-pseudonym key: no settler has run against it (or it was emptied since)".into(),
            )
        })
    }

    /// The key a settler names cards by: the store's, after proposing `held` (the key it
    /// holds, or a new one at its start). A settler proposes at every lease round, so a Redis
    /// that came back empty gets the same key again.
    pub async fn settler_card_key(&self, held: Option<[u8; 16]>) -> Result<[u8; 16], StoreError> {
        match self {
            Store::Redis(r) => {
                let proposed = held.unwrap_or_else(rand::random);
                Ok(r.card_key(Some(proposed)).await?.unwrap_or(proposed))
            }
            Store::Memory(m) => Ok(m.card_key()),
        }
    }

    /// How far the partition's books are: its watermark and the day it is closed through.
    pub async fn progress(&self, partition: u16) -> Result<Progress, StoreError> {
        match self {
            Store::Redis(r) => r.progress(partition).await,
            Store::Memory(m) => {
                let s = m.lock();
                Ok(Progress {
                    watermark: s.watermarks.get(&partition).copied(),
                    closed: s.closed.get(&partition).copied(),
                })
            }
        }
    }

    /// What settlement keeps about these cards of one partition.
    pub async fn riders(
        &self,
        partition: u16,
        cards: &[u64],
    ) -> Result<Vec<CardSettlement>, StoreError> {
        match self {
            Store::Redis(r) => r.riders(partition, cards).await,
            Store::Memory(m) => {
                let s = m.lock();
                Ok(cards
                    .iter()
                    .map(|c| s.riders.get(c).cloned().unwrap_or_default())
                    .collect())
            }
        }
    }

    /// Applies a batch, taken by value so the in-process store keeps its riders' states
    /// without copying them.
    pub async fn apply(&self, batch: ApplyBatch) -> Result<Applied, StoreError> {
        match self {
            Store::Redis(r) => r.apply(&batch).await,
            Store::Memory(m) => Ok(m.apply(batch)),
        }
    }

    pub async fn ack(&self, partition: u16, ids: &[EntryId]) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ack(partition, ids).await,
            Store::Memory(m) => {
                m.ack(partition, ids);
                Ok(())
            }
        }
    }

    /// The settled books of one day, or of every day; the per-card books (the bulk of them)
    /// only when `with_cards`.
    pub async fn ledger(
        &self,
        day: Option<NaiveDate>,
        with_cards: bool,
    ) -> Result<Ledger, StoreError> {
        let mut ledger = match self {
            Store::Redis(r) => r.ledger(day, with_cards).await?,
            Store::Memory(m) => m.lock().ledger.clone(),
        };
        ledger.restrict(day, with_cards);
        Ok(ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_numerically_and_round_trip() {
        let a: EntryId = "1700000000000-9".parse().unwrap();
        let b: EntryId = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string().parse::<EntryId>(), Ok(b));
        assert!("x-1".parse::<EntryId>().is_err());
    }
}
