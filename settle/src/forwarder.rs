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
use tapgate_journal::{
    JournalPosition, JournalRead, ReadError, journal_id, next_segment, read_from,
};
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
    /// Decided taps (approvals and denials) kept per partition for watchers; 0 ships none.
    pub watch_feed: usize,
}

/// Decided taps kept per partition for watchers unless configured otherwise: at the load
/// generator's 25,000 taps a second over 8 partitions, 16 s for a watcher to be away before it
/// misses taps (minutes at a city's ordinary rate), for about 5.5 MB of Redis memory per
/// partition (110 bytes a tap, BENCHMARKS.md).
pub const WATCH_FEED: usize = 50_000;

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

impl Until {
    /// How far the journal may be read now.
    fn limit(&self) -> Option<JournalPosition> {
        match self {
            Until::Durable(durable) => Some(*durable.borrow()),
            Until::EndOfFiles => None,
        }
    }
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
    let Some((journal, mut checkpoint)) = start(&store, &settings, &stats, &mut stop).await? else {
        return Ok(());
    };
    let ours = |stored: Option<Checkpoint>| own_position(&settings.node, &journal, stored);
    let mut retry = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    let mut store_down = Incident::new(
        "forwarder: the store does not take shipments; retrying from the stored checkpoint",
    );
    let at = |position: JournalPosition| Checkpoint {
        journal: journal.clone(),
        position,
    };
    let mut backlog = BacklogGate::default();
    loop {
        let from = checkpoint.unwrap_or_default();
        let read = match read_journal(&settings, from, until.limit()).await {
            Ok(Some(read)) => read,
            // The runtime is shutting down.
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "forwarder: cannot read the journal; retrying");
                if wait_or_stop(&mut stop, retry.next_delay()).await {
                    return Ok(());
                }
                continue;
            }
        };
        let next = past_damage(&read, &stats);
        if next == from && checkpoint.is_some() {
            stats.shipped_to(from);
            match idle(
                &store,
                &settings.node,
                &journal,
                &mut until,
                &mut stop,
                from,
                &stats,
            )
            .await?
            {
                Idle::Stop => return Ok(()),
                Idle::Again => continue,
                Idle::Moved(stored) => {
                    checkpoint = stored;
                    continue;
                }
            }
        }
        if backlog.full(&store, &settings, &stats).await {
            // Stopping while settlers are behind: what is left is shipped on the next start.
            if wait_or_stop(&mut stop, BACKLOG_POLL).await {
                return Ok(());
            }
            continue;
        }
        let taps = decided_taps(&read, settings.partitions, settings.watch_feed > 0);
        let expected = checkpoint.map(at);
        match store
            .ship(
                &settings.node,
                expected.as_ref(),
                &at(next),
                &taps,
                settings.watch_feed,
            )
            .await
        {
            Ok(Shipped::Done) => {
                retry.reset();
                stats.health.ok();
                store_down.recovered(std::time::Instant::now());
                let approved = taps.iter().filter(|t| approved(&t.record)).count();
                stats.shipped.fetch_add(approved as u64, Ordering::Relaxed);
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

/// The next batch of records from `from` up to `limit`, read off the runtime's threads;
/// `None` when the runtime is shutting down.
async fn read_journal(
    settings: &ForwarderSettings,
    from: JournalPosition,
    limit: Option<JournalPosition>,
) -> Result<Option<JournalRead>, ReadError> {
    let dir = settings.journal_dir.clone();
    let batch = settings.batch.max(1);
    match tokio::task::spawn_blocking(move || read_from(&dir, from, limit, batch)).await {
        Ok(read) => read.map(Some),
        Err(_) => Ok(None),
    }
}

/// What a forwarder with nothing new to ship does next.
enum Idle {
    Stop,
    /// Read the journal again.
    Again,
    /// The store holds another checkpoint for this node: ship from there.
    Moved(Option<JournalPosition>),
}

/// Nothing durable is left to ship: waits for more, for a stop, or for a quiet moment in which
/// it checks the store still holds its checkpoint. A Redis that came back older or empty is
/// caught up then, not at the next tap.
async fn idle(
    store: &Store,
    node: &str,
    journal: &str,
    until: &mut Until,
    stop: &mut watch::Receiver<bool>,
    checkpoint: JournalPosition,
    stats: &ForwarderStats,
) -> Result<Idle, StoreError> {
    let durable = match until {
        Until::EndOfFiles => return Ok(Idle::Stop),
        Until::Durable(durable) => durable,
    };
    if *stop.borrow() && *durable.borrow() <= checkpoint {
        return Ok(Idle::Stop);
    }
    let (writer_gone, quiet) = tokio::select! {
        changed = durable.changed() => (changed.is_err(), false),
        _ = stop.changed() => (false, false),
        () = tokio::time::sleep(QUIET_CHECK) => (false, true),
    };
    if quiet
        && let Ok(stored) = store.checkpoint(node).await
        && own_position(node, journal, stored.clone())? != Some(checkpoint)
    {
        stats.checkpoint_moved.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(expected = %checkpoint, found = ?stored, "forwarder: the store's checkpoint changed (Redis restarted older or empty?); shipping again from it");
        return Ok(Idle::Moved(own_position(node, journal, stored)?));
    }
    // The journal is closed: nothing more will become durable.
    if writer_gone && wait_or_stop(stop, QUIET_CHECK).await {
        return Ok(Idle::Stop);
    }
    Ok(Idle::Again)
}

/// Readies the store, reads this journal's identity and finds where shipping resumes (the
/// checkpoint the store holds for this node and journal); `None` when asked to stop first.
async fn start(
    store: &Store,
    settings: &ForwarderSettings,
    stats: &ForwarderStats,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<(String, Option<JournalPosition>)>, StoreError> {
    if !super::init_store(store, settings.partitions, stop).await? {
        return Ok(None);
    }
    let journal = journal_id(&settings.journal_dir)
        .map_err(|e| StoreError::Malformed(format!("{}: {e}", settings.journal_dir.display())))?;
    let Some(stored) = stored_checkpoint(store, &settings.node, stats, stop).await? else {
        return Ok(None);
    };
    let checkpoint = own_position(&settings.node, &journal, stored)?;
    if let Err(e) = store.register_node(&settings.node, &journal).await {
        tracing::debug!(error = %e, "forwarder: could not record its journal for reconcile");
    }
    tracing::info!(node = %settings.node, checkpoint = %checkpoint.map_or("start".into(), |c| c.to_string()), "forwarder starting");
    Ok(Some((journal, checkpoint)))
}

/// The checkpoint the store holds for this node, retried while the store is unreachable;
/// `None` when asked to stop first.
async fn stored_checkpoint(
    store: &Store,
    node: &str,
    stats: &ForwarderStats,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Option<Checkpoint>>, StoreError> {
    let mut retry = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    let mut store_down =
        Incident::new("forwarder: the store does not answer for its checkpoint; retrying");
    loop {
        match store.checkpoint(node).await {
            Ok(stored) => {
                store_down.recovered(std::time::Instant::now());
                return Ok(Some(stored));
            }
            Err(e @ StoreError::Malformed(_)) => return Err(e),
            Err(e) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                store_down.failed(std::time::Instant::now(), &e);
                if wait_or_stop(stop, retry.next_delay()).await {
                    return Ok(None);
                }
            }
        }
    }
}

fn approved(record: &tapgate_journal::JournalRecord) -> bool {
    record.result.outcome == Outcome::Approve
}

/// The taps of what was read to ship, each with its partition and journal position: the
/// approved ones for settlement, and the denials too when watchers are fed (a denial costs
/// nothing, so settlement never sees it).
fn decided_taps(read: &JournalRead, partitions: u16, with_denials: bool) -> Vec<ShippedTap> {
    read.records
        .iter()
        .zip(&read.positions)
        .filter(|(r, _)| with_denials || approved(r))
        .map(|(record, position)| ShippedTap {
            partition: partition_of(record.tap.card_id, partitions),
            position: *position,
            record: *record,
        })
        .collect()
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

/// Where the next read starts: past the rest of a segment whose next record is damaged
/// (counted and logged; `settle reconcile` shows what it held), else where the read ended.
fn past_damage(read: &JournalRead, stats: &ForwarderStats) -> JournalPosition {
    if read.damaged && read.records.is_empty() {
        stats.damaged_segments.fetch_add(1, Ordering::Relaxed);
        tracing::error!(at = %read.next, "forwarder: damaged journal record; the rest of this segment cannot be shipped and `settle reconcile` will show it");
        return next_segment(read.next);
    }
    read.next
}

/// Asks the store how far settlers are behind at most every `BACKLOG_POLL`, so a busy
/// forwarder does not pay a round trip per batch for it.
#[derive(Default)]
struct BacklogGate {
    checked: Option<tokio::time::Instant>,
}

impl BacklogGate {
    /// Whether shipping must wait for settlers now.
    async fn full(
        &mut self,
        store: &Store,
        settings: &ForwarderSettings,
        stats: &ForwarderStats,
    ) -> bool {
        if self.checked.is_some_and(|t| t.elapsed() < BACKLOG_POLL) {
            return false;
        }
        if backlog_full(store, settings, stats).await {
            return true;
        }
        self.checked = Some(tokio::time::Instant::now());
        false
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
