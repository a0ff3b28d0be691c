//! The authorization hot path: the pure decision, and the decision through the card cache on a
//! hit, from one thread and from two at once.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tapgate_city::population::{FIRST_CARD_ID, PopulationSpec};
use tapgate_gateway::cache::CardCache;
use tapgate_gateway::card::CardActivity;
use tapgate_gateway::decide::{CardLookup, GatePlace, decide};
use tapgate_gateway::directory::{Directory, EmbeddedDirectory};
use tapgate_gateway::policy::Policy;
use tapgate_protocol::{AreaCode, Issuer, Mode, Tap, TapKind};

const NOW: u64 = 1_795_939_200_000;
const CARDS: u64 = 100_000;

fn tap(card_id: u64) -> Tap {
    Tap {
        sequence: 1,
        card_id,
        issuer: Issuer::ChongqingSsc,
        kind: TapKind::Flat,
        line: 12,
        stop: 3,
        gate_time_ms: NOW,
    }
}

const BUS: GatePlace = GatePlace {
    terminal_id: 1,
    area: AreaCode(500103),
    mode: Mode::Bus,
};

fn warm_cache() -> Arc<CardCache> {
    let spec = PopulationSpec {
        cards: CARDS,
        ..PopulationSpec::default()
    };
    let dir = Arc::new(EmbeddedDirectory::default());
    spec.cards().for_each(|c| dir.put_card(c));
    let cache = Arc::new(CardCache::new(Directory::Embedded(dir), 30_000, 1 << 20));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let policy = Policy::embedded_default();
    runtime.block_on(async {
        for i in 0..CARDS {
            cache
                .authorize(&tap(FIRST_CARD_ID + i), BUS, &policy, NOW)
                .await;
        }
    });
    cache
}

fn bench(c: &mut Criterion) {
    let policy = Policy::embedded_default();
    let card = PopulationSpec::default().card(7);
    c.bench_function("decide/pure", |b| {
        b.iter(|| {
            decide(
                black_box(&tap(card.card_id)),
                BUS,
                &CardLookup::Found(card),
                CardActivity::default(),
                &policy,
                NOW,
            )
        })
    });

    let cache = warm_cache();
    let mut i = 0u64;
    c.bench_function("decide/cache_hit_1_thread", |b| {
        b.iter(|| {
            i = (i + 7919) % CARDS;
            cache
                .authorize_cached(&tap(FIRST_CARD_ID + i), BUS, &policy, NOW)
                .expect("warm cache hits")
        })
    });

    c.bench_function("decide/cache_hit_2_threads", |b| {
        b.iter_custom(|iters| {
            // Each of two threads does `iters` hits on the shared cache at the same time; the
            // time reported per iteration is one hit's latency while the other core also hits
            // (aggregate throughput is twice its inverse).
            let barrier = Arc::new(Barrier::new(2));
            let workers: Vec<_> = (0..2u64)
                .map(|t| {
                    let (cache, barrier, policy) = (cache.clone(), barrier.clone(), policy.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        let mut i = t * 50_000;
                        for _ in 0..iters {
                            i = (i + 7919) % CARDS;
                            black_box(cache.authorize_cached(
                                &tap(FIRST_CARD_ID + i),
                                BUS,
                                &policy,
                                NOW,
                            ));
                        }
                        start.elapsed()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .max()
                .unwrap_or(Duration::ZERO)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
