//! `tapgate bench-deny`: how long a card reported lost takes to reach the deny list of every
//! connected version-2 gate. An embedded gateway (the shipped population) and the gates run in
//! this process over real QUIC on 127.0.0.1: every gate connects, takes the whole list, and
//! then the tool reports cards lost one after another through the directory, as `tapgate cards
//! lose` does, timing each change from the report to the moment each gate applied it.

use crate::common::parse_duration;
use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapgate_city::CardState;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::config::{Config, DEV_MASTER_KEY_HEX, DirectoryKind};
use tapgate_gateway::node::Node;
use tapgate_loadgen::client::{ClientError, GateClient, GateIdentity, client_endpoint};
use tapgate_loadgen::report::Percentiles;
use tapgate_protocol::{DenyAck, Frame, GateDenyList, MasterKey, Version};
use tapgate_transport::now_ms;
use tapgate_transport::tls::{GateTls, Resumption};
use tokio::sync::Semaphore;

#[derive(Args)]
pub(crate) struct DenyBenchArgs {
    /// Version-2 gates connected, each its own QUIC connection; the embedded population gets
    /// as many gates.
    #[arg(long, default_value_t = 20_000)]
    gates: usize,
    /// Cards reported lost, one after another.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Time between two reports.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    every: Duration,
    /// Receive and send buffer asked for the gateway's UDP socket, in MiB (the kernel grants
    /// at most `net.core.rmem_max` / `wmem_max`).
    #[arg(long, default_value_t = 8)]
    udp_buffer_mib: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Gates sharing one client socket.
const GATES_PER_SOCKET: usize = 2_500;
/// Handshakes in progress at once.
const CONNECTING: usize = 256;
/// How long the last gate may take to apply a change before the run calls it missing.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct DenyBenchReport {
    gates: usize,
    changes: usize,
    /// Cards on the list when the gates connected.
    cards_on_list: usize,
    /// From the first connection to the last gate holding the whole list.
    whole_list_all_gates_ms: u64,
    /// For each change, the time until the last gate applied it, in microseconds.
    last_gate_us: Percentiles,
    /// For each change in the order reported, the time until the last gate applied it, in
    /// milliseconds (`null`: some gate never did).
    last_gate_each_ms: Vec<Option<u64>>,
    /// For every gate and change, the time until that gate applied it, in microseconds.
    each_gate_us: Percentiles,
    /// Changes some gate had not applied within the timeout.
    missing: u64,
    /// Datagrams the kernel dropped for a full receive buffer during the run, at the gateway's
    /// socket and at the gates' (read from /proc/net/udp; absent where there is none).
    dropped_at_gateway: Option<u64>,
    dropped_at_gates: Option<u64>,
    /// Bytes on the wire of a DenyChanges frame carrying one change.
    one_change_frame_bytes: usize,
}

pub(crate) fn run_deny_bench(args: DenyBenchArgs) -> anyhow::Result<()> {
    crate::common::init_logging("warn");
    let dir = tempfile::Builder::new()
        .prefix("tapgate-bench-deny-")
        .tempdir()
        .context("creating the bench directory")?;
    let population = PopulationSpec {
        terminals: args.gates as u64,
        ..PopulationSpec::default()
    };
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("valid address");
    config.server.dev_cert_dir = dir.path().join("dev-cert");
    config.journal.dir = dir.path().join("journal");
    config.directory.kind = DirectoryKind::Embedded;
    config.directory.embedded_cards = population.cards;
    config.directory.embedded_terminals = population.terminals;
    config.settlement.enabled = false;
    config.server.udp_buffer_bytes = args.udp_buffer_mib << 20;
    let report = crate::runtime()?.block_on(async {
        let node = Node::start(&config).await?;
        let report = measure(&args, &node, &population).await;
        node.stop().await?;
        report
    })?;
    println!(
        "{} version-2 gates · {} cards on the list at the start · whole list at every gate {} ms after the first connection",
        report.gates, report.cards_on_list, report.whole_list_all_gates_ms
    );
    println!(
        "{} cards reported lost, one every {:?}; a DenyChanges frame with one change is {} bytes",
        report.changes, args.every, report.one_change_frame_bytes
    );
    let p = |p: &Percentiles| {
        format!(
            "p50 {:.1} · p99 {:.1} · max {:.1} ms",
            p.p50 as f64 / 1000.0,
            p.p99 as f64 / 1000.0,
            p.max as f64 / 1000.0
        )
    };
    println!("report → last gate applied it: {}", p(&report.last_gate_us));
    println!("report → each gate applied it: {}", p(&report.each_gate_us));
    if let (Some(gateway), Some(gates)) = (report.dropped_at_gateway, report.dropped_at_gates) {
        println!(
            "datagrams the kernel dropped for a full receive buffer: {gateway} at the gateway's socket, {gates} at the gates'"
        );
    }
    if report.missing > 0 {
        println!(
            "MISSING: {} changes did not reach every gate within {REACH_TIMEOUT:?}",
            report.missing
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(report.missing == 0, "some changes did not reach every gate");
    Ok(())
}

/// What one gate saw: when it held the whole list, and when it applied each version.
struct GateLog {
    whole_at: Option<Instant>,
    applied: Vec<(u64, Instant)>,
}

async fn measure(
    args: &DenyBenchArgs,
    node: &Node,
    population: &PopulationSpec,
) -> anyhow::Result<DenyBenchReport> {
    let gateway = &node.gateway;
    let target = gateway.local_addr();
    let tls =
        GateTls::new(gateway.certificate_der(), Resumption::Full, Version::V2)?.for_one_gate()?;
    let master = MasterKey::from_hex(DEV_MASTER_KEY_HEX).expect("valid development key");
    let endpoints = (0..args.gates.div_ceil(GATES_PER_SOCKET))
        .map(|_| client_endpoint(gateway.certificate_der(), "127.0.0.1:0".parse().unwrap()))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let stop = Arc::new(tokio::sync::Notify::new());
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut gates = tokio::task::JoinSet::new();
    for index in 0..args.gates {
        let terminal = population.terminal(index as u64);
        let identity = GateIdentity {
            terminal_id: terminal.terminal_id,
            key_version: 1,
            key: master.diversify(terminal.terminal_id),
            area: terminal.area,
            mode: terminal.mode,
            operator: terminal.operator,
        };
        let endpoint = endpoints[index / GATES_PER_SOCKET].clone();
        let (tls, connecting, stop) = (tls.clone(), connecting.clone(), stop.clone());
        gates.spawn(async move {
            let client = {
                let _turn = connecting.acquire().await;
                GateClient::connect_with(
                    &endpoint,
                    Some(&tls),
                    target,
                    &identity,
                    rand::random(),
                    now_ms(),
                )
                .await?
            };
            follow(client, stop).await
        });
    }
    let cards_on_list = wait_for_lists(gateway, &gates).await?;
    let base = cards_on_list.0;
    // Active cards of the population, reported lost one by one.
    let mut reported = Vec::with_capacity(args.changes);
    let mut index = 0;
    while reported.len() < args.changes {
        let card = population.card(index);
        index += 1;
        if card.state != CardState::Active {
            continue;
        }
        let at = Instant::now();
        gateway
            .directory()
            .set_state(card.card_id, CardState::Lost)
            .await?
            .context("a card of the population is missing")?;
        reported.push(at);
        tokio::time::sleep(args.every).await;
    }
    let last_version = base + args.changes as u64;
    let deadline = Instant::now() + REACH_TIMEOUT;
    while gateway.deny_list_acknowledged_below(last_version) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dropped_at_gateway = udp_drops(&[target.port()]);
    let gate_ports: Vec<u16> = endpoints
        .iter()
        .filter_map(|e| e.local_addr().ok().map(|a| a.port()))
        .collect();
    let dropped_at_gates = udp_drops(&gate_ports);
    stop.notify_waiters();
    let mut logs = Vec::with_capacity(args.gates);
    while let Some(log) = gates.join_next().await {
        logs.push(log.context("a gate's task failed")??);
    }
    Ok(DenyBenchReport {
        dropped_at_gateway,
        dropped_at_gates,
        ..summarize(args, started, cards_on_list.1, base, &reported, &logs)
    })
}

/// Datagrams the kernel dropped at the loopback UDP sockets bound to `ports`, from Linux's
/// per-socket counters; `None` where /proc/net/udp cannot be read.
fn udp_drops(ports: &[u16]) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let drops = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1)?.rsplit_once(':')?.1;
            let port = u16::from_str_radix(port, 16).ok()?;
            ports
                .contains(&port)
                .then(|| fields.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum();
    Some(drops)
}

/// Waits until every gate holds the whole list; the list's version and size.
async fn wait_for_lists(
    gateway: &tapgate_gateway::server::Gateway,
    gates: &tokio::task::JoinSet<Result<GateLog, ClientError>>,
) -> anyhow::Result<(u64, usize)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (version, cards) = gateway.deny_list();
        if gateway.deny_list_gates() == gates.len() as u64
            && gateway.deny_list_acknowledged_below(version) == 0
        {
            return Ok((version, cards));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gates did not all connect and take the list within 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gate that follows the deny list and does nothing else, until told to stop.
async fn follow(
    mut client: GateClient,
    stop: Arc<tokio::sync::Notify>,
) -> Result<GateLog, ClientError> {
    let mut list = GateDenyList::default();
    let mut log = GateLog {
        whole_at: None,
        applied: Vec::new(),
    };
    client
        .send_frame(&Frame::DenyAck(DenyAck { version: 0 }))
        .await?;
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            () = &mut stopped => break,
            frame = client.recv() => frame?,
        };
        if matches!(frame, Frame::OfflineRules(_)) {
            continue;
        }
        let ack = list
            .apply(&frame)
            .ok_or(ClientError::Unexpected(frame.frame_type()))?
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        if let Some(ack) = ack {
            let now = Instant::now();
            match frame {
                Frame::DenyList(_) => log.whole_at = Some(now),
                _ => log.applied.push((ack.version, now)),
            }
            client.send_frame(&Frame::DenyAck(ack)).await?;
        }
    }
    client.close();
    Ok(log)
}

fn summarize(
    args: &DenyBenchArgs,
    started: Instant,
    cards_on_list: usize,
    base: u64,
    reported: &[Instant],
    logs: &[GateLog],
) -> DenyBenchReport {
    let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let (mut last_gate, mut each_gate) = (histogram(), histogram());
    let mut missing = 0;
    let mut last_gate_each_ms = Vec::with_capacity(reported.len());
    for (i, at) in reported.iter().enumerate() {
        let version = base + 1 + i as u64;
        let mut last = Some(Duration::ZERO);
        for log in logs {
            // A gate applies several changes at once when they come in one frame.
            let applied = log
                .applied
                .iter()
                .find(|(v, _)| *v >= version)
                .map(|(_, when)| when.saturating_duration_since(*at));
            match applied {
                Some(took) => {
                    let _ = each_gate.record(took.as_micros().max(1) as u64);
                    last = last.map(|l| l.max(took));
                }
                None => last = None,
            }
        }
        last_gate_each_ms.push(last.map(|took| took.as_millis() as u64));
        match last {
            Some(took) => {
                let _ = last_gate.record(took.as_micros().max(1) as u64);
            }
            None => missing += 1,
        }
    }
    let whole = logs
        .iter()
        .filter_map(|log| log.whole_at)
        .max()
        .map_or(0, |at| at.duration_since(started).as_millis() as u64);
    DenyBenchReport {
        gates: args.gates,
        changes: args.changes,
        cards_on_list,
        whole_list_all_gates_ms: whole,
        last_gate_us: Percentiles::of(&last_gate),
        last_gate_each_ms,
        each_gate_us: Percentiles::of(&each_gate),
        missing,
        dropped_at_gateway: None,
        dropped_at_gates: None,
        one_change_frame_bytes: tapgate_protocol::wire_len(
            tapgate_protocol::FrameType::DenyChanges,
        ) + tapgate_protocol::DENY_ENTRY_LEN,
    }
}
