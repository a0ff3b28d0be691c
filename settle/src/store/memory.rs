//! The in-process store: the Redis store's semantics under one lock, for the embedded demo.

use super::{
    Applied, ApplyBatch, CardSettlement, Checkpoint, Delivered, Shipped, ShippedTap, StoreError,
};
use crate::ledger::Ledger;
use chrono::NaiveDate;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};
use tapgate_journal::JournalRecord;
use tapgate_runtime::redis_target::EntryId;
use tapgate_runtime::sync::{Mutex, MutexGuard};
use tokio::sync::Notify;

/// The in-process store of the embedded demo. Streams are bounded by the forwarder's backlog
/// limit, as in Redis.
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    arrived: Notify,
    /// The key of the per-card books' pseudonyms ([`MemoryStore::with_card_key_file`] keeps
    /// it beside the ledger file, where `settle reconcile` finds it).
    card_key: [u8; 16],
}

#[derive(Default)]
pub(super) struct MemoryState {
    pub(super) partitions: u16,
    pub(super) next_ms: u64,
    pub(super) checkpoints: HashMap<String, Checkpoint>,
    pub(super) nodes: HashMap<String, String>,
    pub(super) streams: BTreeMap<u16, MemoryStream>,
    pub(super) watermarks: HashMap<u16, EntryId>,
    pub(super) closed: HashMap<u16, NaiveDate>,
    pub(super) leases: HashMap<u16, (String, Instant)>,
    pub(super) members: HashMap<String, Instant>,
    pub(super) riders: HashMap<u64, CardSettlement>,
    pub(super) ledger: Ledger,
    pub(super) shipped: u64,
    pub(super) settled: u64,
}

#[derive(Default)]
pub(super) struct MemoryStream {
    pub(super) entries: VecDeque<(EntryId, JournalRecord)>,
    /// Entries delivered and not yet acknowledged.
    pub(super) pending: BTreeMap<EntryId, JournalRecord>,
    pub(super) delivered_up_to: Option<EntryId>,
}

impl Default for MemoryStore {
    /// A store whose pseudonym key lives only as long as it does.
    fn default() -> Self {
        Self::with_card_key(rand::random())
    }
}

impl MemoryStore {
    pub fn with_card_key(card_key: [u8; 16]) -> Self {
        Self {
            state: Mutex::default(),
            arrived: Notify::new(),
            card_key,
        }
    }

    /// A store whose pseudonym key is read from `path`, or made and written there (readable by
    /// its owner only) when there is none yet, so every run over one state directory names
    /// cards alike.
    pub fn with_card_key_file(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::with_card_key(card_key_file(path)?))
    }

    pub(super) fn card_key(&self) -> [u8; 16] {
        self.card_key
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().expect("settlement store lock")
    }

    pub(super) fn init(&self, partitions: u16) -> Result<(), StoreError> {
        let mut s = self.lock();
        if s.partitions == 0 {
            s.partitions = partitions;
        }
        if s.partitions != partitions {
            return Err(StoreError::PartitionMismatch {
                stored: s.partitions,
                configured: partitions,
            });
        }
        Ok(())
    }

    pub(super) fn ship(
        &self,
        node: &str,
        expected: Option<&Checkpoint>,
        next: &Checkpoint,
        taps: &[ShippedTap],
    ) -> Shipped {
        let mut s = self.lock();
        let current = s.checkpoints.get(node).cloned();
        if current.as_ref() != expected {
            return Shipped::Moved(current);
        }
        // Entry ids carry the time they reached the stream, as Redis's do: the order window
        // counts from it.
        s.next_ms = tapgate_runtime::now_ms().max(s.next_ms + 1);
        let ms = s.next_ms;
        let approved = || {
            taps.iter()
                .filter(|t| t.record.result.outcome == tapgate_protocol::Outcome::Approve)
        };
        for (seq, tap) in approved().enumerate() {
            let id = EntryId {
                ms,
                seq: seq as u64,
            };
            s.streams
                .entry(tap.partition)
                .or_default()
                .entries
                .push_back((id, tap.record));
        }
        s.checkpoints.insert(node.to_string(), next.clone());
        let shipped = approved().count() as u64;
        s.shipped += shipped;
        drop(s);
        if shipped > 0 {
            self.arrived.notify_waiters();
        }
        Shipped::Done
    }

    pub(super) fn heartbeat(&self, token: &str, ttl: Duration) -> usize {
        let mut s = self.lock();
        let now = Instant::now();
        s.members.insert(token.to_string(), now + ttl);
        s.members.retain(|_, until| *until > now);
        s.members.len()
    }

    pub(super) fn leave(&self, token: &str) {
        self.lock().members.remove(token);
    }

    pub(super) fn lease(&self, partition: u16, token: &str, ttl: Duration) -> bool {
        let mut s = self.lock();
        let now = Instant::now();
        match s.leases.get(&partition) {
            Some((holder, until)) if holder != token && *until > now => false,
            _ => {
                s.leases.insert(partition, (token.to_string(), now + ttl));
                true
            }
        }
    }

    pub(super) fn release(&self, partition: u16, token: &str) {
        let mut s = self.lock();
        if s.leases
            .get(&partition)
            .is_some_and(|(holder, _)| holder == token)
        {
            s.leases.remove(&partition);
        }
    }

    pub(super) fn pending(&self, partition: u16, max: usize) -> Vec<Delivered> {
        let s = self.lock();
        s.streams.get(&partition).map_or_else(Vec::new, |stream| {
            stream
                .pending
                .iter()
                .take(max)
                .map(|(id, r)| Delivered {
                    id: *id,
                    record: Some(*r),
                    adjustment: None,
                })
                .collect()
        })
    }

    pub(super) async fn read_new(
        &self,
        partitions: &[u16],
        max: usize,
        block: Duration,
    ) -> Vec<(u16, Vec<Delivered>)> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let arrived = self.arrived.notified();
            let out = self.take_new(partitions, max);
            if !out.is_empty() {
                return out;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Vec::new();
            }
        }
    }

    pub(super) fn take_new(&self, partitions: &[u16], max: usize) -> Vec<(u16, Vec<Delivered>)> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for p in partitions {
            let Some(stream) = s.streams.get_mut(p) else {
                continue;
            };
            // The stream holds what waits out the order window too: find the first new entry
            // rather than walk past the delivered ones on every read.
            let first_new = stream.delivered_up_to.map_or(0, |after| {
                stream.entries.partition_point(|(id, _)| *id <= after)
            });
            let fresh: Vec<(EntryId, JournalRecord)> = stream
                .entries
                .range(first_new..)
                .take(max)
                .copied()
                .collect();
            if let Some((last, _)) = fresh.last() {
                stream.delivered_up_to = Some(*last);
                stream.pending.extend(fresh.iter().copied());
                out.push((
                    *p,
                    fresh
                        .into_iter()
                        .map(|(id, r)| Delivered {
                            id,
                            record: Some(r),
                            adjustment: None,
                        })
                        .collect(),
                ));
            }
        }
        out
    }

    pub(super) fn apply(&self, batch: ApplyBatch) -> Applied {
        let mut s = self.lock();
        let owner = s.leases.get(&batch.partition).map(|(t, _)| t.as_str());
        if owner != Some(batch.token.as_str()) {
            return Applied::LeaseLost;
        }
        if s.watermarks.get(&batch.partition).copied() != batch.expected {
            return Applied::WatermarkMoved;
        }
        if s.closed
            .get(&batch.partition)
            .is_some_and(|c| *c > batch.closed)
        {
            return Applied::DayClosed;
        }
        s.closed.insert(batch.partition, batch.closed);
        s.riders.extend(batch.riders);
        s.ledger.merge(&batch.ledger);
        s.watermarks.insert(batch.partition, batch.watermark);
        s.settled += batch.taps;
        let stream = s.streams.entry(batch.partition).or_default();
        for id in &batch.acks {
            stream.pending.remove(id);
        }
        while stream
            .entries
            .front()
            .is_some_and(|(id, _)| *id < batch.trim_below)
        {
            stream.entries.pop_front();
        }
        Applied::Done
    }

    pub(super) fn ack(&self, partition: u16, ids: &[EntryId]) {
        let mut s = self.lock();
        if let Some(stream) = s.streams.get_mut(&partition) {
            for id in ids {
                stream.pending.remove(id);
            }
        }
    }
}

/// The name of the file, beside an embedded gateway's ledger, that holds the key of its card
/// pseudonyms.
pub const CARD_KEY_FILE: &str = "card-pseudonym.key";

/// The card-pseudonym key in `path` (32 hex digits), made when the file does not exist yet.
pub fn card_key_file(path: &Path) -> Result<[u8; 16], StoreError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        StoreError::Malformed(format!("card pseudonym key {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| unreadable(&e))?;
    }
    match read_card_key(path) {
        Ok(key) => Ok(key),
        Err(_) if !path.exists() => {
            let key: [u8; 16] = rand::random();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| unreadable(&e))?;
            let line = format!("{}\n", tapgate_protocol::crypto::key_hex(&key));
            std::io::Write::write_all(&mut file, line.as_bytes()).map_err(|e| unreadable(&e))?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// The card-pseudonym key in `path`, which must exist.
pub fn read_card_key(path: &Path) -> Result<[u8; 16], StoreError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        StoreError::Malformed(format!("card pseudonym key {}: {e}", path.display()))
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(&e))?;
    tapgate_protocol::crypto::parse_key_hex(&text).map_err(|e| unreadable(&e))
}

/// Models run under loom by `scripts/test` (and once each as ordinary tests).
#[cfg(test)]
mod loom_models {
    use super::*;
    use tapgate_runtime::sync::{Arc, model, thread};

    fn batch(token: &str) -> ApplyBatch {
        ApplyBatch {
            partition: 0,
            token: token.into(),
            expected: None,
            watermark: EntryId { ms: 1, seq: 0 },
            acks: Vec::new(),
            trim_below: EntryId::default(),
            taps: 1,
            riders: Vec::new(),
            ledger: Ledger::default(),
            closed: NaiveDate::MIN,
        }
    }

    /// Two settlers race for one partition whose lease lapses at once, so either may take it
    /// from the other at any moment, and both apply the same batch: under every interleaving
    /// it is applied exactly once (the lease and the watermark are checked and moved in one
    /// critical section with the ledger update).
    #[test]
    fn a_batch_is_applied_once_whoever_holds_the_lease() {
        model(|| {
            let store = Arc::new(MemoryStore::with_card_key([0; 16]));
            let settlers: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|token| {
                    let store = store.clone();
                    thread::spawn(move || {
                        store.lease(0, token, Duration::ZERO)
                            && matches!(store.apply(batch(token)), Applied::Done)
                    })
                })
                .collect();
            let applied = settlers
                .into_iter()
                .map(|settler| settler.join().expect("settler"))
                .filter(|done| *done)
                .count();
            let state = store.lock();
            assert_eq!((applied, state.settled), (1, 1));
            assert_eq!(state.watermarks.get(&0), Some(&EntryId { ms: 1, seq: 0 }));
        });
    }
}
