//! The card cache: a DashMap in front of the card directory.
//!
//! A hit is a shard lock, a map lookup and the pure decision; nothing on that path awaits. A miss
//! fetches the card once however many taps want it at the same moment (single flight) and
//! remembers unknown cards for a short time so a stream of taps with a bad card does not reach
//! Redis each time. Changes from the directory's feed replace cached records in place.
//!
//! While the directory is unreachable, cached cards are still decided from the cache (changes
//! made meanwhile arrive when the feed reconnects) and uncached cards get
//! `CardLookup::Unavailable`, which the policy turns into a denial or a first-ride approval.

use crate::card::{CardActivity, CardRecord};
use crate::decide::{CardLookup, Decision, GatePlace, decide};
use crate::directory::{CardChange, Directory, DirectoryError};
use crate::policy::Policy;
use crate::shard_map::ShardMap;
use chrono::NaiveDate;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tapgate_protocol::Tap;
use tapgate_runtime::sync::Arc;
use tokio::sync::OnceCell;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Card(CardRecord),
    /// The directory has no such card; ask again after `until_ms`.
    Missing {
        until_ms: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    known: Known,
    activity: CardActivity,
}

const ENTRY_SHARDS: usize = 1024;

type Fetch = Arc<OnceCell<Result<Option<CardRecord>, DirectoryError>>>;

/// Cache counters, read by metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fetches: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Lookups that found a record they could not read: a data fault, not an outage.
    pub malformed_records: AtomicU64,
    pub evictions: AtomicU64,
    pub changes_applied: AtomicU64,
    pub resyncs: AtomicU64,
}

pub struct CardCache {
    entries: ShardMap<u64, Entry>,
    /// How many entries the map holds, kept beside it because `DashMap::len` read-locks every
    /// shard, far too costly on each miss. Exact except for inserts racing a resync's clear.
    entry_count: AtomicUsize,
    /// Fetches under way. A fetch is registered here before it reads the directory and
    /// leaves only after it has put what it read into `entries`.
    fetches: ShardMap<u64, Fetch>,
    directory: Directory,
    negative_ttl_ms: u64,
    capacity: usize,
    pub stats: CacheStats,
}

impl CardCache {
    pub fn new(directory: Directory, negative_ttl_ms: u64, capacity: usize) -> Self {
        Self {
            // Many shards: a hit write-locks its shard, and with few shards the lock words of
            // concurrently hit shards share cache lines that then bounce between cores.
            entries: ShardMap::with_shards(ENTRY_SHARDS),
            entry_count: AtomicUsize::new(0),
            fetches: ShardMap::with_shards(64),
            directory,
            negative_ttl_ms,
            capacity: capacity.max(1),
            stats: CacheStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.entry_count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached record of a card, without fetching.
    pub fn cached(&self, card_id: u64) -> Option<CardRecord> {
        match self.entries.update(&card_id, |entry| entry.known)? {
            Known::Card(card) => Some(card),
            Known::Missing { .. } => None,
        }
    }

    /// Decides a tap against the cached card, fetching it first on a miss, and applies the
    /// decision's effect on the cached state (activity, counted rides) under the same lock.
    pub async fn authorize(
        &self,
        tap: &Tap,
        place: GatePlace,
        policy: &Policy,
        now_ms: u64,
    ) -> Decision {
        if let Some(decision) = self.authorize_cached(tap, place, policy, now_ms) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return decision;
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let lookup = match self.fetch(tap.card_id, now_ms).await {
            Ok(fetched) => match self.authorize_cached(tap, place, policy, now_ms) {
                Some(decision) => return decision,
                // Evicted again before we got to it (capacity pressure): decide from what was
                // fetched, without this node's memory of the card.
                None => fetched.map_or(CardLookup::Unknown, CardLookup::Found),
            },
            Err(_) => CardLookup::Unavailable,
        };
        decide(tap, place, &lookup, CardActivity::default(), policy, now_ms)
    }

    /// The hit path alone: decides from the cache, or `None` when the card must be fetched.
    pub fn authorize_cached(
        &self,
        tap: &Tap,
        place: GatePlace,
        policy: &Policy,
        now_ms: u64,
    ) -> Option<Decision> {
        self.entries.update(&tap.card_id, |entry| {
            let lookup = match entry.known {
                Known::Card(card) => CardLookup::Found(card),
                Known::Missing { until_ms } if now_ms < until_ms => CardLookup::Unknown,
                Known::Missing { .. } => return None,
            };
            let decision = decide(tap, place, &lookup, entry.activity, policy, now_ms);
            entry.activity = decision.activity;
            if let Some(ride) = decision.counted_ride
                && let Known::Card(card) = &mut entry.known
            {
                card.rides_left = u32::from(decision.rides_left);
                card.rides_period = Some(ride.period);
            }
            Some(decision)
        })?
    }

    /// Sets a cached card's counted rides to what the directory says is left in `period`.
    pub fn set_rides_left(&self, card_id: u64, period: NaiveDate, left: u32) {
        self.entries.update(&card_id, |entry| {
            if let Known::Card(card) = &mut entry.known {
                card.rides_left = left;
                card.rides_period = Some(period);
            }
        });
    }

    /// Loads a card into the cache; concurrent callers for one card share one directory request.
    async fn fetch(&self, card_id: u64, now_ms: u64) -> Result<Option<CardRecord>, DirectoryError> {
        let cell = self.join_fetch(card_id);
        let result = cell
            .get_or_init(|| async {
                self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                let result = self.directory.card(card_id).await;
                // Inserted before the fetch is forgotten, so no later caller fetches again.
                if let Ok(found) = &result {
                    let known = match found {
                        Some(card) => Known::Card(*card),
                        None => Known::Missing {
                            until_ms: now_ms.saturating_add(self.negative_ttl_ms),
                        },
                    };
                    self.insert_fetched(card_id, known);
                }
                result
            })
            .await
            .clone();
        self.leave_fetch(card_id, &cell);
        match &result {
            Err(DirectoryError::Malformed { key, detail }) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                self.stats.malformed_records.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%key, %detail, "unreadable card record; its taps are answered as if the directory were down");
            }
            Err(e) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "card fetch failed");
            }
            Ok(_) => {}
        }
        result
    }

    /// The fetch of a card under way, or a new one: every caller for one card gets the same.
    fn join_fetch(&self, card_id: u64) -> Fetch {
        self.fetches.get_or_insert_default(card_id)
    }

    /// Forgets a finished fetch (unless a newer one for the card has taken its place).
    fn leave_fetch(&self, card_id: u64, fetch: &Fetch) {
        self.fetches
            .remove_if(&card_id, |registered| Arc::ptr_eq(registered, fetch));
    }

    fn insert_fetched(&self, card_id: u64, known: Known) {
        self.make_room();
        let inserted = self.entries.slot(card_id, |slot| match slot {
            // A change that arrived while we fetched is newer than what we fetched.
            Some(entry) => {
                if matches!(entry.known, Known::Missing { .. }) {
                    entry.known = known;
                }
                (false, None)
            }
            None => (
                true,
                Some(Entry {
                    known,
                    activity: CardActivity::default(),
                }),
            ),
        });
        if inserted {
            self.entry_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keeps the cache within its capacity by dropping an arbitrary entry. Cards come back on
    /// their next tap; what is lost is only this node's pass-back memory of the dropped card.
    fn make_room(&self) {
        if self.len() < self.capacity {
            return;
        }
        if let Some(victim) = self.entries.any_key()
            && self.entries.remove(&victim).is_some()
        {
            self.entry_count.fetch_sub(1, Ordering::Relaxed);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets every card: the change feed missed changes it cannot recover.
    pub fn resync(&self) {
        self.entries.clear();
        // Counting again (rare, and slow) repairs any drift from inserts during the clear.
        self.entry_count
            .store(self.entries.len(), Ordering::Relaxed);
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies one card change from the directory's change feed.
    pub fn apply(&self, change: CardChange, now_ms: u64) {
        let known = match change.record {
            Some(card) => Known::Card(card),
            None => Known::Missing {
                until_ms: now_ms.saturating_add(self.negative_ttl_ms),
            },
        };
        if self
            .entries
            .update(&change.card_id, |entry| entry.known = known)
            .is_none()
        {
            if self.fetches.contains_key(&change.card_id) {
                // Room ahead of the insert below; only a hint, the check under the lock decides.
                self.make_room();
            }
            // Under the card's entry lock: a fetch under way cannot put in what it read until
            // this is done, and it leaves `fetches` only after it has, so either its record is
            // here to replace or it is still registered and will find this change and keep it.
            let inserted = self.entries.slot(change.card_id, |slot| match slot {
                Some(entry) => {
                    entry.known = known;
                    (false, None)
                }
                None if self.fetches.contains_key(&change.card_id) => (
                    true,
                    Some(Entry {
                        known,
                        activity: CardActivity::default(),
                    }),
                ),
                None => (false, None),
            });
            if inserted {
                self.entry_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.changes_applied.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::CardState;
    use crate::directory::EmbeddedDirectory;
    use tapgate_protocol::{AreaCode, Concession, Issuer, Mode, Outcome, Reason, TapKind};

    const NOW: u64 = 1_795_939_200_000;

    fn record(card_id: u64, state: CardState) -> CardRecord {
        CardRecord {
            card_id,
            state,
            issuer: Issuer::ChongqingSsc,
            concession: Concession::None,
            grade: None,
            home_area: None,
            rides_left: 0,
            rides_period: None,
            renews_on: None,
            expires_on: None,
        }
    }

    fn tap(card_id: u64) -> Tap {
        Tap {
            sequence: 1,
            card_id,
            issuer: Issuer::ChongqingSsc,
            kind: TapKind::Flat,
            line: 1,
            stop: 1,
            gate_time_ms: NOW,
        }
    }

    const BUS: GatePlace = GatePlace {
        terminal_id: 1,
        area: AreaCode(500103),
        mode: Mode::Bus,
    };

    fn cache_with(cards: &[CardRecord]) -> (std::sync::Arc<EmbeddedDirectory>, CardCache) {
        let dir = std::sync::Arc::new(EmbeddedDirectory::default());
        cards.iter().for_each(|c| dir.put_card(*c));
        let cache = CardCache::new(Directory::Embedded(dir.clone()), 1_000, 100);
        (dir, cache)
    }

    #[tokio::test]
    async fn miss_fetches_once_then_hits() {
        let (_, cache) = cache_with(&[record(1, CardState::Active)]);
        let policy = Policy::embedded_default();
        let d = cache.authorize(&tap(1), BUS, &policy, NOW).await;
        assert_eq!(d.outcome, Outcome::Approve);
        cache.authorize(&tap(1), BUS, &policy, NOW).await;
        assert_eq!(cache.stats.fetches.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_for_one_card_make_one_fetch() {
        let (_, cache) = cache_with(&[record(9, CardState::Active)]);
        let cache = Arc::new(cache);
        let policy = Arc::new(Policy::embedded_default());
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (cache, policy) = (cache.clone(), policy.clone());
                tokio::spawn(async move { cache.authorize(&tap(9), BUS, &policy, NOW).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().outcome, Outcome::Approve);
        }
        assert_eq!(cache.stats.fetches.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn unknown_cards_are_cached_negatively_until_the_ttl_passes() {
        let (dir, cache) = cache_with(&[]);
        let policy = Policy::embedded_default();
        let d = cache.authorize(&tap(5), BUS, &policy, NOW).await;
        assert_eq!(d.reason, Reason::UnknownCard);
        dir.put_card(record(5, CardState::Active));
        let d = cache.authorize(&tap(5), BUS, &policy, NOW + 999).await;
        assert_eq!(d.reason, Reason::UnknownCard, "still negatively cached");
        let d = cache.authorize(&tap(5), BUS, &policy, NOW + 1_000).await;
        assert_eq!(d.outcome, Outcome::Approve);
        assert_eq!(cache.stats.fetches.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_change_replaces_the_cached_record_and_resync_forgets_everything() {
        let (_, cache) = cache_with(&[record(3, CardState::Active)]);
        let policy = Policy::embedded_default();
        cache.authorize(&tap(3), BUS, &policy, NOW).await;
        cache.apply(
            CardChange {
                card_id: 3,
                record: Some(record(3, CardState::Lost)),
            },
            NOW,
        );
        let d = cache.authorize(&tap(3), BUS, &policy, NOW).await;
        assert_eq!(d.reason, Reason::CardLost);
        cache.resync();
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn capacity_is_a_bound() {
        let cards: Vec<_> = (1..=10).map(|i| record(i, CardState::Active)).collect();
        let dir = std::sync::Arc::new(EmbeddedDirectory::default());
        cards.iter().for_each(|c| dir.put_card(*c));
        let cache = CardCache::new(Directory::Embedded(dir), 1_000, 4);
        let policy = Policy::embedded_default();
        for i in 1..=10 {
            assert_eq!(
                cache.authorize(&tap(i), BUS, &policy, NOW).await.outcome,
                Outcome::Approve
            );
        }
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.len(), cache.entries.len());
        assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 6);
    }

    /// Models run under loom by `scripts/test` (and once each as ordinary tests).
    mod loom_models {
        use super::*;
        use tapgate_runtime::sync::atomic::AtomicBool;
        use tapgate_runtime::sync::{model, thread};

        fn empty_cache() -> CardCache {
            let directory = Directory::Embedded(std::sync::Arc::new(EmbeddedDirectory::default()));
            CardCache::new(directory, 1_000, 100)
        }

        /// A fetch reads the card before a change is written; the change arrives from the
        /// feed at any moment of the fetch after that read. Whatever the interleaving, the
        /// cache ends with the changed record, never the one the fetch read.
        #[test]
        fn a_change_that_arrives_during_a_fetch_is_not_lost() {
            model(|| {
                let cache = Arc::new(empty_cache());
                let before = record(7, CardState::Active);
                let after = record(7, CardState::Lost);
                let read = Arc::new(AtomicBool::new(false));
                let fetcher = {
                    let (cache, read) = (cache.clone(), read.clone());
                    thread::spawn(move || {
                        let fetch = cache.join_fetch(7);
                        // The directory answers with the record from before the change.
                        read.store(true, Ordering::Release);
                        cache.insert_fetched(7, Known::Card(before));
                        cache.leave_fetch(7, &fetch);
                    })
                };
                while !read.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                cache.apply(
                    CardChange {
                        card_id: 7,
                        record: Some(after),
                    },
                    NOW,
                );
                fetcher.join().expect("fetcher");
                assert_eq!(cache.cached(7), Some(after));
            });
        }

        /// Taps for one card missing at the same moment share one fetch.
        #[test]
        fn concurrent_misses_of_one_card_share_one_fetch() {
            model(|| {
                let cache = Arc::new(empty_cache());
                let other = {
                    let cache = cache.clone();
                    thread::spawn(move || cache.join_fetch(7))
                };
                let mine = cache.join_fetch(7);
                let theirs = other.join().expect("other tap");
                assert!(Arc::ptr_eq(&mine, &theirs));
            });
        }
    }
}
