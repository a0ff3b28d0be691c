//! Settlement: every approved tap becomes money in the right ledger, exactly once.
//!
//! ```text
//! journal ──forwarder──▶ P:{pN}:taps streams ──settlers (consumer group)──▶ ledgers of P:{pN}
//!           checkpoint per partition              fare engine, watermark
//! ```
//!
//! * The forwarder reads the gateway's journal up to its durable end and ships approved taps to
//!   one of N partition streams chosen by card, so one card's taps stay in order. Each
//!   partition keeps the node's checkpoint beside its stream; a partition's entries and its new
//!   checkpoint are written by one script that first checks where that partition stands and
//!   takes only the taps it does not hold yet, so every tap reaches its stream once.
//! * A settler owns a partition through a lease and reads it through the consumer group. Its
//!   ledger update, the partition's applied watermark (the last stream id applied) and the
//!   acknowledgement are one script that checks the lease and the watermark first, so an entry
//!   delivered again (after a crash, a takeover, or a reset of the group) is acknowledged but
//!   never applied twice.
//! * Several gateways' forwarders feed one stream, so a settler lets each new entry wait an
//!   order window and prices a card's taps by gate time ([`order`]).
//! * The fare engine ([`crate::fares`]) is pure; a rider's state between batches is stored
//!   beside the ledgers and written in the same script.
//!
//! [`store`] holds the two stores: Redis, and an in-process one for the zero-setup demo.

#![forbid(unsafe_code)]

pub mod adjust;
pub mod day;
pub mod fares;
pub mod forwarder;
pub mod ledger;
pub mod ops;
pub mod order;
pub mod recent;
pub mod settler;
pub mod stations;
pub mod store;

use crate::fares::FareTables;
use forwarder::{ForwarderSettings, ForwarderStats, Until};
use settler::{SettlerSettings, SettlerStats};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};
use tapgate_journal::JournalPosition;
use tapgate_runtime::health::{Panics, supervise};
use tapgate_runtime::retry::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long stopping waits for the forwarder to ship what is durable and for settlers to finish
/// their batch. Nothing is lost past it: the store's checkpoint and watermarks hold the place.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How a gateway settles what it approves.
#[derive(Debug, Clone)]
pub struct SettlementSettings {
    pub node: String,
    pub journal_dir: PathBuf,
    pub partitions: u16,
    /// Settlers run inside this process; 0 leaves settling to `tapgate settle run` elsewhere.
    pub settlers: usize,
    pub batch: usize,
    pub max_backlog: u64,
    pub lease_ttl: Duration,
    /// Decided taps kept per partition for watchers ([`ForwarderSettings::watch_feed`]).
    pub watch_feed: usize,
    /// How long settlers let new taps wait for older taps of their cards
    /// ([`SettlerSettings::order_window`]).
    pub order_window: Duration,
}

/// The forwarder and settlers running beside a gateway.
pub struct Settlement {
    pub store: Store,
    pub forwarder: Arc<ForwarderStats>,
    pub settlers: Arc<SettlerStats>,
    /// Panics caught in the forwarder's and settlers' tasks.
    pub panics: Arc<Panics>,
    durable: watch::Receiver<JournalPosition>,
    journal_dir: PathBuf,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Settlement {
    /// Starts shipping the journal (up to `durable`) and settling. The store must be
    /// initialised ([`Store::init`]) with the same partition count.
    pub fn start(
        store: Store,
        settings: &SettlementSettings,
        tables: Arc<FareTables>,
        durable: watch::Receiver<JournalPosition>,
    ) -> Settlement {
        let (stop, stop_rx) = watch::channel(false);
        let forwarder = Arc::new(ForwarderStats::default());
        let settlers = Arc::new(SettlerStats::default());
        let panics = Arc::new(Panics::default());
        let mut tasks = Vec::new();
        let forwarding = ForwarderSettings {
            node: settings.node.clone(),
            journal_dir: settings.journal_dir.clone(),
            partitions: settings.partitions,
            batch: settings.batch,
            max_backlog: settings.max_backlog,
            watch_feed: settings.watch_feed,
        };
        let (s, f, rx, d) = (
            store.clone(),
            forwarder.clone(),
            stop_rx.clone(),
            durable.clone(),
        );
        tasks.push(supervise(
            "forwarder",
            forwarder.health.clone(),
            panics.clone(),
            async move {
                if let Err(e) = forwarder::run(s, forwarding, Until::Durable(d), f.clone(), rx).await
                {
                    f.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    f.health
                        .dead(std::time::Instant::now(), format_args!("forwarder stopped: {e}"));
                    tracing::error!(error = %e, "forwarder stopped; approved taps stay in the journal until it runs again");
                }
            },
        ));
        for i in 0..settings.settlers {
            let settling = SettlerSettings {
                name: format!("{}-s{i}", settings.node),
                partitions: settings.partitions,
                batch: settings.batch,
                lease_ttl: settings.lease_ttl,
                order_window: settings.order_window,
            };
            tasks.push(settler::spawn_supervised(
                store.clone(),
                settling,
                tables.clone(),
                settlers.clone(),
                stop_rx.clone(),
                panics.clone(),
            ));
        }
        Settlement {
            store,
            forwarder,
            settlers,
            panics,
            durable,
            journal_dir: settings.journal_dir.clone(),
            stop,
            tasks,
        }
    }

    /// Waits until everything this node shipped is settled and the forwarder has nothing left
    /// to read: false if that took longer than `timeout`.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let durable = *self.durable.borrow();
            let caught_up = self
                .forwarder
                .shipped_through()
                .is_some_and(|p| p >= durable);
            // A store briefly unreachable (a failover) is waited out like a backlog.
            match self.store.counts().await {
                Ok((shipped, settled)) if caught_up && shipped == settled => return Ok(true),
                Ok(_) | Err(StoreError::Unavailable(_)) => {}
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes the settled books to `path` as JSON (what `tapgate settle reconcile --ledger`
    /// reads): how an in-process store's ledger outlives the process.
    pub async fn write_ledger(&self, path: &std::path::Path) -> Result<(), String> {
        let ledger = self
            .store
            .ledger(None, true)
            .await
            .map_err(|e| e.to_string())?;
        let text = serde_json::to_string(&ledger.to_json()).expect("a ledger serializes");
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// How far the forwarder is behind the journal, for the ops endpoint.
    pub fn backlog(&self) -> forwarder::Backlog {
        forwarder::Backlog {
            journal_dir: self.journal_dir.clone(),
            durable: self.durable.clone(),
            forwarder: self.forwarder.clone(),
        }
    }

    /// Ships what is durable, then stops the forwarder and the settlers (which give their
    /// partitions back).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(
                    "settlement task still busy at shutdown; stopped (the next start resumes from the store)"
                );
                task.abort();
            }
        }
    }
}

/// Sets the store up, waiting for it while it is unreachable. False when stopped first; an
/// error when the store can never be used as configured.
async fn init_store(
    store: &Store,
    partitions: u16,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, StoreError> {
    let mut warned = false;
    let mut retry = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
    loop {
        match store.init(partitions).await {
            Ok(()) => return Ok(true),
            Err(StoreError::Unavailable(e)) => {
                if !warned {
                    tracing::warn!(error = %e, "settlement store unreachable; waiting for it");
                    warned = true;
                }
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = retry.wait() => {}
        }
        if *stop.borrow() {
            return Ok(false);
        }
    }
}

/// Which partition a card's taps go to. A multiplicative hash so neighbouring card numbers
/// spread over partitions.
pub fn partition_of(card_id: u64, partitions: u16) -> u16 {
    let mixed = card_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    (mixed % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        let mut counts = [0u32; 8];
        for card in 6_222_000_000_000_000u64..6_222_000_000_008_000 {
            let p = partition_of(card, 8);
            assert_eq!(p, partition_of(card, 8));
            counts[usize::from(p)] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }
}
