//! `tapgate bench`: what tapgate adds per tap over bare QUIC, measured side by side. Each round
//! starts `tapgate echo` and then the gateway (`tapgate serve`: embedded, on a private Redis, or
//! two of them on a private Redis Cluster) as processes of their own, and drives both with the
//! same generator (this process): closed loop at a fixed number of gates, then the highest
//! open-loop rate each holds over many gates. The servers' CPU comes from `/proc/PID/stat`, so
//! it is theirs alone, not the generator's. After each gateway run the gateways are stopped and
//! their books reconciled with their journals.

use crate::books::{read_ledger_file, reconcile_text, settle_dirs};
use crate::common::parse_duration;
use crate::scrape::{caught_up_together, scrape_settlement};
use crate::servers::{PrivateRedis, Server, Started, start};
use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::config::{Config, DEV_MASTER_KEY_HEX};
use tapgate_loadgen::report::{Percentiles, Report};
use tapgate_loadgen::run::{LoadSpec, Pacing, TargetKind, find_max, run};
use tapgate_loadgen::workload::Faults;
use tapgate_protocol::MasterKey;
use tapgate_runtime::ops::process_usage;
use tapgate_settle::fares::FareTables;
use tapgate_settle::ledger::Reconciliation;
use tapgate_settle::store::{RedisStore, Store};
use tapgate_transport::tls::Resumption;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Rounds of closed-loop runs; each runs the echo, then the gateway.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of each closed-loop run: 15s, 1m.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    duration: Duration,
    /// Gates in the closed-loop runs.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Gates in the highest-rate search, run once for each server after the rounds; 0 skips it.
    #[arg(long, default_value_t = 4000)]
    find_max_connections: usize,
    /// Open-loop rate the search starts at; each step is 1.25 times the last.
    #[arg(long, default_value_t = 2000.0)]
    find_max_from: f64,
    /// Length of each step of the search.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    find_max_step: Duration,
    /// A step holds while its p99 stays under this (and nothing is refused or lost).
    #[arg(long, default_value_t = 5.0)]
    p99_bound_ms: f64,
    /// Gates in the embedded gateway's population (the shipped defaults' 20,000).
    #[arg(long, default_value_t = 20_000)]
    terminals: u64,
    /// Cards in the embedded gateway's population.
    #[arg(long, default_value_t = PopulationSpec::default().cards)]
    cards: u64,
    /// The tapgate binary whose `serve` and `echo` are measured; this one by default. Another
    /// build's binary compares two builds under one generator.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The gateway's configurations, in order: `embedded`; `redis`, one gateway on a private
    /// redis-server; `cluster`, two gateways on a private six-node Redis Cluster, the gates split
    /// between them (redis-server and redis-cli must be installed for the last two). The
    /// highest-rate search and the memory figures drive one gateway of the cluster.
    #[arg(long, value_delimiter = ',', default_value = "embedded,redis,cluster")]
    setups: Vec<Setup>,
    /// Connection counts at which to measure memory per nearly idle gate (one tap per gate
    /// every 10 s), for each server: e.g. `4000,20000`. None by default.
    #[arg(long, value_delimiter = ',')]
    idle_connections: Vec<usize>,
    /// A configuration file for the embedded gateway (`serve --config`), to measure settings
    /// other than the shipped defaults; the bench's own flags (listen, journal, population) win.
    #[arg(long)]
    gateway_config: Option<PathBuf>,
    /// The Redis gateways' settlers' order window (`[settlement] order_window_ms`); their
    /// default when absent. 0 prices taps as they arrive: what the window saves in fares, and
    /// costs in settlement lag, shows against a run with it.
    #[arg(long)]
    order_window_ms: Option<u64>,
    /// Where the results go as JSON.
    #[arg(long, default_value = "tapgate-bench.json")]
    json: PathBuf,
}

impl BenchArgs {
    /// The embedded gateway's cards and gates, which the generator's gates must be.
    fn population(&self) -> PopulationSpec {
        PopulationSpec {
            terminals: self.terminals,
            cards: self.cards,
            ..PopulationSpec::default()
        }
    }
}

/// One server's side of a closed-loop run.
#[derive(Debug, Clone, Serialize)]
struct Measured {
    taps_per_s: f64,
    answered: u64,
    errors: u64,
    busy: u64,
    p50_us: u64,
    p99_us: u64,
    /// The server's user and system CPU over the run, per answered tap.
    cpu_us_per_tap: f64,
    /// Approval-to-ledger p99 of the run's taps (the gateway, when it settles).
    #[serde(skip_serializing_if = "Option::is_none")]
    settlement_lag_p99_ms: Option<u64>,
    /// The gateway's books against its journals, once it has stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    exactness: Option<Exactness>,
}

/// What `tapgate settle reconcile` says of the gateways' books after a run.
#[derive(Debug, Clone, Serialize)]
struct Exactness {
    /// Every approved tap in the journals settled exactly once: none lost, none duplicated.
    taps_exact: bool,
    /// The books match the journals priced offline in time order, fare for fare.
    fares_exact: bool,
    /// Taps the settlers priced after a later tap of their card, over the run
    /// (`tapgate_settle_out_of_order_total`): they reached settlement out of time order and
    /// were priced in arrival order, which is what makes fares differ when taps are exact.
    out_of_order: u64,
    /// The same over every run whose taps the reconciled books hold (on Redis, the setup's
    /// earlier runs too): what may explain a fare difference.
    out_of_order_in_books: u64,
    /// Reconcile's summary line (taps in the journals and settled, lost, duplicated).
    summary: String,
}

impl Exactness {
    /// Whether the run counts as a failure: taps lost or doubled, or fares that differ with no
    /// tap priced out of order to explain them.
    fn failed(&self) -> bool {
        !self.taps_exact || (!self.fares_exact && self.out_of_order_in_books == 0)
    }

    fn describe(&self) -> String {
        match (self.taps_exact, self.fares_exact) {
            (true, true) => "books exact".to_owned(),
            (true, false) if self.out_of_order_in_books > 0 => format!(
                "taps exact, FARES DIFFER: {} taps priced out of time order ({} in this run)",
                self.out_of_order_in_books, self.out_of_order
            ),
            _ => format!("BOOKS NOT EXACT ({})", self.summary),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Round {
    echo: Measured,
    tapgate: Measured,
    rate_ratio: f64,
    cpu_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
struct HeldRate {
    echo_taps_per_s: Option<f64>,
    tapgate_taps_per_s: Option<f64>,
    ratio: Option<f64>,
}

/// One configuration of the gateway against the echo.
#[derive(Debug, Serialize)]
struct SetupResult {
    setup: String,
    rounds: Vec<Round>,
    median_rate_ratio: f64,
    median_cpu_ratio: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    find_max: Option<HeldRate>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    memory: Vec<IdleMemory>,
}

/// Resident memory per connected gate, each gate tapping once every 10 s.
#[derive(Debug, Clone, Serialize)]
struct IdleMemory {
    connections: usize,
    echo_kib_per_gate: f64,
    tapgate_kib_per_gate: f64,
}

#[derive(Debug, Serialize)]
struct BenchResult {
    date_unix_s: u64,
    machine: String,
    server_bin: String,
    connections: usize,
    duration_s: f64,
    setups: Vec<SetupResult>,
}

/// The gateway's configurations `bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Setup {
    /// The shipped defaults: the embedded directory, settlement in process.
    Embedded,
    /// A private redis-server holding the cards and gates, settlement through it.
    Redis,
    /// Two gateways on a private six-node Redis Cluster (three masters, three replicas), each
    /// settling beside itself, the generator's gates split between them.
    Cluster,
}

fn spec(
    started: &Started,
    server: &Server,
    gates: std::ops::Range<usize>,
    pacing: Pacing,
    duration: Duration,
    population: PopulationSpec,
) -> LoadSpec {
    LoadSpec {
        target: started.addr,
        target_kind: match server {
            Server::Echo => TargetKind::Echo,
            Server::Embedded(_) | Server::Redis { .. } => TargetKind::Tapgate,
        },
        trusted_cert: started.cert.clone(),
        master_key: MasterKey::from_hex(DEV_MASTER_KEY_HEX).expect("valid development key"),
        key_version: 1,
        connections: gates.len(),
        pacing,
        duration,
        population,
        first_gate: gates.start as u64,
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

/// The runs whose books a store still holds: on Redis every run of a setup settles into the same
/// books, so each reconciliation takes in the earlier runs' journals, and the taps they priced
/// out of order explain fare differences as much as this run's.
#[derive(Default)]
struct EarlierRuns {
    journals: Vec<tempfile::TempDir>,
    out_of_order: u64,
}

/// One closed-loop run, the gates split evenly over the server's processes (each process gets
/// its own range of gates). A gateway is then stopped and its books reconciled with its journal
/// and with `earlier` runs that shipped to the same store, which this run then joins.
async fn closed_loop(
    args: &BenchArgs,
    bin: &Path,
    server: &Server,
    earlier: &mut EarlierRuns,
) -> anyhow::Result<Measured> {
    let processes = server.processes();
    let mut servers = Vec::with_capacity(processes);
    for _ in 0..processes {
        servers.push(start(server, bin, &args.population()).await?);
    }
    let metrics: Vec<_> = servers
        .iter()
        .filter_map(|s| s.ops.as_ref())
        .map(|(client, base)| (client, format!("{base}/metrics")))
        .collect();
    let mut before_settlement = Vec::new();
    for (client, url) in &metrics {
        before_settlement.push(scrape_settlement(client, url).await);
    }
    let cpu = || -> anyhow::Result<Duration> {
        let mut total = Duration::ZERO;
        for s in &servers {
            total += process_usage(Some(s.pid()))
                .context("reading the server's CPU")?
                .cpu;
        }
        Ok(total)
    };
    let cpu_before = cpu()?;
    let mut runs = tokio::task::JoinSet::new();
    for (i, started) in servers.iter().enumerate() {
        let gates = args.connections * i / processes..args.connections * (i + 1) / processes;
        let spec = spec(
            started,
            server,
            gates,
            Pacing::ClosedLoop,
            args.duration,
            args.population(),
        );
        runs.spawn(run(spec));
    }
    let mut reports = Vec::with_capacity(processes);
    while let Some(report) = runs.join_next().await {
        reports.push(report??);
    }
    let cpu_after = cpu()?;
    let mut lag_p99_ms = None;
    let mut out_of_order = 0;
    let after_settlement = caught_up_together(&metrics).await;
    for (before, after) in before_settlement.iter().zip(after_settlement) {
        if let Some(before) = before
            && let Some(after) = after
        {
            lag_p99_ms = lag_p99_ms.max(after.lag_since(before).and_then(|l| l.p99_ms));
            out_of_order += after.out_of_order.saturating_sub(before.out_of_order);
        }
    }
    let mut measured = measured(&reports, cpu_after - cpu_before, lag_p99_ms);
    if matches!(server, Server::Echo) {
        return Ok(measured);
    }
    let mut dirs = Vec::with_capacity(processes);
    for started in servers {
        dirs.push(started.stop()?);
    }
    let mut exactness = reconcile(server, &dirs, &earlier.journals).await?;
    exactness.out_of_order = out_of_order;
    exactness.out_of_order_in_books = out_of_order + earlier.out_of_order;
    measured.exactness = Some(exactness);
    if matches!(server, Server::Redis { .. }) {
        earlier.journals.extend(dirs);
        earlier.out_of_order += out_of_order;
    }
    Ok(measured)
}

/// What `tapgate settle reconcile` computes, for stopped gateways (their working directories
/// `dirs`): their journals and `earlier` ones that shipped to the same store, priced offline,
/// against the ledger file when embedded or the store's books when on Redis.
async fn reconcile(
    server: &Server,
    dirs: &[tempfile::TempDir],
    earlier: &[tempfile::TempDir],
) -> anyhow::Result<Exactness> {
    let journals: Vec<PathBuf> = earlier
        .iter()
        .chain(dirs)
        .map(|dir| dir.path().join("journal"))
        .collect();
    let (settled, fares, cards) = match server {
        Server::Echo => anyhow::bail!("the echo keeps no books"),
        Server::Embedded(config) => {
            let [dir] = dirs else {
                anyhow::bail!("an embedded gateway keeps its books alone");
            };
            let fares = config
                .as_deref()
                .map(Config::load)
                .transpose()?
                .and_then(|c| c.settlement.fares);
            let ledger = dir.path().join("ledger.json");
            let cards = crate::books::ledger_file_pseudonyms(&ledger, None)?;
            (read_ledger_file(&ledger)?, fares, cards)
        }
        Server::Redis { url, .. } => {
            let store = RedisStore::connect(
                url,
                None,
                &Config::default().directory.key_prefix,
                Duration::from_secs(5),
            )?;
            let store = Store::Redis(store);
            let cards = store.card_pseudonyms().await?;
            (store.ledger(None, true).await?, None, cards)
        }
    };
    let tables = FareTables::load(fares.as_deref())?;
    let expected = tokio::task::spawn_blocking(move || {
        let dirs: Vec<&Path> = journals.iter().map(PathBuf::as_path).collect();
        settle_dirs(&dirs, &tables, &cards)
    })
    .await??;
    let reconciliation = Reconciliation::new(&expected.ledger, &settled);
    let text = reconcile_text(&reconciliation, 5);
    if !reconciliation.is_exact() {
        print!("{text}");
    }
    Ok(Exactness {
        taps_exact: reconciliation.lost == 0 && reconciliation.duplicated == 0,
        fares_exact: reconciliation.is_exact(),
        out_of_order: 0,
        out_of_order_in_books: 0,
        summary: text.lines().next().unwrap_or_default().to_owned(),
    })
}

/// One side of a run, from the generator's reports (one per serving process).
fn measured(reports: &[Report], cpu: Duration, lag_p99_ms: Option<u64>) -> Measured {
    let mut latency = reports[0].histogram.clone();
    for report in &reports[1..] {
        latency
            .add(&report.histogram)
            .expect("the generator's histograms share their bounds");
    }
    let latency = Percentiles::of(&latency);
    let answered = reports.iter().map(|r| r.answered).sum::<u64>();
    Measured {
        taps_per_s: reports.iter().map(|r| r.achieved_rate).sum(),
        answered,
        errors: reports.iter().map(|r| r.errors).sum(),
        busy: reports.iter().map(|r| r.busy).sum(),
        p50_us: latency.p50,
        p99_us: latency.p99,
        cpu_us_per_tap: cpu.as_secs_f64() * 1e6 / answered.max(1) as f64,
        settlement_lag_p99_ms: lag_p99_ms,
        exactness: None,
    }
}

/// The server's peak resident memory while `connections` gates are connected and nearly idle,
/// less what it held before they came, per gate, in KiB.
async fn memory_per_gate(
    args: &BenchArgs,
    bin: &Path,
    server: &Server,
    connections: usize,
) -> anyhow::Result<f64> {
    let started = start(server, bin, &args.population()).await?;
    let pid = started.pid();
    let before = process_usage(Some(pid))
        .context("reading the server's memory")?
        .resident_bytes;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(usage) = process_usage(Some(pid)) {
                    peak = peak.max(usage.resident_bytes);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        })
    };
    let report = run(spec(
        &started,
        server,
        0..connections,
        Pacing::OpenLoop {
            rate: connections as f64 / 10.0,
        },
        Duration::from_secs(15),
        args.population(),
    ))
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let report = report?;
    anyhow::ensure!(
        report.connected == connections,
        "only {} of {connections} gates connected to the {server}",
        report.connected
    );
    Ok(peak.saturating_sub(before) as f64 / 1024.0 / connections as f64)
}

async fn held_rate(args: &BenchArgs, bin: &Path, server: &Server) -> anyhow::Result<Option<f64>> {
    let started = start(server, bin, &args.population()).await?;
    let spec = spec(
        &started,
        server,
        0..args.find_max_connections,
        Pacing::OpenLoop {
            rate: args.find_max_from,
        },
        args.find_max_step,
        args.population(),
    );
    let bound = Duration::from_secs_f64(args.p99_bound_ms / 1000.0);
    let best = find_max(spec, args.find_max_from, bound, |step| {
        println!(
            "  {server:>16} {:>8.0} taps/s: achieved {:.0}, p99 {:.2} ms, errors {}, busy {} -> {}",
            step.rate,
            step.report.achieved_rate,
            step.report.latency_us.p99 as f64 / 1000.0,
            step.report.errors,
            step.report.busy,
            if step.held { "held" } else { "did not hold" }
        );
    })
    .await?;
    Ok(best.map(|step| step.rate))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} CPUs, {model}")
}

/// Every round and the search for one configuration of the gateway.
async fn measure(
    args: &BenchArgs,
    bin: &Path,
    setup: Setup,
    gateway: &Server,
) -> anyhow::Result<SetupResult> {
    let mut rounds = Vec::new();
    let mut earlier = EarlierRuns::default();
    for round in 1..=args.rounds {
        let echo = closed_loop(args, bin, &Server::Echo, &mut earlier).await?;
        let tapgate = closed_loop(args, bin, gateway, &mut earlier).await?;
        let measured = Round {
            rate_ratio: tapgate.taps_per_s / echo.taps_per_s.max(f64::MIN_POSITIVE),
            cpu_ratio: tapgate.cpu_us_per_tap / echo.cpu_us_per_tap.max(f64::MIN_POSITIVE),
            echo,
            tapgate,
        };
        print_round(round, &measured);
        rounds.push(measured);
    }
    let find_max = if args.find_max_connections > 0 {
        println!(
            "highest rate held over {} gates:",
            args.find_max_connections
        );
        let echo = held_rate(args, bin, &Server::Echo).await?;
        let tapgate = held_rate(args, bin, gateway).await?;
        let ratio = echo.zip(tapgate).map(|(e, t)| t / e);
        println!(
            "  echo {} taps/s, tapgate {} taps/s, ratio {}",
            show(echo, 0),
            show(tapgate, 0),
            show(ratio, 2)
        );
        Some(HeldRate {
            echo_taps_per_s: echo,
            tapgate_taps_per_s: tapgate,
            ratio,
        })
    } else {
        None
    };
    let mut memory = Vec::new();
    for &connections in &args.idle_connections {
        let echo = memory_per_gate(args, bin, &Server::Echo, connections).await?;
        let tapgate = memory_per_gate(args, bin, gateway, connections).await?;
        println!(
            "memory at {connections} nearly idle gates: echo {echo:.1} KiB a gate, tapgate {tapgate:.1} KiB a gate"
        );
        memory.push(IdleMemory {
            connections,
            echo_kib_per_gate: echo,
            tapgate_kib_per_gate: tapgate,
        });
    }
    let result = SetupResult {
        setup: format!("{setup:?}").to_lowercase(),
        memory,
        median_rate_ratio: median(rounds.iter().map(|r| r.rate_ratio).collect()),
        median_cpu_ratio: median(rounds.iter().map(|r| r.cpu_ratio).collect()),
        rounds,
        find_max,
    };
    if !result.rounds.is_empty() {
        println!(
            "median over the rounds: rate ratio {:.2}, CPU ratio {:.2}",
            result.median_rate_ratio, result.median_cpu_ratio
        );
    }
    Ok(result)
}

pub(crate) fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    crate::common::init_logging("warn");
    let mut args = args;
    // The servers run in directories of their own.
    if let Some(config) = &args.gateway_config {
        args.gateway_config = Some(
            std::fs::canonicalize(config)
                .with_context(|| format!("finding {}", config.display()))?,
        );
    }
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe().context("finding this binary")?,
    };
    println!(
        "tapgate bench: {} rounds of {} gates closed loop for {:.0} s, echo then gateway ({}), on {}",
        args.rounds,
        args.connections,
        args.duration.as_secs_f64(),
        bin.display(),
        machine()
    );
    crate::runtime()?.block_on(async {
        let mut setups = Vec::new();
        for setup in &args.setups {
            println!("\n{setup:?} gateway:");
            let result = match setup {
                Setup::Embedded => {
                    let server = Server::Embedded(args.gateway_config.clone());
                    measure(&args, &bin, *setup, &server).await?
                }
                Setup::Redis | Setup::Cluster => {
                    let (redis, gateways) = if *setup == Setup::Redis {
                        (PrivateRedis::start(&bin, &args.population())?, 1)
                    } else {
                        (PrivateRedis::start_cluster(&bin, &args.population())?, 2)
                    };
                    let url = redis.url.clone();
                    let server = Server::Redis {
                        url,
                        gateways,
                        order_window_ms: args.order_window_ms,
                        udp_buffer_bytes: None,
                    };
                    measure(&args, &bin, *setup, &server).await?
                }
            };
            setups.push(result);
        }
        let result = BenchResult {
            date_unix_s: tapgate_runtime::now_ms() / 1000,
            machine: machine(),
            server_bin: bin.display().to_string(),
            connections: args.connections,
            duration_s: args.duration.as_secs_f64(),
            setups,
        };
        let json = serde_json::to_string_pretty(&result).expect("the result serializes");
        std::fs::write(&args.json, json)
            .with_context(|| format!("writing {}", args.json.display()))?;
        println!("json: {}", args.json.display());
        let failed = result
            .setups
            .iter()
            .flat_map(|s| &s.rounds)
            .filter(|r| r.tapgate.exactness.as_ref().is_some_and(Exactness::failed))
            .count();
        anyhow::ensure!(
            failed == 0,
            "the books did not reconcile with the journals after {failed} runs"
        );
        Ok(())
    })
}

fn show(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "none held".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_round(round: usize, r: &Round) {
    let side = |name: &str, m: &Measured| {
        format!(
            "{name} {:>7.0} taps/s p50 {:>5} µs p99 {:>6} µs CPU {:>5.1} µs/tap{}{}",
            m.taps_per_s,
            m.p50_us,
            m.p99_us,
            m.cpu_us_per_tap,
            m.settlement_lag_p99_ms
                .map_or(String::new(), |lag| format!(" settlement lag p99 {lag} ms")),
            m.exactness
                .as_ref()
                .map_or(String::new(), |e| format!(", {}", e.describe()))
        )
    };
    println!(
        "round {round}: {} | {} | rate ratio {:.2}, CPU ratio {:.2}",
        side("echo", &r.echo),
        side("tapgate", &r.tapgate),
        r.rate_ratio,
        r.cpu_ratio
    );
}
