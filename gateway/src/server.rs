//! The QUIC endpoint and gate sessions: everything between a UDP socket and the authorization
//! core. Implements PROTOCOL.md sections 1, 4, 6 and 7.

use crate::cache::CardCache;
use crate::card::CardPseudonymizer;
use crate::decide::{CountedRide, Decision, GatePlace, with_ride_claim};
use crate::deny::{DenyBook, DenyEvent, GateFollow};
use crate::directory::{
    ChangeEvent, Directory, DirectoryError, RideClaim, TerminalChange, TerminalRecord,
};
use crate::metrics::{Metrics, PlaceSlot};
use crate::offline;
use crate::policy::Policy;
use crate::session::{
    self, HeadWait, Provisioning, Recorded, Recording, TapSession, Transmit, Work, busy,
};
use crate::terminal::TerminalState;
use bytes::BytesMut;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tapgate_journal::{Durable, Journal, JournalRecord, JournalSettings, JournalWriter};
use tapgate_protocol::{
    DenyAck, ErrorCode, ErrorFrame, Frame, KeyRing, MacKey, OfflineRules, OfflineTap, Outcome,
    Reason, SealedFrame, Tag, Tap, TapResult, Version, seal,
};
use tapgate_runtime::clock::sleep_until_some;
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
    /// The endpoint's settings; resumed handshakes are counted in `tickets_redeemed`.
    pub fn transport(&self, tickets_redeemed: Arc<AtomicU64>) -> TransportSettings {
        TransportSettings {
            idle_timeout: self.idle_timeout,
            keep_alive: self.keep_alive,
            udp_buffer_bytes: self.udp_buffer_bytes,
            // One remembered session per gate the node may hold.
            session_tickets: self.max_connections,
            tickets_redeemed,
            newest_version: tapgate_protocol::Version::NEWEST,
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
    ride_updates: mpsc::Sender<(u64, CountedRide)>,
    /// Where decisions go to be shared with the other gateways; `None` when there are none
    /// (the embedded directory).
    decisions: Option<mpsc::Sender<SharedDecision>>,
    /// The gateway's background tasks (change feed, shared answers, counted rides): dead when
    /// one panicked.
    tasks: Arc<PartHealth>,
    panics: Arc<Panics>,
    shutdown: watch::Receiver<bool>,
    /// The deny list every version-2 gate follows.
    deny: RwLock<DenyBook>,
    /// Moves on whenever the deny list changes, to wake the sessions that follow it.
    deny_changed: watch::Receiver<u64>,
    /// The version each following session's gate last acknowledged, by connection.
    deny_acked: Arc<DashMap<usize, u64>>,
    /// The policy's offline rules, which every version-2 session sends its gate again when they
    /// change.
    offline_rules: watch::Sender<OfflineRules>,
}

/// Deny-list changes a node keeps for gates that are behind; a gate further behind is sent the
/// whole list. At a change a second, about a day.
const DENY_RECENT: usize = 65_536;

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
        let metrics = Arc::new(Metrics::default());
        let endpoint = server_endpoint(
            listen,
            chain,
            key,
            &limits.transport(metrics.tls_resumptions.clone()),
        )?;
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
        let deny_events = directory.follow_deny_list().await;

        let tasks = Arc::new(PartHealth::default());
        let panics = Arc::new(Panics::default());
        let (ride_updates, ride_rx) = mpsc::channel(RIDE_UPDATE_QUEUE);
        supervise(
            "counted rides",
            tasks.clone(),
            panics.clone(),
            apply_ride_updates(directory.clone(), ride_rx),
        );
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
        let deny_changed = watch::Sender::new(0);
        let offline_rules = watch::Sender::new(policy.offline);
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
            deny: RwLock::new(DenyBook::new(DENY_RECENT)),
            deny_changed: deny_changed.subscribe(),
            deny_acked: Arc::default(),
            offline_rules,
        });
        follow_directory(&shared, changes, deny_events, deny_changed);
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

    /// The deny list's version at this node, and how many cards are on it.
    pub fn deny_list(&self) -> (u64, usize) {
        let book = self.shared.deny.read().expect("deny book lock");
        (book.version(), book.len())
    }

    /// Version-2 gates following the deny list here now.
    pub fn deny_list_gates(&self) -> u64 {
        self.shared
            .metrics
            .deny_gates
            .load(Ordering::Relaxed)
            .max(0) as u64
    }

    /// Following gates whose last acknowledgement is below `version` (or that have not
    /// acknowledged yet).
    pub fn deny_list_acknowledged_below(&self, version: u64) -> u64 {
        let acknowledged = self.shared.deny_acked.len() as u64;
        let below = self
            .shared
            .deny_acked
            .iter()
            .filter(|entry| *entry.value() < version)
            .count() as u64;
        below + self.deny_list_gates().saturating_sub(acknowledged)
    }

    pub fn journal(&self) -> &Journal {
        &self.shared.journal
    }

    /// Replaces the policy; taps decided from now on use the new one, and version-2 gates are
    /// sent its offline rules when they differ.
    pub fn set_policy(&self, policy: Policy) {
        let rules = policy.offline;
        *self.shared.policy.write().expect("policy lock") = Arc::new(policy);
        self.shared.offline_rules.send_if_modified(|sent| {
            let changed = *sent != rules;
            *sent = rules;
            changed
        });
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

/// Starts applying what the directory's feeds say, under the gateway's task supervision.
fn follow_directory(
    shared: &Arc<Shared>,
    changes: mpsc::Receiver<ChangeEvent>,
    deny_events: mpsc::Receiver<DenyEvent>,
    deny_changed: watch::Sender<u64>,
) {
    supervise(
        "deny list",
        shared.tasks.clone(),
        shared.panics.clone(),
        apply_deny_list(Arc::downgrade(shared), deny_events, deny_changed),
    );
    supervise(
        "change feed",
        shared.tasks.clone(),
        shared.panics.clone(),
        apply_changes(Arc::downgrade(shared), changes),
    );
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

/// Applies the directory's deny list to the node's book and wakes the sessions that follow it,
/// until the feed ends or the gateway is gone.
async fn apply_deny_list(
    shared: std::sync::Weak<Shared>,
    mut events: mpsc::Receiver<DenyEvent>,
    changed: watch::Sender<u64>,
) {
    let mut loaded = false;
    while let Some(event) = events.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if matches!(event, DenyEvent::Whole { .. }) && std::mem::replace(&mut loaded, true) {
            shared.metrics.deny_reloads.fetch_add(1, Ordering::Relaxed);
        }
        let applied = {
            let mut book = shared.deny.write().expect("deny book lock");
            let applied = book.apply(event, Instant::now());
            shared
                .metrics
                .deny_version
                .store(book.version(), Ordering::Relaxed);
            shared
                .metrics
                .deny_entries
                .store(book.len() as u64, Ordering::Relaxed);
            applied
        };
        if let Err(gap) = applied {
            // The feeds load the whole list again when they see a gap, so this is a bug.
            tracing::error!(%gap, "deny list change out of order; ignored");
        }
        changed.send_modify(|revision| *revision += 1);
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
async fn apply_ride_updates(directory: Directory, mut rx: mpsc::Receiver<(u64, CountedRide)>) {
    let mut retry = Backoff::new(RIDE_UPDATE_RETRY, RIDE_UPDATE_CEILING);
    while let Some((card_id, ride)) = rx.recv().await {
        loop {
            match directory.take_counted_ride(card_id, ride).await {
                Ok(_) => {
                    retry.reset();
                    break;
                }
                // The ride was taken (not replicated and the deny list are about card changes,
                // which this is not), or the record is unreadable, which the cache logged and
                // counted.
                Err(
                    DirectoryError::Malformed { .. }
                    | DirectoryError::NotReplicated { .. }
                    | DirectoryError::DenyListBehind(_),
                ) => break,
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
        // A connection counts against the limit from its first packet (its Hello may come as
        // early data), so past half the limit a sender must first show it receives at its
        // address (a QUIC Retry, one more round trip): handshakes from forged addresses cannot
        // take the places of gates.
        let active = shared.metrics.connections_active.load(Ordering::Relaxed);
        if active as usize >= shared.limits.max_connections / 2 && incoming.may_retry() {
            shared.metrics.retries.fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        shared
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        sessions.spawn(async move {
            // Taken before the handshake completes, so a Hello sent as early data is answered
            // a round trip sooner; the session holds back everything after the Hello until
            // the handshake is done (`Handshake`).
            let Ok(connecting) = incoming.accept() else {
                return;
            };
            // A server's connection always converts (quinn's contract for incoming ones).
            let Ok((connection, done)) = connecting.into_0rtt() else {
                return;
            };
            let handshake = Handshake(done);
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
                // Closed once the handshake is done: a close during it cannot carry the
                // application's code to the gate (RFC 9000, section 10.2.3).
                handshake
                    .complete(shared.limits.hello_timeout, &connection)
                    .await;
                connection.close(
                    quinn::VarInt::from_u32(ErrorCode::TooManyConnections.code().into()),
                    ErrorCode::TooManyConnections.label().as_bytes(),
                );
            } else {
                Session::run(shared.clone(), connection, handshake).await;
            }
            shared
                .metrics
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
    while sessions.join_next().await.is_some() {}
}

/// What an answer waits for before it goes out: its journal record synced (an approval), and
/// its copy shared with the other gateways (when there are any).
struct Waits {
    journal: Option<Durable>,
    shared: Option<oneshot::Receiver<()>>,
    failed: bool,
}

impl Waits {
    /// `None` when there is nothing to wait for.
    fn of(journal: Option<Durable>, shared: Option<oneshot::Receiver<()>>) -> Option<Waits> {
        (journal.is_some() || shared.is_some()).then_some(Waits {
            journal,
            shared,
            failed: false,
        })
    }

    /// Resolves once `poll_recorded` no longer says pending. Cancel-safe: an interrupted wait
    /// leaves what it waited for in place.
    async fn wait(&mut self) {
        if let Some(durable) = &mut self.journal {
            let recorded = matches!(durable.await, Ok(Ok(())));
            self.journal = None;
            if !recorded {
                self.failed = true;
                return;
            }
        }
        if let Some(sharing) = &mut self.shared {
            let _ = sharing.await;
            self.shared = None;
        }
    }
}

impl Recording for Waits {
    fn poll_recorded(&mut self) -> Recorded {
        if self.failed {
            return Recorded::Failed;
        }
        if let Some(durable) = &mut self.journal {
            match durable.try_recv() {
                Ok(Ok(())) => self.journal = None,
                Err(oneshot::error::TryRecvError::Empty) => return Recorded::Pending,
                _ => {
                    self.failed = true;
                    return Recorded::Failed;
                }
            }
        }
        if let Some(sharing) = &mut self.shared {
            // Sharing that gave up releases the answer too: a gate is answered whatever
            // happens to Redis.
            if let Err(oneshot::error::TryRecvError::Empty) = sharing.try_recv() {
                return Recorded::Pending;
            }
            self.shared = None;
        }
        Recorded::Done
    }
}

/// An admitted gate, as its session's I/O needs it.
struct Admitted {
    terminal: TerminalRecord,
    place: GatePlace,
    state: Arc<TerminalState>,
    /// Where the gate's answers are counted (area, mode, operator), found once per session.
    counted_as: PlaceSlot,
}

struct Session {
    shared: Arc<Shared>,
    connection: quinn::Connection,
}

/// A version-2 session's part in the deny list.
struct DenyFollowing {
    follow: GateFollow,
    /// The offline rules the gate was last sent: first with the first deny-list frames, then
    /// whenever the policy's rules change.
    rules_sent: Option<OfflineRules>,
    mac: MacKey,
    /// Where the session is counted among the gates following the list, while it lives.
    metrics: Arc<Metrics>,
    acked: Arc<DashMap<usize, u64>>,
    connection: usize,
}

impl DenyFollowing {
    fn new(
        mac: MacKey,
        metrics: &Arc<Metrics>,
        acked: Arc<DashMap<usize, u64>>,
        connection: usize,
    ) -> Self {
        metrics.deny_gates.fetch_add(1, Ordering::Relaxed);
        DenyFollowing {
            follow: GateFollow::default(),
            rules_sent: None,
            mac,
            metrics: metrics.clone(),
            acked,
            connection,
        }
    }
}

impl Drop for DenyFollowing {
    fn drop(&mut self) {
        self.metrics.deny_gates.fetch_sub(1, Ordering::Relaxed);
        self.acked.remove(&self.connection);
    }
}

/// The end of a connection's TLS handshake, which a session may start before: until then what
/// has arrived on the stream may be early data, which an eavesdropper can replay (PROTOCOL.md
/// section 1.2).
struct Handshake(quinn::ZeroRttAccepted);

impl Handshake {
    /// Waits for the handshake to end, at most `limit`; false if it took longer or failed.
    async fn complete(self, limit: Duration, connection: &quinn::Connection) -> bool {
        // For a server the future's value carries no meaning: it ends when the handshake does,
        // whether it succeeded or failed, so the connection says which.
        tokio::time::timeout(limit, self.0).await.is_ok() && connection.close_reason().is_none()
    }
}

impl Session {
    async fn run(shared: Arc<Shared>, connection: quinn::Connection, handshake: Handshake) {
        let session = Session { shared, connection };
        session.serve(handshake).await;
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

    async fn serve(self, handshake: Handshake) {
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
        // A stream that opened before the handshake ended came as early data.
        let early = recv.is_0rtt();
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
        // An early Hello is answered at once: answering changes nothing a replay could abuse
        // (no tap is decided, the window does not move). The taps after it wait until the
        // handshake proves the gate is really there.
        if early {
            self.shared
                .metrics
                .early_hellos
                .fetch_add(1, Ordering::Relaxed);
        }
        if !handshake
            .complete(limits.hello_timeout, &self.connection)
            .await
        {
            self.shared.metrics.count_error(ErrorCode::HelloTimeout);
            self.close(ErrorCode::HelloTimeout);
            return;
        }
        self.shared
            .metrics
            .sessions_authenticated
            .fetch_add(1, Ordering::Relaxed);
        let _connected = self.shared.metrics.gate_connected(terminal.mode);

        let gate = Admitted {
            place: GatePlace {
                terminal_id: terminal.terminal_id,
                area: terminal.area,
                mode: terminal.mode,
            },
            counted_as: PlaceSlot::of(terminal.area, terminal.mode, terminal.operator),
            terminal,
            state,
        };
        let version = tls::negotiated_version(&self.connection);
        let session = TapSession::new(
            mac.clone(),
            version,
            limits.max_in_flight,
            limits.idle_timeout,
            Instant::now(),
        );
        let deny = (version >= Version::V2).then(|| {
            DenyFollowing::new(
                mac,
                &self.shared.metrics,
                self.shared.deny_acked.clone(),
                self.connection.stable_id(),
            )
        });
        self.run_taps(&mut reader, send, session, &gate, deny).await;
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
    /// answers in the same order as they become ready (approvals once durable), as the session's
    /// rules say. This is their I/O: the stream, the clock, shutdown and revocation.
    async fn run_taps(
        &self,
        reader: &mut FrameReader,
        mut send: quinn::SendStream,
        mut session: TapSession<Waits>,
        gate: &Admitted,
        mut deny: Option<DenyFollowing>,
    ) {
        let mut shutdown = self.shared.shutdown.clone();
        let mut deny_changed = self.shared.deny_changed.clone();
        let mut rules_changed = self.shared.offline_rules.subscribe();
        // One wait for the whole session: making a new one for every tap re-registers with the
        // watch each time, a measurable share of the per-tap work.
        let stopping = shutdown.wait_for(|stop| *stop);
        tokio::pin!(stopping);
        let revoked = gate.state.revocation.notified();
        tokio::pin!(revoked);
        // Enabled before the flag is read, so a revocation between the two still wakes it.
        revoked.as_mut().enable();
        if gate.state.revoked.load(Ordering::SeqCst) {
            session.handle_revoked(Instant::now());
        }
        let resend_wait = self.shared.limits.resend_wait;
        // Room for a few answers: it grows with a burst and keeps what it grew to, while an idle
        // gate (most of them, most of the time) holds no more than this.
        let mut out = BytesMut::with_capacity(256);
        // QUIC lets a gate's address change under the connection (a bus between cell towers);
        // the session goes on, and the change is counted where a frame shows it.
        let mut peer = self.connection.remote_address();
        loop {
            out.clear();
            let transmit = session.poll_transmit(&mut out, |result, read_at| {
                self.answered(gate, result, read_at);
            });
            let still_behind = match (transmit, deny.as_mut()) {
                (Transmit::Open, Some(deny)) => self.send_deny_list(deny, &mut out),
                _ => false,
            };
            let written = out.is_empty() || send.write_all(&out).await.is_ok();
            match transmit {
                Transmit::Open if written => {}
                Transmit::Open => return,
                Transmit::Close(error) => {
                    self.shared.metrics.count_error(error.code);
                    if written {
                        finish_when_acknowledged(&mut send, &self.connection).await;
                    }
                    return self.close(error.code);
                }
                Transmit::Done => {
                    if written {
                        // Closing at once could discard the last answers: close once the gate
                        // has them, with code 0, `done` (section 4.5).
                        finish_when_acknowledged(&mut send, &self.connection).await;
                        self.connection.close(quinn::VarInt::from_u32(0), b"done");
                    }
                    return;
                }
            }
            let reading = session.is_reading();
            let wants_frame = session.wants_frame();
            let head_waits = session.head_wait().is_some();
            let idle = session.poll_timeout().map(tokio::time::Instant::from_std);
            let deny_follows = reading && deny.is_some();
            let deny_behind = deny_follows && still_behind;
            let next = tokio::select! {
                biased;
                _ = &mut stopping, if reading => {
                    session.handle_shutdown(Instant::now());
                    continue;
                }
                _ = &mut revoked, if reading => {
                    session.handle_revoked(Instant::now());
                    continue;
                }
                () = wait_for_head(&mut session, &gate.state, resend_wait), if head_waits => continue,
                next = reader.next(), if wants_frame => next,
                () = sleep_until_some(idle), if idle.is_some() => {
                    session.handle_timeout(Instant::now());
                    continue;
                }
                // The gate's list is behind the node's: send more once nothing above is ready.
                () = std::future::ready(()), if deny_behind => continue,
                Ok(()) = deny_changed.changed(), if deny_follows => continue,
                Ok(()) = rules_changed.changed(), if deny_follows => continue,
            };
            let now = Instant::now();
            match next {
                Ok(Some(frame)) => {
                    let now_at = self.connection.remote_address();
                    if now_at != peer {
                        self.shared
                            .metrics
                            .migrations
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(gate = gate.terminal.terminal_id, from = %peer, to = %now_at, "a gate moved; its connection carried on");
                        peer = now_at;
                    }
                    let work = session.handle_frame(
                        &frame,
                        &mut gate.state.window.lock().expect("window lock"),
                        now,
                    );
                    match (work, deny.as_mut()) {
                        (Some(Work::DenyHeld(held)), Some(deny)) => {
                            self.deny_held(deny, held, gate.terminal.terminal_id);
                        }
                        (Some(work), _) => self.work(&mut session, work, gate).await,
                        (None, _) => {}
                    }
                }
                Ok(None) | Err(ReadError::Stream(_)) => session.handle_end(),
                Err(ReadError::Decode(e)) => session.handle_undecodable(e.error_code(), now),
            }
        }
    }

    /// Does what the session handed over for a tap, and reports its answer back.
    async fn work(&self, session: &mut TapSession<Waits>, work: Work, gate: &Admitted) {
        let (sequence, (result, waits)) = match work {
            Work::Decide { tap, tag } => (tap.sequence, self.decide_fresh(&tap, tag, gate).await),
            Work::Upload { upload, tag } => (
                upload.tap.sequence,
                self.record_upload(&upload, tag, gate).await,
            ),
            Work::Resend(answer) => (answer.sequence, self.resend(&gate.state, answer)),
            // Only a version-2 session hands this out, and it always follows the list.
            Work::DenyHeld(_) => return,
        };
        session.decided(sequence, result, waits);
    }

    /// Appends the deny-list frames the gate needs next; after its first DenyAck, the offline
    /// rules before them (PROTOCOL.md section 4.7).
    /// Returns whether the gate's list is still behind the node's (asked under the same lock,
    /// so a following session takes it once per turn).
    fn send_deny_list(&self, deny: &mut DenyFollowing, out: &mut BytesMut) -> bool {
        let rules = *self.shared.offline_rules.borrow();
        if deny.rules_sent != Some(rules) && deny.follow.acked().is_some() {
            seal(&Frame::OfflineRules(rules), &deny.mac, out);
            deny.rules_sent = Some(rules);
        }
        let book = self.shared.deny.read().expect("deny book lock");
        let written = deny.follow.poll(&book, &deny.mac, out);
        let metrics = &self.shared.metrics;
        metrics
            .deny_changes_sent
            .fetch_add(written.changes as u64, Ordering::Relaxed);
        metrics
            .deny_list_parts_sent
            .fetch_add(written.list_parts as u64, Ordering::Relaxed);
        if written.resync {
            metrics.deny_resyncs.fetch_add(1, Ordering::Relaxed);
        }
        deny.follow.behind(&book)
    }

    /// The gate's DenyAck: where its list goes on from, and (after the first) how long the
    /// change it acknowledges took to reach it.
    fn deny_held(&self, deny: &mut DenyFollowing, held: DenyAck, terminal_id: u64) {
        let book = self.shared.deny.read().expect("deny book lock");
        let metrics = &self.shared.metrics;
        if deny.follow.acked().is_some()
            && let Some(arrived) = book.arrived(held.version)
        {
            metrics.deny_propagation.record(arrived.elapsed());
        }
        if deny.follow.acknowledged(held, &book) {
            // Counted for operators; after a failover this can be every gate, so not one line
            // each at info.
            metrics.deny_other_history.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                gate = terminal_id,
                version = held.version,
                "a gate holds a deny list of another history (a failover lost changes it was sent); sending it the whole list"
            );
        }
        self.shared.deny_acked.insert(deny.connection, held.version);
    }

    /// An answer on its way out: into the gate's window (waking resends that wait for it) and
    /// the counters.
    fn answered(&self, gate: &Admitted, result: TapResult, read_at: Instant) {
        gate.state.complete(result);
        let metrics = &self.shared.metrics;
        metrics.count_answer(result.outcome, result.reason);
        metrics.by_place.count(gate.counted_as, result.outcome);
        metrics.answer_latency.record(read_at.elapsed());
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
    fn resend(&self, state: &TerminalState, answer: TapResult) -> (TapResult, Option<Waits>) {
        self.shared.metrics.resends.fetch_add(1, Ordering::Relaxed);
        let restored = state
            .restored
            .lock()
            .expect("restored lock")
            .remove(&answer.sequence);
        let Some(record) = restored else {
            return (answer, None);
        };
        match self.shared.journal.reserve() {
            Ok(slot) => (answer, Waits::of(Some(slot.append_durable(record)), None)),
            Err(_) => {
                // Kept for the gate's next resend.
                state
                    .restored
                    .lock()
                    .expect("restored lock")
                    .insert(answer.sequence, record);
                (busy(answer.sequence), None)
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
        ride: CountedRide,
        decision: Decision,
        place: GatePlace,
        policy: &Policy,
    ) -> Decision {
        match self.shared.directory.take_counted_ride(card_id, ride).await {
            Ok(claim) => {
                let left = match claim {
                    RideClaim::Taken { left } => left,
                    RideClaim::NoneLeft => 0,
                };
                self.shared.cache.set_rides_left(card_id, ride.period, left);
                with_ride_claim(decision, claim, place, policy)
            }
            Err(_) => {
                if self.shared.ride_updates.try_send((card_id, ride)).is_err() {
                    self.shared
                        .metrics
                        .ride_updates_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                decision
            }
        }
    }

    /// The online decision on `tap` at `at`, with its counted ride taken from the directory.
    async fn decide_at(&self, tap: &Tap, gate: &Admitted, policy: &Policy, at: u64) -> Decision {
        let decision = self
            .shared
            .cache
            .authorize(tap, gate.place, policy, at)
            .await;
        match decision.counted_ride {
            Some(ride) => {
                self.claim_ride(tap.card_id, ride, decision, gate.place, policy)
                    .await
            }
            None => decision,
        }
    }

    /// Decides a new tap. A journal slot is claimed before deciding, so a tap answered Busy
    /// has changed nothing.
    async fn decide_fresh(
        &self,
        tap: &Tap,
        tag: Tag,
        gate: &Admitted,
    ) -> (TapResult, Option<Waits>) {
        let Ok(slot) = self.shared.journal.reserve() else {
            return (busy(tap.sequence), None);
        };
        let now = now_ms();
        let policy = self.shared.policy.read().expect("policy lock").clone();
        let decision = self.decide_at(tap, gate, &policy, now).await;
        let record = record_of(tap, tag, gate, &decision, now, None);
        let (result, terminal) = (record.result, &gate.terminal);
        let shared = self.share(record);
        if result.outcome == Outcome::Approve {
            (result, Waits::of(Some(slot.append_durable(record)), shared))
        } else {
            tracing::debug!(
                terminal = terminal.terminal_id,
                card = %self.shared.pseudonyms.pseudonym(tap.card_id),
                reason = %result.reason,
                "tap denied"
            );
            slot.append(record);
            (result, Waits::of(None, shared))
        }
    }

    /// Records a tap the gate approved offline (PROTOCOL.md section 4.7): decided as an online
    /// tap at the gate's time of the tap, then recorded as an approval whatever the decision,
    /// flagged with the offline rule it broke. A journal slot is claimed first, as for a tap.
    async fn record_upload(
        &self,
        upload: &OfflineTap,
        tag: Tag,
        gate: &Admitted,
    ) -> (TapResult, Option<Waits>) {
        let tap = &upload.tap;
        let Ok(slot) = self.shared.journal.reserve() else {
            return (busy(tap.sequence), None);
        };
        let uploaded = now_ms();
        // A gate clock ahead of the gateway's cannot put a ride in the future.
        let tapped = tap.gate_time_ms.min(uploaded);
        let policy = self.shared.policy.read().expect("policy lock").clone();
        let online = self.decide_at(tap, gate, &policy, tapped).await;
        let listed = self
            .shared
            .deny
            .read()
            .expect("deny book lock")
            .listed_in(tap.card_id, upload.deny_held());
        let metrics = &self.shared.metrics;
        // Decided by a list a failover lost: what it held cannot be told, so no flag under
        // rule 1 rather than one the gate may not have deserved.
        let listed = listed.unwrap_or_else(|_| {
            metrics
                .offline_other_history
                .fetch_add(1, Ordering::Relaxed);
            None
        });
        let decision = offline::recorded_as(upload, online, gate.place.mode, listed, &policy);
        metrics.offline_taps.fetch_add(1, Ordering::Relaxed);
        if decision.reason != Reason::Approved {
            metrics.offline_flagged.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                terminal = gate.terminal.terminal_id,
                sequence = tap.sequence,
                card = %self.shared.pseudonyms.pseudonym(tap.card_id),
                flag = %decision.reason,
                "offline tap flagged"
            );
        }
        let record = record_of(tap, tag, gate, &decision, tapped, Some(uploaded));
        let shared = self.share(record);
        (
            record.result,
            Waits::of(Some(slot.append_durable(record)), shared),
        )
    }
}

/// The journal record of a decided tap, made at `at` (for an offline tap, the gate's time; the
/// upload reached the gateway at `uploaded_ms`).
fn record_of(
    tap: &Tap,
    tag: Tag,
    gate: &Admitted,
    decision: &Decision,
    at: u64,
    uploaded_ms: Option<u64>,
) -> JournalRecord {
    let terminal = &gate.terminal;
    JournalRecord {
        terminal_id: terminal.terminal_id,
        tag,
        tap: *tap,
        server_time_ms: at,
        area: terminal.area.0,
        mode: terminal.mode,
        operator: terminal.operator,
        result: TapResult {
            sequence: tap.sequence,
            outcome: decision.outcome,
            reason: decision.reason,
            concession: decision.concession,
            fare_fen: decision.fare_fen,
            rides_left: decision.rides_left,
        },
        pay_percent: decision.pay_percent,
        repeat_boarding: decision.repeat_boarding,
        uploaded_ms,
    }
}

/// Waits for what the answer at the head of the session's queue waits for.
async fn wait_for_head(session: &mut TapSession<Waits>, state: &TerminalState, limit: Duration) {
    match session.head_wait() {
        Some(HeadWait::Recording(waits)) => waits.wait().await,
        Some(HeadWait::FirstCopy(first)) => {
            let answer = await_answer(state, first.sequence, first.tag, limit).await;
            session.first_copy_answered(answer);
        }
        None => std::future::pending().await,
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
