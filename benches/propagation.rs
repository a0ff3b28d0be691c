//! How long a lost-card report takes to reach a running gateway's cache through a shared Redis:
//! from issuing the report (the MULTI/EXEC that writes the record and its change-stream entry)
//! to the gateway's cache holding the new state. Starts a private redis-server and a private
//! six-node Redis Cluster as the tests do, and before the criterion run prints the p50 and p99
//! of 500 reports on each.

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::{Duration, Instant};
use support::{Harness, RedisCluster, RedisServer, WANZHOU_BUS, card};
use tapgate_gateway::card::CardState;
use tapgate_protocol::{Concession, Issuer};
use tapgate_runtime::now_ms;

const CARD: u64 = 6_222_000_000_000_042;

fn bench(c: &mut Criterion) {
    let redis = RedisServer::start();
    propagation(c, "lost_card_report_to_second_gateway", &redis.url());
    let cluster = RedisCluster::start();
    propagation(
        c,
        "lost_card_report_to_second_gateway_through_a_cluster",
        &cluster.url(),
    );
}

fn propagation(c: &mut Criterion, name: &str, url: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let (reporter, gateway) = runtime.block_on(async {
        let reporter = support::redis_directory(url);
        support::provision(&reporter, CARD).await;
        let gateway = Harness::start(support::redis_directory(url), state.path()).await;
        let policy = tapgate_gateway::policy::Policy::embedded_default();
        // Load the card into the gateway's cache, as a tap would.
        gateway
            .gateway
            .cache()
            .authorize(
                &support::tap(1, CARD, tapgate_protocol::TapKind::Flat),
                tapgate_gateway::decide::GatePlace {
                    terminal_id: WANZHOU_BUS.terminal_id,
                    area: WANZHOU_BUS.area,
                    mode: WANZHOU_BUS.mode,
                },
                &policy,
                now_ms(),
            )
            .await;
        (reporter, gateway)
    });
    let cache = gateway.gateway.cache().clone();
    let mut lost = false;
    let report = |lost: bool| {
        let cache = cache.clone();
        let reporter = reporter.clone();
        async move {
            let state = if lost {
                CardState::Lost
            } else {
                CardState::Active
            };
            let start = Instant::now();
            reporter
                .put_card(card(CARD, state, Issuer::ChongqingSsc, Concession::None, 0))
                .await
                .unwrap();
            while cache.cached(CARD).map(|c| c.state) != Some(state) {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "change never arrived"
                );
                tokio::task::yield_now().await;
            }
            start.elapsed()
        }
    };
    let mut samples: Vec<Duration> = runtime.block_on(async {
        let mut samples = Vec::with_capacity(500);
        for i in 0..500 {
            samples.push(report(i % 2 == 0).await);
        }
        samples
    });
    samples.sort();
    eprintln!(
        "{name}: p50 {:?}, p99 {:?}, max {:?} over {} reports",
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        samples[samples.len() - 1],
        samples.len()
    );
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    lost = !lost;
                    total += report(lost).await;
                }
                total
            })
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
