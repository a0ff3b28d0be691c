//! The live watcher: watching every gateway's decided taps as they are shipped.
//!
//! Each gateway's forwarder puts every decided tap (approvals and denials) on its card's
//! partition feed (`P:{pN}:decided`) in the same step as it ships the approved ones to
//! settlement, so the feeds hold each tap once whichever gateway decided it. One watcher at a
//! time reads them all: whoever holds the watch lease. A card's taps and a gate's taps then meet
//! in one [`Watcher`], so the card rules and the per-gate rule see everything, and other
//! watchers wait as standbys. One core keeps up with well over a million taps a second
//! (BENCHMARKS.md), far above a city's rate, so one active watcher is enough.
//!
//! Each round reads a page of every partition's feed, feeds the taps to the watcher in time
//! order and stores the alerts together with the new places in one script that first checks the
//! lease ([`AlertStore::commit`]): a watcher that lost its lease while paused stores nothing,
//! so every alert is stored once. A watcher that takes over reads the last `warm_up` of each feed
//! before its stored place again without raising alerts, so its windows hold what its
//! predecessor's held. The feeds are trimmed by length: a watcher that falls further behind than
//! that misses taps, which it counts and reports as not ready.

use crate::store::{AlertStore, StoredAlert};
use crate::{Alert, Observed, Rule, Rules, Watcher};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tapgate_runtime::health::PartHealth;
use tapgate_runtime::redis_target::EntryId;
use tapgate_runtime::retry::Backoff;
use tapgate_settle::store::{FedTap, FeedFrom, RedisStore, Store};
use tokio::sync::watch;

/// How long a watcher with nothing new to read waits before reading again.
const IDLE_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// This watcher's name in logs and the lease.
    pub name: String,
    /// How soon a standby takes over from a watcher that stopped.
    pub lease_ttl: Duration,
    /// Feed entries read per partition per round.
    pub batch: usize,
    /// How long alerts are kept.
    pub retention: Duration,
}

/// The live watcher's counters, read by metrics.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub taps: AtomicU64,
    pub denied: AtomicU64,
    /// Alerts stored, by rule in [`Rule::ALL`] order.
    pub alerts: [AtomicU64; Rule::ALL.len()],
    /// Decided taps trimmed from a feed before this watcher (or its predecessor) read them.
    pub missed: AtomicU64,
    /// Times this watcher started from the stored places (taking the lease, or after a store
    /// failure).
    pub takeovers: AtomicU64,
    pub store_errors: AtomicU64,
    /// Whether this watcher holds the lease (the others are standbys).
    pub active: AtomicBool,
    /// How far behind the newest entry the last round's place is, at most over the partitions
    /// (0 when every feed was read to its end).
    pub behind_ms: AtomicU64,
    pub cards_remembered: AtomicU64,
    /// Failing after a store failure or missed taps, until a round reads every feed to its end.
    pub health: Arc<PartHealth>,
}

/// Where each partition's feed is read from, the last entry seen there (this watcher's or its
/// predecessor's) with its number, and up to where (the predecessor's place) taps only rebuild
/// the windows.
struct Places {
    from: Vec<FeedFrom>,
    seen: Vec<Option<(EntryId, u64)>>,
    quiet_through: Vec<Option<EntryId>>,
}

impl Places {
    fn resume(stored: &BTreeMap<u16, (EntryId, u64)>, partitions: u16, warm_up: Duration) -> Self {
        let warm_up_ms = warm_up.as_millis() as u64;
        let seen: Vec<Option<(EntryId, u64)>> =
            (0..partitions).map(|p| stored.get(&p).copied()).collect();
        Places {
            from: seen
                .iter()
                .map(|place| match place {
                    Some((id, _)) => FeedFrom::Since(id.ms.saturating_sub(warm_up_ms)),
                    None => FeedFrom::Start,
                })
                .collect(),
            quiet_through: seen.iter().map(|place| place.map(|(id, _)| id)).collect(),
            seen,
        }
    }

    /// Notes a page read from partition `p`; how many entries between the last one seen and
    /// this page's new ones were trimmed unread.
    fn note(&mut self, p: usize, page: &[FedTap]) -> u64 {
        let mut missed = 0;
        for tap in page {
            match self.seen[p] {
                Some((id, _)) if tap.id <= id => continue,
                // A number not past the last seen: the feed started again (a Redis that came
                // back empty); nothing can be said about what it lost.
                Some((_, ordinal)) if tap.ordinal > ordinal => {
                    missed += tap.ordinal - ordinal - 1;
                }
                _ => {}
            }
            self.seen[p] = Some((tap.id, tap.ordinal));
        }
        if let Some(last) = page.last() {
            self.from[p] = FeedFrom::After(last.id);
        }
        missed
    }
}

/// Runs until `stop` turns true: a standby while another watcher holds the lease, the watcher
/// while this one does. Stored alerts are handed to `act` (the rules' actions) after they are
/// stored. Store failures are retried; they never store an alert twice.
pub async fn run<F, Fut>(
    feeds: RedisStore,
    alerts: AlertStore,
    rules: Rules,
    settings: LiveSettings,
    stats: Arc<LiveStats>,
    mut act: F,
    mut stop: watch::Receiver<bool>,
) where
    F: FnMut(Vec<StoredAlert>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let token = format!("{}-{:016x}", settings.name, rand::random::<u64>());
    let mut retry = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
    let mut watching: Option<(Watcher, Places)> = None;
    while !*stop.borrow() {
        let wait = match round(
            &feeds,
            &alerts,
            &rules,
            &settings,
            &stats,
            &token,
            &mut watching,
        )
        .await
        {
            // Readiness comes back when a round reaches the end of every feed (Idle), not
            // while the watcher catches up or just missed taps.
            Ok(Round::Read(stored)) => {
                retry.reset();
                if !stored.is_empty() {
                    act(stored).await;
                }
                continue;
            }
            Ok(Round::Idle) => {
                retry.reset();
                stats.health.ok();
                IDLE_POLL
            }
            Ok(Round::Standby) => {
                stats.health.ok();
                settings.lease_ttl / 3
            }
            Err(e) => {
                // The watcher has seen this round's taps but its places were not stored: it
                // would see them twice. Starting again from the stored places (a take-over)
                // keeps every tap seen once and every alert stored once.
                watching = None;
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                stats
                    .health
                    .fail(Instant::now(), format_args!("watch store: {e}"));
                tracing::warn!(error = %e, "watcher: the store failed; retrying");
                retry.next_delay()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
    if watching.is_some() {
        stats.active.store(false, Ordering::Relaxed);
        if let Err(e) = alerts.release_lease(&token).await {
            tracing::debug!(error = %e, "watcher: could not give up its lease; it expires");
        }
    }
}

enum Round {
    /// Taps were read; these alerts were stored.
    Read(Vec<StoredAlert>),
    /// Every feed was read to its end.
    Idle,
    /// Another watcher holds the lease.
    Standby,
}

async fn round(
    feeds: &RedisStore,
    alerts: &AlertStore,
    rules: &Rules,
    settings: &LiveSettings,
    stats: &LiveStats,
    token: &str,
    watching: &mut Option<(Watcher, Places)>,
) -> Result<Round, String> {
    let (watcher, places) = match watching {
        Some(w) => w,
        None => {
            if !alerts.hold_lease(token, settings.lease_ttl).await? {
                stats.active.store(false, Ordering::Relaxed);
                return Ok(Round::Standby);
            }
            *watching = Some(take_over(feeds, alerts, rules, stats).await?);
            watching.as_mut().expect("just set")
        }
    };
    let pages = futures_util::future::join_all(
        places
            .from
            .iter()
            .enumerate()
            .map(|(p, from)| feeds.read_feed(p as u16, *from, settings.batch)),
    )
    .await;
    let pages = pages
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let now_ms = tapgate_runtime::now_ms();
    let behind_ms = pages
        .iter()
        .filter(|page| page.len() >= settings.batch)
        .filter_map(|page| page.last())
        .map(|last| now_ms.saturating_sub(last.id.ms))
        .max()
        .unwrap_or(0);
    stats.behind_ms.store(behind_ms, Ordering::Relaxed);
    if pages.iter().all(Vec::is_empty) {
        // Nothing to store, but the lease must stay ours.
        if !alerts.hold_lease(token, settings.lease_ttl).await? {
            lose(stats, watching);
            return Ok(Round::Standby);
        }
        return Ok(Round::Idle);
    }
    let raised = observe(watcher, &places.quiet_through, &pages, stats);
    // The places move before they are stored: if storing fails or the lease is gone, the
    // caller drops them with the watcher, and the next holder resumes from the stored ones.
    let missed: u64 = pages
        .iter()
        .enumerate()
        .map(|(p, page)| places.note(p, page))
        .sum();
    let read_to: Vec<(u16, (EntryId, u64))> = places
        .seen
        .iter()
        .enumerate()
        .filter(|(p, _)| !pages[*p].is_empty())
        .filter_map(|(p, seen)| Some((p as u16, (*seen)?)))
        .collect();
    let ids = alerts
        .commit(
            token,
            settings.lease_ttl,
            &raised,
            settings.retention,
            now_ms,
            &read_to,
        )
        .await?;
    let Some(ids) = ids else {
        lose(stats, watching);
        return Ok(Round::Standby);
    };
    if missed > 0 {
        stats.missed.fetch_add(missed, Ordering::Relaxed);
        stats.health.fail(
            Instant::now(),
            format_args!("{missed} decided taps were trimmed from the feeds before this watcher read them (raise [settlement] watch_feed)"),
        );
    }
    for alert in &raised {
        stats.alerts[alert.rule.index()].fetch_add(1, Ordering::Relaxed);
    }
    stats
        .cards_remembered
        .store(watcher.cards_remembered() as u64, Ordering::Relaxed);
    Ok(Round::Read(
        ids.into_iter()
            .zip(raised)
            .map(|(id, alert)| StoredAlert { id, alert })
            .collect(),
    ))
}

/// Feeds a round's taps to the watcher in gateway-time order; the alerts raised by taps past
/// the predecessor's place.
fn observe(
    watcher: &mut Watcher,
    quiet_through: &[Option<EntryId>],
    pages: &[Vec<FedTap>],
    stats: &LiveStats,
) -> Vec<Alert> {
    let mut taps: Vec<(usize, &FedTap)> = pages
        .iter()
        .enumerate()
        .flat_map(|(p, page)| page.iter().map(move |tap| (p, tap)))
        .collect();
    taps.sort_by_key(|(_, tap)| (tap.record.server_time_ms, tap.id));
    let mut raised = Vec::new();
    for (p, fed) in taps {
        let tap = Observed::from(&fed.record);
        let alerts = watcher.observe(&tap);
        if quiet_through[p].is_some_and(|q| fed.id <= q) {
            continue;
        }
        stats.taps.fetch_add(1, Ordering::Relaxed);
        if !tap.approved {
            stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        raised.extend(alerts);
    }
    raised
}

/// Starts watching from the places the last holder of the lease stored.
async fn take_over(
    feeds: &RedisStore,
    alerts: &AlertStore,
    rules: &Rules,
    stats: &LiveStats,
) -> Result<(Watcher, Places), String> {
    let partitions = feeds.stored_partitions().await.map_err(|e| e.to_string())?;
    if partitions == 0 {
        return Err("no gateway has shipped to this Redis yet (no partition count)".into());
    }
    let pseudonyms = Store::Redis(feeds.clone())
        .card_pseudonyms()
        .await
        .map_err(|e| e.to_string())?;
    let stored = alerts.places().await?;
    stats.active.store(true, Ordering::Relaxed);
    stats.takeovers.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        partitions,
        resumed = stored.len(),
        "watcher: holds the watch lease; watching"
    );
    Ok((
        Watcher::new(rules.clone(), pseudonyms),
        Places::resume(&stored, partitions, rules.warm_up()),
    ))
}

fn lose(stats: &LiveStats, watching: &mut Option<(Watcher, Places)>) {
    tracing::warn!("watcher: another watcher holds the watch lease; standing by");
    stats.active.store(false, Ordering::Relaxed);
    *watching = None;
}
