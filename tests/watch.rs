//! `tapgate watch journal` over a journal written here: a cloned card and a lost card tried
//! again are named, by pseudonym only, and an ordinary rider is not.

mod support;

use std::process::Command;
use tapgate_journal::JournalRecord;
use tapgate_protocol::{Concession, Issuer, Mode, Outcome, Reason, TapKind};

fn denied_lost(gate: u64, sequence: u64, card: u64, at: u64) -> JournalRecord {
    let mut r = metro_entry(gate, sequence, card, at);
    r.result.outcome = Outcome::Deny;
    r.result.reason = Reason::CardLost;
    r
}

fn metro_entry(gate: u64, sequence: u64, card: u64, at: u64) -> JournalRecord {
    support::approved(gate, sequence, card, TapKind::Entry, Mode::Metro, 5, at)
}

const CLONED: u64 = 6_222_000_000_000_777;

/// A journal of a cloned card, an ordinary rider and a lost card tried at two gates.
async fn write_journal(state: &std::path::Path) -> std::path::PathBuf {
    let journal = support::TestJournal::open(state);
    let t0 = 1_795_939_200_000;
    let ordinary = 6_222_000_000_000_888;
    journal
        .append(vec![
            // The clone: two entries at two stations two minutes apart.
            metro_entry(30_001, 1, CLONED, t0),
            metro_entry(30_002, 1, CLONED, t0 + 120_000),
            // An ordinary rider who forgot to tap out enters again in the evening.
            metro_entry(30_001, 2, ordinary, t0),
            metro_entry(30_003, 1, ordinary, t0 + 9 * 3_600_000),
            // A lost card tried at two gates.
            denied_lost(30_004, 1, 6_222_000_000_000_999, t0 + 600_000),
            denied_lost(30_005, 1, 6_222_000_000_000_999, t0 + 900_000),
        ])
        .await;
    let dir = journal.settings.dir.clone();
    journal.close();
    dir
}

#[tokio::test]
async fn a_clone_and_a_lost_card_tried_again_are_named_by_pseudonym_and_a_rider_is_not() {
    let state = tempfile::tempdir().unwrap();
    let journal = write_journal(state.path()).await;
    let redis = support::RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "watch",
            "journal",
            "--json",
            "--record",
            "--redis-url",
            &redis.url(),
        ])
        .arg("--dir")
        .arg(&journal)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let alerts: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rules: Vec<&str> = alerts.iter().filter_map(|a| a["rule"].as_str()).collect();
    assert_eq!(rules, ["clone", "denied_retry"], "{stdout}");
    assert_eq!(alerts[0]["gates"], serde_json::json!([30_001, 30_002]));
    assert_eq!(alerts[1]["gates"], serde_json::json!([30_004, 30_005]));
    assert!(!stdout.contains("6222000000000"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("6 decided taps (4 approved): 2 alerts"),
        "{stderr}"
    );

    // Kept in Redis: listed by rule, and none outside the window asked for.
    let list = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["alerts", "--json", "--redis-url", &redis.url()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(list(&["--since", "1d"]), 2);
    assert_eq!(list(&["--since", "1d", "--rule", "denied_retry"]), 1);
    assert_eq!(list(&["--since", "1d", "--rule", "velocity"]), 0);
    let bad = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["alerts", "--since", "1y", "--redis-url", &redis.url()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("30m, 24h, 7d"));
}

/// With `[actions] block = ["clone"]` the cloned card is blocked in the directory and the
/// action is recorded; without `--record` such rules are refused rather than acted on silently.
#[tokio::test]
async fn a_blocking_rule_blocks_the_card_and_records_it() {
    use tapgate_city::CardState;
    let state = tempfile::tempdir().unwrap();
    let journal = write_journal(state.path()).await;
    let redis = support::RedisServer::start();
    let directory = support::redis_directory(&redis.url());
    let active = support::card(
        CLONED,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::None,
        0,
    );
    directory.put_card(active).await.unwrap();
    let rules = state.path().join("rules.toml");
    let text = tapgate_watch::DEFAULT_RULES_TOML.replace("block = []", "block = [\"clone\"]");
    assert_ne!(text, tapgate_watch::DEFAULT_RULES_TOML);
    std::fs::write(&rules, text).unwrap();
    let watch = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["watch", "journal", "--redis-url", &redis.url(), "--dir"])
            .arg(&journal)
            .arg("--rules")
            .arg(&rules)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = watch(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--record"));
    assert_eq!(
        directory.card(CLONED).await.unwrap().unwrap().state,
        CardState::Active
    );

    let out = watch(&["--record"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        directory.card(CLONED).await.unwrap().unwrap().state,
        CardState::Blocked
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let audit: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("tapgate:{watch}:actions")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let entry = &audit[0].1[0].1;
    assert!(
        entry.contains("\"outcome\":\"blocked\"") && entry.contains("\"rule\":\"clone\""),
        "{entry}"
    );
    assert!(!entry.contains("6222000000000777"), "{entry}");
}

const FEED: usize = tapgate_settle::forwarder::WATCH_FEED;

/// Ships a journal of its own as gateway `node` would, feeding the watchers.
async fn ship(
    store: &tapgate_settle::store::Store,
    state: &std::path::Path,
    node: &str,
    records: Vec<JournalRecord>,
    watch_feed: usize,
) {
    use tapgate_settle::forwarder::{self, ForwarderSettings, ForwarderStats, Until};
    let journal = support::TestJournal::open(&state.join(node));
    journal.append(records).await;
    let dir = journal.settings.dir.clone();
    journal.close();
    let settings = ForwarderSettings {
        node: node.to_owned(),
        journal_dir: dir,
        partitions: 4,
        batch: 64,
        max_backlog: u64::MAX,
        watch_feed,
    };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let stats = std::sync::Arc::new(ForwarderStats::default());
    forwarder::run(store.clone(), settings, Until::EndOfFiles, stats, stop_rx)
        .await
        .unwrap();
}

/// The store the gateways ship to, set up as a settler leaves it (partitions, card key).
async fn feed_store(url: &str) -> tapgate_settle::store::Store {
    use tapgate_settle::store::{RedisStore, Store};
    let store = Store::Redis(
        RedisStore::connect(url, None, "tapgate", std::time::Duration::from_secs(2)).unwrap(),
    );
    store.init(4).await.unwrap();
    store.settler_card_key(None).await.unwrap();
    store
}

/// A live watcher with a stop switch, collecting what it hands to the rules' actions.
struct LiveWatcher {
    stats: std::sync::Arc<tapgate_watch::live::LiveStats>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LiveWatcher {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }
}

fn start_watcher(url: &str, name: &str) -> LiveWatcher {
    use tapgate_watch::live::{LiveSettings, LiveStats};
    let feeds = tapgate_settle::store::RedisStore::connect(
        url,
        None,
        "tapgate",
        std::time::Duration::from_secs(2),
    )
    .unwrap();
    let alerts = tapgate_watch::store::AlertStore::connect(
        url,
        None,
        "tapgate",
        std::time::Duration::from_secs(2),
    )
    .unwrap();
    let stats = std::sync::Arc::new(LiveStats::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let settings = LiveSettings {
        name: name.to_owned(),
        lease_ttl: std::time::Duration::from_millis(1_000),
        batch: 2,
        retention: std::time::Duration::from_secs(86_400),
    };
    let task = tokio::spawn(tapgate_watch::live::run(
        feeds,
        alerts,
        tapgate_watch::Rules::embedded_default(),
        settings,
        stats.clone(),
        |_| async {},
        stop_rx,
    ));
    LiveWatcher { stats, stop, task }
}

/// The alerts stored, (rule, gates), once `want` are there or after 30 s.
async fn stored_alerts(url: &str, want: usize) -> Vec<(String, Vec<u64>)> {
    let store = tapgate_watch::store::AlertStore::connect(
        url,
        None,
        "tapgate",
        std::time::Duration::from_secs(2),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let listed = store.list(0, None, 100).await.unwrap_or_default();
        if listed.len() >= want || std::time::Instant::now() > deadline {
            // A moment more, so a duplicate stored late would show.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let listed = store.list(0, None, 100).await.unwrap();
            return listed
                .into_iter()
                .map(|s| (s.alert.rule.name().to_owned(), s.alert.gates))
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Two gateways feed one live watcher while a second stands by. Taps of one card decided by
/// different gateways meet in the watcher; when it stops, the standby takes over from its
/// place, rebuilds the windows from the feed without raising anything again, and raises what
/// spans the hand-over.
async fn two_gateways_one_watcher_and_a_standby(url: &str) {
    let state = tempfile::tempdir().unwrap();
    let store = feed_store(url).await;
    let t0 = 1_795_939_200_000;
    let (lost, lost_later) = (6_222_000_000_000_999, 6_222_000_000_000_555);
    let first = start_watcher(url, "first");
    let second = start_watcher(url, "second");
    ship(
        &store,
        state.path(),
        "gateway-a",
        vec![
            metro_entry(30_001, 1, CLONED, t0),
            denied_lost(30_004, 1, lost, t0 + 600_000),
            denied_lost(30_007, 1, lost_later, t0 + 700_000),
        ],
        FEED,
    )
    .await;
    ship(
        &store,
        state.path(),
        "gateway-b",
        vec![
            metro_entry(30_002, 1, CLONED, t0 + 120_000),
            denied_lost(30_005, 1, lost, t0 + 900_000),
        ],
        FEED,
    )
    .await;
    let mut alerts = stored_alerts(url, 2).await;
    alerts.sort();
    assert_eq!(
        alerts,
        [
            ("clone".to_owned(), vec![30_001, 30_002]),
            ("denied_retry".to_owned(), vec![30_004, 30_005])
        ]
    );
    let (active, standby) = if first
        .stats
        .active
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        (first, second)
    } else {
        (second, first)
    };
    assert!(
        !standby
            .stats
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    active.stop().await;

    ship(
        &store,
        state.path(),
        "gateway-c",
        vec![denied_lost(30_008, 1, lost_later, t0 + 800_000)],
        FEED,
    )
    .await;
    let mut alerts = stored_alerts(url, 3).await;
    alerts.sort();
    assert_eq!(
        alerts,
        [
            ("clone".to_owned(), vec![30_001, 30_002]),
            ("denied_retry".to_owned(), vec![30_004, 30_005]),
            ("denied_retry".to_owned(), vec![30_007, 30_008]),
        ]
    );
    assert!(
        standby
            .stats
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(
        standby
            .stats
            .missed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    standby.stop().await;
}

#[tokio::test]
async fn a_live_watcher_sees_every_gateway_and_hands_over_to_a_standby() {
    let redis = support::RedisServer::start();
    two_gateways_one_watcher_and_a_standby(&redis.url()).await;
}

#[tokio::test]
async fn a_live_watcher_sees_every_gateway_and_hands_over_to_a_standby_on_a_redis_cluster() {
    let cluster = support::RedisCluster::start();
    two_gateways_one_watcher_and_a_standby(&cluster.url()).await;
}

/// A watcher away for longer than its feed holds says it missed taps rather than pretending
/// it saw everything.
#[tokio::test]
async fn a_watcher_that_fell_further_behind_than_the_feed_counts_missed_taps() {
    use std::sync::atomic::Ordering;
    let redis = support::RedisServer::start();
    let url = redis.url();
    let state = tempfile::tempdir().unwrap();
    let store = feed_store(&url).await;
    let t0 = 1_795_939_200_000;
    let lost = 6_222_000_000_000_999;
    let watcher = start_watcher(&url, "first");
    ship(
        &store,
        state.path(),
        "gateway-a",
        vec![denied_lost(30_004, 1, lost, t0)],
        10,
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while watcher.stats.taps.load(Ordering::Relaxed) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher saw nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    watcher.stop().await;

    // Away while a gate's worth of taps of one card is fed through a feed of ten.
    let away: Vec<JournalRecord> = (1..=400)
        .map(|i| denied_lost(30_005, i, lost, t0 + i * 1_000))
        .collect();
    ship(&store, state.path(), "gateway-b", away, 10).await;
    let watcher = start_watcher(&url, "second");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (mut seen, mut missed) = (0, 0);
    while seen + missed < 400 {
        assert!(
            std::time::Instant::now() < deadline,
            "{seen} watched and {missed} missed of 400"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        seen = watcher.stats.taps.load(Ordering::Relaxed);
        missed = watcher.stats.missed.load(Ordering::Relaxed);
    }
    assert_eq!(seen + missed, 400);
    assert!(
        missed >= 200,
        "{missed} missed: the feed keeps about 100 of 400"
    );
    watcher.stop().await;
}

/// `tapgate watch run` as operators run it: it counts alerts by rule on its ops endpoint, says
/// it is the active watcher and ready, and stops cleanly on SIGTERM.
#[tokio::test]
async fn watch_run_serves_alerts_by_rule_and_stops_on_sigterm() {
    let redis = support::RedisServer::start();
    let url = redis.url();
    let state = tempfile::tempdir().unwrap();
    let store = feed_store(&url).await;
    let ops: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "watch",
            "run",
            "--redis-url",
            &url,
            "--lease-ttl-ms",
            "1000",
        ])
        .args(["--ops-listen", &ops.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = 1_795_939_200_000;
    let lost = 6_222_000_000_000_999;
    ship(
        &store,
        state.path(),
        "gateway-a",
        vec![
            denied_lost(30_004, 1, lost, t0),
            denied_lost(30_005, 1, lost, t0 + 60_000),
        ],
        FEED,
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let metrics = loop {
        let scraped = tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect(ops)
                .is_ok()
                .then(|| support::http_get(ops, "/metrics"))
        })
        .await
        .unwrap();
        if let Some(m) =
            scraped.filter(|m| m.contains("tapgate_watch_alerts_total{rule=\"denied_retry\"} 1"))
        {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no alert counted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(metrics.contains("tapgate_watch_active 1"), "{metrics}");
    assert!(
        metrics.contains("tapgate_watch_taps_total{outcome=\"denied\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tapgate_watch_alerts_total{rule=\"clone\"} 0"),
        "{metrics}"
    );
    let (status, _) = tokio::task::spawn_blocking(move || support::http_get_any(ops, "/readyz"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    // The operators' page shows the alerts by rule, and the shipped alert rules and Grafana
    // dashboard name only watcher metrics this scrape has.
    let profile = tempfile::tempdir().unwrap();
    let dir = profile.path().to_owned();
    let page = tokio::task::spawn_blocking(move || support::rendered_page(ops, &dir))
        .await
        .unwrap();
    assert_eq!(support::shown(&page, "alerts-denied_retry"), 1, "{page}");
    assert_eq!(support::shown(&page, "alerts-clone"), 0);
    for file in ["ops/alerts.yml", "ops/grafana-dashboard.json"] {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for name in support::metric_names(&text) {
            if name.starts_with("tapgate_watch_") {
                assert!(
                    metrics.lines().any(|l| l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}{{"))),
                    "{file}: `{name}` is not in the watcher's scrape"
                );
            }
        }
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}
