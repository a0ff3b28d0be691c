//! End-to-end: the load generator against a real gateway, and against the echo baseline.

mod support;

use std::time::Duration;
use support::*;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::directory::{Directory, EmbeddedDirectory};
use tapgate_loadgen::echo::EchoServer;
use tapgate_loadgen::run::{LoadSpec, Pacing, TargetKind, run};
use tapgate_loadgen::workload::Faults;
use tapgate_protocol::MasterKey;
use tapgate_transport::tls::Resumption;

fn population() -> PopulationSpec {
    PopulationSpec {
        cards: 5_000,
        terminals: 50,
        ..PopulationSpec::default()
    }
}

async fn gateway(state: &std::path::Path) -> Harness {
    let embedded = std::sync::Arc::new(EmbeddedDirectory::default());
    let spec = population();
    spec.cards().for_each(|c| embedded.put_card(c));
    spec.terminals().for_each(|t| embedded.put_terminal(t));
    Harness::start(Directory::Embedded(embedded), state).await
}

fn load(
    target: std::net::SocketAddr,
    kind: TargetKind,
    cert: &[u8],
    pacing: Pacing,
    faults: Faults,
) -> LoadSpec {
    LoadSpec {
        target,
        target_kind: kind,
        trusted_cert: cert.to_vec(),
        master_key: MasterKey::new(MASTER_V1),
        key_version: 1,
        connections: 20,
        pacing,
        duration: Duration::from_secs(2),
        population: population(),
        first_gate: 0,
        faults,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_load_is_fully_answered_with_the_workloads_decisions() {
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let spec = load(
        h.addr(),
        TargetKind::Tapgate,
        h.gateway.certificate_der(),
        Pacing::OpenLoop { rate: 500.0 },
        Faults::default(),
    );
    let report = run(spec).await.unwrap();
    assert_eq!(report.connected, 20);
    assert_eq!(report.sent, 1000, "{}", report.summary());
    assert_eq!(report.answered, report.sent, "{}", report.summary());
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(report.decisions.get("approved").copied().unwrap_or(0) > 900);
    assert!(report.latency_us.p50 > 0 && report.latency_us.p50 <= report.latency_us.max);
    assert_eq!(
        h.gateway.metrics().snapshot().approved,
        report.decisions["approved"]
    );
    let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
    assert_eq!(json["sent"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_refused_and_the_gates_recover() {
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let faults = Faults {
        bad_mac: 0.05,
        replay: 0.05,
        resend: 0.05,
    };
    let spec = load(
        h.addr(),
        TargetKind::Tapgate,
        h.gateway.certificate_der(),
        Pacing::OpenLoop { rate: 500.0 },
        faults,
    );
    let report = run(spec).await.unwrap();
    assert!(
        report
            .error_kinds
            .get("refused_bad_mac")
            .copied()
            .unwrap_or(0)
            > 10,
        "{}",
        report.summary()
    );
    assert!(
        report
            .error_kinds
            .get("refused_replay")
            .copied()
            .unwrap_or(0)
            > 10,
        "{}",
        report.summary()
    );
    assert!(h.gateway.metrics().snapshot().resends > 10);
    assert!(
        report.answered > 800,
        "gates kept tapping after reconnecting: {}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_against_the_echo_baseline() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let spec = load(
        echo.local_addr(),
        TargetKind::Echo,
        echo.certificate_der(),
        Pacing::ClosedLoop,
        Faults::default(),
    );
    let report = run(spec).await.unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(report.answered > 100);
    assert_eq!(report.decisions.keys().collect::<Vec<_>>(), ["echo"]);
    echo.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_drives_the_target_it_is_given_and_stops_at_the_first_step_that_fails() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut spec = load(
        echo.local_addr(),
        TargetKind::Echo,
        echo.certificate_der(),
        Pacing::ClosedLoop,
        Faults::default(),
    );
    spec.duration = Duration::from_millis(500);
    let mut steps = Vec::new();
    // A bound of zero fails every step: one step is run, and nothing held.
    let best = tapgate_loadgen::run::find_max(spec, 200.0, Duration::ZERO, |step| {
        steps.push((step.rate, step.held, step.report.clone()))
    })
    .await
    .unwrap();
    assert!(best.is_none());
    assert_eq!(steps.len(), 1);
    let (rate, held, report) = &steps[0];
    assert_eq!((*rate, *held), (200.0, false));
    assert!(!report.closed_loop, "find-max runs open loop");
    assert_eq!(report.target, "echo");
    assert_eq!(report.connected, 20, "{}", report.summary());
    assert_eq!(report.answered, report.sent, "{}", report.summary());
    assert_eq!(report.decisions.keys().collect::<Vec<_>>(), ["echo"]);
    echo.close();
}

/// `tapgate bench` as a user runs it, made small: for the three setups (embedded, a private
/// redis-server, and two gateways on a private Redis Cluster, which the command starts), the
/// echo and the gateways start as processes of their own, each is measured, and the JSON holds
/// their ratios. After each run the gateways' books are reconciled with the journals; on Redis
/// the second round's books hold the first round's taps too, so they only reconcile with both
/// rounds' journals, and on the cluster with both gateways' journals.
#[test]
fn the_bench_command_measures_the_echo_and_every_gateway_setup_and_writes_their_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let printed = tapgate_succeeds(&[
        "bench",
        "--rounds",
        "2",
        "--duration",
        "1s",
        "--connections",
        "10",
        "--terminals",
        "50",
        "--cards",
        "5000",
        "--find-max-connections",
        "0",
        "--setups",
        "embedded,redis,cluster",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(printed.contains("rate ratio"), "{printed}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let setups = result["setups"].as_array().unwrap();
    assert_eq!(
        setups
            .iter()
            .map(|s| s["setup"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["embedded", "redis", "cluster"]
    );
    for setup in setups {
        for round in setup["rounds"].as_array().unwrap() {
            let books = &round["tapgate"]["exactness"];
            assert_eq!(books["taps_exact"], true, "{round}");
            let summary = books["summary"].as_str().unwrap();
            assert!(summary.contains("0 lost, 0 duplicated"), "{round}");
            // Through two gateways a card's taps can reach settlement out of time order and
            // be priced in arrival order; the books say so rather than differ unexplained.
            if books["fares_exact"] == false {
                assert_eq!(setup["setup"], "cluster", "{round}");
                assert!(
                    books["out_of_order_in_books"].as_u64().unwrap() > 0,
                    "{round}"
                );
            } else {
                assert!(summary.ends_with("0 differences"), "{round}");
            }
        }
        let round = &setup["rounds"][0];
        for side in ["echo", "tapgate"] {
            assert!(round[side]["answered"].as_u64().unwrap() > 0, "{round}");
            assert_eq!(round[side]["errors"], 0, "{round}");
            assert!(
                round[side]["cpu_us_per_tap"].as_f64().unwrap() > 0.0,
                "{round}"
            );
        }
        // The gateway settles in both setups, so its run reports the settlement lag.
        assert!(
            round["tapgate"]["settlement_lag_p99_ms"].is_u64(),
            "{round}"
        );
        let ratio = setup["median_rate_ratio"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio.is_finite(), "{setup}");
    }
}

/// An open-loop load at `rate` against the harness's gateway, without faults.
fn open_loop(h: &Harness, rate: f64) -> LoadSpec {
    load(
        h.addr(),
        TargetKind::Tapgate,
        h.gateway.certificate_der(),
        Pacing::OpenLoop { rate },
        Faults::default(),
    )
}

/// Issue 16's ground truth: a seeded run with misuse injected for each card rule and ordinary
/// riders mixed in, decided by a real gateway, watched from its journal. Every injected card is
/// caught by its own rule and by no other, and no ordinary rider is alerted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_card_misuse_is_all_caught_and_no_ordinary_rider_is_alerted() {
    use tapgate_watch::score::{Injected, score};
    use tapgate_watch::{Observed, Rules, Watcher};
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let mut spec = open_loop(&h, 2_000.0);
    spec.connections = 50;
    spec.duration = Duration::from_secs(3);
    spec.fraud_cards = 3;
    let report = run(spec).await.unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert_eq!(
        report.riders_over_budget, 0,
        "ordinary riders rode like people"
    );
    h.gateway.shutdown().await;

    let truth: Vec<Injected> =
        serde_json::from_value(serde_json::to_value(&report.injected).unwrap()).unwrap();
    let mut taps = Vec::new();
    for segment in tapgate_journal::list_segments(&h.state.join("journal")).unwrap() {
        tapgate_journal::read_segment(&segment, |r| taps.push(Observed::from(&r))).unwrap();
    }
    taps.sort_by_key(|t| t.at_ms);
    let mut watcher = Watcher::new(
        Rules::embedded_default(),
        tapgate_protocol::crypto::CardPseudonymizer::new([7; 16]),
    );
    let alerts: Vec<_> = taps.iter().flat_map(|t| watcher.observe(t)).collect();
    let (scores, ordinary) = score(&alerts, &truth);
    for s in scores
        .iter()
        .filter(|s| s.rule != tapgate_watch::Rule::GateDenials)
    {
        assert_eq!(s.injected, 3, "{s:?}: every injection fully sent");
        assert_eq!(s.recall(), Some(1.0), "{s:?}");
        assert_eq!(s.precision(), Some(1.0), "{s:?}");
    }
    assert!(
        ordinary.is_empty(),
        "ordinary riders alerted on: {ordinary:?}"
    );
}

/// A share of the gates moves to another address halfway through the run, as bus validators do
/// between cell towers: every tap is answered, no gate reconnects, and the gateway counts one
/// migration per gate that moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_that_move_mid_run_keep_their_connections() {
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let mut spec = open_loop(&h, 1_000.0);
    spec.migrate = 0.25;
    let report = run(spec).await.unwrap();
    assert_eq!(report.moved, 5, "{}", report.summary());
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert_eq!(report.answered, report.sent);
    let m = h.gateway.metrics().snapshot();
    assert_eq!(m.migrations, 5);
    assert_eq!(m.connections_total, 20, "no gate connected twice");
    assert!(report.summary().contains("moved mid-run: 5 gates"));
}

/// A share of the gates drops its connection and reconnects, one after another, as bus
/// validators do after tunnels, over a link with round trips 20 ms longer: each resumes its
/// TLS session, its early Hello is answered, its unanswered taps are resent, and nothing is
/// lost or counted as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_that_drop_reconnect_with_an_early_hello_and_lose_nothing() {
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let mut spec = open_loop(&h, 1_000.0);
    spec.drop = 0.25;
    spec.added_rtt = Duration::from_millis(20);
    let report = run(spec).await.unwrap();
    let summary = report.summary();
    let r = report.reconnects;
    assert_eq!(
        (
            r.reconnected,
            r.early_hellos_answered,
            r.early_hellos_refused
        ),
        (5, 5, 0),
        "{summary}"
    );
    assert!(
        r.time_us.p50 >= 20_000,
        "at least one round trip: {summary}"
    );
    assert_eq!(report.errors, 0, "{summary}");
    assert_eq!(report.answered + report.resent, report.sent, "{summary}");
    let m = h.gateway.metrics().snapshot();
    assert_eq!((m.tls_resumptions, m.early_hellos), (5, 5));
    assert_eq!(
        m.connections_total, 25,
        "each dropping gate connected twice"
    );
    assert!(summary.contains("reconnected: 5 times (5 with an early Hello answered"));
}

/// Half the gates lose their link for a while. They decide taps by the rules the gateway sent
/// (refusing the cards on their deny list and what the rules leave out), keep what they
/// approved, and upload it when the link is back, before any new tap: every upload is
/// receipted, the gateway records each once, and nothing is left over or counted as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_that_lose_their_link_ride_offline_and_upload_every_tap_they_approved() {
    let state = tempfile::tempdir().unwrap();
    let h = gateway(state.path()).await;
    let mut spec = open_loop(&h, 400.0);
    spec.version = tapgate_protocol::Version::V2;
    spec.duration = Duration::from_secs(4);
    spec.offline = 0.5;
    spec.offline_for = Duration::from_secs(2);
    let report = run(spec).await.unwrap();
    let summary = report.summary();
    let o = &report.offline;
    assert_eq!(o.gates, 10, "{summary}");
    assert!(o.approved > 100, "{summary}");
    assert_eq!(o.recorded + o.already, o.approved, "{summary}");
    assert_eq!((o.not_uploaded, report.errors), (0, 0), "{summary}");
    let m = h.gateway.metrics();
    let recorded = m.offline_taps.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(recorded, o.approved, "{summary}");
    assert!(
        summary.contains("offline: 10 gates lost their link"),
        "{summary}"
    );
}

/// The demo with gates that lose their link: it ends with every uploaded offline tap in the
/// journal once and the books reconciled with the journal, or it fails.
#[test]
fn the_demo_settles_every_offline_tap_once() {
    let text = tapgate_succeeds(&[
        "demo",
        "--duration",
        "4s",
        "--connections",
        "20",
        "--rate",
        "400",
        "--offline",
        "0.5",
        "--offline-for",
        "2s",
    ]);
    assert!(
        text.contains("0 lost, 0 duplicated; 0 differences"),
        "{text}"
    );
    assert!(
        text.contains("0 of them more than once; each settled once"),
        "{text}"
    );
}

/// `tapgate bench-deny` on a few gates: every change reaches every gate, each gate applies
/// each change once, and the report counts the datagrams the kernel dropped at either side
/// (none here) and lists each change's time to its last gate.
#[test]
fn bench_deny_times_each_change_to_every_gate_and_counts_dropped_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("deny.json");
    let text = tapgate_succeeds(&[
        "bench-deny",
        "--gates",
        "20",
        "--changes",
        "3",
        "--every",
        "50ms",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        text.contains(
            "dropped for a full receive buffer: 0 at the gateway's socket, 0 at the gates'"
        ),
        "{text}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let each = report["last_gate_each_ms"].as_array().unwrap();
    assert_eq!(each.len(), 3);
    assert!(each.iter().all(serde_json::Value::is_u64), "{each:?}");
    assert_eq!(report["missing"], 0);
}

/// `tapgate bench-deny --gate-processes 2`: a Redis gateway in its own process (on a private
/// redis-server the tool starts), the gates split over two processes, the cards reported lost
/// through Redis; every change reaches every gate, and the report has both sides' CPU.
#[test]
fn bench_deny_with_the_gates_in_processes_of_their_own_reaches_every_gate_through_redis() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("deny.json");
    let text = tapgate_succeeds(&[
        "bench-deny",
        "--gates",
        "40",
        "--changes",
        "3",
        "--every",
        "50ms",
        "--gate-processes",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(text.contains("the gates in 2 processes"), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["gate_processes"], 2);
    assert_eq!(report["missing"], 0);
    assert!(report["cards_on_list"].as_u64().unwrap() > 0, "{report}");
    let each = report["last_gate_each_ms"].as_array().unwrap();
    assert_eq!(each.len(), 3);
    assert!(each.iter().all(serde_json::Value::is_u64), "{each:?}");
    assert!(report["cpu"]["gateway_changes"].is_f64(), "{report}");
    assert_eq!(report["dropped_at_gates"], 0);
}

/// Runs the `tapgate` binary with `args`; what it printed, once it exited successfully.
fn tapgate_succeeds(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
