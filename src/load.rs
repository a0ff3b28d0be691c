//! `tapgate load` and `tapgate demo`.

use crate::common::parse_duration;
use crate::runtime;
use crate::scrape::{caught_up, ops_client, scrape_settlement};
use anyhow::Context as _;
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::config::{Config, DEV_MASTER_KEY_HEX, DirectoryKind};
use tapgate_gateway::node::Node;
use tapgate_loadgen::echo::EchoServer;
use tapgate_loadgen::report::{Report, SettlementLag};
use tapgate_loadgen::run::{LoadSpec, Pacing, TargetKind, run};
use tapgate_loadgen::workload::Faults;
use tapgate_protocol::{MasterKey, Version};
use tapgate_transport::tls::Resumption;

fn parse_resumption(s: &str) -> Result<Resumption, String> {
    match s {
        "full" => Ok(Resumption::Full),
        "ticket" => Ok(Resumption::Ticket),
        "early" => Ok(Resumption::EarlyHello),
        other => Err(format!("{other:?}: expected full, ticket or early")),
    }
}

#[derive(Args, Clone)]
pub(crate) struct WorkloadArgs {
    /// Simulated gates, each its own QUIC connection.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Total taps per second, open loop (intended send times fixed in advance).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Closed loop instead: each gate sends its next tap when the previous one is answered.
    #[arg(long)]
    closed_loop: bool,
    /// How long to send taps: 30, 30s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the card and gate population; must be the gateway's.
    #[arg(long, default_value_t = PopulationSpec::default().seed)]
    seed: u64,
    /// Cards in the population; must be the gateway's.
    #[arg(long, default_value_t = PopulationSpec::default().cards)]
    cards: u64,
    /// Gates in the population; must be the gateway's.
    #[arg(long, default_value_t = PopulationSpec::default().terminals)]
    terminals: u64,
    /// The simulated gates are the population's terminals from this index on. Generators
    /// driving several gateways at once take ranges that do not overlap (a gate is one device).
    #[arg(long, default_value_t = 0)]
    first_gate: u64,
    /// Share of taps sent with a corrupted tag (each closes its connection; the gate reconnects).
    #[arg(long, default_value_t = 0.0)]
    bad_mac: f64,
    /// Share of taps sent with an old sequence number (closes the connection too).
    #[arg(long, default_value_t = 0.0)]
    replay: f64,
    /// Share of taps that resend the previous frame byte for byte.
    #[arg(long, default_value_t = 0.0)]
    resend: f64,
    /// Make this many cards misbehave for each misuse pattern the card-use watcher looks for
    /// (velocity, impossible travel, clone, a denied card tried again, concession overuse), and
    /// break this many readers halfway through the run (half their taps then carry unknown
    /// card numbers).
    /// Ordinary riders then ride from home gates with cards in good standing, so the run's
    /// misuse is exactly what was injected: `--truth` writes it down for `tapgate watch journal
    /// --truth` to score the rules against.
    #[arg(long, default_value_t = 0)]
    fraud_cards: usize,
    /// Share of the gates that move to another local address halfway through the run, as a bus
    /// validator does between cell towers; each keeps its connection (QUIC migration).
    #[arg(long, default_value_t = 0.0)]
    migrate: f64,
    /// Share of the gates that drop their connection once and reconnect, as a bus validator does
    /// after a tunnel, one after another through the middle half of the run; the report gives
    /// the reconnect times.
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
    /// How gates reconnect: `full` (a full TLS handshake each time), `ticket` (resume the TLS
    /// session, Hello after the handshake) or `early` (resume, Hello sent as early data).
    #[arg(long, default_value = "early", value_parser = parse_resumption)]
    resumption: Resumption,
    /// Time added to every round trip between the gates and the gateway (each datagram a gate
    /// sends is held back this long), to see what a cellular link's round trips cost: 50ms.
    #[arg(long, value_parser = parse_duration)]
    added_rtt: Option<Duration>,
    /// The newest protocol version the gates offer: 1, or 2 (they follow the deny list, and
    /// the report says how long its changes took to reach them).
    #[arg(long, default_value = "1", value_parser = crate::common::parse_version)]
    protocol: Version,
    /// Share of the gates that lose their link a quarter into the run, for --offline-for:
    /// they decide taps by the gateway's offline rules meanwhile and upload the ones they
    /// approved when the link is back (needs --protocol 2).
    #[arg(long, default_value_t = 0.0)]
    offline: f64,
    /// How long the offline gates' link is lost.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    offline_for: Duration,
    /// How many times the offline gates lose their link, each time after being back for
    /// --offline-for.
    #[arg(long, default_value_t = 1)]
    offline_spells: u32,
    /// Write the injected misuse here, one JSON object a line (rule, card, gates).
    #[arg(long, requires = "fraud_cards")]
    truth: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency and throughput charts (SVG) here.
    #[arg(long, default_value = "tapgate-load.svg")]
    chart: PathBuf,
}

#[derive(Args)]
pub(crate) struct LoadArgs {
    /// The gateway, HOST:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// DER certificate the gateway presents (or its CA).
    #[arg(long, default_value = "tapgate-state/dev-cert/cert.der")]
    cert: PathBuf,
    /// Master key of key version 1, 32 hex digits (the development key by default).
    #[arg(long, env = "TAPGATE_LOAD_MASTER_KEY", default_value = DEV_MASTER_KEY_HEX)]
    master_key: String,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Also run the same load against a bare QUIC echo server started in this process and
    /// report tapgate/echo.
    #[arg(long)]
    compare_echo: bool,
    /// The target is `tapgate echo` (the transport baseline), not a gateway.
    #[arg(long, conflicts_with = "compare_echo")]
    echo: bool,
    /// Raise the rate step by step (×1.25) from --rate until p99 exceeds --p99-bound-ms or
    /// answers fall behind; report the highest rate that held.
    #[arg(long)]
    find_max: bool,
    #[arg(long, default_value_t = 5.0)]
    p99_bound_ms: f64,
    /// The gateway's ops endpoint (`http://127.0.0.1:9433/metrics`): read before and after
    /// the run, after settlement catches up, to report the settlement lag of the run's taps.
    #[arg(long, default_value = "http://127.0.0.1:9433/metrics")]
    gateway_metrics: String,
    /// Do not read the gateway's ops endpoint.
    #[arg(long)]
    no_gateway_metrics: bool,
}

#[derive(Args)]
pub(crate) struct EchoArgs {
    /// Address to listen on (UDP).
    #[arg(long, default_value = "127.0.0.1:4434")]
    listen: SocketAddr,
    /// Where the development certificate is written (cert.der is what `load --cert` trusts).
    #[arg(long, default_value = "tapgate-state/echo-cert")]
    dev_cert_dir: PathBuf,
}

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// How long the simulated gates tap.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 200)]
    connections: usize,
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Share of the gates that lose their link once for --offline-for, ride offline and upload
    /// their taps when it is back (the gates then speak protocol version 2); the demo checks
    /// that every uploaded tap is in the journal once and settled once.
    #[arg(long, default_value_t = 0.0)]
    offline: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    offline_for: Duration,
}

impl WorkloadArgs {
    fn spec(
        &self,
        target: SocketAddr,
        kind: TargetKind,
        cert: Vec<u8>,
        key: MasterKey,
    ) -> LoadSpec {
        LoadSpec {
            target,
            target_kind: kind,
            trusted_cert: cert,
            master_key: key,
            key_version: 1,
            connections: self.connections,
            pacing: if self.closed_loop {
                Pacing::ClosedLoop
            } else {
                Pacing::OpenLoop { rate: self.rate }
            },
            duration: self.duration,
            population: PopulationSpec {
                seed: self.seed,
                cards: self.cards,
                terminals: self.terminals,
                ..PopulationSpec::default()
            },
            first_gate: self.first_gate,
            faults: Faults {
                bad_mac: self.bad_mac,
                replay: self.replay,
                resend: self.resend,
            },
            fraud_cards: self.fraud_cards,
            migrate: self.migrate,
            drop: self.drop,
            resumption: self.resumption,
            added_rtt: self.added_rtt.unwrap_or_default(),
            version: self.protocol,
            offline: self.offline,
            offline_for: self.offline_for,
            offline_spells: self.offline_spells,
            show_progress: true,
        }
    }

    fn write_outputs(&self, report: &Report) -> anyhow::Result<()> {
        write_file(&self.chart, &report.svg())?;
        println!("chart: {}", self.chart.display());
        if let Some(path) = &self.json {
            write_file(path, &report.json())?;
            println!("json: {}", path.display());
        }
        if let Some(path) = &self.truth {
            let lines: String = report
                .injected
                .iter()
                .map(|i| serde_json::to_string(i).expect("an injection serializes") + "\n")
                .collect();
            write_file(path, &lines)?;
            println!(
                "truth: {} injected misuses in {}; ordinary riders' taps beyond a day's {}: {}",
                report.injected.len(),
                path.display(),
                tapgate_loadgen::workload::RIDER_TAPS,
                report.riders_over_budget
            );
        }
        Ok(())
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub(crate) fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    crate::common::init_logging("warn");
    let cert =
        std::fs::read(&args.cert).map_err(|e| anyhow::anyhow!("{}: {e}", args.cert.display()))?;
    let key =
        MasterKey::from_hex(&args.master_key).map_err(|e| anyhow::anyhow!("--master-key: {e}"))?;
    runtime()?.block_on(async {
        let kind = if args.echo {
            TargetKind::Echo
        } else {
            TargetKind::Tapgate
        };
        if args.find_max {
            return find_max(&args, kind, cert, key).await;
        }
        let spec = args.workload.spec(args.target, kind, cert, key.clone());
        let metrics_url =
            (!args.no_gateway_metrics && !args.echo).then_some(args.gateway_metrics.as_str());
        let client = ops_client();
        let before = match metrics_url {
            Some(url) => scrape_settlement(&client, url).await,
            None => None,
        };
        let mut report = run(spec).await?;
        if let (Some(url), Some(before)) = (metrics_url, &before) {
            report.settlement = caught_up(&client, url)
                .await
                .and_then(|after| after.lag_since(before));
        }
        print!("{}", report.summary());
        args.workload.write_outputs(&report)?;
        if args.compare_echo {
            let echo = EchoServer::start("127.0.0.1:0".parse().expect("valid address"))?;
            let spec = args.workload.spec(
                echo.local_addr(),
                TargetKind::Echo,
                echo.certificate_der().to_vec(),
                key,
            );
            let baseline = run(spec).await?;
            echo.close();
            print!("\n{}", baseline.summary());
            println!(
                "\ntapgate / echo throughput: {:.1} %",
                100.0 * report.achieved_rate / baseline.achieved_rate.max(f64::MIN_POSITIVE)
            );
        }
        Ok(())
    })
}

async fn find_max(
    args: &LoadArgs,
    kind: TargetKind,
    cert: Vec<u8>,
    key: MasterKey,
) -> anyhow::Result<()> {
    let spec = args.workload.spec(args.target, kind, cert, key);
    let bound = Duration::from_secs_f64(args.p99_bound_ms.max(0.0) / 1000.0);
    let best = tapgate_loadgen::run::find_max(spec, args.workload.rate, bound, |step| {
        let report = &step.report;
        println!(
            "{:>9.0} taps/s: achieved {:.0}, p99 {:.2} ms, errors {}, busy {} -> {}",
            step.rate,
            report.achieved_rate,
            report.latency_us.p99 as f64 / 1000.0,
            report.errors,
            report.busy,
            if step.held { "held" } else { "did not hold" }
        );
    })
    .await?;
    match best {
        Some(step) => {
            println!(
                "\nhighest rate that held: {:.0} taps/s (p99 bound {} ms)\n",
                step.rate, args.p99_bound_ms
            );
            print!("{}", step.report.summary());
            args.workload.write_outputs(&step.report)
        }
        None => Err(anyhow::anyhow!(
            "even {:.0} taps/s did not hold; start lower with --rate",
            args.workload.rate
        )),
    }
}

/// `tapgate echo`: the transport baseline as a process of its own, so it can be measured with
/// the same process layout as a gateway.
pub(crate) fn run_echo(args: EchoArgs) -> anyhow::Result<()> {
    crate::common::init_logging("info");
    runtime()?.block_on(async {
        let tls = tapgate_transport::tls::TlsSource::Dev {
            dir: args.dev_cert_dir.clone(),
        };
        let echo = EchoServer::start_with(args.listen, &tls)?;
        println!(
            "echo baseline on {} (certificate {}); Ctrl-C stops it",
            echo.local_addr(),
            args.dev_cert_dir
                .join(tapgate_transport::tls::DEV_CERT_FILE)
                .display()
        );
        tokio::signal::ctrl_c().await?;
        echo.close();
        Ok(())
    })
}

impl DemoArgs {
    /// The demo's load: `connections` of the population's gates, at the demo's rate; version 2
    /// when some gates go offline.
    fn workload(
        &self,
        connections: usize,
        population: &PopulationSpec,
        dir: &Path,
    ) -> WorkloadArgs {
        WorkloadArgs {
            connections,
            rate: self.rate,
            closed_loop: false,
            duration: self.duration,
            seed: population.seed,
            cards: population.cards,
            terminals: population.terminals,
            first_gate: 0,
            bad_mac: 0.0,
            replay: 0.0,
            resend: 0.0,
            fraud_cards: 0,
            migrate: 0.0,
            drop: 0.0,
            resumption: Resumption::EarlyHello,
            added_rtt: None,
            protocol: if self.offline > 0.0 {
                Version::V2
            } else {
                Version::V1
            },
            offline: self.offline,
            offline_for: self.offline_for,
            offline_spells: 1,
            truth: None,
            json: Some(dir.join("report.json")),
            chart: dir.join("report.svg"),
        }
    }
}

pub(crate) fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    crate::common::init_logging("warn");
    let dir = tempfile::Builder::new()
        .prefix("tapgate-demo-")
        .tempdir()
        .map_err(|e| anyhow::anyhow!("creating the demo directory: {e}"))?
        .keep();
    let population = PopulationSpec::default();
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("valid address");
    config.server.dev_cert_dir = dir.join("dev-cert");
    config.journal.dir = dir.join("journal");
    config.directory.kind = DirectoryKind::Embedded;
    config.directory.embedded_cards = population.cards;
    config.directory.embedded_terminals = population.terminals;
    let connections = args.connections.min(population.terminals as usize);
    println!(
        "tapgate demo: an embedded gateway with {} cards and {} gates of Chongqing's 41 areas;\n{} simulated gates tap at {:.0} taps/s for {:.0} s over real QUIC on 127.0.0.1.\n",
        population.cards,
        population.terminals,
        connections,
        args.rate,
        args.duration.as_secs_f64()
    );
    runtime()?.block_on(async {
        let node = Node::start(&config).await?;
        let settlers = node
            .settlement
            .as_ref()
            .context("the demo configuration settles")?
            .settlers
            .clone();
        let workload = args.workload(connections, &population, &dir);
        let key = MasterKey::from_hex(DEV_MASTER_KEY_HEX).expect("valid development key");
        let spec = workload.spec(
            node.gateway.local_addr(),
            TargetKind::Tapgate,
            node.gateway.certificate_der().to_vec(),
            key,
        );
        let report = run(spec).await;
        let metrics = node.gateway.metrics().snapshot();
        let ledger_path = node.ledger_file().to_owned();
        let settling = std::time::Instant::now();
        // Stops the gateway, then lets settlement catch up and write the ledger.
        node.stop().await?;
        let mut report = report?;
        let caught_up = settling.elapsed();
        report.settlement = SettlementLag::from_buckets(
            &settlers.lag.cumulative(),
            settlers.lag.sum_ms.load(std::sync::atomic::Ordering::Relaxed),
        );
        print!("{}", report.summary());
        println!(
            "gateway: {} sessions, {} approved, {} denied, {} busy",
            metrics.sessions_authenticated, metrics.approved, metrics.denied, metrics.busy
        );
        workload.write_outputs(&report)?;
        let journal = dir.join("journal");
        println!("journal: {}", journal.display());
        println!(
            "settlement: approvals shipped to partition streams, priced and booked by the settler; caught up {:.1} s after the run",
            caught_up.as_secs_f64(),
        );
        let settled = crate::books::read_ledger_file(&ledger_path)?;
        let expected = crate::books::settle_dirs(
            &[journal.as_path()],
            &tapgate_settle::fares::FareTables::embedded_default(),
            &crate::books::ledger_file_pseudonyms(&ledger_path, None)?,
        )?;
        let reconciliation =
            tapgate_settle::ledger::Reconciliation::new(&expected.ledger, &settled);
        print!("{}", crate::books::reconcile_text(&reconciliation, 10));
        print_ledger_commands(&ledger_path, &journal, &settled);
        if !reconciliation.is_exact() {
            anyhow::bail!("settlement does not reconcile with the journal");
        }
        if !report.offline.is_empty() {
            check_offline_journaled(&journal, report.offline.recorded + report.offline.already)?;
        }
        Ok(())
    })
}

/// Every offline tap the gates were told the gateway holds (a receipt `recorded`, or `already`
/// when the first receipt was lost) is in the journal exactly once, and nothing else is (the
/// reconcile above settled every journaled approval once).
fn check_offline_journaled(journal: &Path, receipted: u64) -> anyhow::Result<()> {
    let mut taps = std::collections::HashMap::<(u64, u64), u64>::new();
    for segment in tapgate_journal::list_segments(journal)? {
        tapgate_journal::read_segment(&segment, |r| {
            if r.is_offline() {
                *taps.entry((r.terminal_id, r.tap.sequence)).or_default() += 1;
            }
        })?;
    }
    let twice = taps.values().filter(|n| **n > 1).count();
    println!(
        "offline: {receipted} uploads receipted as held by the gateway; the journal holds {} offline taps, {twice} of them more than once; each settled once (reconcile above)",
        taps.len()
    );
    if taps.len() as u64 != receipted || twice > 0 {
        anyhow::bail!(
            "the journal's offline taps are not the ones the gates were told were recorded"
        );
    }
    Ok(())
}

/// Where the demo's books are, and the commands that read them.
fn print_ledger_commands(
    ledger_path: &std::path::Path,
    journal: &std::path::Path,
    settled: &tapgate_settle::ledger::Ledger,
) {
    let total = settled.total();
    let day = settled
        .days
        .keys()
        .next_back()
        .map_or_else(String::new, ToString::to_string);
    println!(
        "ledger: {} ({} fares, {}.{:02} yuan)\n  report:    tapgate settle report --ledger {0}\n  statement: tapgate settle statement --ledger {0} --operator 2 --date {day}\n  reconcile: tapgate settle reconcile --ledger {0} --journal {}",
        ledger_path.display(),
        total.rides,
        total.fen / 100,
        total.fen % 100,
        journal.display()
    );
}
