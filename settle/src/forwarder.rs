//! The forwarder: ships a gateway's approved taps from its journal to the partition streams.
//!
//! It resumes from the checkpoint kept in the store, never from memory, so a restart of itself,
//! of the gateway, or of Redis (which may come back older, or empty) resumes from what the
//! store actually holds: a Redis that came back empty gets every tap again from the start of
//! the journal and rebuilds its ledgers.

use super::partition_of;
use super::store::{Checkpoint, Shipped, ShippedTap, Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tapgate_journal::{JournalPosition, journal_id, next_segment, read_from};
use tapgate_protocol::Outcome;
use tapgate_runtime::health::{Incident, PartHealth};
use tapgate_runtime::retry::Backoff;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    /// This gateway's name; its checkpoint is kept under it.
    pub node: String,
    pub journal_dir: PathBuf,
    pub partitions: u16,
    /// Journal records read (and shipped) per round trip.
    pub batch: usize,
    /// Taps shipped and not yet settled above which shipping pauses: the journal on disk is
    /// the buffer, not Redis's memory.
    pub max_backlog: u64,
}

/// Forwarder counters, read by metrics.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    pub shipped: AtomicU64,
    pub batches: AtomicU64,
    pub checkpoint_moved: AtomicU64,
    pub damaged_segments: AtomicU64,
    pub store_errors: AtomicU64,
    pub backlog_pauses: AtomicU64,
    /// The forwarder stopped on an error only an operator can clear (see the log).
    pub failed: std::sync::atomic::AtomicBool,
    /// Everything before this position has been shipped.
    pub shipped_through: std::sync::Mutex<Option<JournalPosition>>,
    /// Failing while the store does not take shipments; dead when the forwarder stopped.
    pub health: Arc<PartHealth>,
}

impl ForwarderStats {
    fn shipped_to(&self, position: JournalPosition) {
        *self.shipped_through.lock().expect("forwarder stats lock") = Some(position);
    }

    pub fn shipped_through(&self) -> Option<JournalPosition> {
        *self.shipped_through.lock().expect("forwarder stats lock")
    }
}

/// How far a running gateway's forwarder is behind its journal, measured when asked: right
/// whether the forwarder is shipping, waiting for settlers, retrying, or stopped.
#[derive(Clone)]
pub struct Backlog {
    pub journal_dir: PathBuf,
    pub durable: watch::Receiver<JournalPosition>,
    pub forwarder: Arc<ForwarderStats>,
}

impl Backlog {
    /// Journal bytes and decided taps (journal records) durable but not yet read by the
    /// forwarder. Before the forwarder has found its checkpoint, everything since the start of
    /// this process's journal counts.
    pub fn measure(&self) -> (u64, u64) {
        let durable = *self.durable.borrow();
        let shipped = self.forwarder.shipped_through().unwrap_or_default();
        tapgate_journal::distance(&self.journal_dir, shipped, durable).unwrap_or((0, 0))
    }
}

/// Where the forwarder stops reading.
pub enum Until {
    /// A running gateway's durable end; the forwarder follows it until `stop` turns true.
    Durable(watch::Receiver<JournalPosition>),
    /// The end of the files of a stopped gateway; the forwarder returns there.
    EndOfFiles,
}

/// First wait after a failure; failures in a row wait longer, up to `RETRY_CEILING`.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_CEILING: Duration = Duration::from_secs(2);
/// How often a forwarder with nothing to ship checks the store still holds its checkpoint.
const QUIET_CHECK: Duration = Duration::from_millis(500);
const BACKLOG_POLL: Duration = Duration::from_millis(50);

/// Runs until `stop` is true and everything durable before it has been shipped, or for
/// [`Until::EndOfFiles`] until the end of the journal. Store failures are retried; they never
/// lose or double a tap.
pub async fn run(
    store: Store,
    settings: ForwarderSettings,
    mut until: Until,
    stats: Arc<ForwarderStats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    if !super::init_store(&store, settings.partitions, &mut stop).await? {
        return Ok(());
    }
    let journal = journal_id(&settings.journal_dir)
        .map_err(|e| StoreError::Malformed(format!("{}: {e}", settings.journal_dir.display())))?;
    let ours = |stored: Option<Checkpoint>| own_position(&settings.node, &journal, stored);
    let mut retry = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    let mut store_down = Incident::new(
        "forwarder: the store does not take shipments; retrying from the stored checkpoint",
    );
    let at = |position: JournalPosition| Checkpoint {
        journal: journal.clone(),
        position,
    };
    let mut checkpoint = loop {
        match store.checkpoint(&settings.node).await {
            Ok(c) => break ours(c)?,
            Err(e @ StoreError::Malformed(_)) => return Err(e),
            Err(e) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                store_down.failed(std::time::Instant::now(), &e);
                if wait_or_stop(&mut stop, retry.next_delay()).await {
                    return Ok(());
                }
            }
        }
    };
    retry.reset();
    if let Err(e) = store.register_node(&settings.node, &journal).await {
        tracing::debug!(error = %e, "forwarder: could not record its journal for reconcile");
    }
    let mut backlog_checked: Option<tokio::time::Instant> = None;
    tracing::info!(node = %settings.node, checkpoint = %checkpoint.map_or("start".into(), |c| c.to_string()), "forwarder starting");
    loop {
        let limit = match &until {
            Until::Durable(durable) => Some(*durable.borrow()),
            Until::EndOfFiles => None,
        };
        let from = checkpoint.unwrap_or_default();
        let dir = settings.journal_dir.clone();
        let batch = settings.batch.max(1);
        let read = tokio::task::spawn_blocking(move || read_from(&dir, from, limit, batch)).await;
        let read = match read {
            Ok(Ok(r)) => r,
            // The runtime is shutting down.
            Err(_) => return Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "forwarder: cannot read the journal; retrying");
                if wait_or_stop(&mut stop, retry.next_delay()).await {
                    return Ok(());
                }
                continue;
            }
        };
        let mut next = read.next;
        if read.damaged && read.records.is_empty() {
            stats.damaged_segments.fetch_add(1, Ordering::Relaxed);
            tracing::error!(at = %read.next, "forwarder: damaged journal record; the rest of this segment cannot be shipped and `settle reconcile` will show it");
            next = next_segment(read.next);
        }
        if next == from && checkpoint.is_some() {
            stats.shipped_to(from);
            match &mut until {
                Until::EndOfFiles => return Ok(()),
                Until::Durable(durable) => {
                    if *stop.borrow() && *durable.borrow() <= from {
                        return Ok(());
                    }
                    let (writer_gone, quiet) = tokio::select! {
                        changed = durable.changed() => (changed.is_err(), false),
                        _ = stop.changed() => (false, false),
                        () = tokio::time::sleep(QUIET_CHECK) => (false, true),
                    };
                    // Nothing to ship: check the store still holds our checkpoint. A Redis
                    // that came back older or empty is caught up now, not at the next tap.
                    if quiet
                        && let Ok(stored) = store.checkpoint(&settings.node).await
                        && ours(stored.clone())? != checkpoint
                    {
                        stats.checkpoint_moved.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(expected = ?checkpoint, found = ?stored, "forwarder: the store's checkpoint changed (Redis restarted older or empty?); shipping again from it");
                        checkpoint = ours(stored)?;
                        continue;
                    }
                    // The journal is closed: nothing more will become durable.
                    if writer_gone && wait_or_stop(&mut stop, QUIET_CHECK).await {
                        return Ok(());
                    }
                    continue;
                }
            }
        }
        let check_backlog = backlog_checked.is_none_or(|t| t.elapsed() >= BACKLOG_POLL);
        if check_backlog && backlog_full(&store, &settings, &stats).await {
            // Stopping while settlers are behind: what is left is shipped on the next start.
            if wait_or_stop(&mut stop, BACKLOG_POLL).await {
                return Ok(());
            }
            continue;
        }
        if check_backlog {
            backlog_checked = Some(tokio::time::Instant::now());
        }
        let taps: Vec<ShippedTap> = read
            .records
            .iter()
            .zip(&read.positions)
            .filter(|(r, _)| r.result.outcome == Outcome::Approve)
            .map(|(record, position)| ShippedTap {
                partition: partition_of(record.tap.card_id, settings.partitions),
                position: *position,
                record: *record,
            })
            .collect();
        let expected = checkpoint.map(at);
        match store
            .ship(&settings.node, expected.as_ref(), &at(next), &taps)
            .await
        {
            Ok(Shipped::Done) => {
                retry.reset();
                stats.health.ok();
                store_down.recovered(std::time::Instant::now());
                stats
                    .shipped
                    .fetch_add(taps.len() as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.shipped_to(next);
                // A shipment moves the checkpoint forward or not at all.
                debug_assert!(checkpoint.is_none_or(|c| c <= next), "checkpoint went back");
                checkpoint = Some(next);
            }
            Ok(Shipped::Moved(current)) => {
                stats.checkpoint_moved.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(expected = ?checkpoint, found = ?current, "forwarder: checkpoint moved under it (a second forwarder with this node name, or a Redis that lost data); resuming from the stored one");
                checkpoint = ours(current)?;
            }
            Err(e) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                stats
                    .health
                    .fail(std::time::Instant::now(), format_args!("cannot ship: {e}"));
                store_down.failed(std::time::Instant::now(), &e);
                // Stopping while the store is unreachable: the stored checkpoint keeps the
                // place, and the next start ships the rest.
                if wait_or_stop(&mut stop, retry.next_delay()).await {
                    return Ok(());
                }
                // The batch may or may not have landed: only the store knows.
                if let Ok(c) = store.checkpoint(&settings.node).await {
                    checkpoint = ours(c)?;
                }
            }
        }
    }
}

/// The position in this journal a stored checkpoint stands for; an error when it belongs to
/// another journal, which must never be resumed from.
fn own_position(
    node: &str,
    journal: &str,
    stored: Option<Checkpoint>,
) -> Result<Option<JournalPosition>, StoreError> {
    match stored {
        None => Ok(None),
        Some(c) if c.journal == journal => Ok(Some(c.position)),
        Some(c) => Err(StoreError::ForeignCheckpoint {
            node: node.to_owned(),
            theirs: c.journal,
            ours: journal.to_owned(),
        }),
    }
}

async fn backlog_full(store: &Store, settings: &ForwarderSettings, stats: &ForwarderStats) -> bool {
    match store.counts().await {
        Ok((shipped, settled)) if shipped.saturating_sub(settled) >= settings.max_backlog => {
            stats.backlog_pauses.fetch_add(1, Ordering::Relaxed);
            true
        }
        _ => false,
    }
}

/// Sleeps for `d`; true when `stop` is set.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = stop.changed() => {}
        () = tokio::time::sleep(d) => {}
    }
    *stop.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_of_another_journal_is_refused() {
        let position = JournalPosition {
            segment: 3,
            offset: 870,
        };
        let stored = |journal: &str| {
            Some(Checkpoint {
                journal: journal.into(),
                position,
            })
        };
        assert_eq!(own_position("gw", "aa", None), Ok(None));
        assert_eq!(own_position("gw", "aa", stored("aa")), Ok(Some(position)));
        assert!(matches!(
            own_position("gw", "aa", stored("bb")),
            Err(StoreError::ForeignCheckpoint { .. })
        ));
        let text = stored("aa").unwrap().to_string();
        assert_eq!(text.parse::<Checkpoint>(), Ok(stored("aa").unwrap()));
    }
}
