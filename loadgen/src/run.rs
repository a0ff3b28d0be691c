//! Running a load: connect the gates, pace taps, collect answers.
//!
//! Open loop: taps are due at fixed intended times (tap `k` at `start + k / rate`, handed to
//! gate `k mod connections`), whatever the answers do. Latency is measured from the intended
//! time, so a stalled gateway shows up as latency instead of silently slowing the generator
//! (no coordinated omission). Tokio's timer has a 1 ms resolution, too coarse at 20,000 taps/s,
//! so a dedicated pacing thread sleeps with the OS's high-resolution timer (`nanosleep`, about
//! 60 µs of slack here), wakes at least every 200 µs and releases every tap that has come due.
//! Closed loop: each gate sends its next tap when the previous one is answered.

use crate::client::{ClientError, EarlyHello, GateClient, GateIdentity, gate_endpoint, hello};
use crate::fraud::FraudPlan;
use crate::link::DelayedLink;
use crate::offline::{OfflineGate, Receipted, UploadWindows, merge_windows, upload_seconds};
use crate::report::{DenyFollowed, OfflineRidden, Percentiles, Reconnects, Report};
use crate::workload::{Action, Faults, GateWorkload};
use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tapgate_city::TerminalRecord;
use tapgate_city::population::PopulationSpec;
use tapgate_protocol::{
    ErrorCode, Frame, GateDenyList, MasterKey, OfflineReceipt, Outcome, Version,
};
use tapgate_transport::clock::sleep_until_some;
use tapgate_transport::now_ms;
use tapgate_transport::retry::Backoff;
use tapgate_transport::tls::{GateTls, Resumption};
use tokio::sync::{Semaphore, mpsc};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    OpenLoop { rate: f64 },
    ClosedLoop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Tapgate,
    /// The echo baseline: answers are the taps themselves, sent back.
    Echo,
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub target_kind: TargetKind,
    /// DER certificate the target presents (or its CA).
    pub trusted_cert: Vec<u8>,
    pub master_key: MasterKey,
    pub key_version: u8,
    pub connections: usize,
    pub pacing: Pacing,
    pub duration: Duration,
    /// Must be the population the gateway knows.
    pub population: PopulationSpec,
    /// Gates are the population's terminals from this index on, `connections` of them:
    /// generators driving several gateways at once take ranges that do not overlap.
    pub first_gate: u64,
    pub faults: Faults,
    /// Cards made to misbehave for each pattern of [`crate::fraud::Pattern`] (0: none). With
    /// any, ordinary riders ride from home gates with cards in good standing, so the report's
    /// `injected` is the whole truth about misuse in the run.
    pub fraud_cards: usize,
    /// Share of the gates that change address halfway through the run, as a bus validator does
    /// between cell towers: each gets a UDP socket of its own and moves it once, keeping its
    /// connection (QUIC migration).
    pub migrate: f64,
    /// Share of the gates that drop their connection once and reconnect, as a bus validator
    /// does after a tunnel, one after another through the middle half of the run; the report
    /// gives their reconnect times.
    pub drop: f64,
    /// How the gates reconnect: full handshake, resumed, or resumed with an early Hello.
    pub resumption: Resumption,
    /// Added to every round trip between the gates and the gateway (each datagram a gate sends
    /// is held back this long), to see on one machine what a cellular link's round trips cost.
    pub added_rtt: Duration,
    /// The newest protocol version the gates offer. With 2 they follow the deny list.
    pub version: Version,
    /// Share of the gates that lose their link a quarter into the run, for `offline_for`:
    /// they decide offline meanwhile and upload what they approved when the link is back
    /// (version 2, open loop).
    pub offline: f64,
    pub offline_for: Duration,
    /// How often those gates lose it: each spell after the first starts `offline_for` after
    /// the link came back from the one before.
    pub offline_spells: u32,
    pub show_progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no gate could connect; first failure: {0}")]
    NoneConnected(String),
    #[error("the population has {have} terminals; gates {first} to {last} are not among them")]
    NotEnoughTerminals { have: u64, first: u64, last: u64 },
    #[error("offline gates: {0}")]
    Offline(String),
}

/// Handshakes in progress at once while connecting the gates.
const CONNECT_CONCURRENCY: usize = 256;
/// Taps queued for one gate before the pacer counts it as behind.
const GATE_QUEUE: usize = 256;
/// First wait after a failed reconnection; failures in a row wait up to the ceiling.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_CEILING: Duration = Duration::from_secs(1);
/// How long one reconnection attempt may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long answers are awaited after the last tap was sent.
const DRAIN: Duration = Duration::from_secs(3);

/// Counters of one gate, merged at the end. Latencies go to the shared histograms instead: a
/// histogram per gate would cost hundreds of kilobytes times thousands of gates.
struct GateStats {
    sent: u64,
    /// Unanswered taps sent again after a reconnect.
    resent: u64,
    answered: u64,
    busy: u64,
    decisions: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// Injected misuse with taps this gate never sent: left out of the run's truth.
    unsent_injections: std::collections::BTreeSet<usize>,
    /// Ordinary riders' taps beyond what a person rides in a day.
    over_budget: u64,
    /// Gates moved to another address mid-run (0 or 1 per gate).
    moved: u64,
    /// Connections made again after a drop, a loss or a refusal.
    reconnected: u64,
    early_hellos_answered: u64,
    early_hellos_refused: u64,
    deny: DenyFollowed,
    offline: OfflineRidden,
    upload_windows: UploadWindows,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl GateStats {
    fn new() -> Self {
        Self {
            sent: 0,
            resent: 0,
            answered: 0,
            busy: 0,
            decisions: BTreeMap::new(),
            errors: BTreeMap::new(),
            unsent_injections: std::collections::BTreeSet::new(),
            over_budget: 0,
            moved: 0,
            reconnected: 0,
            early_hellos_answered: 0,
            early_hellos_refused: 0,
            deny: DenyFollowed::default(),
            offline: OfflineRidden::default(),
            upload_windows: Vec::new(),
        }
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }

    fn merge(&mut self, other: GateStats) {
        self.unsent_injections.extend(other.unsent_injections);
        self.over_budget += other.over_budget;
        self.moved += other.moved;
        self.reconnected += other.reconnected;
        self.early_hellos_answered += other.early_hellos_answered;
        self.early_hellos_refused += other.early_hellos_refused;
        self.deny.merge(&other.deny);
        self.offline.merge(&other.offline);
        merge_windows(&mut self.upload_windows, &other.upload_windows);
        self.sent += other.sent;
        self.resent += other.resent;
        self.answered += other.answered;
        self.busy += other.busy;
        for (k, v) in other.decisions {
            *self.decisions.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Refused(frame) => format!("refused_{}", frame.code),
        ClientError::ClosedByGateway { reason, .. } => format!("closed_{reason}"),
        ClientError::Connect(_) => "connect_failed".into(),
        ClientError::Connection(_) | ClientError::Closed => "connection_lost".into(),
        ClientError::BadMac => "answer_bad_mac".into(),
        ClientError::Decode(_) => "answer_undecodable".into(),
        ClientError::Unexpected(_) => "answer_unexpected".into(),
        ClientError::NonceMismatch => "hello_ack_nonce".into(),
        ClientError::Dropped => "dropped".into(),
    }
}

/// Latency histograms (from intended send, from actual send), sharded by gate so recording
/// rarely contends.
struct Latencies {
    shards: Vec<std::sync::Mutex<(Histogram<u64>, Histogram<u64>)>>,
}

const LATENCY_SHARDS: usize = 32;

impl Latencies {
    fn new() -> Self {
        Self {
            shards: (0..LATENCY_SHARDS)
                .map(|_| std::sync::Mutex::new((histogram(), histogram())))
                .collect(),
        }
    }

    fn record(&self, gate: u64, from_intended: Duration, from_send: Duration) {
        let mut shard = self.shards[(gate % LATENCY_SHARDS as u64) as usize]
            .lock()
            .expect("latency shard lock");
        let _ = shard.0.record(from_intended.as_micros().max(1) as u64);
        let _ = shard.1.record(from_send.as_micros().max(1) as u64);
    }

    fn merged(&self) -> (Histogram<u64>, Histogram<u64>) {
        let (mut intended, mut sent) = (histogram(), histogram());
        for shard in &self.shards {
            let shard = shard.lock().expect("latency shard lock");
            let _ = intended.add(&shard.0);
            let _ = sent.add(&shard.1);
        }
        (intended, sent)
    }
}

struct Shared {
    spec: LoadSpec,
    latencies: Latencies,
    endpoint: quinn::Endpoint,
    start: Instant,
    stop: AtomicBool,
    answered: AtomicU64,
    /// Answers in each tenth of a second from `start`: fine enough to show a stall of a few
    /// hundred milliseconds, which per-second counts smooth away.
    answered_per_tick: Box<[AtomicU64]>,
    /// From a gate's decision to reconnect to its HelloAck, in microseconds; rare enough for
    /// one lock.
    reconnect_times: std::sync::Mutex<Histogram<u64>>,
}

const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_SECOND: usize = 10;

/// Ticks in a span, a part tick counting whole.
fn ticks_in(span: Duration) -> usize {
    span.as_millis().div_ceil(TICK.as_millis()).max(1) as usize
}

/// One step of [`find_max`].
#[derive(Debug)]
pub struct Step {
    pub rate: f64,
    pub report: Report,
    pub held: bool,
}

/// Runs `spec` open loop at its rate, then at 1.25 times that, and so on, until a step's p99
/// passes `p99_bound`, it has errors or Busy answers, or its answers fall behind (under 95 % of
/// the rate). Every step is passed to `on_step` as it ends; returns the last step that held.
/// The target, its kind and the workload are the spec's: only the rate changes.
pub async fn find_max(
    spec: LoadSpec,
    start_rate: f64,
    p99_bound: Duration,
    mut on_step: impl FnMut(&Step),
) -> Result<Option<Step>, LoadError> {
    let mut rate = start_rate;
    let mut best = None;
    loop {
        let report = run(LoadSpec {
            pacing: Pacing::OpenLoop { rate },
            ..spec.clone()
        })
        .await?;
        let held = u128::from(report.latency_us.p99) <= p99_bound.as_micros()
            && report.errors == 0
            && report.busy == 0
            && report.achieved_rate >= 0.95 * rate;
        let step = Step { rate, report, held };
        on_step(&step);
        if !step.held {
            return Ok(best);
        }
        best = Some(step);
        rate *= 1.25;
    }
}

pub async fn run(spec: LoadSpec) -> Result<Report, LoadError> {
    let last_gate = spec.first_gate + spec.connections as u64;
    if spec.population.terminals < last_gate {
        return Err(LoadError::NotEnoughTerminals {
            have: spec.population.terminals,
            first: spec.first_gate,
            last: last_gate.saturating_sub(1),
        });
    }
    check_offline(&spec)?;
    let endpoint = gate_endpoint(&spec.trusted_cert, any_port(spec.target), spec.added_rtt)?;
    let tls = GateTls::new(&spec.trusted_cert, spec.resumption, spec.version)
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let ready = connected_gates(&spec, &tls, &endpoint).await?;
    let connected = ready.len();
    let connect_failures = (spec.connections - connected) as u64;

    let shared = Arc::new(Shared {
        start: Instant::now() + Duration::from_millis(50),
        spec: spec.clone(),
        latencies: Latencies::new(),
        endpoint,
        stop: AtomicBool::new(false),
        answered: AtomicU64::new(0),
        answered_per_tick: (0..ticks_in(spec.duration + DRAIN))
            .map(|_| AtomicU64::new(0))
            .collect(),
        reconnect_times: std::sync::Mutex::new(histogram()),
    });
    let progress = progress_bar(&shared);

    let mut plan = plan_fraud(&spec, &ready);
    let (mut tasks, queues) = spawn_gates(&shared, ready, plan.as_mut());
    let behind = match spec.pacing {
        Pacing::OpenLoop { rate } => {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || pace(&shared, rate, queues))
                .await
                .unwrap_or(0)
        }
        Pacing::ClosedLoop => {
            tokio::time::sleep_until((shared.start + spec.duration).into()).await;
            shared.stop.store(true, Ordering::SeqCst);
            0
        }
    };
    let mut total = GateStats::new();
    while let Some(result) = tasks.join_next().await {
        if let Ok(stats) = result {
            total.merge(stats);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if connect_failures > 0 {
        *total.errors.entry("connect_failed".into()).or_default() += connect_failures;
    }
    shared.endpoint.close(0u32.into(), b"done");
    let unsent = std::mem::take(&mut total.unsent_injections);
    let over_budget = total.over_budget;
    let moved = total.moved;
    let deny = std::mem::take(&mut total.deny);
    let mut offline = std::mem::take(&mut total.offline);
    if let Some(seconds) = upload_seconds(&total.upload_windows) {
        offline.upload_s = seconds;
        offline.upload_rate = offline.recorded as f64 / offline.upload_s.max(0.001);
    }
    let reconnects = Reconnects {
        reconnected: total.reconnected,
        early_hellos_answered: total.early_hellos_answered,
        early_hellos_refused: total.early_hellos_refused,
        time_us: shared
            .reconnect_times
            .lock()
            .map(|times| Percentiles::of(&times))
            .unwrap_or_default(),
    };
    let mut report = report(&shared, total, connected, behind);
    report.reconnects = reconnects;
    report.injected = plan.map_or_else(Vec::new, |plan| plan.sent(&unsent));
    report.riders_over_budget = over_budget;
    report.moved = moved;
    report.deny = deny;
    report.offline = offline;
    Ok(report)
}

/// Gates go offline a quarter into the run, and again after as long online as offline for
/// each further spell: they must be back from the last, with time to upload, before it ends;
/// and only version 2 has offline taps.
fn check_offline(spec: &LoadSpec) -> Result<(), LoadError> {
    if spec.offline <= 0.0 {
        return Ok(());
    }
    let fail = |why: String| Err(LoadError::Offline(why));
    if spec.version < Version::V2 {
        return fail("offline taps need protocol version 2 (--protocol 2)".into());
    }
    if spec.pacing == Pacing::ClosedLoop {
        return fail("a closed loop has no taps to decide offline; use an open loop".into());
    }
    if spec.offline_spells == 0 {
        return fail("offline gates lose their link at least once (--offline-spells 1)".into());
    }
    let spells = spec
        .offline_for
        .saturating_mul(spec.offline_spells.saturating_mul(2) - 1);
    if spec.duration.mul_f64(0.25) + spells > spec.duration.mul_f64(0.9) {
        return fail(format!(
            "a link lost a quarter into a {:?} run {} time(s) for {:?}, as long online between, is not back before 90 % of the run; run longer",
            spec.duration, spec.offline_spells, spec.offline_for
        ));
    }
    Ok(())
}

/// Starts every connected gate's task with its workload (home riders and scripted misuse when
/// there is a fraud plan; a move or a drop halfway through for the gates that do either); the
/// open-loop pacer's queues, one per gate.
fn spawn_gates(
    shared: &Arc<Shared>,
    ready: Vec<Connected>,
    mut plan: Option<&mut FraudPlan>,
) -> (tokio::task::JoinSet<GateStats>, Vec<mpsc::Sender<Instant>>) {
    let spec = &shared.spec;
    let connected = ready.len();
    let avoid = Arc::new(plan.as_ref().map(|p| p.cards.clone()).unwrap_or_default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut queues = Vec::with_capacity(connected);
    for (position, gate) in ready.into_iter().enumerate() {
        let terminal = gate.terminal;
        let mut workload = GateWorkload::new(
            spec.population.seed,
            &spec.population,
            terminal,
            spec.faults,
        );
        if let Some(plan) = plan.as_deref_mut() {
            workload = workload.with_home_riders(
                position as u64,
                connected as u64,
                avoid.clone(),
                plan.take_script(terminal.terminal_id),
            );
            if plan.broken.contains(&terminal.terminal_id) {
                // Broken halfway through: the reader's earlier windows show its usual share.
                workload = workload.broken_from(now_ms() + spec.duration.as_millis() as u64 / 2);
            }
        }
        let gate = Gate::new(shared.clone(), gate, workload);
        match spec.pacing {
            Pacing::OpenLoop { .. } => {
                let (tx, rx) = mpsc::channel(GATE_QUEUE);
                queues.push(tx);
                tasks.spawn(drive_open_loop(gate, rx));
            }
            Pacing::ClosedLoop => {
                tasks.spawn(drive_closed_loop(gate));
            }
        }
    }
    (tasks, queues)
}

/// The misuse to inject, when the spec asks for any, planned onto the gates that connected.
fn plan_fraud(spec: &LoadSpec, ready: &[Connected]) -> Option<FraudPlan> {
    (spec.fraud_cards > 0).then(|| {
        let terminals: Vec<TerminalRecord> = ready.iter().map(|gate| gate.terminal).collect();
        FraudPlan::new(
            spec.population.seed,
            &spec.population,
            &terminals,
            spec.fraud_cards,
        )
    })
}

/// Any local port, of the target's address family.
fn any_port(target: SocketAddr) -> SocketAddr {
    if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("valid bind address")
}

/// A gate that completed its handshake.
struct Connected {
    terminal: TerminalRecord,
    identity: GateIdentity,
    client: GateClient,
    /// The gate's own TLS configuration, with its own memory of tickets.
    tls: quinn::ClientConfig,
    /// The socket of its own a gate that moves halfway through the run has.
    own_endpoint: Option<quinn::Endpoint>,
    /// When it drops its connection and reconnects, as a share of the run.
    drops_at: Option<f64>,
    /// Whether it loses its link for a while and rides offline.
    goes_offline: bool,
}

/// The gates that connected; an error only when none did.
async fn connected_gates(
    spec: &LoadSpec,
    tls: &GateTls,
    endpoint: &quinn::Endpoint,
) -> Result<Vec<Connected>, LoadError> {
    let connect_started = Instant::now();
    let mut first_failure = None;
    let mut ready = Vec::new();
    for gate in connect_all(spec, tls, endpoint).await {
        match gate {
            Ok(gate) => ready.push(gate),
            Err(e) => {
                first_failure.get_or_insert(e.to_string());
            }
        }
    }
    if ready.is_empty() {
        return Err(LoadError::NoneConnected(first_failure.unwrap_or_default()));
    }
    tracing::info!(
        gates = ready.len(),
        elapsed_ms = connect_started.elapsed().as_millis() as u64,
        "gates connected"
    );
    Ok(ready)
}

/// The run's figures, from every gate's merged counters and the shared recorders.
fn report(shared: &Shared, total: GateStats, connected: usize, behind: u64) -> Report {
    let spec = &shared.spec;
    let (from_intended, from_send) = shared.latencies.merged();
    let duration_s = spec.duration.as_secs_f64();
    let per_tick: Vec<u64> = shared.answered_per_tick[..ticks_in(spec.duration)]
        .iter()
        .map(|count| count.load(Ordering::Relaxed))
        .collect();
    Report {
        target: match spec.target_kind {
            TargetKind::Tapgate => "tapgate".into(),
            TargetKind::Echo => "echo".into(),
        },
        connections: spec.connections,
        connected,
        closed_loop: spec.pacing == Pacing::ClosedLoop,
        target_rate: match spec.pacing {
            Pacing::OpenLoop { rate } => rate,
            Pacing::ClosedLoop => 0.0,
        },
        achieved_rate: total.answered as f64 / duration_s,
        duration_s,
        sent: total.sent,
        resent: total.resent,
        answered: total.answered,
        errors: total.errors.values().sum(),
        busy: total.busy,
        behind,
        latency_us: Percentiles::of(&from_intended),
        latency_from_send_us: Percentiles::of(&from_send),
        decisions: total.decisions,
        error_kinds: total.errors,
        throughput_per_s: per_tick
            .chunks(TICKS_PER_SECOND)
            .map(|second| second.iter().sum())
            .collect(),
        throughput_per_100ms: per_tick,
        settlement: None,
        injected: Vec::new(),
        riders_over_budget: 0,
        moved: 0,
        reconnects: Reconnects::default(),
        deny: DenyFollowed::default(),
        offline: OfflineRidden::default(),
        histogram: from_intended,
    }
}

fn progress_bar(shared: &Arc<Shared>) -> Option<ProgressBar> {
    if !shared.spec.show_progress {
        return None;
    }
    let bar = ProgressBar::new(shared.spec.duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} s  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let shared = shared.clone();
    let ticker = bar.clone();
    tokio::spawn(async move {
        let mut last = 0;
        while !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let elapsed = shared.start.elapsed();
            let answered = shared.answered.load(Ordering::Relaxed);
            ticker.set_position(elapsed.as_secs().min(shared.spec.duration.as_secs()));
            ticker.set_message(format!(
                "{answered} answered, {} taps/s",
                (answered - last) * 2
            ));
            last = answered;
        }
    });
    Some(bar)
}

async fn connect_all(
    spec: &LoadSpec,
    tls: &GateTls,
    endpoint: &quinn::Endpoint,
) -> Vec<Result<Connected, ClientError>> {
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    let share = |of: f64| (of.clamp(0.0, 1.0) * spec.connections as f64).round() as usize;
    let moving = share(spec.migrate);
    // The gates that drop are the last ones, so a run that also moves gates keeps them apart.
    // Their drops are spread over the middle half of the run, one after another, as tunnels
    // spread them over a day: each reconnect is timed on its own, not in a crowd.
    let dropping = share(spec.drop);
    let dropping_from = spec.connections - dropping;
    // The gates that go offline are the ones before those, as far as there are any.
    let offline_from = dropping_from.saturating_sub(share(spec.offline));
    for i in 0..spec.connections {
        let terminal = spec.population.terminal(spec.first_gate + i as u64);
        let identity = GateIdentity {
            terminal_id: terminal.terminal_id,
            key_version: spec.key_version,
            key: spec.master_key.diversify(terminal.terminal_id),
            area: terminal.area,
            mode: terminal.mode,
            operator: terminal.operator,
        };
        // A gate that moves has a socket of its own, so moving it moves no other gate.
        let own_endpoint = (i < moving)
            .then(|| gate_endpoint(&spec.trusted_cert, any_port(spec.target), spec.added_rtt).ok())
            .flatten();
        let gate_tls = match tls.for_one_gate() {
            Ok(gate_tls) => gate_tls,
            Err(e) => {
                set.spawn(async move { (i, Err(ClientError::Connect(e.to_string()))) });
                continue;
            }
        };
        let (endpoint, limit, target, kind) = (
            own_endpoint.clone().unwrap_or_else(|| endpoint.clone()),
            limit.clone(),
            spec.target,
            spec.target_kind,
        );
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore never closes");
            let client = connect(&endpoint, &gate_tls, target, kind, &identity).await;
            let gate = client.map(|client| Connected {
                terminal,
                identity,
                client,
                tls: gate_tls,
                own_endpoint,
                drops_at: (i >= dropping_from)
                    .then(|| 0.25 + 0.5 * (i - dropping_from) as f64 / dropping as f64),
                goes_offline: (offline_from..dropping_from).contains(&i),
            });
            (i, gate)
        });
    }
    let mut gates: Vec<_> = set.join_all().await;
    gates.sort_by_key(|(i, _)| *i);
    gates.into_iter().map(|(_, gate)| gate).collect()
}

async fn connect(
    endpoint: &quinn::Endpoint,
    tls: &quinn::ClientConfig,
    target: SocketAddr,
    kind: TargetKind,
    identity: &GateIdentity,
) -> Result<GateClient, ClientError> {
    // Random, so no two connections of a gate share one (section 4.1), whenever they start.
    let nonce: u64 = rand::random();
    match kind {
        TargetKind::Tapgate => {
            GateClient::connect_with(endpoint, Some(tls), target, identity, nonce, now_ms()).await
        }
        TargetKind::Echo => {
            let mut gate = GateClient::open(endpoint, target, identity).await?;
            gate.send_frame(&hello(identity, nonce, now_ms())).await?;
            gate.recv().await?;
            Ok(gate)
        }
    }
}

/// The pacing thread: hands each due tap's intended time to its gate. Returns how many taps
/// could not be handed over because the gate's queue was full.
fn pace(shared: &Shared, rate: f64, queues: Vec<mpsc::Sender<Instant>>) -> u64 {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    // Exactly this many taps are due in the run, however late the thread wakes.
    let total = (shared.spec.duration.as_secs_f64() * rate).ceil() as u64;
    let mut behind = 0;
    let mut k: u64 = 0;
    while k < total {
        let now = Instant::now();
        let due = if now < shared.start {
            0
        } else {
            (((now - shared.start).as_secs_f64() * rate) as u64 + 1).min(total)
        };
        while k < due {
            let intended = shared.start + interval.mul_f64(k as f64);
            if queues[(k % queues.len() as u64) as usize]
                .try_send(intended)
                .is_err()
            {
                behind += 1;
            }
            k += 1;
        }
        let next = shared.start + interval.mul_f64(k as f64);
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_micros(200));
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
    // Close the run at its nominal end, even if the last tap was due earlier.
    let end = shared.start + shared.spec.duration;
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    shared.stop.store(true, Ordering::SeqCst);
    behind
}

/// One gate's sending and receiving state, shared by both pacing modes.
struct Gate {
    shared: Arc<Shared>,
    identity: GateIdentity,
    client: GateClient,
    tls: quinn::ClientConfig,
    workload: GateWorkload,
    /// The socket of its own a moving gate has (kept for the connection's life), and when it
    /// moves, until it has.
    own_endpoint: Option<quinn::Endpoint>,
    moves_at: Option<Instant>,
    /// When a dropping gate drops its connection, until it has.
    drops_at: Option<Instant>,
    next_sequence: u64,
    last_frame: Option<Bytes>,
    last_answered: bool,
    in_flight: HashMap<u64, InFlight>,
    stats: GateStats,
    /// The gate's deny list, kept across its connections; `None` for a version-1 gate.
    deny: Option<GateDenyList>,
    /// For a gate that loses its link: its offline riding.
    offline: Option<OfflineGate>,
}

/// A tap sent and not yet answered, kept as sent so it can be resent byte for byte on the next
/// connection if this one ends first.
struct InFlight {
    intended: Instant,
    sent: Instant,
    /// Shared with `last_frame`: cloning it costs a reference count, not a copy.
    frame: Bytes,
}

impl Gate {
    fn new(shared: Arc<Shared>, gate: Connected, workload: GateWorkload) -> Self {
        let halfway = shared.start + shared.spec.duration / 2;
        Self {
            next_sequence: gate.client.ack.last_sequence + 1,
            identity: gate.identity,
            client: gate.client,
            tls: gate.tls,
            workload,
            moves_at: gate.own_endpoint.as_ref().map(|_| halfway),
            own_endpoint: gate.own_endpoint,
            drops_at: gate
                .drops_at
                .map(|share| shared.start + shared.spec.duration.mul_f64(share)),
            last_frame: None,
            last_answered: false,
            in_flight: HashMap::new(),
            stats: GateStats::new(),
            deny: None,
            offline: gate.goes_offline.then(|| {
                OfflineGate::new(
                    shared.start + shared.spec.duration / 4,
                    shared.spec.offline_for,
                    shared.spec.offline_spells,
                )
            }),
            shared,
        }
    }

    /// On a version-2 connection, tells the gateway which deny list the gate holds,
    /// so the gateway goes on from there (the whole list for a new gate).
    async fn follow_deny_list(&mut self) -> Result<(), ClientError> {
        if self.client.version() < Version::V2 {
            return Ok(());
        }
        let held = self.deny.get_or_insert_with(GateDenyList::default).held();
        self.client.send_frame(&Frame::DenyAck(held)).await
    }

    /// A frame from the gateway: deny-list frames are applied and acknowledged, answers
    /// recorded.
    async fn take(&mut self, frame: Frame) -> Result<(), ClientError> {
        if let Some(offline) = &mut self.offline {
            offline.heard(now_ms());
        }
        match frame {
            // Gates that never lose their link have no use for the rules.
            Frame::OfflineRules(rules) => {
                if let Some(offline) = &mut self.offline {
                    offline.set_rules(rules);
                }
                return Ok(());
            }
            Frame::OfflineReceipt(receipt) => {
                self.take_receipt(&receipt);
                return Ok(());
            }
            _ => {}
        }
        let Some(applied) = self.deny.as_mut().and_then(|list| list.apply(&frame)) else {
            self.record(frame);
            return Ok(());
        };
        match &frame {
            Frame::DenyList(part) => {
                self.stats.deny.list_parts += 1;
                self.stats.deny.whole_lists += u64::from(part.last);
            }
            _ => self.stats.deny.changes_frames += 1,
        }
        match applied {
            Ok(Some(ack)) => self.client.send_frame(&Frame::DenyAck(ack)).await,
            Ok(None) => Ok(()),
            Err(out_of_step) => {
                self.stats.error("deny_list_out_of_step");
                Err(ClientError::Connection(out_of_step.to_string()))
            }
        }
    }

    /// The gate's deny list as it ends the run.
    fn deny_followed(&mut self) {
        if let Some(list) = &self.deny {
            let d = &mut self.stats.deny;
            d.gates = 1;
            d.lowest_version = list.version();
            d.highest_version = list.version();
            d.cards = list.len() as u64;
        }
    }

    /// Moves a moving gate to a new local port once its time has come, as a bus validator's
    /// address changes between cell towers; its connection is meant to carry on.
    fn move_if_due(&mut self) {
        let (Some(at), Some(endpoint)) = (self.moves_at, &self.own_endpoint) else {
            return;
        };
        if Instant::now() < at {
            return;
        }
        self.moves_at = None;
        let added_rtt = self.shared.spec.added_rtt;
        let moved = endpoint
            .local_addr()
            .and_then(|was| std::net::UdpSocket::bind(SocketAddr::new(was.ip(), 0)))
            .and_then(|socket| {
                if added_rtt.is_zero() {
                    endpoint.rebind(socket)
                } else {
                    endpoint.rebind_abstract(DelayedLink::wrap(socket, added_rtt)?)
                }
            });
        match moved {
            Ok(()) => self.stats.moved += 1,
            Err(_) => self.stats.error("move_failed"),
        }
    }

    fn take_receipt(&mut self, receipt: &OfflineReceipt) {
        self.in_flight.remove(&receipt.sequence);
        let Some(offline) = &mut self.offline else {
            self.stats.error("unexpected_offline_receipt");
            return;
        };
        match offline.receipt(receipt, self.next_sequence, Instant::now()) {
            Receipted::NoSuchUpload => self.stats.error("receipt_for_unknown_sequence"),
            Receipted::KeptAgain => self.next_sequence += 1,
            Receipted::Held => {}
        }
    }

    /// Whether the gate's link is down now (it loses it here when its time has come, closing
    /// its connection: a dead link answers nothing).
    fn link_down(&mut self) -> bool {
        let Some(offline) = &mut self.offline else {
            return false;
        };
        if offline.loses_link(Instant::now()) {
            self.client.connection.close(0u32.into(), b"link lost");
        }
        offline.is_down()
    }

    /// Decides the workload's next tap without a link, by the offline rules.
    fn tap_offline(&mut self) {
        let sequence = self.next_sequence;
        // Faults and resends need a link: offline, the gate only taps.
        let Action::Tap(tap) = self.workload.next(sequence, now_ms(), false) else {
            return;
        };
        let list = self.deny.get_or_insert_with(GateDenyList::default);
        let offline = self
            .offline
            .as_mut()
            .expect("only an offline gate taps offline");
        if offline.decide(tap, self.identity.mode, list) {
            self.next_sequence += 1;
        }
    }

    /// The lost link is back: reconnect, resend what was unanswered; uploads follow.
    async fn come_back(&mut self) -> bool {
        if let Some(offline) = &mut self.offline {
            offline.link_back(Instant::now());
        }
        self.recover(&ClientError::Dropped).await
    }

    /// Uploads the next kept offline tap, kept as sent so a lost connection resends it.
    async fn upload_next(&mut self) -> Result<(), ClientError> {
        let now = Instant::now();
        let Some(upload) = self.offline.as_mut().and_then(|o| o.next_upload(now)) else {
            return Ok(());
        };
        let frame = self.client.sealed(&Frame::OfflineTap(upload)).freeze();
        self.in_flight.insert(
            upload.tap.sequence,
            InFlight {
                intended: now,
                sent: now,
                frame: frame.clone(),
            },
        );
        self.client.send_raw(&frame).await
    }

    /// Whether kept offline taps wait to be uploaded; new taps wait for them.
    fn uploads_waiting(&self) -> bool {
        self.offline.as_ref().is_some_and(OfflineGate::has_kept)
    }

    /// Sends the workload's next action. Returns whether a TapResult is expected (a fault gets
    /// an Error instead, an offline tap nothing).
    async fn send_next(&mut self, intended: Instant) -> Result<bool, ClientError> {
        self.move_if_due();
        self.drop_if_due()?;
        if self.link_down() {
            self.tap_offline();
            return Ok(false);
        }
        let sequence = self.next_sequence;
        let action = self.workload.next(
            sequence,
            now_ms(),
            self.last_frame.is_some() && self.last_answered,
        );
        let (bytes, answered_sequence) = match action {
            Action::Tap(tap) => {
                self.next_sequence += 1;
                (
                    self.client.sealed(&Frame::Tap(tap)).freeze(),
                    Some(sequence),
                )
            }
            Action::Resend => {
                let bytes = self.last_frame.clone().expect("resend only after a frame");
                let sequence = tapgate_protocol::decode_one(&bytes)
                    .ok()
                    .and_then(|f| f.sequence());
                (bytes, sequence)
            }
            Action::BadMac(tap) => {
                self.next_sequence += 1;
                let mut bytes = self.client.sealed(&Frame::Tap(tap));
                let last = bytes.len() - 1;
                bytes[last] ^= 0x01;
                (bytes.freeze(), None)
            }
            Action::Replay(tap) => (self.client.sealed(&Frame::Tap(tap)).freeze(), None),
        };
        let sent_at = Instant::now();
        // Recorded before the write: if the write fails the tap may still have reached the
        // gateway, so it is resent on the next connection like any other unanswered tap.
        if let Some(sequence) = answered_sequence {
            self.in_flight.insert(
                sequence,
                InFlight {
                    intended,
                    sent: sent_at,
                    frame: bytes.clone(),
                },
            );
            if !matches!(action, Action::Resend) {
                self.last_frame = Some(bytes.clone());
                self.last_answered = false;
            }
        }
        self.client.send_raw(&bytes).await?;
        self.stats.sent += 1;
        Ok(answered_sequence.is_some())
    }

    /// Whether the gateway's `max_in_flight` lets another tap go out now. The echo baseline
    /// announces no bound (its HelloAck is not parsed), so it gets none.
    fn may_send(&self) -> bool {
        let bound = usize::from(self.client.ack.max_in_flight);
        bound == 0 || self.in_flight.len() < bound
    }

    fn record(&mut self, frame: Frame) {
        let (sequence, decision) = match frame {
            Frame::TapResult(r) => {
                if r.outcome == Outcome::Busy {
                    self.stats.busy += 1;
                }
                (r.sequence, r.reason.label())
            }
            // The echo baseline returns the tap itself.
            Frame::Tap(t) => (t.sequence, "echo"),
            other => {
                self.stats
                    .error(&format!("unexpected_{}", other.frame_type()));
                return;
            }
        };
        let Some(InFlight { intended, sent, .. }) = self.in_flight.remove(&sequence) else {
            self.stats.error("answer_for_unknown_sequence");
            return;
        };
        let now = Instant::now();
        self.shared.latencies.record(
            self.identity.terminal_id,
            now.saturating_duration_since(intended),
            now.saturating_duration_since(sent),
        );
        self.stats.answered += 1;
        *self.stats.decisions.entry(decision.to_owned()).or_default() += 1;
        let tick = (now.saturating_duration_since(self.shared.start).as_millis() / TICK.as_millis())
            as usize;
        if let Some(count) = self.shared.answered_per_tick.get(tick) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.last_answered = true;
        self.shared.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// After a refusal or a lost connection: count it, reconnect, and resend every tap the old
    /// connection left unanswered, byte for byte (PROTOCOL.md section 6 makes that safe: a tap
    /// the gateway decided is answered from its window, one it never saw is decided now).
    async fn recover(&mut self, error: &ClientError) -> bool {
        if !matches!(error, ClientError::Dropped) {
            self.stats.error(&error_kind(error));
        }
        // A tap refused as a replay or a conflict would be refused again on every resend.
        if let ClientError::Refused(refusal) = error
            && matches!(
                refusal.code,
                ErrorCode::Replay | ErrorCode::SequenceConflict
            )
            && self.in_flight.remove(&refusal.sequence).is_some()
        {
            self.stats.error("unanswered");
        }
        self.last_frame = None;
        // A handshake with a gateway that is gone waits for QUIC's idle timeout; none is
        // worth waiting for past the end of the run.
        let run_end = tokio::time::Instant::from_std(self.shared.start + self.shared.spec.duration);
        // Jittered, so thousands of gates refused at once do not all come back at once.
        let mut retry = Backoff::new(RECONNECT_FIRST, RECONNECT_CEILING);
        let began = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let reconnected = tokio::time::timeout_at(
                run_end.min(tokio::time::Instant::now() + RECONNECT_TIMEOUT),
                connect(
                    // A gate with a socket of its own reconnects from it.
                    self.own_endpoint.as_ref().unwrap_or(&self.shared.endpoint),
                    &self.tls,
                    self.shared.spec.target,
                    self.shared.spec.target_kind,
                    &self.identity,
                ),
            )
            .await
            .unwrap_or_else(|_| Err(ClientError::Connect("handshake timed out".into())));
            let outcome = match reconnected {
                Ok(client) => {
                    self.count_reconnect(began.elapsed(), client.early_hello);
                    self.next_sequence = self.next_sequence.max(client.ack.last_sequence + 1);
                    self.client = client;
                    match self.follow_deny_list().await {
                        Ok(()) => self.resend_unanswered().await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => return true,
                Err(e) => {
                    self.stats.error(&error_kind(&e));
                    retry.wait().await;
                }
            }
        }
        if !self.in_flight.is_empty() {
            *self.stats.errors.entry("unanswered".into()).or_default() +=
                self.in_flight.len() as u64;
            self.in_flight.clear();
        }
        false
    }

    fn count_reconnect(&mut self, took: Duration, early: EarlyHello) {
        self.stats.reconnected += 1;
        match early {
            EarlyHello::NotSent => {}
            EarlyHello::Answered => self.stats.early_hellos_answered += 1,
            EarlyHello::Refused => self.stats.early_hellos_refused += 1,
        }
        if let Ok(mut times) = self.shared.reconnect_times.lock() {
            let _ = times.record((took.as_micros() as u64).max(1));
        }
    }

    /// Drops a dropping gate's connection once its time has come; the gate then reconnects as
    /// after any lost connection.
    fn drop_if_due(&mut self) -> Result<(), ClientError> {
        match self.drops_at {
            Some(at) if Instant::now() >= at => {
                self.drops_at = None;
                self.client.connection.close(0u32.into(), b"dropped");
                Err(ClientError::Dropped)
            }
            _ => Ok(()),
        }
    }

    async fn resend_unanswered(&mut self) -> Result<(), ClientError> {
        let mut owed: Vec<_> = self
            .in_flight
            .iter()
            .map(|(sequence, tap)| (*sequence, tap.frame.clone()))
            .collect();
        owed.sort_unstable_by_key(|(sequence, _)| *sequence);
        for (_, frame) in owed {
            self.client.send_raw(&frame).await?;
            self.stats.sent += 1;
            self.stats.resent += 1;
        }
        Ok(())
    }

    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.client.recv()).await {
                Ok(Ok(frame)) => {
                    if self.take(frame).await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        if !self.in_flight.is_empty() {
            *self.stats.errors.entry("unanswered".into()).or_default() +=
                self.in_flight.len() as u64;
        }
        self.client.close();
        self.deny_followed();
        if let Some(offline) = &mut self.offline {
            offline.finish();
            self.stats.offline = std::mem::take(&mut offline.ridden);
            self.stats.upload_windows = std::mem::take(&mut offline.upload_windows);
        }
    }
}

async fn drive_open_loop(mut gate: Gate, mut due: mpsc::Receiver<Instant>) -> GateStats {
    if let Err(e) = gate.follow_deny_list().await
        && !gate.recover(&e).await
    {
        return gate.stats;
    }
    loop {
        let back_at = gate.offline.as_ref().and_then(OfflineGate::back_at);
        let uploads_waiting = gate.uploads_waiting();
        // Offline, nothing is in flight that a tap could wait for.
        let may_tap = (back_at.is_some() || gate.may_send()) && !uploads_waiting;
        tokio::select! {
            biased;
            answer = gate.client.receiver.recv(), if back_at.is_none() => {
                let taken = match answer {
                    Ok(frame) => gate.take(frame).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = taken
                    && !gate.recover(&e).await
                {
                    break;
                }
            },
            () = sleep_until_some(back_at.map(Into::into)), if back_at.is_some() => {
                if !gate.come_back().await {
                    break;
                }
            }
            () = std::future::ready(()), if uploads_waiting && gate.may_send() => {
                if let Err(e) = gate.upload_next().await
                    && !gate.recover(&e).await
                {
                    break;
                }
            }
            intended = due.recv(), if may_tap => {
                let Some(intended) = intended else { break };
                if let Err(e) = gate.send_next(intended).await
                    && !gate.recover(&e).await
                {
                    break;
                }
            }
        }
    }
    gate.drain().await;
    let unsent: Vec<usize> = gate.workload.unsent_injections().collect();
    gate.stats.unsent_injections.extend(unsent);
    gate.stats.over_budget = gate.workload.over_budget();
    gate.stats
}

async fn drive_closed_loop(mut gate: Gate) -> GateStats {
    let shared = gate.shared.clone();
    tokio::time::sleep_until(shared.start.into()).await;
    if let Err(e) = gate.follow_deny_list().await
        && !gate.recover(&e).await
    {
        return gate.stats;
    }
    while !shared.stop.load(Ordering::Relaxed) {
        // Taps resent after a reconnect are answered before the next one goes out. A fault
        // expects the gateway's Error instead of an answer; either way, read next.
        let sent = if gate.in_flight.is_empty() {
            gate.send_next(Instant::now()).await.map(|_| ())
        } else {
            Ok(())
        };
        let result = match sent {
            Ok(()) => match gate.client.recv().await {
                Ok(frame) => gate.take(frame).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = result
            && !gate.recover(&e).await
        {
            break;
        }
    }
    gate.drain().await;
    let unsent: Vec<usize> = gate.workload.unsent_injections().collect();
    gate.stats.unsent_injections.extend(unsent);
    gate.stats.over_budget = gate.workload.over_budget();
    gate.stats
}
