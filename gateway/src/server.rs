//! The QUIC endpoint and gate sessions: everything between a UDP socket and the authorization
//! core. Implements PROTOCOL.md sections 1, 4, 6 and 7.

use crate::cache::CardCache;
use crate::card::CardPseudonymizer;
use crate::decide::{Decision, GatePlace, with_ride_claim};
use crate::directory::{
    ChangeEvent, Directory, DirectoryError, RideClaim, TerminalChange, TerminalRecord,
};
use crate::metrics::{Metrics, PlaceSlot};
use crate::policy::Policy;
use crate::session::{self, Provisioning, TapStep};
use crate::terminal::TerminalState;
use bytes::BytesMut;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapgate_journal::{Durable, Journal, JournalRecord, JournalSettings, JournalWriter};
use tapgate_protocol::{
    ErrorCode, ErrorFrame, Frame, FrameType, KeyRing, MacKey, Outcome, RIDES_LEFT_NOT_APPLICABLE,
    Reason, SealedFrame, Tag, Tap, TapResult,
};
use tapgate_runtime::health::{Panics, PartHealth, supervise};
use tapgate_runtime::now_ms;
use tapgate_runtime::retry::Backoff;
use tapgate_transport::tls::{self, TlsSource};
use tapgate_transport::{
    EndpointError, FrameReader, ReadError, TransportSettings, finish_when_acknowledged,
    server_endpoint,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// Limits and timers of the endpoint.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// Taps a gate may have unanswered; more are answered Busy.
    pub max_in_flight: u16,
    pub resend_window: u16,
    pub hello_timeout: Duration,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Requested size of the UDP socket's receive and send buffers.
    pub udp_buffer_bytes: usize,
    /// Longest a resend waits for the answer of its still-undecided first copy.
    pub resend_wait: Duration,
}

impl Limits {
    pub fn transport(&self) -> TransportSettings {
        TransportSettings {
            idle_timeout: self.idle_timeout,
            keep_alive: self.keep_alive,
            udp_buffer_bytes: self.udp_buffer_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_in_flight: 32,
            resend_window: 32,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(15),
            udp_buffer_bytes: 8 << 20,
            resend_wait: Duration::from_secs(5),
        }
    }
}

/// Everything needed to start a gateway.
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub tls: TlsSource,
    pub keys: KeyRing,
    pub limits: Limits,
    pub policy: Policy,
    pub journal: JournalSettings,
    pub directory: Directory,
    pub negative_ttl_ms: u64,
    pub cache_capacity: usize,
    pub log_salt: [u8; 16],
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Journal(#[from] tapgate_journal::JournalError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// Counted rides given while the directory was unreachable, waiting to be taken from it.
const RIDE_UPDATE_QUEUE: usize = 65_536;
/// Pause between attempts to take a ride given while the directory was away.
/// First wait before taking a counted ride again from an unreachable directory; waits grow
/// to `RIDE_UPDATE_CEILING`.
const RIDE_UPDATE_RETRY: Duration = Duration::from_millis(250);
const RIDE_UPDATE_CEILING: Duration = Duration::from_secs(2);

struct Shared {
    keys: KeyRing,
    limits: Limits,
    policy: RwLock<Arc<Policy>>,
    directory: Directory,
    cache: Arc<CardCache>,
    journal: Journal,
    terminals: DashMap<u64, Arc<TerminalState>>,
    provisioned: DashMap<u64, TerminalRecord>,
    metrics: Arc<Metrics>,
    pseudonyms: CardPseudonymizer,
    ride_updates: mpsc::Sender<u64>,
    /// Where decisions go to be shared with the other gateways; `None` when there are none
    /// (the embedded directory).
    decisions: Option<mpsc::Sender<SharedDecision>>,
    /// The gateway's background tasks (change feed, shared answers, counted rides): dead when
    /// one panicked.
    tasks: Arc<PartHealth>,
    panics: Arc<Panics>,
    shutdown: watch::Receiver<bool>,
}

/// A decided tap on its way to the other gateways, and who waits for it to get there.
type SharedDecision = (JournalRecord, oneshot::Sender<()>);
/// Decisions waiting to be shared; more are answered unshared.
const DECISION_QUEUE: usize = 65_536;
/// Decisions shared per round trip.
const DECISION_BATCH: usize = 1024;
/// After sharing failed, how long decisions are answered without trying (Redis is away).
const DECISION_RETRY: Duration = Duration::from_secs(1);

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
    journal_writer: JournalWriter,
    certificate: Vec<u8>,
}

/// The journal opened, its writer, and the terminals its answers were restored to.
type RecoveredJournal = (Journal, JournalWriter, DashMap<u64, Arc<TerminalState>>);

/// Opens the journal, and fills each terminal's resend window from the answers it holds, so a
/// gate resending after a restart gets the answer it was owed.
fn recover_journal(
    settings: &JournalSettings,
    window: u16,
) -> Result<RecoveredJournal, StartError> {
    let terminals: DashMap<u64, Arc<TerminalState>> = DashMap::new();
    let mut recovered = 0u64;
    let (journal, writer) = Journal::open(settings, |record| {
        recovered += 1;
        terminals
            .entry(record.terminal_id)
            .or_insert_with(|| TerminalState::new(window))
            .window
            .lock()
            .expect("window lock")
            .restore(record.tap.sequence, record.tag, record.result);
    })?;
    tracing::info!(
        records = recovered,
        terminals = terminals.len(),
        "journal recovered"
    );
    Ok((journal, writer, terminals))
}

impl Gateway {
    /// Recovers the journal, binds the socket and starts accepting gates.
    pub async fn start(settings: GatewaySettings) -> Result<Gateway, StartError> {
        let GatewaySettings {
            listen,
            tls: tls_source,
            keys,
            limits,
            policy,
            journal: journal_settings,
            directory,
            negative_ttl_ms,
            cache_capacity,
            log_salt,
        } = settings;

        let (journal, journal_writer, terminals) =
            recover_journal(&journal_settings, limits.resend_window)?;

        let (chain, key) = tls::load(&tls_source)?;
        let certificate = chain.first().map(|c| c.to_vec()).unwrap_or_default();
        let endpoint = server_endpoint(listen, chain, key, &limits.transport())?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| EndpointError::Socket {
                addr: listen,
                source,
            })?;

        let cache = Arc::new(CardCache::new(
            directory.clone(),
            negative_ttl_ms,
            cache_capacity,
        ));
        let changes = directory.follow_changes().await;

        let tasks = Arc::new(PartHealth::default());
        let panics = Arc::new(Panics::default());
        let (ride_updates, ride_rx) = mpsc::channel(RIDE_UPDATE_QUEUE);
        supervise(
            "counted rides",
            tasks.clone(),
            panics.clone(),
            apply_ride_updates(directory.clone(), ride_rx),
        );
        let metrics = Arc::new(Metrics::default());
        let decisions = directory.shares_decisions().then(|| {
            let (tx, rx) = mpsc::channel(DECISION_QUEUE);
            supervise(
                "shared answers",
                tasks.clone(),
                panics.clone(),
                share_decisions(
                    directory.clone(),
                    rx,
                    2 * limits.resend_window,
                    metrics.clone(),
                ),
            );
            tx
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            keys,
            limits,
            policy: RwLock::new(Arc::new(policy)),
            directory,
            cache,
            journal,
            terminals,
            provisioned: DashMap::new(),
            metrics,
            pseudonyms: CardPseudonymizer::new(log_salt),
            ride_updates,
            decisions,
            tasks: tasks.clone(),
            panics: panics.clone(),
            shutdown: shutdown_rx,
        });
        supervise(
            "change feed",
            tasks,
            panics,
            apply_changes(Arc::downgrade(&shared), changes),
        );
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tracing::info!(%local_addr, "gateway listening");
        Ok(Gateway {
            shared,
            endpoint,
            local_addr,
            shutdown,
            accept_task,
            journal_writer,
            certificate,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The DER certificate the gateway presents (for clients trusting a development certificate).
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The gateway's background tasks, for readiness: dead when one panicked.
    pub fn tasks_health(&self) -> &Arc<PartHealth> {
        &self.shared.tasks
    }

    pub fn panics(&self) -> &Arc<Panics> {
        &self.shared.panics
    }

    pub fn directory(&self) -> &Directory {
        &self.shared.directory
    }

    pub fn cache(&self) -> &Arc<CardCache> {
        &self.shared.cache
    }

    pub fn journal(&self) -> &Journal {
        &self.shared.journal
    }

    /// Replaces the policy; taps decided from now on use the new one.
    pub fn set_policy(&self, policy: Policy) {
        *self.shared.policy.write().expect("policy lock") = Arc::new(policy);
    }

    /// Stops accepting, lets every session answer what it has decided, tells the gates
    /// `shutting_down`, flushes the journal and closes the endpoint.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new connections, finishing sessions");
        self.endpoint.set_server_config(None);
        let _ = self.shutdown.send(true);
        if let Err(e) = self.accept_task.await {
            tracing::error!(error = %e, "accept loop failed");
        }
        let Gateway {
            shared,
            endpoint,
            journal_writer,
            ..
        } = self;
        drop(shared);
        // The writer thread ends once the last journal handle (held by sessions) is gone.
        let joined = tokio::task::spawn_blocking(move || journal_writer.join());
        if tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .is_err()
        {
            tracing::error!("journal writer did not finish within 10 s");
        }
        endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::ShuttingDown.code().into()),
            b"shutting_down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tracing::info!("gateway stopped");
    }
}

/// Applies the directory's change feed until it ends or the gateway is gone: cards to the
/// cache, gates to the provisioning this gateway has cached and to their open sessions.
async fn apply_changes(shared: std::sync::Weak<Shared>, mut changes: mpsc::Receiver<ChangeEvent>) {
    while let Some(event) = changes.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            ChangeEvent::TerminalChanged(TerminalChange {
                terminal_id,
                record: Some(record),
            }) => {
                // Open sessions keep the place they said Hello with; the next Hello gets this.
                shared.provisioned.insert(terminal_id, record);
                if let Some(state) = shared.terminals.get(&terminal_id) {
                    state.revoked.store(false, Ordering::SeqCst);
                }
            }
            ChangeEvent::TerminalChanged(TerminalChange {
                terminal_id,
                record: None,
            }) => {
                shared.provisioned.remove(&terminal_id);
                // Marked even for a gate this gateway has not seen, so a Hello that looked the
                // gate up just before the revocation is still refused.
                let state = shared
                    .terminals
                    .entry(terminal_id)
                    .or_insert_with(|| TerminalState::new(shared.limits.resend_window))
                    .clone();
                state.revoked.store(true, Ordering::SeqCst);
                state.revocation.notify_waiters();
                tracing::info!(terminal = terminal_id, "gate revoked");
            }
            ChangeEvent::Resync => {
                shared.provisioned.clear();
                shared.cache.resync();
            }
            ChangeEvent::Changed(change) => shared.cache.apply(change, now_ms()),
        }
    }
}

/// Shares decided taps with the other gateways in batches, each decision's waiter released once
/// it is in Redis. While Redis fails, decisions are released unshared (and counted) rather than
/// held: a gate is answered whatever happens to Redis.
async fn share_decisions(
    directory: Directory,
    mut rx: mpsc::Receiver<SharedDecision>,
    slots: u16,
    metrics: Arc<Metrics>,
) {
    let mut batch: Vec<SharedDecision> = Vec::with_capacity(DECISION_BATCH);
    let mut failing_until: Option<tokio::time::Instant> = None;
    while rx.recv_many(&mut batch, DECISION_BATCH).await > 0 {
        let skip = failing_until.is_some_and(|t| tokio::time::Instant::now() < t);
        if !skip {
            let records: Vec<JournalRecord> = batch.iter().map(|(r, _)| *r).collect();
            match directory.share_decisions(&records, slots).await {
                Ok(()) => {
                    if failing_until.take().is_some() {
                        tracing::info!("decisions are shared with the other gateways again");
                    }
                }
                Err(e) => {
                    if failing_until.is_none() {
                        tracing::warn!(error = %e, "cannot share decisions with the other gateways; answering without until Redis is back");
                    }
                    failing_until = Some(tokio::time::Instant::now() + DECISION_RETRY);
                }
            }
        }
        if failing_until.is_some() {
            metrics
                .decisions_unshared
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        for (_, done) in batch.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Takes, once the directory is reachable again, the counted rides given while it was not.
async fn apply_ride_updates(directory: Directory, mut rx: mpsc::Receiver<u64>) {
    let mut retry = Backoff::new(RIDE_UPDATE_RETRY, RIDE_UPDATE_CEILING);
    while let Some(card_id) = rx.recv().await {
        loop {
            match directory.take_counted_ride(card_id).await {
                Ok(_) => {
                    retry.reset();
                    break;
                }
                // The ride was taken (not replicated is about card changes, which this is not),
                // or the record is unreadable, which the cache logged and counted.
                Err(DirectoryError::Malformed { .. } | DirectoryError::NotReplicated { .. }) => {
                    break;
                }
                Err(DirectoryError::Unavailable(_)) => retry.wait().await,
            }
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        // Reap finished sessions so the set does not grow with the connection count over a day.
        while sessions.try_join_next().is_some() {}
        shared
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        sessions.spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            let active = shared
                .metrics
                .connections_active
                .fetch_add(1, Ordering::Relaxed);
            if active as usize >= shared.limits.max_connections {
                shared
                    .metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                shared.metrics.count_error(ErrorCode::TooManyConnections);
                connection.close(
                    quinn::VarInt::from_u32(ErrorCode::TooManyConnections.code().into()),
                    ErrorCode::TooManyConnections.label().as_bytes(),
                );
            } else {
                Session::run(shared.clone(), connection).await;
            }
            shared
                .metrics
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
    while sessions.join_next().await.is_some() {}
}

/// A tap's answer as it waits its turn in the session's queue.
enum Pending {
    Ready(TapResult),
    /// A decision, sent once what it waits for is done: its journal record on disk (an
    /// approval), and its copy shared with the other gateways (when there are any).
    Recording {
        result: TapResult,
        journal: Option<Durable>,
        shared: Option<oneshot::Receiver<()>>,
    },
    /// A resend of a tap still being decided elsewhere.
    AwaitAnswer {
        sequence: u64,
        tag: Tag,
    },
    /// Send this Error, then close.
    Fatal(ErrorFrame),
}

struct Session {
    shared: Arc<Shared>,
    connection: quinn::Connection,
}

impl Session {
    async fn run(shared: Arc<Shared>, connection: quinn::Connection) {
        let session = Session { shared, connection };
        session.serve().await;
    }

    fn close(&self, code: ErrorCode) {
        self.connection.close(
            quinn::VarInt::from_u32(code.code().into()),
            code.label().as_bytes(),
        );
    }

    /// Sends an Error and closes; `key` is `None` when there is no key to tag it with.
    async fn refuse(&self, send: &mut quinn::SendStream, code: ErrorCode, key: Option<&MacKey>) {
        self.shared.metrics.count_error(code);
        let error = ErrorFrame { code, sequence: 0 };
        let mut out = BytesMut::new();
        match key {
            Some(key) => tapgate_protocol::seal(&Frame::Error(error), key, &mut out),
            None => tapgate_protocol::seal_unkeyed_error(error, &mut out),
        }
        if send.write_all(&out).await.is_ok() {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.connection.closed()).await;
        }
        self.close(code);
    }

    async fn serve(self) {
        let limits = &self.shared.limits;
        let (mut send, recv) =
            match tokio::time::timeout(limits.hello_timeout, self.connection.accept_bi()).await {
                Ok(Ok(streams)) => streams,
                Ok(Err(_)) => return,
                Err(_) => {
                    self.shared.metrics.count_error(ErrorCode::HelloTimeout);
                    self.close(ErrorCode::HelloTimeout);
                    return;
                }
            };
        let mut reader = FrameReader::new(recv);
        let first = match tokio::time::timeout(limits.hello_timeout, reader.next()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) | Ok(Err(ReadError::Stream(_))) => return,
            Ok(Err(ReadError::Decode(e))) => {
                return self.refuse(&mut send, e.error_code(), None).await;
            }
            Err(_) => return self.refuse(&mut send, ErrorCode::HelloTimeout, None).await,
        };
        let Some((mac, terminal, state)) = self.authenticate(&mut send, &first).await else {
            return;
        };
        self.shared
            .metrics
            .sessions_authenticated
            .fetch_add(1, Ordering::Relaxed);
        let _connected = self.shared.metrics.gate_connected(terminal.mode);

        let place = GatePlace {
            area: terminal.area,
            mode: terminal.mode,
        };
        let mut session = Answers {
            send,
            mac,
            state,
            counted_as: PlaceSlot::of(terminal.area, terminal.mode, terminal.operator),
            queue: VecDeque::with_capacity(usize::from(limits.max_in_flight)),
            out: BytesMut::with_capacity(4096),
        };
        self.run_taps(&mut reader, &mut session, &terminal, place)
            .await;
    }

    /// Checks the Hello (PROTOCOL.md section 5) and answers HelloAck.
    async fn authenticate(
        &self,
        send: &mut quinn::SendStream,
        first: &SealedFrame,
    ) -> Option<(MacKey, TerminalRecord, Arc<TerminalState>)> {
        // The session's rules decide; this only looks the terminal up between their two steps
        // and writes what they decided.
        let admitted = match session::claimed_identity(first) {
            Err(refusal) => Err(refusal),
            Ok((terminal_id, key_version)) => {
                let provisioning = match self.provisioned_terminal(terminal_id).await {
                    Ok(Some(t)) => Provisioning::Provisioned(t),
                    Ok(None) => Provisioning::Unknown,
                    Err(e) => {
                        tracing::warn!(terminal = terminal_id, error = %e, "cannot look up terminal");
                        Provisioning::Unreachable
                    }
                };
                session::admit(first, key_version, provisioning, &self.shared.keys)
            }
        };
        let (hello, mac, terminal) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::info!(terminal = ?first.hello_identity().map(|(t, _)| t), code = %refusal.code, why = refusal.why, "Hello refused");
                self.refuse(send, refusal.code, refusal.key.as_deref())
                    .await;
                return None;
            }
        };
        let state = self
            .shared
            .terminals
            .entry(hello.terminal_id)
            .or_insert_with(|| TerminalState::new(self.shared.limits.resend_window))
            .clone();
        if state.revoked.load(Ordering::SeqCst) {
            tracing::info!(terminal = hello.terminal_id, "revoked gate refused");
            self.refuse(send, ErrorCode::UnknownTerminal, Some(&mac))
                .await;
            return None;
        }
        self.restore_shared_decisions(hello.terminal_id, &state)
            .await;
        let ack = session::hello_ack(
            &hello,
            state.window.lock().expect("window lock").highest(),
            self.shared.limits.resend_window,
            self.shared.limits.max_in_flight,
            now_ms(),
        );
        let mut out = BytesMut::new();
        tapgate_protocol::seal(&Frame::HelloAck(ack), &mac, &mut out);
        send.write_all(&out).await.ok()?;
        tracing::debug!(terminal = hello.terminal_id, area = %terminal.area, mode = %terminal.mode, "gate authenticated");
        Some((mac, terminal, state))
    }

    /// Loads what other gateways decided for this gate into its window, so a tap it resends
    /// here after moving gets the answer it was first given. Without Redis the window stays as
    /// it is: such a resend is then decided anew (and charged once).
    async fn restore_shared_decisions(&self, terminal_id: u64, state: &TerminalState) {
        if self.shared.decisions.is_none() {
            return;
        }
        let records = match self.shared.directory.shared_decisions(terminal_id).await {
            Ok(records) => records,
            Err(e) => {
                tracing::debug!(terminal = terminal_id, error = %e, "shared decisions unavailable at Hello");
                return;
            }
        };
        let mut window = state.window.lock().expect("window lock");
        let mut restored = state.restored.lock().expect("restored lock");
        for record in records {
            if window.restore_unseen(record.tap.sequence, record.tag, record.result) {
                self.shared
                    .metrics
                    .decisions_restored
                    .fetch_add(1, Ordering::Relaxed);
                if record.result.outcome == Outcome::Approve {
                    restored.insert(record.tap.sequence, record);
                }
            }
        }
        // What has left the window can no longer be resent.
        let oldest = window
            .highest()
            .saturating_sub(u64::from(self.shared.limits.resend_window));
        restored.retain(|sequence, _| *sequence > oldest);
    }

    async fn provisioned_terminal(
        &self,
        terminal_id: u64,
    ) -> Result<Option<TerminalRecord>, crate::directory::DirectoryError> {
        if let Some(t) = self.shared.provisioned.get(&terminal_id) {
            return Ok(Some(*t));
        }
        let found = self.shared.directory.terminal(terminal_id).await?;
        if let Some(t) = found {
            self.shared.provisioned.insert(terminal_id, t);
        }
        Ok(found)
    }

    /// The session after its Hello: one task reads taps, decides them in order and writes the
    /// answers in the same order as they become ready (approvals once durable). Reading stops
    /// at a fatal error or shutdown; the answers decided before it are still sent, then the
    /// Error, then the connection is closed.
    async fn run_taps(
        &self,
        reader: &mut FrameReader,
        answers: &mut Answers,
        terminal: &TerminalRecord,
        place: GatePlace,
    ) {
        let mut shutdown = self.shared.shutdown.clone();
        // One wait for the whole session: making a new one for every tap re-registers with the
        // watch each time, a measurable share of the per-tap work.
        let stopping = shutdown.wait_for(|stop| *stop);
        tokio::pin!(stopping);
        let state = answers.state.clone();
        let revoked = state.revocation.notified();
        tokio::pin!(revoked);
        // Enabled before the flag is read, so a revocation between the two still wakes it.
        revoked.as_mut().enable();
        let fatal = |code, sequence| Pending::Fatal(ErrorFrame { code, sequence });
        let mut reading = true;
        // QUIC keep-alives keep the connection itself from idling, so silence is timed here: a
        // gate that sends nothing for the idle timeout while nothing is owed to it is told so
        // and disconnected (PROTOCOL.md section 1).
        let idle = self.shared.limits.idle_timeout;
        let mut last_frame = tokio::time::Instant::now();
        if state.revoked.load(Ordering::SeqCst) {
            answers.push(fatal(ErrorCode::UnknownTerminal, 0));
            reading = false;
        }
        loop {
            match answers.flush(&self.shared).await {
                Flushed::Open => {}
                Flushed::Closed => return,
                Flushed::Fatal(error) => return self.close_after(answers, error).await,
            }
            if !reading && answers.queue.is_empty() {
                // Every answer is written. Close only once the gate has them (closing at once
                // could discard the last ones), with code 0, `done` (section 4.5).
                finish_when_acknowledged(&mut answers.send, &self.connection).await;
                self.connection.close(quinn::VarInt::from_u32(0), b"done");
                return;
            }
            let next = tokio::select! {
                biased;
                _ = &mut stopping, if reading => {
                    answers.push(fatal(ErrorCode::ShuttingDown, 0));
                    reading = false;
                    continue;
                }
                _ = &mut revoked, if reading => {
                    answers.push(fatal(ErrorCode::UnknownTerminal, 0));
                    reading = false;
                    continue;
                }
                () = answers.wait_for_head(&self.shared), if !answers.queue.is_empty() => continue,
                next = reader.next(), if reading => next,
                () = tokio::time::sleep_until(last_frame + idle), if reading && answers.queue.is_empty() => {
                    answers.push(fatal(ErrorCode::IdleTimeout, 0));
                    reading = false;
                    continue;
                }
            };
            last_frame = tokio::time::Instant::now();
            let read_at = std::time::Instant::now();
            let frame = match next {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(ReadError::Stream(_)) => {
                    reading = false;
                    continue;
                }
                Err(ReadError::Decode(e)) => {
                    answers.push(fatal(e.error_code(), 0));
                    reading = false;
                    continue;
                }
            };
            let pending = match frame.frame_type() {
                FrameType::Tap => self.tap(&frame, answers, terminal, place).await,
                FrameType::Hello => fatal(ErrorCode::DuplicateHello, 0),
                _ => fatal(ErrorCode::UnexpectedFrame, 0),
            };
            reading = !matches!(pending, Pending::Fatal(_));
            answers.queue.push_back(Queued { read_at, pending });
        }
    }

    /// What to answer a Tap frame.
    async fn tap(
        &self,
        frame: &SealedFrame,
        answers: &Answers,
        terminal: &TerminalRecord,
        place: GatePlace,
    ) -> Pending {
        let step = session::classify_tap(
            frame,
            &answers.mac,
            &mut answers.state.window.lock().expect("window lock"),
            answers.queue.len(),
            self.shared.limits.max_in_flight,
        );
        match step {
            TapStep::Fresh { tap, tag, room } => {
                self.decide_fresh(&tap, tag, terminal, place, room).await
            }
            TapStep::Resend(answer) => self.resend(&answers.state, answer),
            TapStep::AwaitAnswer { sequence, tag } => Pending::AwaitAnswer { sequence, tag },
            TapStep::Fatal(error) => Pending::Fatal(error),
        }
    }

    /// Sends the Error (after every answer before it has gone out), then closes.
    async fn close_after(&self, answers: &mut Answers, error: ErrorFrame) {
        self.shared.metrics.count_error(error.code);
        answers.out.clear();
        tapgate_protocol::seal(&Frame::Error(error), &answers.mac, &mut answers.out);
        if answers.send.write_all(&answers.out).await.is_ok() {
            finish_when_acknowledged(&mut answers.send, &self.connection).await;
        }
        self.close(error.code);
    }

    /// Hands a decision to be shared with the other gateways; the receiver resolves once it is
    /// (or once sharing has given up). `None` without other gateways, or when the queue is
    /// full: the tap is then answered unshared.
    fn share(&self, record: JournalRecord) -> Option<oneshot::Receiver<()>> {
        let queue = self.shared.decisions.as_ref()?;
        let (done, shared) = oneshot::channel();
        match queue.try_send((record, done)) {
            Ok(()) => Some(shared),
            Err(_) => {
                self.shared
                    .metrics
                    .decisions_unshared
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Answers a resend from the window. An approval another gateway decided (restored at
    /// Hello) is first journaled here as that gateway recorded it, byte for byte.
    fn resend(&self, state: &TerminalState, answer: TapResult) -> Pending {
        self.shared.metrics.resends.fetch_add(1, Ordering::Relaxed);
        let restored = state
            .restored
            .lock()
            .expect("restored lock")
            .remove(&answer.sequence);
        let Some(record) = restored else {
            return Pending::Ready(answer);
        };
        match self.shared.journal.reserve() {
            Ok(slot) => Pending::Recording {
                result: answer,
                journal: Some(slot.append_durable(record)),
                shared: None,
            },
            Err(_) => {
                // Kept for the gate's next resend.
                state
                    .restored
                    .lock()
                    .expect("restored lock")
                    .insert(answer.sequence, record);
                Pending::Ready(busy(answer.sequence))
            }
        }
    }

    /// Takes the counted ride a decision used from the directory before the tap is answered, so
    /// the directory's count, shared by every gateway, decides which tap got the last ride, and
    /// the answer and the journal record say what settlement will book. While the directory is
    /// unreachable the cache's count stands and the ride is taken from the directory later.
    async fn claim_ride(
        &self,
        card_id: u64,
        decision: Decision,
        place: GatePlace,
        policy: &Policy,
    ) -> Decision {
        match self.shared.directory.take_counted_ride(card_id).await {
            Ok(claim) => {
                let left = match claim {
                    RideClaim::Taken { left } => left,
                    RideClaim::NoneLeft => 0,
                };
                self.shared.cache.set_rides_left(card_id, left);
                with_ride_claim(decision, claim, place, policy)
            }
            Err(_) => {
                if self.shared.ride_updates.try_send(card_id).is_err() {
                    self.shared
                        .metrics
                        .ride_updates_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                decision
            }
        }
    }

    /// Decides a new tap. Capacity is claimed before deciding — a slot in this session's
    /// answer queue and in the journal's queue — so a tap answered Busy has changed nothing.
    async fn decide_fresh(
        &self,
        tap: &Tap,
        tag: Tag,
        terminal: &TerminalRecord,
        place: GatePlace,
        room: bool,
    ) -> Pending {
        let slot = if room {
            self.shared.journal.reserve().ok()
        } else {
            None
        };
        let Some(slot) = slot else {
            return Pending::Ready(busy(tap.sequence));
        };
        let now = now_ms();
        let policy = self.shared.policy.read().expect("policy lock").clone();
        let mut decision = self.shared.cache.authorize(tap, place, &policy, now).await;
        if decision.uses_counted_ride {
            decision = self.claim_ride(tap.card_id, decision, place, &policy).await;
        }
        let result = TapResult {
            sequence: tap.sequence,
            outcome: decision.outcome,
            reason: decision.reason,
            concession: decision.concession,
            fare_fen: decision.fare_fen,
            rides_left: decision.rides_left,
        };
        let record = JournalRecord {
            terminal_id: terminal.terminal_id,
            tag,
            tap: *tap,
            server_time_ms: now,
            area: terminal.area.0,
            mode: terminal.mode,
            operator: terminal.operator,
            result,
        };
        let shared = self.share(record);
        if result.outcome == Outcome::Approve {
            Pending::Recording {
                result,
                journal: Some(slot.append_durable(record)),
                shared,
            }
        } else {
            tracing::debug!(
                terminal = terminal.terminal_id,
                card = %self.shared.pseudonyms.pseudonym(tap.card_id),
                reason = %result.reason,
                "tap denied"
            );
            slot.append(record);
            Pending::Recording {
                result,
                journal: None,
                shared,
            }
        }
    }
}

fn busy(sequence: u64) -> TapResult {
    TapResult {
        sequence,
        outcome: Outcome::Busy,
        reason: Reason::Overloaded,
        concession: tapgate_protocol::Concession::None,
        fare_fen: 0,
        rides_left: RIDES_LEFT_NOT_APPLICABLE,
    }
}

/// A session's answers in the order of their taps, and the stream they go out on.
struct Answers {
    send: quinn::SendStream,
    mac: MacKey,
    state: Arc<TerminalState>,
    /// Where the gate's answers are counted (area, mode, operator), found once per session.
    counted_as: PlaceSlot,
    queue: VecDeque<Queued>,
    out: BytesMut,
}

/// An answer on its way, and when the frame it answers was read.
struct Queued {
    read_at: std::time::Instant,
    pending: Pending,
}

enum Flushed {
    Open,
    /// The stream is gone; nothing more can be sent.
    Closed,
    /// Everything before this Error has been sent.
    Fatal(ErrorFrame),
}

impl Answers {
    /// Queues an answer that reads no frame of its own (an Error at shutdown, say).
    fn push(&mut self, pending: Pending) {
        self.queue.push_back(Queued {
            read_at: std::time::Instant::now(),
            pending,
        });
    }

    /// Writes every answer at the head of the queue that is ready, in order. Each answer enters
    /// the terminal's window as it goes out, so a resend can never be answered with an approval
    /// that is not yet durable.
    async fn flush(&mut self, shared: &Shared) -> Flushed {
        self.out.clear();
        let mut fatal = None;
        while let Some(head) = self.queue.front_mut() {
            let result = match &mut head.pending {
                Pending::AwaitAnswer { .. } => break,
                Pending::Fatal(error) => {
                    fatal = Some(*error);
                    self.queue.clear();
                    break;
                }
                pending => match pending.ready() {
                    Some(result) => result,
                    None => break,
                },
            };
            let read_at = head.read_at;
            self.queue.pop_front();
            self.state.complete(result);
            shared.metrics.count_answer(result.outcome, result.reason);
            shared
                .metrics
                .by_place
                .count(self.counted_as, result.outcome);
            tapgate_protocol::seal(&Frame::TapResult(result), &self.mac, &mut self.out);
            shared.metrics.answer_latency.record(read_at.elapsed());
        }
        if !self.out.is_empty() && self.send.write_all(&self.out).await.is_err() {
            return Flushed::Closed;
        }
        match fatal {
            Some(error) => Flushed::Fatal(error),
            None => Flushed::Open,
        }
    }

    /// Resolves when the head of the queue can be flushed. Cancel-safe: an interrupted wait
    /// leaves the head as it was, or further along.
    async fn wait_for_head(&mut self, shared: &Shared) {
        let Some(Queued { pending: head, .. }) = self.queue.front_mut() else {
            return;
        };
        match head {
            Pending::Recording {
                result,
                journal,
                shared: waiting,
            } => {
                if let Some(durable) = journal {
                    let recorded = matches!(durable.await, Ok(Ok(())));
                    *journal = None;
                    if !recorded {
                        // The journal could not record it: the approval is withdrawn.
                        *head = Pending::Ready(busy(result.sequence));
                        return;
                    }
                }
                if let Some(sharing) = waiting {
                    let _ = sharing.await;
                    *waiting = None;
                }
            }
            Pending::AwaitAnswer { sequence, tag } => {
                match await_answer(&self.state, *sequence, *tag, shared.limits.resend_wait).await {
                    Some(answer) => *head = Pending::Ready(answer),
                    None => {
                        self.queue.pop_front();
                    }
                }
            }
            _ => {}
        }
    }
}

impl Pending {
    /// The answer when it can go out now; `None` while it waits. A journal that could not
    /// record an approval turns it into Busy.
    fn ready(&mut self) -> Option<TapResult> {
        let Pending::Recording {
            result,
            journal,
            shared,
        } = self
        else {
            return match self {
                Pending::Ready(result) => Some(*result),
                _ => None,
            };
        };
        if let Some(durable) = journal {
            match durable.try_recv() {
                Ok(Ok(())) => *journal = None,
                Err(oneshot::error::TryRecvError::Empty) => return None,
                _ => {
                    let withdrawn = busy(result.sequence);
                    *self = Pending::Ready(withdrawn);
                    return Some(withdrawn);
                }
            }
        }
        if let Some(sharing) = shared {
            if let Err(oneshot::error::TryRecvError::Empty) = sharing.try_recv() {
                return None;
            }
            *shared = None;
        }
        Some(*result)
    }
}

/// Waits, up to `limit`, for the answer to a tap whose first copy is still being decided.
async fn await_answer(
    state: &TerminalState,
    sequence: u64,
    tag: Tag,
    limit: Duration,
) -> Option<TapResult> {
    match tokio::time::timeout(limit, state.answer_of(sequence, tag)).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(
                sequence,
                "resend's first copy still undecided; not answered"
            );
            None
        }
    }
}
