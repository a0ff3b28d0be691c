//! A settler: owns some partitions, reads their taps through the consumer group, prices them
//! with the fare engine and applies each batch to the ledgers exactly once.
//!
//! Partitions are shared out by leases: every settler heartbeats, takes up to its fair share
//! (partitions ÷ live settlers, rounded up) and lets go of the rest, so one card's taps are
//! settled by one settler at a time and in order. A settler that takes a partition over first
//! claims what its predecessor read and never acknowledged, oldest first. One that stops in
//! order gives its partitions back and leaves the membership, so the others take them at their
//! next lease round rather than once its heartbeat lapses.

use super::ledger::{Booking, Ledger};
use super::store::{Applied, ApplyBatch, CardSettlement, Delivered, EntryId, Store, StoreError};
use crate::adjust::Adjustment;
use crate::fares::{FareTables, settle};
use crate::order::{self, Arrival};
use chrono::NaiveDate;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tapgate_journal::JournalRecord;
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_runtime::health::PartHealth;
use tapgate_runtime::retry::Backoff;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct SettlerSettings {
    /// Shown in the consumer group; a unique token is added per run.
    pub name: String,
    pub partitions: u16,
    /// Entries read and applied per batch.
    pub batch: usize,
    /// How long a lease lasts without renewal: how soon a dead settler's partitions move on.
    pub lease_ttl: Duration,
    /// How long a new entry waits on its partition's stream before it is priced, so that an
    /// older tap of its card shipped by a forwarder behind by less than this is priced first
    /// (see [`crate::order`]). Zero prices each read as it comes, in gate-time order within it.
    pub order_window: Duration,
}

/// Upper bounds (ms) of the settlement-lag histogram buckets.
pub const LAG_BUCKETS_MS: [u64; 20] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1_000, 2_000, 5_000, 10_000,
];

/// Time from a tap's approval to its ledger update, as a cumulative histogram.
#[derive(Debug, Default)]
pub struct LagHistogram {
    /// One counter per bound in [`LAG_BUCKETS_MS`], then one for everything above.
    buckets: [AtomicU64; LAG_BUCKETS_MS.len() + 1],
    pub sum_ms: AtomicU64,
    pub count: AtomicU64,
}

impl LagHistogram {
    pub fn record(&self, lag_ms: u64) {
        let i = LAG_BUCKETS_MS.partition_point(|&b| b < lag_ms);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(lag_ms, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (`le`), the last being `+Inf`.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            out.push((LAG_BUCKETS_MS.get(i).copied(), total));
        }
        out
    }
}

/// Settler counters, read by metrics.
#[derive(Debug, Default)]
pub struct SettlerStats {
    pub settled: AtomicU64,
    pub charges: AtomicU64,
    pub batches: AtomicU64,
    /// Entries delivered again after they were applied: acknowledged, not applied.
    pub redelivered: AtomicU64,
    /// Taps that another gateway's journal had brought already: acknowledged, booked once.
    pub copies: AtomicU64,
    /// Taps priced after a later tap of the same card: they reached their partition out of
    /// time order (two gateways' forwarders, one of them behind), and the fare engine, which
    /// prices a card's taps in the order it sees them, may have put a transfer discount or a
    /// trip's exit on a different ride than pricing in time order would.
    pub out_of_order: AtomicU64,
    /// Taps that reached settlement after their settlement day had closed, booked to the open
    /// day as late taps.
    pub late: AtomicU64,
    /// Entries that are not journal records: acknowledged, never applied.
    pub malformed: AtomicU64,
    pub leases_lost: AtomicU64,
    pub store_errors: AtomicU64,
    pub partitions_held: AtomicU64,
    /// Entries read and waiting out the order window, over this process's settlers.
    pub waiting: AtomicU64,
    pub lag: LagHistogram,
    /// Failing while the store does not answer; dead when a settler stopped on an error or
    /// panicked.
    pub health: Arc<PartHealth>,
}

/// First wait after the store failed a round; failures in a row wait longer, up to
/// `RETRY_CEILING`.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_CEILING: Duration = Duration::from_secs(2);
const READ_BLOCK: Duration = Duration::from_millis(200);
/// Lease rounds come this often while partitions may be changing hands (see
/// [`next_lease_round_in`]).
const LEASE_CATCH_UP: Duration = Duration::from_millis(250);

/// When the next lease round is due. Normally a third of the lease time. After the membership
/// changed, a settler short of its share looks again every [`LEASE_CATCH_UP`] for one normal
/// interval: the settlers above their share give partitions back at their own next round, and
/// those partitions should not wait up to another third of the lease time unsettled.
fn next_lease_round_in(lease_ttl: Duration, short_of_share: bool, catching_up: bool) -> Duration {
    let normal = lease_ttl / 3;
    if short_of_share && catching_up {
        LEASE_CATCH_UP.min(normal)
    } else {
        normal
    }
}

#[derive(Default)]
struct Held {
    /// Entries may wait in the group's pending list (taken over, or a read whose answer was
    /// lost): claim those before reading new ones.
    check_pending: bool,
    /// Entries read and not yet priced, in stream order: they wait out the order window. They
    /// stay in the group's pending list meanwhile, so a settler taking the partition over
    /// claims them.
    waiting: Vec<Read>,
}

/// An entry waiting out the order window, with when this settler read it.
struct Read {
    at_ms: u64,
    entry: Delivered,
}

impl Read {
    /// When the entry reached the stream. Its id is the store's clock; reading bounds it, so a
    /// store clock ahead of this settler's cannot hold entries longer than the window after
    /// they were read.
    fn arrived_ms(&self) -> u64 {
        self.entry.id.ms.min(self.at_ms)
    }

    fn arrival(&self) -> Arrival {
        Arrival {
            arrived_ms: self.arrived_ms(),
            tap: self
                .entry
                .record
                .map(|r| (r.tap.card_id, order::pricing_order(&r))),
        }
    }
}

impl Held {
    fn claim_pending(&mut self) {
        self.check_pending = true;
        // The pending list holds these too; they are read from there again.
        self.waiting.clear();
    }
}

/// Read entries a partition may hold waiting for the order window, in batches: past it the
/// settler reads no more of that partition until some are priced, and new entries wait in the
/// stream instead (their window counts from their arrival there).
const WAITING_BATCHES: usize = 8;
/// How often a settler looks for waiting entries that became ready. Looking costs a pass over
/// every waiting entry of a partition whose first is due, so not on every read.
const ORDER_TICK: Duration = Duration::from_millis(50);

/// Starts one settler under the panic supervisor; a settler that stops on a store error marks
/// the settlers' health dead so readiness names it.
pub fn spawn_supervised(
    store: Store,
    settings: SettlerSettings,
    tables: Arc<FareTables>,
    stats: Arc<SettlerStats>,
    stop: watch::Receiver<bool>,
    panics: Arc<tapgate_runtime::health::Panics>,
) -> tokio::task::JoinHandle<()> {
    let health = stats.health.clone();
    let run = run(store, settings, tables, stats, stop);
    tapgate_runtime::health::supervise("settler", health.clone(), panics, async move {
        if let Err(e) = run.await {
            health.dead(
                std::time::Instant::now(),
                format_args!("settler stopped: {e}"),
            );
            tracing::error!(error = %e, "settler stopped");
        }
    })
}

/// Runs until `stop` is set, then gives its partitions back.
pub async fn run(
    store: Store,
    settings: SettlerSettings,
    tables: Arc<FareTables>,
    stats: Arc<SettlerStats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    if !super::init_store(&store, settings.partitions, &mut stop).await? {
        return Ok(());
    }
    let token = format!(
        "{}-{}-{:08x}",
        settings.name,
        std::process::id(),
        rand::random::<u32>()
    );
    let card_key = store.settler_card_key(None).await?;
    let mut settler = Settler {
        store,
        card_key,
        cards: CardPseudonymizer::new(card_key),
        settings,
        fare_tables_digest: tables.digest(),
        tables,
        stats,
        token,
        held: BTreeMap::new(),
        next_lease_round: Instant::now(),
        members: 0,
        catch_up_until: Instant::now(),
        failing: false,
        reported_waiting: 0,
        next_ordering: Instant::now(),
    };
    tracing::info!(settler = %settler.token, fare_tables = %settler.fare_tables_digest, "settler starting");
    let mut retry = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    while !*stop.borrow() {
        if let Err(e) = settler.round().await {
            settler.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            settler
                .stats
                .health
                .fail(std::time::Instant::now(), format_args!("store: {e}"));
            if !settler.failing {
                tracing::warn!(error = %e, "settler: store unavailable; retrying");
            }
            settler.failing = true;
            settler.held.values_mut().for_each(Held::claim_pending);
            settler.report_waiting();
            tokio::select! {
                _ = stop.changed() => {}
                () = retry.wait() => {}
            }
        } else if settler.failing {
            retry.reset();
            tracing::info!("settler: store reachable again");
            settler.stats.health.ok();
            settler.failing = false;
        }
    }
    for p in std::mem::take(&mut settler.held).into_keys() {
        let _ = settler.store.release(p, &settler.token).await;
    }
    settler.report_waiting();
    let _ = settler.store.leave(&settler.token).await;
    settler.stats.partitions_held.store(0, Ordering::Relaxed);
    tracing::info!(settler = %settler.token, "settler stopped");
    Ok(())
}

/// The settlement days a batch is priced against.
#[derive(Debug, Clone, Copy)]
struct Days {
    /// Every day through this one is closed.
    closed: NaiveDate,
    /// Where late taps are booked.
    open: NaiveDate,
}

/// A priced batch: its books and what happened on the way.
#[derive(Default)]
struct Priced {
    ledger: Ledger,
    charges: u64,
    copies: u64,
    out_of_order: u64,
    late: u64,
}

struct Settler {
    store: Store,
    /// The key of the card pseudonyms, as the store holds it, and what it names cards by in
    /// the per-card books.
    card_key: [u8; 16],
    cards: CardPseudonymizer,
    settings: SettlerSettings,
    tables: Arc<FareTables>,
    /// Recorded with every batch's books.
    fare_tables_digest: String,
    stats: Arc<SettlerStats>,
    token: String,
    held: BTreeMap<u16, Held>,
    next_lease_round: Instant,
    /// Live settlers at the last lease round.
    members: usize,
    /// Until when partitions may still be changing hands after the membership changed.
    catch_up_until: Instant,
    failing: bool,
    /// What this settler last added into the process's waiting gauge.
    reported_waiting: u64,
    /// When to look for ready entries next.
    next_ordering: Instant,
}

impl Settler {
    async fn round(&mut self) -> Result<(), StoreError> {
        if Instant::now() >= self.next_lease_round {
            let short_of_share = self.manage_leases().await?;
            let now = Instant::now();
            self.next_lease_round = now
                + next_lease_round_in(
                    self.settings.lease_ttl,
                    short_of_share,
                    now < self.catch_up_until,
                );
        }
        let with_pending: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, h)| h.check_pending)
            .map(|(p, _)| *p)
            .collect();
        for p in with_pending {
            let entries = self
                .store
                .pending(p, &self.token, self.settings.batch)
                .await?;
            if entries.is_empty() {
                if let Some(h) = self.held.get_mut(&p) {
                    h.check_pending = false;
                }
            } else {
                self.settle_batch(p, entries).await?;
            }
        }
        let most_waiting = self.settings.batch * WAITING_BATCHES;
        let reading: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, h)| !h.check_pending && h.waiting.len() < most_waiting)
            .map(|(p, _)| *p)
            .collect();
        let until_leases = self
            .next_lease_round
            .saturating_duration_since(Instant::now());
        let block = READ_BLOCK
            .min(until_leases)
            .min(if self.held.values().any(|h| !h.waiting.is_empty()) {
                ORDER_TICK
            } else {
                READ_BLOCK
            })
            .max(Duration::from_millis(1));
        let delivered = self
            .store
            .read_new(&reading, &self.token, self.settings.batch, block)
            .await?;
        for (p, entries) in delivered {
            if let Some(h) = self.held.get_mut(&p) {
                let at_ms = tapgate_runtime::now_ms();
                h.waiting
                    .extend(entries.into_iter().map(|entry| Read { at_ms, entry }));
            }
        }
        self.settle_ready().await?;
        self.report_waiting();
        Ok(())
    }

    fn order_window_ms(&self) -> u64 {
        u64::try_from(self.settings.order_window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Prices every partition's waiting entries that are ready, a batch at a time, once an
    /// [`ORDER_TICK`].
    async fn settle_ready(&mut self) -> Result<(), StoreError> {
        if Instant::now() < self.next_ordering {
            return Ok(());
        }
        self.next_ordering = Instant::now() + ORDER_TICK;
        let window = self.order_window_ms();
        let partitions: Vec<u16> = self.held.keys().copied().collect();
        for p in partitions {
            let now = tapgate_runtime::now_ms();
            let Some(h) = self.held.get(&p).filter(|h| {
                h.waiting
                    .first()
                    .is_some_and(|r| r.arrived_ms().saturating_add(window) <= now)
            }) else {
                continue;
            };
            let arrivals: Vec<Arrival> = h.waiting.iter().map(Read::arrival).collect();
            let ends = order::batch_ends(&arrivals, now, window, self.settings.batch);
            let mut taken = 0;
            for end in ends {
                // A batch the store turned back (the watermark moved, the lease was lost)
                // empties the waiting entries: they are read again from the pending list.
                let Some(h) = self
                    .held
                    .get_mut(&p)
                    .filter(|h| h.waiting.len() >= end - taken)
                else {
                    break;
                };
                let entries: Vec<Delivered> =
                    h.waiting.drain(..end - taken).map(|r| r.entry).collect();
                taken = end;
                self.settle_batch(p, entries).await?;
            }
        }
        Ok(())
    }

    /// Keeps the process's waiting gauge, which every settler of the process adds into: at
    /// the end of each round, after a failed one, and at the stop.
    fn report_waiting(&mut self) {
        let waiting: u64 = self.held.values().map(|h| h.waiting.len() as u64).sum();
        let gauge = &self.stats.waiting;
        if waiting >= self.reported_waiting {
            gauge.fetch_add(waiting - self.reported_waiting, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(self.reported_waiting - waiting, Ordering::Relaxed);
        }
        self.reported_waiting = waiting;
    }

    /// Renews, takes and gives back leases; true when this settler holds fewer partitions
    /// than its share.
    async fn manage_leases(&mut self) -> Result<bool, StoreError> {
        let ttl = self.settings.lease_ttl;
        let partitions = self.settings.partitions.max(1);
        let live = self.store.heartbeat(&self.token, ttl).await?.max(1);
        if live != self.members {
            self.members = live;
            self.catch_up_until = Instant::now() + ttl / 3 + ttl / 10;
        }
        let card_key = self.store.settler_card_key(Some(self.card_key)).await?;
        if card_key != self.card_key {
            tracing::warn!(
                settler = %self.token,
                "the store names cards by another pseudonym key than this settler did (it was emptied and another process made a new one); this settler names cards by the store's from now on"
            );
            self.card_key = card_key;
            self.cards = CardPseudonymizer::new(card_key);
        }
        let share = usize::from(partitions).div_ceil(live);
        let mine: Vec<u16> = self.held.keys().copied().collect();
        for p in mine {
            if !self.store.lease(p, &self.token, ttl).await? {
                self.lose(p);
            }
        }
        // Start looking at a different place per settler so two settlers starting together do
        // not race for the same partitions.
        let start = self
            .token
            .bytes()
            .fold(0u16, |a, b| a.wrapping_add(u16::from(b)))
            % partitions;
        for i in 0..partitions {
            if self.held.len() >= share {
                break;
            }
            let p = (start + i) % partitions;
            if !self.held.contains_key(&p) && self.store.lease(p, &self.token, ttl).await? {
                tracing::info!(partition = p, settler = %self.token, "settler took a partition");
                self.held.insert(
                    p,
                    Held {
                        check_pending: true,
                        ..Held::default()
                    },
                );
            }
        }
        while self.held.len() > share {
            let Some((p, _)) = self.held.pop_last() else {
                break;
            };
            self.store.release(p, &self.token).await?;
            tracing::info!(partition = p, settler = %self.token, "settler gave a partition back");
        }
        self.stats
            .partitions_held
            .store(self.held.len() as u64, Ordering::Relaxed);
        Ok(self.held.len() < share)
    }

    fn lose(&mut self, partition: u16) {
        if self.held.remove(&partition).is_some() {
            self.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(partition, settler = %self.token, "settler lost a partition's lease");
        }
    }

    /// Prices a batch's records for their cards and books them: on their settlement day, or
    /// late on the open day when theirs is closed.
    fn price(
        &self,
        records: &[JournalRecord],
        riders: &mut HashMap<u64, CardSettlement>,
        days: Days,
    ) -> Priced {
        let mut priced = Priced::default();
        priced
            .ledger
            .fare_tables
            .insert(self.fare_tables_digest.clone());
        for record in records {
            let rider = riders.entry(record.tap.card_id).or_default();
            if !rider.recent.first_time(record) {
                priced.copies += 1;
                continue;
            }
            // An offline upload's own time is the gate's, before taps settled earlier by
            // design; it is out of order only when a tap that reached a gateway after it was
            // priced first.
            if rider
                .fares
                .latest_ms()
                .is_some_and(|latest| record.reached_gateway_ms() < latest)
            {
                priced.out_of_order += 1;
            }
            let charges = settle(record, &mut rider.fares, &self.tables);
            priced.charges += charges.len() as u64;
            let tapped = self.tables.day.day_of(record.server_time_ms);
            let booking = if tapped <= days.closed {
                priced.late += 1;
                Booking {
                    tapped,
                    booked: days.open,
                }
            } else {
                Booking::on_time(tapped)
            };
            priced.ledger.book(booking, record, &charges, &self.cards);
        }
        priced
    }

    async fn settle_batch(
        &mut self,
        partition: u16,
        entries: Vec<Delivered>,
    ) -> Result<(), StoreError> {
        // Read every batch rather than remembered from the last apply: a Redis restored from an
        // older snapshot holds an older watermark, and entries between the two must be applied,
        // not acknowledged as seen.
        let progress = self.store.progress(partition).await?;
        let watermark = progress.watermark;
        let applied_before = |id: EntryId| watermark.is_some_and(|w| id <= w);
        let acks: Vec<EntryId> = entries.iter().map(|e| e.id).collect();
        let redelivered = entries.iter().filter(|e| applied_before(e.id)).count();
        let fresh: Vec<&Delivered> = entries.iter().filter(|e| !applied_before(e.id)).collect();
        self.stats
            .redelivered
            .fetch_add(redelivered as u64, Ordering::Relaxed);
        let Some(last) = fresh.last().map(|e| e.id) else {
            return self.store.ack(partition, &acks).await;
        };
        let mut records: Vec<_> = fresh.iter().filter_map(|e| e.record).collect();
        order::in_pricing_order(&mut records);
        let adjustments: Vec<&Adjustment> = fresh
            .iter()
            .filter_map(|e| e.adjustment.as_deref())
            .collect();
        let malformed = fresh.len() - records.len() - adjustments.len();
        if malformed > 0 {
            self.stats
                .malformed
                .fetch_add(malformed as u64, Ordering::Relaxed);
            tracing::error!(
                partition,
                malformed,
                "settler: stream entries that are not journal records; acknowledged, not applied"
            );
        }
        let mut cards: Vec<u64> = records.iter().map(|r| r.tap.card_id).collect();
        cards.sort_unstable();
        cards.dedup();
        let states = self.store.riders(partition, &cards).await?;
        let now = tapgate_runtime::now_ms();
        let calendar = self.tables.day;
        let closed = progress
            .closed
            .map_or(calendar.closed_through(now), |stored| {
                stored.max(calendar.closed_through(now))
            });
        let mut riders: HashMap<u64, CardSettlement> = cards.into_iter().zip(states).collect();
        let days = Days {
            closed,
            open: calendar.open_day(now, closed),
        };
        let mut priced = self.price(&records, &mut riders, days);
        for adjustment in &adjustments {
            let mut booked = (*adjustment).clone();
            booked.booked = Some(days.open);
            priced.ledger.adjustments.push(booked);
        }
        // Only entries above the watermark are fresh: applying them moves it forward.
        debug_assert!(
            watermark.is_none_or(|w| w < last),
            "watermark would go back"
        );
        let batch = ApplyBatch {
            partition,
            token: self.token.clone(),
            expected: watermark,
            watermark: last,
            trim_below: acks.iter().copied().min().unwrap_or(last),
            acks,
            taps: (records.len() + adjustments.len()) as u64,
            riders: riders.into_iter().collect(),
            ledger: priced.ledger,
            closed,
        };
        match self.store.apply(batch).await? {
            Applied::Done => {
                // From when a gateway had the tap: for an offline upload, its arrival, not the
                // gate's time of the tap.
                for record in &records {
                    self.stats
                        .lag
                        .record(now.saturating_sub(record.reached_gateway_ms()));
                }
                self.stats
                    .settled
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                let stats = &self.stats;
                stats.charges.fetch_add(priced.charges, Ordering::Relaxed);
                stats.copies.fetch_add(priced.copies, Ordering::Relaxed);
                let out_of_order = priced.out_of_order;
                stats
                    .out_of_order
                    .fetch_add(out_of_order, Ordering::Relaxed);
                stats.late.fetch_add(priced.late, Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
            }
            Applied::LeaseLost => self.lose(partition),
            Applied::WatermarkMoved | Applied::DayClosed => {
                if let Some(h) = self.held.get_mut(&partition) {
                    h.claim_pending();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settler_short_of_its_share_looks_again_soon_only_while_partitions_move() {
        let ttl = Duration::from_secs(10);
        assert_eq!(next_lease_round_in(ttl, true, true), LEASE_CATCH_UP);
        for (short, catching_up) in [(true, false), (false, true), (false, false)] {
            assert_eq!(next_lease_round_in(ttl, short, catching_up), ttl / 3);
        }
        // Never later than the normal round, however short the lease.
        let short_ttl = Duration::from_millis(300);
        assert_eq!(next_lease_round_in(short_ttl, true, true), short_ttl / 3);
    }

    #[test]
    fn lag_lands_in_the_first_bucket_that_holds_it() {
        let h = LagHistogram::default();
        for lag in [0, 1, 2, 4, 10_000, 60_000] {
            h.record(lag);
        }
        let c = h.cumulative();
        assert_eq!(c[0], (Some(1), 2));
        assert_eq!(c[1], (Some(2), 3));
        assert_eq!(c[3], (Some(5), 4));
        assert_eq!(c[LAG_BUCKETS_MS.len() - 1], (Some(10_000), 5));
        assert_eq!(c[LAG_BUCKETS_MS.len()], (None, 6));
    }
}
