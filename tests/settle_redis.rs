//! End-to-end settlement through a private redis-server: load, ship, settle, reconcile — with
//! settlers killed mid-stream, Redis restarted (with its data, and empty), and entries
//! delivered twice.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::*;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::directory::{Directory, EmbeddedDirectory};
use tapgate_loadgen::run::{LoadSpec, Pacing, TargetKind, run};
use tapgate_loadgen::workload::Faults;
use tapgate_protocol::MasterKey;
use tapgate_settle::fares::FareTables;
use tapgate_settle::ledger::{Ledger, Reconciliation, settle_journals};
use tapgate_settle::store::{RedisStore, Store};
use tapgate_settle::{Settlement, SettlementSettings};
use tapgate_transport::tls::Resumption;

fn population() -> PopulationSpec {
    PopulationSpec {
        cards: 3_000,
        terminals: 40,
        ..PopulationSpec::default()
    }
}

async fn gateway(state: &Path) -> Harness {
    let embedded = Arc::new(EmbeddedDirectory::default());
    let spec = population();
    spec.cards().for_each(|c| embedded.put_card(c));
    spec.terminals().for_each(|t| embedded.put_terminal(t));
    Harness::start(Directory::Embedded(embedded), state).await
}

fn store(redis: &RedisServer) -> Store {
    Store::Redis(
        RedisStore::connect(&redis.url(), None, "tapgate", Duration::from_secs(2)).unwrap(),
    )
}

fn settlement(h: &Harness, store: Store, settlers: usize) -> Settlement {
    settlement_of("gw-test", h, store, settlers)
}

fn settlement_of(node: &str, h: &Harness, store: Store, settlers: usize) -> Settlement {
    let settings = SettlementSettings {
        settlers,
        ..test_settlement(node, h.state.join("journal"))
    };
    Settlement::start(
        store,
        &settings,
        Arc::new(FareTables::embedded_default()),
        h.gateway.journal().durable(),
    )
}

fn load_spec(h: &Harness, rate: f64, seconds: u64) -> LoadSpec {
    LoadSpec {
        target: h.addr(),
        target_kind: TargetKind::Tapgate,
        trusted_cert: h.gateway.certificate_der().to_vec(),
        master_key: MasterKey::new(MASTER_V1),
        key_version: 1,
        connections: 20,
        pacing: Pacing::OpenLoop { rate },
        duration: Duration::from_secs(seconds),
        population: population(),
        first_gate: 0,
        faults: Faults::default(),
        fraud_cards: 0,
        migrate: 0.0,
        drop: 0.0,
        resumption: Resumption::EarlyHello,
        added_rtt: Duration::ZERO,
        version: tapgate_protocol::Version::V1,
        offline: 0.0,
        offline_for: Duration::ZERO,
        offline_spells: 1,
        show_progress: false,
    }
}

/// The journal settled offline, naming cards as the store's settlers do.
async fn expected(state: &Path, store: &Store) -> Ledger {
    let cards = store.card_pseudonyms().await.unwrap();
    settle_journals(
        &[&state.join("journal")],
        &FareTables::embedded_default(),
        &cards,
    )
    .unwrap()
    .ledger
}

/// Waits until the store's ledgers match the journal exactly.
async fn reconciled(store: &Store, expected: &Ledger, within: Duration) -> Reconciliation {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(settled) = store.ledger(None, true).await {
            let r = Reconciliation::new(expected, &settled);
            if r.is_exact() || Instant::now() >= deadline {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "the store stayed unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `tapgate settle run` process with its ops endpoint on `ops`.
/// A `tapgate settle run` process, killed when the test ends however it ends (a failed
/// assertion included), so no settler outlives its test.
struct Settler(Child);

impl Settler {
    /// Kills it, without letting it give its leases back.
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn settle_run(redis_url: &str, ops: SocketAddr) -> Settler {
    // Its log (on standard output) goes to a file, for when a test fails.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::temp_dir().join("tapgate-settle-run.log"))
        .unwrap();
    Settler(
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["settle", "run", "--redis-url", redis_url])
            .args(["--ops-listen", &ops.to_string()])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--lease-ttl-ms", "1000", "--batch", "64"])
            .env("RUST_LOG", "info")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("tapgate settle run starts"),
    )
}

fn reconcile_cli(redis_url: &str, journal: &Path) -> (bool, String) {
    reconcile_cli_with(redis_url, journal, &[])
}

fn reconcile_cli_with(redis_url: &str, journal: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["settle", "reconcile", "--redis-url", redis_url])
        .arg("--journal")
        .arg(journal)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_settles_exactly_once_through_settler_kills_and_a_redis_restart() {
    let mut redis = RedisServer::start_persistent();
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    // Only the forwarder runs in the gateway; settling is done by `tapgate settle run`.
    let settlement = settlement(&h, store(&redis), 0);
    let load = tokio::spawn(run(load_spec(&h, 800.0, 5)));
    let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut settler = settle_run(&redis.url(), ops);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Killed mid-stream, without releasing its leases: its successor waits for them to expire
    // and takes over what it read and never acknowledged.
    settler.stop();
    let mut settler = settle_run(&redis.url(), ops);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(800)).await;
    settler.stop();
    let mut settler = settle_run(&redis.url(), ops);

    let report = load.await.unwrap().unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    h.gateway.shutdown().await;
    assert!(
        settlement
            .wait_settled(Duration::from_secs(30))
            .await
            .unwrap(),
        "settlement caught up"
    );
    let expected = expected(&h.state, &settlement.store).await;
    assert!(expected.taps() > 3_000, "{} approved taps", expected.taps());
    let r = reconciled(&settlement.store, &expected, Duration::from_secs(10)).await;
    assert!(r.is_exact(), "{r:?}");
    assert_eq!((r.lost, r.duplicated), (0, 0));
    // The last settler took over from the killed ones and says so on its ops endpoint.
    let metrics = http_get(ops, "/metrics");
    let settled: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tapgate_settled_taps_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no settled count in\n{metrics}"));
    assert!(settled > 0, "{metrics}");
    assert!(metrics.contains("# TYPE tapgate_settlement_lag_seconds histogram"));
    settler.stop();
    settlement.shutdown().await;

    let journal = h.state.join("journal");
    let (ok, text) = reconcile_cli(&redis.url(), &journal);
    assert!(ok, "{text}");
    assert!(
        text.contains("0 lost, 0 duplicated; 0 differences"),
        "{text}"
    );
    assert!(!text.contains("fare tables"), "{text}");
    // Reconciling with other fare tables than the settlers' says so.
    let dearer = state.path().join("dearer-fares.toml");
    std::fs::write(
        &dearer,
        tapgate_settle::fares::DEFAULT_FARES_TOML.replace("daily_cap = 0", "daily_cap = 1600"),
    )
    .unwrap();
    let (_, text) = reconcile_cli_with(
        &redis.url(),
        &journal,
        &["--fares", dearer.to_str().unwrap()],
    );
    assert!(
        text.contains("note: the ledgers were priced with fare tables"),
        "{text}"
    );
    // A tap booked twice is found.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let day = *expected.days.keys().next().unwrap();
    let _: i64 = redis::cmd("HINCRBY")
        .arg("tapgate:{p0}:ledger-taps")
        .arg(day.to_string())
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (ok, text) = reconcile_cli(&redis.url(), &journal);
    assert!(!ok, "{text}");
    assert!(text.contains("0 lost, 1 duplicated"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_entries_are_not_applied_twice_and_an_emptied_redis_is_rebuilt() {
    let mut redis = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let settlement = settlement(&h, store(&redis), 1);
    let report = run(load_spec(&h, 500.0, 2)).await.unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(
        settlement
            .wait_settled(Duration::from_secs(20))
            .await
            .unwrap(),
        "settled"
    );
    let expected = expected(&h.state, &settlement.store).await;
    assert!(
        reconciled(&settlement.store, &expected, Duration::from_secs(5))
            .await
            .is_exact()
    );

    // Deliver every entry still in the streams again, as after a crash between apply and
    // acknowledgement.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for p in 0..PARTITIONS {
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(format!("tapgate:{{p{p}}}:taps"))
            .arg("settlers")
            .arg("0")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while settlement.settlers.redelivered.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "nothing was delivered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reconciled(&settlement.store, &expected, Duration::from_secs(2)).await;
    assert!(r.is_exact(), "{r:?}");

    // Redis comes back empty: the forwarder notices its checkpoint is gone, ships the journal
    // again from the start, and the settler rebuilds every ledger.
    redis.restart();
    let r = reconciled(&settlement.store, &expected, Duration::from_secs(20)).await;
    assert!(r.is_exact(), "{r:?}");
    assert!(
        settlement
            .forwarder
            .checkpoint_moved
            .load(Ordering::Relaxed)
            > 0
    );
    h.gateway.shutdown().await;
    settlement.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopped_while_redis_is_down_ships_the_rest_after_its_restart() {
    let mut redis = RedisServer::start_persistent();
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let first = settlement(&h, store(&redis), 1);
    let report = run(load_spec(&h, 500.0, 1)).await.unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    redis.stop();
    // Taps keep being approved and journaled while settlement cannot reach Redis.
    let report = run(load_spec(&h, 500.0, 1)).await.unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    h.gateway.shutdown().await;
    tokio::time::timeout(Duration::from_secs(15), first.shutdown())
        .await
        .expect("stopping does not wait for Redis");

    redis.restart();
    let h = gateway(state.path()).await;
    let second = settlement(&h, store(&redis), 1);
    assert!(second.wait_settled(Duration::from_secs(20)).await.unwrap());
    let expected = expected(&h.state, &second.store).await;
    assert!(expected.taps() > 500, "{} approved taps", expected.taps());
    let r = reconciled(&second.store, &expected, Duration::from_secs(5)).await;
    assert!(r.is_exact(), "{r:?}");
    h.gateway.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_one_node_name_do_not_ship_from_each_others_place() {
    let redis = RedisServer::start();
    let (first_state, second_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = gateway(first_state.path()).await;
    let first_settlement = settlement(&first, store(&redis), 1);
    let report = run(load_spec(&first, 500.0, 1)).await.unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(
        first_settlement
            .wait_settled(Duration::from_secs(20))
            .await
            .unwrap()
    );

    // Same `node` name, another journal: its forwarder refuses the first one's checkpoint.
    let second = gateway(second_state.path()).await;
    let second_settlement = settlement(&second, store(&redis), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second_settlement.forwarder.failed.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the second forwarder kept going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second gateway says it is not ready, and why; the first one is.
    let readiness = |h: &Harness, s: &Settlement| {
        tapgate_gateway::ops::exposition(&h.gateway)
            .with(tapgate_settle::ops::SettlementCounters::of(s))
            .readiness(std::time::Instant::now())
    };
    let unready = readiness(&second, &second_settlement);
    assert_eq!(unready.failing.len(), 1, "{unready:?}");
    assert_eq!(unready.failing[0].part, "forwarder");
    assert!(
        unready.failing[0].reason.contains("share a node name"),
        "{unready:?}"
    );
    assert!(readiness(&first, &first_settlement).ready());
    let expected = expected(&first.state, &first_settlement.store).await;
    let r = reconciled(&first_settlement.store, &expected, Duration::from_secs(5)).await;
    assert!(r.is_exact(), "{r:?}");
    for (h, s) in [(first, first_settlement), (second, second_settlement)] {
        h.gateway.shutdown().await;
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_settles_exactly_once_on_a_redis_cluster_through_a_master_failover_and_a_restart() {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let store =
        Store::Redis(RedisStore::connect(&url, None, "tapgate", Duration::from_secs(2)).unwrap());
    // The gateway ships; `tapgate settle run` settles, through a settler kill and a master
    // failover.
    let settlement = settlement(&h, store, 0);
    let load = tokio::spawn(run(load_spec(&h, 800.0, 6)));
    let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut settler = settle_run(&url, ops);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    settler.stop();
    let mut settler = settle_run(&url, ops);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed = cluster.kill_master_of("tapgate:{p0}:taps");
    eprintln!("killed the master on port {killed}");
    // And the whole cluster goes down and comes back from its append-only files.
    cluster.restart_all();

    let report = load.await.unwrap().unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    let durable = h.gateway.journal().durable();
    h.gateway.shutdown().await;
    if !settlement
        .wait_settled(Duration::from_secs(60))
        .await
        .unwrap()
    {
        let f = &settlement.forwarder;
        panic!(
            "settlement did not catch up: counts {:?}; forwarder shipped through {:?} of {:?}, store errors {}, failed {}, health {:?}; settle run metrics:\n{}",
            settlement.store.counts().await,
            f.shipped_through(),
            *durable.borrow(),
            f.store_errors.load(Ordering::Relaxed),
            f.failed.load(Ordering::Relaxed),
            f.health.reason(),
            http_get(ops, "/metrics")
                .lines()
                .filter(|l| l.starts_with("tapgate_settle") || l.starts_with("tapgate_ready"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    let expected = expected(&h.state, &settlement.store).await;
    assert!(expected.taps() > 3_000, "{} approved taps", expected.taps());
    let r = reconciled(&settlement.store, &expected, Duration::from_secs(20)).await;
    assert!(r.is_exact(), "{r:?}");
    settler.stop();
    settlement.shutdown().await;
    let (ok, text) = reconcile_cli(&url, &h.state.join("journal"));
    assert!(ok, "{text}");
    assert!(
        text.contains("0 lost, 0 duplicated; 0 differences"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gate_population_on_two_gateways_is_settled_once_on_a_single_redis() {
    let redis = RedisServer::start();
    two_gateways_one_population(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gate_population_on_two_gateways_is_settled_once_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    two_gateways_one_population(&cluster.url()).await;
}

/// Every gate sends every tap to two gateways at once: both approve and journal it, and it is
/// booked once.
async fn two_gateways_one_population(url: &str) {
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (gateway(state_a.path()).await, gateway(state_b.path()).await);
    let store =
        || Store::Redis(RedisStore::connect(url, None, "tapgate", Duration::from_secs(2)).unwrap());
    let settle_a = settlement_of("gw-a", &a, store(), 1);
    let settle_b = settlement_of("gw-b", &b, store(), 1);
    let (load_a, load_b) = tokio::join!(run(load_spec(&a, 400.0, 3)), run(load_spec(&b, 400.0, 3)));
    let (load_a, load_b) = (load_a.unwrap(), load_b.unwrap());
    assert_eq!(load_a.errors + load_b.errors, 0, "{}", load_a.summary());
    a.gateway.shutdown().await;
    b.gateway.shutdown().await;
    for s in [&settle_a, &settle_b] {
        assert!(s.wait_settled(Duration::from_secs(30)).await.unwrap());
    }
    let journals = [a.state.join("journal"), b.state.join("journal")];
    let cards = settle_a.store.card_pseudonyms().await.unwrap();
    let expected = settle_journals(
        &[journals[0].as_path(), journals[1].as_path()],
        &FareTables::embedded_default(),
        &cards,
    )
    .unwrap();
    let single = settle_journals(
        &[journals[0].as_path()],
        &FareTables::embedded_default(),
        &cards,
    )
    .unwrap()
    .ledger;
    assert!(expected.copies > 1_000, "{} copies", expected.copies);
    // The same taps, whichever gateway's journal they are read from.
    assert_eq!(expected.ledger.taps(), single.taps());
    let r = reconciled(&settle_a.store, &expected.ledger, Duration::from_secs(10)).await;
    let out_of_order = settle_a.settlers.out_of_order.load(Ordering::Relaxed)
        + settle_b.settlers.out_of_order.load(Ordering::Relaxed);
    eprintln!(
        "copies: journals {} settlers {} + {}; lost {} duplicated {}; out of order {out_of_order}",
        expected.copies,
        settle_a.settlers.copies.load(Ordering::Relaxed),
        settle_b.settlers.copies.load(Ordering::Relaxed),
        r.lost,
        r.duplicated
    );
    assert_eq!((r.lost, r.duplicated), (0, 0), "{r:?}");
    // A card's taps reach its partition through both forwarders; when one is a shipment
    // behind, the settler prices a tap after a later one of its card, so fares follow arrival
    // order. The books may then differ from the journals priced in time order, and only then.
    assert!(r.is_exact() || out_of_order > 0, "{r:?}");
    let copies = settle_a.settlers.copies.load(Ordering::Relaxed)
        + settle_b.settlers.copies.load(Ordering::Relaxed);
    assert_eq!(copies, expected.copies);
    settle_a.shutdown().await;
    settle_b.shutdown().await;
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["settle", "reconcile", "--redis-url", url])
        .arg("--journal")
        .arg(&journals[0])
        .arg("--journal")
        .arg(&journals[1])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() || out_of_order > 0, "{text}");
    assert!(text.contains("0 lost, 0 duplicated;"), "{text}");
    assert!(text.contains("in more than one journal"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_run_exits_with_an_error_it_cannot_recover_from() {
    let redis = RedisServer::start();
    store(&redis).init(PARTITIONS).await.unwrap();
    // Settlers told of another partition count would split cards across partitions. It stops
    // at once, not after waiting a minute for settling that cannot happen.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["settle", "run", "--redis-url", &redis.url()])
        .args([
            "--partitions",
            "3",
            "--until-idle-ms",
            "60000",
            "--ops-listen",
            "off",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("set up for 4 partitions"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
}

/// Approved bus boardings in 渝中, one card each, `days_ago` days before now.
fn old_boardings(first_card: u64, n: u64, days_ago: u64) -> Vec<tapgate_journal::JournalRecord> {
    let at = tapgate_runtime::now_ms() - days_ago * 86_400_000;
    (0..n)
        .map(|i| {
            let card = first_card + i;
            let flat = tapgate_protocol::TapKind::Flat;
            let bus = tapgate_protocol::Mode::Bus;
            approved(YUZHONG_BUS.terminal_id, card, card, flat, bus, 1, at + i)
        })
        .collect()
}

/// Settlement of a test's own journal, against a private Redis.
fn settlement_of_journal(
    journal: &TestJournal,
    redis: &RedisServer,
    tables: FareTables,
) -> Settlement {
    settlement_of_node(
        journal,
        redis,
        tables,
        "gw-own-journal",
        1,
        default_order_window(),
    )
}

fn default_order_window() -> Duration {
    Duration::from_millis(tapgate_gateway::config::DEFAULT_ORDER_WINDOW_MS)
}

/// Settlement of one test journal as gateway `node`, with its own settlers.
fn settlement_of_node(
    journal: &TestJournal,
    redis: &RedisServer,
    tables: FareTables,
    node: &str,
    settlers: usize,
    order_window: Duration,
) -> Settlement {
    let settings = SettlementSettings {
        settlers,
        order_window,
        ..test_settlement(node, journal.settings.dir.clone())
    };
    Settlement::start(
        store(redis),
        &settings,
        Arc::new(tables),
        journal.journal.durable(),
    )
}

/// A metro trip whose exit went through one gateway and whose entry through another, the
/// entry's forwarder a few hundred milliseconds behind: with an order window the settler
/// prices entry then exit, as the journals have them; without one it prices the exit first
/// (the maximum, an exit without entry), and the books differ from the journals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_whose_entry_reaches_settlement_after_its_exit_is_priced_in_gate_time_order() {
    let with_window = trip_through_two_gateways(Duration::from_secs(3), Entry::Online).await;
    assert_eq!(with_window, (0, true), "(out of order, books exact)");
    let without = trip_through_two_gateways(Duration::ZERO, Entry::Online).await;
    assert_eq!(without, (1, false), "the scenario puts the exit first");
}

/// The same trip with an entry the gate approved offline ten minutes before. An upload is
/// priced by when it reached its gateway, by the settlers and by reconcile alike:
/// - uploaded 30 s before the exit was tapped at another gateway, it is priced first (with an
///   order window; without one the exit goes first, as for an online entry);
/// - uploaded after the exit was settled, it is priced after it, and that is not out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_upload_is_priced_by_when_it_reached_its_gateway() {
    let with_window = trip_through_two_gateways(Duration::from_secs(3), Entry::Uploaded).await;
    assert_eq!(with_window, (0, true), "(out of order, books exact)");
    let without = trip_through_two_gateways(Duration::ZERO, Entry::Uploaded).await;
    assert_eq!(without, (1, false), "the scenario puts the exit first");
    let after_the_exit = trip_through_two_gateways(Duration::ZERO, Entry::UploadedLate).await;
    assert_eq!(
        after_the_exit,
        (0, true),
        "priced after the exit, as reconcile does"
    );
}

/// How the trip's entry reached its gateway.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    Online,
    /// Tapped offline, uploaded 30 s before the exit.
    Uploaded,
    /// Tapped offline, uploaded 20 s after the exit.
    UploadedLate,
}

/// Settles the trip with `order_window`: the taps priced out of order, and whether the books
/// equal the journals priced offline.
async fn trip_through_two_gateways(order_window: Duration, entered: Entry) -> (u64, bool) {
    use tapgate_protocol::{Mode, TapKind};
    let redis = RedisServer::start();
    let (entry_state, exit_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (entry_journal, exit_journal) = (
        TestJournal::open(entry_state.path()),
        TestJournal::open(exit_state.path()),
    );
    let (card, gate, at) = (7_001, YUZHONG_METRO.terminal_id, tapgate_runtime::now_ms());
    let tap =
        |sequence, kind, stop, at| approved(gate, sequence, card, kind, Mode::Metro, stop, at);
    let entry_tap = match entered {
        Entry::Online => tap(1, TapKind::Entry, 10, at - 60_000),
        Entry::Uploaded | Entry::UploadedLate => tapgate_journal::JournalRecord {
            uploaded_ms: Some(if entered == Entry::Uploaded {
                at - 60_000
            } else {
                at - 10_000
            }),
            ..tap(1, TapKind::Entry, 10, at - 600_000)
        },
    };
    entry_journal.append(vec![entry_tap]).await;
    exit_journal
        .append(vec![tap(2, TapKind::Exit, 20, at - 30_000)])
        .await;
    let tables = FareTables::embedded_default();
    let exit = settlement_of_node(
        &exit_journal,
        &redis,
        tables.clone(),
        "gw-exit",
        1,
        order_window,
    );
    if order_window.is_zero() {
        assert!(exit.wait_settled(Duration::from_secs(20)).await.unwrap());
    } else {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let entry = settlement_of_node(
        &entry_journal,
        &redis,
        tables.clone(),
        "gw-entry",
        0,
        order_window,
    );
    assert!(entry.wait_settled(Duration::from_secs(20)).await.unwrap());
    assert!(exit.wait_settled(Duration::from_secs(20)).await.unwrap());
    let out_of_order = exit.settlers.out_of_order.load(Ordering::Relaxed);
    entry.shutdown().await;
    exit.shutdown().await;

    let cards = store(&redis).card_pseudonyms().await.unwrap();
    let dirs = [&*entry_journal.settings.dir, &*exit_journal.settings.dir];
    let expected = settle_journals(&dirs, &tables, &cards).unwrap().ledger;
    let settled = store(&redis).ledger(None, true).await.unwrap();
    let exact = Reconciliation::new(&expected, &settled).is_exact();
    entry_journal.close();
    exit_journal.close();
    (out_of_order, exact)
}

/// A day settled while open keeps its books when it closes: taps of it that arrive later are
/// booked to the open day as late taps naming it, reconcile compares them on their own day,
/// and a settler whose clock is behind cannot book into a day another settler closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_day_never_changes_and_taps_arriving_after_it_are_booked_late() {
    let redis = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    let journal = TestJournal::open(state.path());
    let shipped = FareTables::embedded_default();
    let tapped = shipped
        .day
        .day_of(tapgate_runtime::now_ms() - 3 * 86_400_000);

    // Settled while a week's grace keeps three days ago open: booked on its own day.
    journal.append(old_boardings(1_000, 6, 3)).await;
    let mut week_open = shipped.clone();
    week_open.day.close_after_minutes = 7 * 24 * 60;
    let first = settlement_of_journal(&journal, &redis, week_open);
    assert!(first.wait_settled(Duration::from_secs(20)).await.unwrap());
    first.shutdown().await;
    let before = store(&redis).ledger(None, false).await.unwrap();
    assert_eq!(before.days[&tapped].taps, 6);
    assert!(before.late.is_empty());

    // With the shipped two hours that day is closed: more of its taps go to the open day.
    journal.append(old_boardings(2_000, 4, 3)).await;
    let second = settlement_of_journal(&journal, &redis, shipped.clone());
    assert!(second.wait_settled(Duration::from_secs(20)).await.unwrap());
    let after = store(&redis).ledger(None, false).await.unwrap();
    assert_eq!(
        after.days[&tapped], before.days[&tapped],
        "a closed day changed"
    );
    let open = shipped.day.day_of(tapgate_runtime::now_ms());
    assert_eq!(after.late.keys().collect::<Vec<_>>(), [&(open, tapped)]);
    assert_eq!(after.late[&(open, tapped)].taps, 4);
    assert_eq!(second.settlers.late.load(Ordering::Relaxed), 4);
    second.shutdown().await;

    let cards = store(&redis).card_pseudonyms().await.unwrap();
    let expected = settle_journals(&[&journal.settings.dir], &shipped, &cards)
        .unwrap()
        .ledger;
    let settled = store(&redis).ledger(None, true).await.unwrap();
    let r = Reconciliation::new(&expected, &settled);
    assert!(r.is_exact(), "{r:?}");
    assert_eq!(r.late_taps, 4);
    let (ok, text) = reconcile_cli(&redis.url(), &journal.settings.dir);
    assert!(ok, "{text}");
    assert!(
        text.contains("4 taps reached settlement after their day closed"),
        "{text}"
    );
    a_batch_of_a_clock_behind_is_refused(&store(&redis)).await;
    journal.close();
}

/// A settler whose clock is a day behind prices the day before as open; the partition's
/// record of its closed days refuses the batch.
async fn a_batch_of_a_clock_behind_is_refused(s: &Store) {
    let p = 0;
    assert!(
        s.lease(p, "slow-clock", Duration::from_secs(5))
            .await
            .unwrap()
    );
    let progress = s.progress(p).await.unwrap();
    let closed = progress.closed.expect("batches recorded it");
    let batch = tapgate_settle::store::ApplyBatch {
        partition: p,
        token: "slow-clock".into(),
        expected: progress.watermark,
        watermark: tapgate_settle::store::EntryId {
            ms: u64::MAX,
            seq: 0,
        },
        acks: Vec::new(),
        trim_below: tapgate_settle::store::EntryId::default(),
        taps: 0,
        riders: Vec::new(),
        ledger: Ledger::default(),
        closed: closed.pred_opt().unwrap(),
    };
    assert_eq!(
        s.apply(batch).await.unwrap(),
        tapgate_settle::store::Applied::DayClosed
    );
}

fn adjust_cli(redis_url: &str, journal: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["settle", "adjust", "--redis-url", redis_url])
        .args(["--partitions", &PARTITIONS.to_string()])
        .arg("--journal")
        .arg(journal)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A metro entry whose exit went missing is charged the maximum at the card's next entry; the
/// desk refunds it once (a second refund is refused), completes nothing twice, adds a desk
/// correction, and every correction is booked once on the open day, audited, listed in the
/// operator's statement and borne out by reconcile — which catches one the journals do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrections_are_priced_from_the_journals_booked_once_and_reconciled() {
    use tapgate_protocol::{Mode, TapKind};
    let redis = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    let journal = TestJournal::open(state.path());
    let tables = FareTables::embedded_default();
    let now = tapgate_runtime::now_ms() - 3_600_000;
    let gate = YUZHONG_METRO.terminal_id;
    journal
        .append(vec![
            approved(gate, 1, 77, TapKind::Entry, Mode::Metro, 10, now),
            approved(
                gate,
                2,
                77,
                TapKind::Entry,
                Mode::Metro,
                12,
                now + 1_800_000,
            ),
            approved(gate, 3, 77, TapKind::Exit, Mode::Metro, 14, now + 2_400_000),
        ])
        .await;
    let settlement = settlement_of_journal(&journal, &redis, tables.clone());
    assert!(
        settlement
            .wait_settled(Duration::from_secs(20))
            .await
            .unwrap()
    );
    let dir = &journal.settings.dir;
    let url = redis.url();
    let max = i64::from(tables.metro.max);
    make_corrections(&url, dir, gate, max);
    assert!(
        settlement
            .wait_settled(Duration::from_secs(20))
            .await
            .unwrap()
    );
    let books = store(&redis).ledger(None, false).await.unwrap();
    let open = tables.day.day_of(tapgate_runtime::now_ms());
    assert_eq!(books.adjustments.len(), 2, "{:?}", books.adjustments);
    assert!(
        books
            .adjustments
            .iter()
            .all(|a| a.booked == Some(open) && a.by == "desk 3 解放碑")
    );
    let (ok, text) = reconcile_cli(&url, dir);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("corrections: 2 booked, {} fen net", -max - 50)),
        "{text}"
    );
    let statement = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "settle",
            "statement",
            "--redis-url",
            &url,
            "--operator",
            "2",
        ])
        .args(["--date", &open.to_string()])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&statement.stdout);
    assert!(
        csv.contains(&format!(",{gate},cq_ssc,,1,{}\n", -max)),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("adjustment_refund_max_fare,")),
        "{csv}"
    );

    a_forged_correction_fails_reconcile(&redis, &settlement, dir, books.adjustments[1].clone())
        .await;
    settlement.shutdown().await;
    journal.close();
}

/// Through the command: a refund of the maximum fare, refused the second time and for a
/// completion of the same trip; a desk correction; refused without an audit trail or a tap.
fn make_corrections(url: &str, dir: &Path, gate: u64, max: i64) {
    let audit = ["--by", "desk 3 解放碑", "--why", "exit gate out of order"];
    let tap = format!("{gate}-1");

    let refund = [&["--tap", &tap, "--refund-max-fare"][..], &audit].concat();
    let (ok, out) = adjust_cli(url, dir, &refund);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} fen on the rider's side", -max)),
        "{out}"
    );
    let (ok, out) = adjust_cli(url, dir, &refund);
    assert!(
        !ok && out.contains("settled by an earlier correction"),
        "{out}"
    );
    let complete = [&["--tap", &tap, "--complete-trip", "2:12"][..], &audit].concat();
    let (ok, out) = adjust_cli(url, dir, &complete);
    assert!(
        !ok && out.contains("settled by an earlier correction"),
        "{out}"
    );
    let exit = format!("{gate}-3");
    let desk = [&["--tap", &exit, "--desk-fen", "-50"][..], &audit].concat();
    assert!(adjust_cli(url, dir, &desk).0);
    let unaudited = ["--tap", &tap, "--desk-fen", "10", "--by", "x", "--why", " "];
    let (ok, out) = adjust_cli(url, dir, &unaudited);
    assert!(!ok && out.contains("--why"), "{out}");
    let (ok, out) = adjust_cli(
        url,
        dir,
        &[&["--tap", "1-999", "--desk-fen", "5"][..], &audit].concat(),
    );
    assert!(!ok && out.contains("not an approved tap"), "{out}");
}

/// A correction the journals do not bear out (written around the command) fails reconcile.
async fn a_forged_correction_fails_reconcile(
    redis: &RedisServer,
    settlement: &Settlement,
    dir: &Path,
    mut forged: tapgate_settle::adjust::Adjustment,
) {
    forged.id = "adj-forged".into();
    forged.fen = -5_000;
    let s = store(redis);
    let partition = tapgate_settle::partition_of(77, PARTITIONS);
    assert!(s.submit_adjustment(partition, &forged).await.unwrap());
    assert!(
        settlement
            .wait_settled(Duration::from_secs(20))
            .await
            .unwrap()
    );
    let (ok, text) = reconcile_cli(&redis.url(), dir);
    assert!(
        !ok && text.contains("adj-forged: booked -5000 fen, the journals price it -50 fen"),
        "{text}"
    );
}
