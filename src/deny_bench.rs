//! `tapgate bench-deny`: how long a card reported lost takes to reach the deny list of every
//! connected version-2 gate. Every gate connects over real QUIC on 127.0.0.1 and takes the whole
//! list; then the tool reports cards lost one after another, as `tapgate cards lose` does, and
//! times each change from the report to the moment each gate applied it.
//!
//! By default an embedded gateway (the shipped population) and every gate share this process.
//! With `--gate-processes N` the gateway is a process of its own on a private redis-server
//! that holds the population, the gates are split over N processes of their own (hidden
//! subcommand `bench-deny-gates`, each with its own sockets and runtime), and the cards are
//! reported lost through Redis, the way an operator's report reaches a city's gateways. Times
//! cross processes as wall-clock microseconds of this one machine.

use crate::common::parse_duration;
use crate::servers::{PrivateRedis, Server, start};
use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tapgate_city::CardState;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::config::{Config, DEV_MASTER_KEY_HEX, DirectoryKind};
use tapgate_gateway::directory::Directory;
use tapgate_gateway::node::Node;
use tapgate_loadgen::client::{ClientError, GateClient, GateIdentity, client_endpoint};
use tapgate_loadgen::report::Percentiles;
use tapgate_protocol::{ErrorCode, Frame, GateDenyList, MasterKey, Version};
use tapgate_runtime::ops::process_usage;
use tapgate_transport::now_ms;
use tapgate_transport::tls::{GateTls, Resumption};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

#[derive(Args)]
pub(crate) struct DenyBenchArgs {
    /// Version-2 gates connected, each its own QUIC connection; the population gets as many
    /// gates.
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
    /// Run the gateway as a process of its own on a private redis-server (which must be
    /// installed), and split the gates over this many processes of their own; 0 runs an
    /// embedded gateway and every gate in this process.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
    gate_processes: u16,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One process's share of `bench-deny --gate-processes`: it connects its gates, prints a
/// [`GatesLine::Look`] line whenever their progress changes, and once its stdin closes, a
/// [`GatesLine::Log`] line, and exits.
#[derive(Args)]
pub(crate) struct DenyGatesArgs {
    /// The gateway's QUIC address.
    #[arg(long)]
    target: SocketAddr,
    /// The gateway's certificate (DER), trusted as it is.
    #[arg(long)]
    cert: PathBuf,
    /// Gates in the whole population, so every process derives the same gates.
    #[arg(long)]
    terminals: u64,
    /// The first of this process's gates, by index in the population.
    #[arg(long)]
    first: usize,
    /// This process's gates.
    #[arg(long)]
    count: usize,
}

/// Gates sharing one client socket.
const GATES_PER_SOCKET: usize = 2_500;
/// Handshakes in progress at once, in each process.
const CONNECTING: usize = 256;
/// How long the last gate may take to apply a change before the run calls it missing.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Times a gate says Hello again after the gateway refused it with `internal`, and the pause
/// before each.
const HELLO_RETRIES: usize = 5;
const HELLO_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long every gate may take to connect and hold the whole list.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize)]
struct DenyBenchReport {
    gates: usize,
    /// Processes the gates ran in; 0 when they shared this process with the gateway.
    gate_processes: u16,
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
    /// CPU the gateway's and the gates' processes used, when they run apart.
    cpu: Option<CpuUse>,
}

/// CPU in cores (CPU seconds per second), over a quiet second with every gate connected
/// and over the changes, from each report until the last gate applied the last.
#[derive(Debug, Serialize)]
struct CpuUse {
    gateway_quiet: f64,
    gates_quiet: f64,
    gateway_changes: f64,
    gates_changes: f64,
    /// The gateway's CPU per change above its quiet use, in milliseconds.
    gateway_ms_per_change: f64,
}

/// The gateway's and the gates' processes, to read their CPU.
struct Pids {
    gateway: u32,
    gates: Vec<u32>,
}

impl Pids {
    /// CPU used so far by the gateway and by the gates, and when it was read.
    fn cpu(&self) -> anyhow::Result<(Duration, Duration, Instant)> {
        let of = |pid: u32| {
            process_usage(Some(pid))
                .map(|usage| usage.cpu)
                .with_context(|| format!("reading the CPU of process {pid}"))
        };
        let mut gates = Duration::ZERO;
        for pid in &self.gates {
            gates += of(*pid)?;
        }
        Ok((of(self.gateway)?, gates, Instant::now()))
    }
}

/// CPU between two readings of [`Pids::cpu`], in cores.
fn cores(
    (gateway_before, gates_before, at_before): (Duration, Duration, Instant),
    (gateway_after, gates_after, at_after): (Duration, Duration, Instant),
) -> (f64, f64, Duration) {
    let wall = at_after.duration_since(at_before);
    let share = |cpu: Duration| cpu.as_secs_f64() / wall.as_secs_f64().max(f64::MIN_POSITIVE);
    (
        share(gateway_after.saturating_sub(gateway_before)),
        share(gates_after.saturating_sub(gates_before)),
        wall,
    )
}

pub(crate) fn run_deny_bench(args: DenyBenchArgs) -> anyhow::Result<()> {
    crate::common::init_logging("warn");
    anyhow::ensure!(args.gates > 0, "--gates must be at least 1");
    let population = PopulationSpec {
        terminals: args.gates as u64,
        ..PopulationSpec::default()
    };
    let report = crate::runtime()?.block_on(async {
        if args.gate_processes == 0 {
            measure_in_one_process(&args, &population).await
        } else {
            measure_apart(&args, &population).await
        }
    })?;
    print_report(&args, &report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(report.missing == 0, "some changes did not reach every gate");
    Ok(())
}

fn print_report(args: &DenyBenchArgs, report: &DenyBenchReport) {
    let arrangement = if report.gate_processes == 0 {
        "an embedded gateway and the gates in one process".to_owned()
    } else {
        format!(
            "a Redis gateway in its own process, the gates in {} processes",
            report.gate_processes
        )
    };
    println!(
        "{} version-2 gates ({arrangement}) · {} cards on the list at the start · whole list at every gate {} ms after the first connection",
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
    let each: Vec<String> = report
        .last_gate_each_ms
        .iter()
        .map(|ms| ms.map_or_else(|| "missing".to_owned(), |ms| ms.to_string()))
        .collect();
    println!("each change to its last gate, ms: {}", each.join(" · "));
    if let (Some(gateway), Some(gates)) = (report.dropped_at_gateway, report.dropped_at_gates) {
        println!(
            "datagrams the kernel dropped for a full receive buffer: {gateway} at the gateway's socket, {gates} at the gates'"
        );
    }
    if let Some(cpu) = &report.cpu {
        println!(
            "CPU in cores, quiet → during the changes: gateway {:.2} → {:.2}, gates {:.2} → {:.2}; the gateway's per change above quiet: {:.0} ms",
            cpu.gateway_quiet,
            cpu.gateway_changes,
            cpu.gates_quiet,
            cpu.gates_changes,
            cpu.gateway_ms_per_change
        );
    }
    if report.missing > 0 {
        println!(
            "MISSING: {} changes did not reach every gate within {REACH_TIMEOUT:?}",
            report.missing
        );
    }
}

/// The embedded gateway and every gate in this process.
async fn measure_in_one_process(
    args: &DenyBenchArgs,
    population: &PopulationSpec,
) -> anyhow::Result<DenyBenchReport> {
    let dir = tempfile::Builder::new()
        .prefix("tapgate-bench-deny-")
        .tempdir()
        .context("creating the bench directory")?;
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("valid address");
    config.server.dev_cert_dir = dir.path().join("dev-cert");
    config.journal.dir = dir.path().join("journal");
    config.directory.kind = DirectoryKind::Embedded;
    config.directory.embedded_cards = population.cards;
    config.directory.embedded_terminals = population.terminals;
    config.settlement.enabled = false;
    config.server.udp_buffer_bytes = args.udp_buffer_mib << 20;
    let node = Node::start(&config).await?;
    let gateway = &node.gateway;
    let started = unix_us();
    let gates = GateSet::connect(
        gateway.local_addr(),
        gateway.certificate_der(),
        population,
        0..args.gates,
    )?;
    let report = measure(
        args,
        gateway.directory(),
        population,
        Gates::Here(gates),
        gateway.local_addr().port(),
        started,
        None,
    )
    .await;
    node.stop().await?;
    report
}

/// A Redis gateway in its own process, the gates in `args.gate_processes` processes.
async fn measure_apart(
    args: &DenyBenchArgs,
    population: &PopulationSpec,
) -> anyhow::Result<DenyBenchReport> {
    let bin = std::env::current_exe().context("finding this program to start its processes")?;
    let redis = PrivateRedis::start(&bin, population)?;
    let server = Server::Redis {
        url: redis.url.clone(),
        gateways: 1,
        order_window_ms: None,
        udp_buffer_bytes: Some(args.udp_buffer_mib << 20),
    };
    let gateway = start(&server, &bin, population).await?;
    let dir = tempfile::Builder::new()
        .prefix("tapgate-bench-deny-")
        .tempdir()
        .context("creating the bench directory")?;
    let cert = dir.path().join("gateway.der");
    std::fs::write(&cert, &gateway.cert).context("writing the gateway's certificate")?;
    let directory = crate::common::RedisTarget {
        redis_url: redis.url.clone(),
        redis_tls_ca_file: None,
        key_prefix: "tapgate".to_owned(),
    }
    .directory(0)?;
    let started = unix_us();
    let processes = usize::from(args.gate_processes);
    let per_process = args.gates.div_ceil(processes);
    let mut children = Vec::with_capacity(processes);
    for first in (0..args.gates).step_by(per_process) {
        let count = per_process.min(args.gates - first);
        children.push(GateProcess::spawn(
            &bin,
            gateway.addr,
            &cert,
            population.terminals,
            first..first + count,
        )?);
    }
    let pids = Pids {
        gateway: gateway.pid(),
        gates: children.iter().filter_map(GateProcess::pid).collect(),
    };
    measure(
        args,
        &directory,
        population,
        Gates::Apart(children),
        gateway.addr.port(),
        started,
        Some(pids),
    )
    .await
}

/// Wall-clock microseconds since the Unix epoch: the one clock every process of a run shares.
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

/// What one gate saw: when it held the whole list, how many cards that list had, and when it
/// applied each later version (wall-clock microseconds).
#[derive(Debug, Serialize, Deserialize)]
struct GateLog {
    whole_at_us: Option<u64>,
    whole_cards: usize,
    applied: Vec<(u64, u64)>,
}

/// How far one process's gates are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Look {
    /// Gates holding a whole list.
    whole: usize,
    /// The lowest version any of them holds (0 while some gate holds none).
    lowest: u64,
}

/// A line a gate process prints, as JSON.
#[derive(Debug, Serialize, Deserialize)]
enum GatesLine {
    Look(Look),
    Log(GroupLog),
}

/// What one process's gates saw, and the datagrams the kernel dropped at their sockets.
#[derive(Debug, Default, Serialize, Deserialize)]
struct GroupLog {
    gates: Vec<GateLog>,
    dropped: Option<u64>,
}

/// Gates of this process following the deny list.
struct GateSet {
    tasks: JoinSet<Result<GateLog, ClientError>>,
    /// The gates' local UDP ports, for the kernel's drop counts.
    ports: Vec<u16>,
    progress: Arc<Progress>,
    stop: watch::Sender<bool>,
}

impl GateSet {
    /// Starts connecting the population's gates `range` to `target`; each follows the list
    /// until [`GateSet::finish`].
    fn connect(
        target: SocketAddr,
        cert: &[u8],
        population: &PopulationSpec,
        range: std::ops::Range<usize>,
    ) -> anyhow::Result<GateSet> {
        let tls = GateTls::new(cert, Resumption::Full, Version::V2)?.for_one_gate()?;
        let master = MasterKey::from_hex(DEV_MASTER_KEY_HEX).expect("valid development key");
        let endpoints = (0..range.len().div_ceil(GATES_PER_SOCKET))
            .map(|_| client_endpoint(cert, "127.0.0.1:0".parse().expect("valid address")))
            .collect::<Result<Vec<_>, _>>()?;
        let progress = Arc::new(Progress {
            whole: AtomicUsize::new(0),
            held: range.clone().map(|_| AtomicU64::new(0)).collect(),
        });
        let (stop, stopped) = watch::channel(false);
        let connecting = Arc::new(Semaphore::new(CONNECTING));
        let mut tasks = JoinSet::new();
        for (slot, index) in range.enumerate() {
            let terminal = population.terminal(index as u64);
            let identity = GateIdentity {
                terminal_id: terminal.terminal_id,
                key_version: 1,
                key: master.diversify(terminal.terminal_id),
                area: terminal.area,
                mode: terminal.mode,
                operator: terminal.operator,
            };
            let endpoint = endpoints[slot / GATES_PER_SOCKET].clone();
            let (tls, connecting, stopped) = (tls.clone(), connecting.clone(), stopped.clone());
            let progress = progress.clone();
            tasks.spawn(async move {
                let mut refused = 0;
                let client = loop {
                    let _turn = connecting.acquire().await;
                    let connected = GateClient::connect_with(
                        &endpoint,
                        Some(&tls),
                        target,
                        &identity,
                        rand::random(),
                        now_ms(),
                    )
                    .await;
                    match connected {
                        // The gateway could not look the gate up in time (a loaded machine):
                        // a gate connects again, as PROTOCOL.md section 4.5 says.
                        Err(ClientError::Refused(e))
                            if e.code == ErrorCode::Internal && refused < HELLO_RETRIES =>
                        {
                            refused += 1;
                            tokio::time::sleep(HELLO_RETRY_PAUSE).await;
                        }
                        connected => break connected?,
                    }
                };
                follow(client, &progress, slot, stopped).await
            });
        }
        let ports = endpoints
            .iter()
            .filter_map(|e| e.local_addr().ok().map(|a| a.port()))
            .collect();
        Ok(GateSet {
            tasks,
            ports,
            progress,
            stop,
        })
    }

    /// How far the gates are; an error once any gate has failed.
    fn look(&mut self) -> anyhow::Result<Look> {
        if let Some(ended) = self.tasks.try_join_next() {
            ended.context("a gate's task failed")??;
            anyhow::bail!("a gate stopped following the list before the run ended");
        }
        let progress = &self.progress;
        Ok(Look {
            whole: progress.whole.load(Ordering::Relaxed),
            lowest: progress
                .held
                .iter()
                .map(|held| held.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0),
        })
    }

    /// Stops the gates; what each saw, and the datagrams dropped at their sockets.
    async fn finish(mut self) -> anyhow::Result<GroupLog> {
        let dropped = udp_drops(&self.ports);
        let _ = self.stop.send(true);
        let mut gates = Vec::with_capacity(self.progress.held.len());
        while let Some(log) = self.tasks.join_next().await {
            gates.push(log.context("a gate's task failed")??);
        }
        Ok(GroupLog { gates, dropped })
    }
}

/// Where a [`GateSet`]'s gates report how far they are: how many hold a whole list, and the
/// version each holds (by its slot in the set).
struct Progress {
    whole: AtomicUsize,
    held: Vec<AtomicU64>,
}

/// A process of `tapgate bench-deny-gates`, killed if dropped before it finished.
struct GateProcess {
    child: tokio::process::Child,
    lines: mpsc::Receiver<GatesLine>,
    look: Look,
}

impl GateProcess {
    fn spawn(
        bin: &Path,
        target: SocketAddr,
        cert: &Path,
        terminals: u64,
        gates: std::ops::Range<usize>,
    ) -> anyhow::Result<GateProcess> {
        let mut child = tokio::process::Command::new(bin)
            .arg("bench-deny-gates")
            .arg("--target")
            .arg(target.to_string())
            .arg("--cert")
            .arg(cert)
            .args(["--terminals", &terminals.to_string()])
            .args(["--first", &gates.start.to_string()])
            .args(["--count", &gates.len().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} bench-deny-gates", bin.display()))?;
        let stdout = child.stdout.take().context("the gate process's stdout")?;
        // A process prints a look only when it changes, and one log at its end.
        let (sender, lines) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                match serde_json::from_str::<GatesLine>(&line) {
                    Ok(parsed) => {
                        if sender.send(parsed).await.is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("{line}"),
                }
            }
        });
        Ok(GateProcess {
            child,
            lines,
            look: Look {
                whole: 0,
                lowest: 0,
            },
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The process's latest look; an error once it has exited.
    fn look(&mut self) -> anyhow::Result<Look> {
        loop {
            match self.lines.try_recv() {
                Ok(GatesLine::Look(look)) => self.look = look,
                Ok(GatesLine::Log(_)) => anyhow::bail!("a gate process ended before told to"),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(self.look),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let status = self.child.try_wait()?;
                    anyhow::bail!("a gate process exited before the run ended ({status:?})");
                }
            }
        }
    }

    /// Closes the process's stdin, which stops its gates; what they saw.
    async fn finish(mut self) -> anyhow::Result<GroupLog> {
        drop(self.child.stdin.take());
        let log = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = self.lines.recv().await {
                if let GatesLine::Log(log) = line {
                    return Some(log);
                }
            }
            None
        })
        .await
        .context("a gate process did not report within 60 s")?
        .context("a gate process exited without its report")?;
        let status = self.child.wait().await?;
        anyhow::ensure!(status.success(), "a gate process ended with {status}");
        Ok(log)
    }
}

/// Where the gates run.
enum Gates {
    Here(GateSet),
    Apart(Vec<GateProcess>),
}

impl Gates {
    /// How far all the gates are.
    fn look(&mut self) -> anyhow::Result<Look> {
        match self {
            Gates::Here(set) => set.look(),
            Gates::Apart(processes) => {
                let mut all = Look {
                    whole: 0,
                    lowest: u64::MAX,
                };
                for process in processes {
                    let look = process.look()?;
                    all.whole += look.whole;
                    all.lowest = all.lowest.min(look.lowest);
                }
                Ok(all)
            }
        }
    }

    /// Polls until `done` holds of the look, or `within` has passed; the last look.
    async fn until(
        &mut self,
        within: Duration,
        done: impl Fn(Look) -> bool,
    ) -> anyhow::Result<Look> {
        let deadline = Instant::now() + within;
        loop {
            let look = self.look()?;
            if done(look) || Instant::now() >= deadline {
                return Ok(look);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> anyhow::Result<GroupLog> {
        match self {
            Gates::Here(set) => set.finish().await,
            Gates::Apart(processes) => {
                let mut all = GroupLog::default();
                for process in processes {
                    let log = process.finish().await?;
                    all.gates.extend(log.gates);
                    all.dropped = match (all.dropped, log.dropped) {
                        (Some(a), Some(b)) => Some(a + b),
                        (a, b) => a.or(b),
                    };
                }
                Ok(all)
            }
        }
    }
}

/// Waits for every gate to hold the whole list, reports cards lost through `directory`, and
/// times each to every gate.
async fn measure(
    args: &DenyBenchArgs,
    directory: &Directory,
    population: &PopulationSpec,
    mut gates: Gates,
    gateway_port: u16,
    started: u64,
    pids: Option<Pids>,
) -> anyhow::Result<DenyBenchReport> {
    let connected = gates
        .until(CONNECT_TIMEOUT, |look| look.whole == args.gates)
        .await?;
    anyhow::ensure!(
        connected.whole == args.gates,
        "{} of {} gates took the whole list within {} s",
        connected.whole,
        args.gates,
        CONNECT_TIMEOUT.as_secs()
    );
    let base = connected.lowest;
    let quiet = match &pids {
        Some(pids) => {
            let before = pids.cpu()?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((before, pids.cpu()?))
        }
        None => None,
    };
    // Active cards of the population, reported lost one by one.
    let changes_before = pids.as_ref().map(Pids::cpu).transpose()?;
    let mut reported = Vec::with_capacity(args.changes);
    let mut index = 0;
    while reported.len() < args.changes {
        let card = population.card(index);
        index += 1;
        if card.state != CardState::Active {
            continue;
        }
        let at = unix_us();
        directory
            .set_state(card.card_id, CardState::Lost)
            .await?
            .context("a card of the population is missing")?;
        reported.push(at);
        tokio::time::sleep(args.every).await;
    }
    let last_version = base + args.changes as u64;
    gates
        .until(REACH_TIMEOUT, |look| look.lowest >= last_version)
        .await?;
    let cpu = match (&pids, quiet, changes_before) {
        (Some(pids), Some((quiet_before, quiet_after)), Some(changes_before)) => {
            let (gateway_quiet, gates_quiet, _) = cores(quiet_before, quiet_after);
            let (gateway_changes, gates_changes, wall) = cores(changes_before, pids.cpu()?);
            Some(CpuUse {
                gateway_quiet,
                gates_quiet,
                gateway_changes,
                gates_changes,
                gateway_ms_per_change: (gateway_changes - gateway_quiet).max(0.0)
                    * wall.as_secs_f64()
                    * 1000.0
                    / args.changes.max(1) as f64,
            })
        }
        _ => None,
    };
    let dropped_at_gateway = udp_drops(&[gateway_port]);
    let log = gates.finish().await?;
    Ok(DenyBenchReport {
        dropped_at_gateway,
        dropped_at_gates: log.dropped,
        cpu,
        ..summarize(args, started, base, &reported, &log.gates)
    })
}

/// `tapgate bench-deny-gates`: one process's share of the gates.
pub(crate) fn run_deny_gates(args: DenyGatesArgs) -> anyhow::Result<()> {
    let cert =
        std::fs::read(&args.cert).with_context(|| format!("reading {}", args.cert.display()))?;
    let population = PopulationSpec {
        terminals: args.terminals,
        ..PopulationSpec::default()
    };
    // Stdin closing, when the driver is done or has died, is the signal to stop.
    let (closed, mut stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed.send(());
    });
    crate::runtime()?.block_on(async {
        let mut set = GateSet::connect(
            args.target,
            &cert,
            &population,
            args.first..args.first + args.count,
        )?;
        let mut printed = None;
        loop {
            let look = set.look()?;
            if printed != Some(look) {
                print_line(&GatesLine::Look(look))?;
                printed = Some(look);
            }
            tokio::select! {
                _ = &mut stdin_closed => break,
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        let log = set.finish().await?;
        print_line(&GatesLine::Log(log))
    })
}

/// One line to the driver; a few a second, so writing it blocking is fine.
fn print_line(line: &GatesLine) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, line)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
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

/// A gate that follows the deny list and does nothing else, until told to stop.
async fn follow(
    mut client: GateClient,
    progress: &Progress,
    slot: usize,
    mut stopped: watch::Receiver<bool>,
) -> Result<GateLog, ClientError> {
    let mut list = GateDenyList::default();
    let mut log = GateLog {
        whole_at_us: None,
        whole_cards: 0,
        applied: Vec::new(),
    };
    client.send_frame(&Frame::DenyAck(list.held())).await?;
    loop {
        let frame = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
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
            let now = unix_us();
            match frame {
                Frame::DenyList(_) => {
                    if log.whole_at_us.is_none() {
                        progress.whole.fetch_add(1, Ordering::Relaxed);
                    }
                    log.whole_at_us = Some(now);
                    log.whole_cards = list.len();
                }
                _ => log.applied.push((ack.version, now)),
            }
            progress.held[slot].store(ack.version, Ordering::Relaxed);
            client.send_frame(&Frame::DenyAck(ack)).await?;
        }
    }
    client.close();
    Ok(log)
}

fn summarize(
    args: &DenyBenchArgs,
    started_us: u64,
    base: u64,
    reported_us: &[u64],
    logs: &[GateLog],
) -> DenyBenchReport {
    let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let (mut last_gate, mut each_gate) = (histogram(), histogram());
    let mut missing = 0;
    let mut last_gate_each_ms = Vec::with_capacity(reported_us.len());
    for (i, at) in reported_us.iter().enumerate() {
        let version = base + 1 + i as u64;
        let mut last = Some(0);
        for log in logs {
            // A gate applies several changes at once when they come in one frame.
            let applied = log
                .applied
                .iter()
                .find(|(v, _)| *v >= version)
                .map(|(_, when)| when.saturating_sub(*at));
            match applied {
                Some(took_us) => {
                    let _ = each_gate.record(took_us.max(1));
                    last = last.map(|l: u64| l.max(took_us));
                }
                None => last = None,
            }
        }
        last_gate_each_ms.push(last.map(|took_us| took_us / 1000));
        match last {
            Some(took_us) => {
                let _ = last_gate.record(took_us.max(1));
            }
            None => missing += 1,
        }
    }
    let whole = logs
        .iter()
        .filter_map(|log| log.whole_at_us)
        .max()
        .map_or(0, |at| at.saturating_sub(started_us) / 1000);
    DenyBenchReport {
        gates: args.gates,
        gate_processes: args.gate_processes,
        changes: args.changes,
        cards_on_list: logs.iter().map(|log| log.whole_cards).max().unwrap_or(0),
        whole_list_all_gates_ms: whole,
        last_gate_us: Percentiles::of(&last_gate),
        last_gate_each_ms,
        each_gate_us: Percentiles::of(&each_gate),
        missing,
        dropped_at_gateway: None,
        dropped_at_gates: None,
        cpu: None,
        one_change_frame_bytes: tapgate_protocol::wire_len(
            tapgate_protocol::FrameType::DenyChanges,
        ) + tapgate_protocol::DENY_ENTRY_LEN,
    }
}
