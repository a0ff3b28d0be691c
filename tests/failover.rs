//! A gateway killed with SIGKILL under load while its gates move to a second gateway and resend
//! what it never answered: every approval a gate received is settled exactly once, and the
//! books reconcile with both journals. Run on a single Redis and on a Redis Cluster.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::card::CardState;
use tapgate_gateway::directory::TerminalRecord;
use tapgate_journal::{list_segments, read_segment};
use tapgate_loadgen::client::{GateClient, client_endpoint};
use tapgate_protocol::{Mode, Outcome, Tap, TapKind};
use tapgate_runtime::now_ms;
use tapgate_settle::Settlement;
use tapgate_settle::fares::FareTables;
use tapgate_settle::ledger::{Ledger, settle_journals};
use tapgate_settle::store::{RedisStore, Store};

const GATES: usize = 24;
const TAPS_PER_GATE: u64 = 120;

fn population() -> PopulationSpec {
    PopulationSpec {
        cards: 3_000,
        terminals: GATES as u64,
        ..PopulationSpec::default()
    }
}

/// Gateway A: a `tapgate serve` process of its own, so it can be killed.
fn serve(url: &str, state: &Path, listen: SocketAddr) -> Child {
    let config = state.join("gw-a.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{listen}\"\ndev_cert_dir = \"{cert}\"\n\n\
             [directory]\nkind = \"redis\"\nredis_url = \"{url}\"\nresponse_timeout_ms = 1000\n\n\
             [journal]\ndir = \"{journal}\"\n\n\
             [settlement]\nnode = \"gw-a\"\npartitions = {PARTITIONS}\nsettlers = 0\nbatch = 64\n",
            cert = state.join("cert").display(),
            journal = state.join("journal").display(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--master-key", &format!("1={}", hex::encode(MASTER_V1))])
        .args(["--ops-listen", "off"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state.join("gw-a.log")).unwrap())
        .spawn()
        .expect("tapgate serve starts")
}

fn tapgate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The tap ids (gate, sequence) of every approved record in a journal.
fn approved_in(journal: &Path) -> BTreeSet<(u64, u64)> {
    let mut ids = BTreeSet::new();
    for segment in list_segments(journal).unwrap() {
        read_segment(&segment, |r| {
            if r.result.outcome == Outcome::Approve {
                ids.insert((r.terminal_id, r.tap.sequence));
            }
        })
        .unwrap();
    }
    ids
}

struct Gateways {
    a: (quinn::Endpoint, SocketAddr),
    b: (quinn::Endpoint, SocketAddr),
}

/// One gate: taps one at a time on gateway A; when A goes away, moves to B, sends again the tap
/// A never answered, and goes on there. Returns the approvals it received.
async fn ride(
    gateways: Arc<Gateways>,
    terminal: TerminalRecord,
    cards: Arc<Vec<(u64, tapgate_protocol::Issuer)>>,
) -> Vec<(u64, u64)> {
    let kind = match terminal.mode {
        Mode::Metro | Mode::IntercityRail => TapKind::Entry,
        _ => TapKind::Flat,
    };
    let id = identity(&terminal);
    let mut on_b = false;
    let connect = |on_b: bool| {
        let gateways = gateways.clone();
        let id = id.clone();
        async move {
            let (endpoint, addr) = if on_b { &gateways.b } else { &gateways.a };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match GateClient::connect(endpoint, *addr, &id, rand_nonce(), now_ms()).await {
                    Ok(client) => return client,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "gate cannot connect: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    let mut client = connect(false).await;
    let mut approved = Vec::new();
    for sequence in 1..=TAPS_PER_GATE {
        // Every tap a card of its own: no pass-back, and each answer independent of the last.
        let (card_id, issuer) =
            cards[(terminal.terminal_id as usize * 131 + sequence as usize) % cards.len()];
        let tap = Tap {
            sequence,
            card_id,
            issuer,
            kind,
            line: 2,
            stop: 15,
            gate_time_ms: now_ms(),
        };
        let result = loop {
            match tokio::time::timeout(Duration::from_secs(2), client.tap(tap)).await {
                Ok(Ok(result)) => break result,
                // Gateway A is gone: the same tap goes to B, as a resend.
                _ if !on_b => {
                    on_b = true;
                    client = connect(true).await;
                }
                other => panic!("gateway B failed a tap: {other:?}"),
            }
        };
        if result.outcome == Outcome::Approve {
            approved.push((terminal.terminal_id, sequence));
        }
        // About a hundred taps a second per gate: A dies in the middle of the run.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    approved
}

async fn a_gateway_killed_under_load(url: &str) {
    let spec = population();
    let (cards, terminals): (Vec<_>, Vec<_>) = (spec.cards().collect(), spec.terminals().collect());
    let directory = redis_directory(url);
    directory.put_cards(&cards).await.unwrap();
    directory.put_terminals(&terminals).await.unwrap();
    let active: Vec<_> = cards
        .iter()
        .filter(|c| c.state == CardState::Active)
        .map(|c| (c.card_id, c.issuer))
        .collect();

    let (a_state, b_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut gateway_a = serve(url, a_state.path(), a_addr);
    let b = Harness::start(redis_directory(url), b_state.path()).await;
    let store =
        Store::Redis(RedisStore::connect(url, None, "tapgate", Duration::from_secs(2)).unwrap());
    let settlement_b = Settlement::start(
        store.clone(),
        &test_settlement("gw-b", b.state.join("journal")),
        Arc::new(FareTables::embedded_default()),
        b.gateway.journal().durable(),
    );
    let cert_a = {
        let path = a_state.path().join("cert").join("cert.der");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(der) = std::fs::read(&path) {
                break der;
            }
            assert!(Instant::now() < deadline, "gateway A wrote no certificate");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let gateways = Arc::new(Gateways {
        a: (
            client_endpoint(&cert_a, "127.0.0.1:0".parse().unwrap()).unwrap(),
            a_addr,
        ),
        b: (b.endpoint.clone(), b.addr()),
    });
    let active = Arc::new(active);
    let gates: Vec<_> = terminals
        .iter()
        .map(|t| tokio::spawn(ride(gateways.clone(), *t, active.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    gateway_a.kill().unwrap();
    gateway_a.wait().unwrap();
    let mut received = Vec::new();
    for gate in gates {
        received.extend(gate.await.unwrap());
    }
    // Every gate said Hello to B with A's answers in Redis: B loaded them into its windows.
    let restored = b
        .gateway
        .metrics()
        .decisions_restored
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(restored >= GATES as u64, "{restored} answers restored");
    b.gateway.shutdown().await;

    // What A journaled and never shipped goes out as a stopped gateway's journal does.
    let journal_a: PathBuf = a_state.path().join("journal");
    let journal_b: PathBuf = b.state.join("journal");
    let (ok, text) = tapgate(&[
        "settle",
        "forward",
        "--redis-url",
        url,
        "--journal",
        journal_a.to_str().unwrap(),
        "--node",
        "gw-a",
        "--partitions",
        &PARTITIONS.to_string(),
    ]);
    assert!(ok, "{text}");
    wait_settled_or_explain(&settlement_b, &store).await;
    settlement_b.shutdown().await;

    let gateway_a_log =
        std::fs::read_to_string(a_state.path().join("gw-a.log")).unwrap_or_default();
    let (journaled, copies) =
        every_approval_journaled(&received, &journal_a, &journal_b, &gateway_a_log);
    // And the books hold every journaled tap exactly once.
    let expected = settled_offline(&[journal_a.as_path(), journal_b.as_path()]);
    assert_eq!(expected.ledger.taps(), journaled.len() as u64);
    assert_eq!(expected.copies, copies as u64);
    let settled = store.ledger(None, true).await.unwrap();
    assert_eq!(settled.taps(), journaled.len() as u64);
    reconcile_says_exact(url, &journal_a, &journal_b, &settled);
}

/// Every approval a gate received is durable in some journal; returns the journaled
/// approvals and how many are in both journals.
fn every_approval_journaled(
    received: &[(u64, u64)],
    journal_a: &Path,
    journal_b: &Path,
    gateway_a_log: &str,
) -> (BTreeSet<(u64, u64)>, usize) {
    let (in_a, in_b) = (approved_in(journal_a), approved_in(journal_b));
    assert!(
        !in_a.is_empty() && !in_b.is_empty(),
        "{} approvals received, {} journaled on A, {} on B; gateway A said:\n{}",
        received.len(),
        in_a.len(),
        in_b.len(),
        gateway_a_log
    );
    let journaled: BTreeSet<_> = in_a.union(&in_b).copied().collect();
    let copies = in_a.intersection(&in_b).count();
    eprintln!(
        "{} approvals received, {} on A, {} on B, {copies} in both journals",
        received.len(),
        in_a.len(),
        in_b.len()
    );
    // Every approval a gate received is durable in some journal.
    let missing: Vec<_> = received
        .iter()
        .filter(|id| !journaled.contains(id))
        .collect();
    assert!(missing.is_empty(), "approvals in no journal: {missing:?}");
    (journaled, copies)
}

/// Waits for settlement to catch up; if it does not, says where each part stands.
async fn wait_settled_or_explain(settlement: &Settlement, store: &Store) {
    if !settlement
        .wait_settled(Duration::from_secs(60))
        .await
        .unwrap()
    {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let (f, s) = (&settlement.forwarder, &settlement.settlers);
        panic!(
            "settlement did not catch up: counts {:?}; forwarder shipped through {:?}, store errors {}, failed {}; settlers settled {}, store errors {}, leases lost {}, partitions held {}, health {:?}",
            store.counts().await,
            f.shipped_through(),
            load(&f.store_errors),
            f.failed.load(std::sync::atomic::Ordering::Relaxed),
            load(&s.settled),
            load(&s.store_errors),
            load(&s.leases_lost),
            load(&s.partitions_held),
            s.health.reason(),
        );
    }
}

/// `tapgate settle reconcile` finds the books exact with both journals, and names the
/// journal that is missing when given one.
fn reconcile_says_exact(url: &str, journal_a: &Path, journal_b: &Path, settled: &Ledger) {
    let per_day: BTreeMap<_, _> = settled.days.iter().map(|(d, l)| (*d, l.taps)).collect();
    let (ok, text) = tapgate(&[
        "settle",
        "reconcile",
        "--redis-url",
        url,
        "--journal",
        journal_a.to_str().unwrap(),
        "--journal",
        journal_b.to_str().unwrap(),
    ]);
    assert!(ok, "{text}\n{per_day:?}");
    assert!(
        text.contains("0 lost, 0 duplicated; 0 differences"),
        "{text}"
    );
    // Given one journal only, reconcile says whose is missing.
    let (ok, text) = tapgate(&[
        "settle",
        "reconcile",
        "--redis-url",
        url,
        "--journal",
        journal_a.to_str().unwrap(),
    ]);
    assert!(!ok, "{text}");
    assert!(text.contains("journal of node gw-b missing"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_on_a_single_redis_is_settled_once() {
    let redis = RedisServer::start();
    a_gateway_killed_under_load(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_on_a_redis_cluster_is_settled_once() {
    let cluster = RedisCluster::start();
    a_gateway_killed_under_load(&cluster.url()).await;
}

/// The journals settled offline. Only tap counts are compared with them, so the key that names
/// cards does not matter.
fn settled_offline(journals: &[&Path]) -> tapgate_settle::ledger::JournalSettlement {
    let cards = tapgate_protocol::crypto::CardPseudonymizer::new([0; 16]);
    settle_journals(journals, &FareTables::embedded_default(), &cards).unwrap()
}
