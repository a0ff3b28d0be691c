//! Card and terminal directories: where card records live, and how changes to them reach every
//! gateway's cache.
//!
//! Two implementations behind one type: [`Directory::Redis`] for production, and
//! [`Directory::Embedded`], an in-process store for the zero-setup demo and for tests.
//!
//! Redis key schema (`P` is the configured key prefix, `tapgate` by default; `GG` is the id's
//! change group, [`change_group`], two digits from `00` to `15`):
//!
//! | key                          | type   | fields |
//! |------------------------------|--------|--------|
//! | `P:{gGG}:card:ID`            | hash   | `state` (active/lost/cancelled/blocked), `issuer` (cq_ssc/cq_city/sc_tianfutong/t_union), `concession` (none/elder/disabled/veteran/student), `rides` (counted rides left), `expires` (YYYY-MM-DD or empty) |
//! | `P:{gGG}:terminal:ID`        | hash   | `area` (six-digit code), `mode` (bus/metro/ferry/cableway/intercity_rail), `operator` (number) |
//! | `P:{gGG}:decided:ID`         | hash   | the gate's latest decided taps, shared by every gateway: field = sequence mod twice the resend window, value = the tap's journal record |
//! | `P:{gGG}:changes`            | stream | one entry per change in the group: `id` and the card's new fields, or `deleted` = 1; for a gate, `terminal` and its new fields, or `deleted` = 1 |
//!
//! Why this is safe on a Redis Cluster: the braces are the hash tag, so a group's cards, gates
//! and change stream share one slot. Every change is written with its stream entry in one
//! MULTI/EXEC of its group, which a cluster accepts and which a master failover keeps or loses
//! whole (replication keeps a slot's writes in order). Counted rides are taken by a script on
//! the card's key alone. Gateways follow all sixteen streams, each with XREAD BLOCK from the
//! last entry they applied, so a gateway that was disconnected reads what it missed when it
//! reconnects; plain pub/sub would have dropped it. If a stream was trimmed past that point, or
//! came back without it (a failover that lost the newest entries, or a restart without
//! persistence), the gateway drops its whole cache instead.

use crate::card::{CardRecord, CardState};
pub use crate::decide::RideClaim;
use crate::health::{Incident, Panics, PartHealth, supervise};
use crate::journal::{JournalRecord, PAYLOAD_LEN};
use crate::redis_target::{RedisConnection, RedisTarget, bounded_error};
use chrono::NaiveDate;
use redis::AsyncCommands;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapgate_protocol::{AreaCode, Concession, Issuer, Mode};
use tapgate_transport::retry::Backoff;
use tokio::sync::{broadcast, mpsc};

pub use tapgate_city::TerminalRecord;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("card directory unreachable: {0}")]
    Unavailable(String),
    #[error("card directory holds a malformed record for {key}: {detail}")]
    Malformed { key: String, detail: String },
    #[error(
        "the change was written, but only {acked} of the {wanted} replicas asked for held it after {waited_ms} ms; a failover of its master now could lose it: check it, and write it again if it is gone"
    )]
    NotReplicated {
        wanted: u16,
        acked: u16,
        waited_ms: u64,
    },
}

impl From<redis::RedisError> for DirectoryError {
    fn from(e: redis::RedisError) -> Self {
        DirectoryError::Unavailable(bounded_error(&e))
    }
}

/// One change to a card record, as every cache receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardChange {
    pub card_id: u64,
    /// The new record; `None` when the card was deleted.
    pub record: Option<CardRecord>,
}

/// One change to a gate's provisioning, as every gateway receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalChange {
    pub terminal_id: u64,
    /// The new record; `None` when the gate was revoked.
    pub record: Option<TerminalRecord>,
}

/// What a gateway receives from the directory's change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeEvent {
    Changed(CardChange),
    TerminalChanged(TerminalChange),
    /// Changes were missed and cannot be recovered: forget every cached card and gate.
    Resync,
}

/// Bound of the channel between a change feed and its cache.
const CHANGE_CHANNEL: usize = 4096;
/// Approximate length the change stream is trimmed to.
const CHANGE_STREAM_MAXLEN: usize = 1_000_000;

#[derive(Clone)]
pub enum Directory {
    Embedded(Arc<EmbeddedDirectory>),
    Redis(RedisDirectory),
}

impl Directory {
    pub async fn card(&self, card_id: u64) -> Result<Option<CardRecord>, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.card(card_id)),
            Directory::Redis(d) => d.card(card_id).await,
        }
    }

    pub async fn terminal(
        &self,
        terminal_id: u64,
    ) -> Result<Option<TerminalRecord>, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.terminal(terminal_id)),
            Directory::Redis(d) => d.terminal(terminal_id).await,
        }
    }

    /// Writes a card record and publishes the change.
    pub async fn put_card(&self, record: CardRecord) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                d.put_card(record);
                Ok(())
            }
            Directory::Redis(d) => d.put_cards(&[record]).await,
        }
    }

    pub async fn put_cards(&self, records: &[CardRecord]) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                records.iter().for_each(|r| d.put_card(*r));
                Ok(())
            }
            Directory::Redis(d) => d.put_cards(records).await,
        }
    }

    pub async fn put_terminals(&self, records: &[TerminalRecord]) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                records.iter().for_each(|r| d.put_terminal(*r));
                Ok(())
            }
            Directory::Redis(d) => d.put_terminals(records).await,
        }
    }

    /// Takes a gate out of service everywhere: refused at its next Hello, and every gateway
    /// following the change feed closes the sessions it has open.
    pub async fn revoke_terminal(&self, terminal_id: u64) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                d.revoke_terminal(terminal_id);
                Ok(())
            }
            Directory::Redis(d) => d.revoke_terminal(terminal_id).await,
        }
    }

    /// Takes one ride from the card's counted concession allowance, atomically and never below
    /// zero, whichever gateway asks: the directory's count decides which tap used the last
    /// ride. Not published as a change: every gateway asks the directory for each counted ride.
    pub async fn take_counted_ride(&self, card_id: u64) -> Result<RideClaim, DirectoryError> {
        match self {
            Directory::Embedded(d) => Ok(d.take_counted_ride(card_id)),
            Directory::Redis(d) => d.take_counted_ride(card_id).await,
        }
    }

    /// How the directory's Redis looks, for readiness; `None` for the embedded directory, which
    /// cannot fail.
    pub fn health(&self) -> Option<Arc<DirectoryHealth>> {
        match self {
            Directory::Embedded(_) => None,
            Directory::Redis(d) => Some(d.health.clone()),
        }
    }

    /// Whether other gateways can see what this one shares: only through Redis.
    pub fn shares_decisions(&self) -> bool {
        matches!(self, Directory::Redis(_))
    }

    /// Shares decided taps with every gateway of the directory, so a gate that moves to another
    /// gateway and resends a tap gets the first decision. Each gate keeps its last `slots`
    /// decisions (a ring by sequence number).
    pub async fn share_decisions(
        &self,
        records: &[JournalRecord],
        slots: u16,
    ) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(_) => Ok(()),
            Directory::Redis(d) => d.share_decisions(records, slots).await,
        }
    }

    /// The decisions other gateways shared for a gate, any order.
    pub async fn shared_decisions(
        &self,
        terminal_id: u64,
    ) -> Result<Vec<JournalRecord>, DirectoryError> {
        match self {
            Directory::Embedded(_) => Ok(Vec::new()),
            Directory::Redis(d) => d.shared_decisions(terminal_id).await,
        }
    }

    /// Starts following card changes. The receiver gets every change made after this call; if
    /// Redis cannot be reached now, the feed starts when it can, with a `Resync` first.
    pub async fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
        match self {
            Directory::Embedded(d) => d.follow_changes(),
            Directory::Redis(d) => d.follow_changes().await,
        }
    }
}

/// In-process directory for the demo and tests.
pub struct EmbeddedDirectory {
    cards: RwLock<HashMap<u64, CardRecord>>,
    terminals: RwLock<HashMap<u64, TerminalRecord>>,
    changes: broadcast::Sender<ChangeEvent>,
}

impl Default for EmbeddedDirectory {
    fn default() -> Self {
        Self {
            cards: RwLock::default(),
            terminals: RwLock::default(),
            changes: broadcast::channel(CHANGE_CHANNEL).0,
        }
    }
}

impl EmbeddedDirectory {
    pub fn card(&self, card_id: u64) -> Option<CardRecord> {
        self.cards
            .read()
            .expect("card map lock")
            .get(&card_id)
            .copied()
    }

    pub fn terminal(&self, terminal_id: u64) -> Option<TerminalRecord> {
        self.terminals
            .read()
            .expect("terminal map lock")
            .get(&terminal_id)
            .copied()
    }

    pub fn put_card(&self, record: CardRecord) {
        self.cards
            .write()
            .expect("card map lock")
            .insert(record.card_id, record);
        // No receivers is fine: nobody caches yet.
        let _ = self.changes.send(ChangeEvent::Changed(CardChange {
            card_id: record.card_id,
            record: Some(record),
        }));
    }

    pub fn put_terminal(&self, record: TerminalRecord) {
        self.terminals
            .write()
            .expect("terminal map lock")
            .insert(record.terminal_id, record);
        let _ = self
            .changes
            .send(ChangeEvent::TerminalChanged(TerminalChange {
                terminal_id: record.terminal_id,
                record: Some(record),
            }));
    }

    /// Takes a gate out of service: it is refused at its next Hello, and gateways close the
    /// sessions it has open.
    pub fn revoke_terminal(&self, terminal_id: u64) {
        self.terminals
            .write()
            .expect("terminal map lock")
            .remove(&terminal_id);
        let _ = self
            .changes
            .send(ChangeEvent::TerminalChanged(TerminalChange {
                terminal_id,
                record: None,
            }));
    }

    fn take_counted_ride(&self, card_id: u64) -> RideClaim {
        match self.cards.write().expect("card map lock").get_mut(&card_id) {
            Some(card) if card.rides_left > 0 => {
                card.rides_left -= 1;
                RideClaim::Taken {
                    left: card.rides_left,
                }
            }
            _ => RideClaim::NoneLeft,
        }
    }

    fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
        let mut changes = self.changes.subscribe();
        let (tx, rx) = mpsc::channel(CHANGE_CHANNEL);
        tokio::spawn(async move {
            loop {
                let event = match changes.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => ChangeEvent::Resync,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

/// Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// A single Redis or a Redis Cluster ([`crate::redis_target`]).
    pub url: String,
    /// CA certificates (PEM) a TLS Redis's certificate must chain to; the system's when absent.
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub key_prefix: String,
    /// Longest a lookup may wait for Redis before the tap is answered without it.
    pub response_timeout: Duration,
    /// Replicas that must hold a card or gate change before writing it counts as done
    /// (Redis WAIT); 0 does not wait. With replicas, a change acknowledged this way survives
    /// the failover of its master.
    pub wait_replicas: u16,
}

/// Longest a change waits for its replicas before it is reported as not replicated; never
/// longer than most of the response timeout, which would end the wait first.
const REPLICA_WAIT: Duration = Duration::from_secs(2);

/// A Redis stream entry id, `ms-seq`, ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for EntryId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        match (ms.parse(), seq.parse()) {
            (Ok(ms), Ok(seq)) => Ok(Self { ms, seq }),
            _ => Err(format!("`{s}` is not a stream entry id")),
        }
    }
}

/// How many change groups the directory's keys are spread over. Each group is one hash slot
/// holding its cards, its gates and its change stream, so a record and the change entry that
/// announces it are written in one MULTI/EXEC on any Redis; every gateway follows all groups.
/// Fixed: changing it moves every key.
pub const CHANGE_GROUPS: u16 = 16;

/// The change group of a card or gate id.
pub fn change_group(id: u64) -> u16 {
    // The low digits of card numbers are sequential; mix before taking the group.
    ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % u64::from(CHANGE_GROUPS)) as u16
}

/// Counted rides are taken in Redis, never below zero, so gateways racing on one card cannot
/// overdraw it. KEYS: the card. Returns the rides left after taking one, -1 when none was left,
/// -2 when the card has no readable count.
const TAKE_RIDE_SCRIPT: &str = r"
local rides = redis.call('HGET', KEYS[1], 'rides')
if not rides then return -2 end
local n = tonumber(rides)
if n == nil or n ~= math.floor(n) then return -2 end
if n <= 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'rides', -1)
";

/// How the directory's Redis looks from this process.
#[derive(Debug)]
pub struct DirectoryHealth {
    /// Redis answering this process's commands, probed every second while a gateway runs.
    pub redis: Arc<PartHealth>,
    /// Each change group's feed following its stream.
    pub feed: Vec<Arc<PartHealth>>,
    /// Panics caught in the feed's and the probe's tasks.
    pub panics: Arc<Panics>,
}

impl Default for DirectoryHealth {
    fn default() -> Self {
        Self {
            redis: Arc::default(),
            feed: (0..CHANGE_GROUPS).map(|_| Arc::default()).collect(),
            panics: Arc::default(),
        }
    }
}

/// How often a gateway asks its Redis whether it answers.
const PROBE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct RedisDirectory {
    target: Arc<RedisTarget>,
    health: Arc<DirectoryHealth>,
    connection: RedisConnection,
    prefix: Arc<str>,
    wait_replicas: u16,
    replica_wait: Duration,
    take_ride: Arc<redis::Script>,
}

impl RedisDirectory {
    /// Prepares the connection without waiting for Redis: a gateway can start while Redis is
    /// down and serve what it can; lookups fail fast until Redis is back.
    pub fn connect(settings: &RedisSettings) -> Result<Self, DirectoryError> {
        let target = RedisTarget::parse(&settings.url, settings.tls_ca_file.as_deref())
            .map_err(DirectoryError::Unavailable)?;
        let connection = target.shared_connection(settings.response_timeout)?;
        Ok(Self {
            target: Arc::new(target),
            health: Arc::default(),
            connection,
            prefix: settings.key_prefix.as_str().into(),
            wait_replicas: settings.wait_replicas,
            replica_wait: REPLICA_WAIT.min(settings.response_timeout * 3 / 4),
            take_ride: Arc::new(redis::Script::new(TAKE_RIDE_SCRIPT)),
        })
    }

    /// The hash tag of a change group: its keys all hash to one slot.
    fn group_tag(&self, group: u16) -> String {
        format!("{}:{{g{group:02}}}", self.prefix)
    }

    fn card_key(&self, card_id: u64) -> String {
        format!("{}:card:{card_id}", self.group_tag(change_group(card_id)))
    }

    fn terminal_key(&self, terminal_id: u64) -> String {
        format!(
            "{}:terminal:{terminal_id}",
            self.group_tag(change_group(terminal_id))
        )
    }

    fn changes_key(&self, group: u16) -> String {
        format!("{}:changes", self.group_tag(group))
    }

    async fn card(&self, card_id: u64) -> Result<Option<CardRecord>, DirectoryError> {
        let key = self.card_key(card_id);
        let fields: HashMap<String, String> = self.connection.clone().hgetall(&key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_card(card_id, &fields)
            .map(Some)
            .map_err(|detail| DirectoryError::Malformed { key, detail })
    }

    async fn terminal(&self, terminal_id: u64) -> Result<Option<TerminalRecord>, DirectoryError> {
        let key = self.terminal_key(terminal_id);
        let fields: HashMap<String, String> = self.connection.clone().hgetall(&key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_terminal(terminal_id, &fields)
            .map(Some)
            .map_err(|detail| DirectoryError::Malformed { key, detail })
    }

    /// Writes records with their change entries: one MULTI/EXEC per change group, since a
    /// transaction may touch one slot only.
    async fn write_grouped<T>(
        &self,
        items: &[T],
        id_of: impl Fn(&T) -> u64,
        mut queue: impl FnMut(&mut redis::Pipeline, &T),
    ) -> Result<(), DirectoryError> {
        let mut groups: BTreeMap<u16, Vec<&T>> = BTreeMap::new();
        for item in items {
            groups
                .entry(change_group(id_of(item)))
                .or_default()
                .push(item);
        }
        for group in groups.into_values() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for item in group {
                queue(&mut pipe, item);
            }
            pipe.query_async::<()>(&mut self.connection.clone()).await?;
        }
        self.wait_for_replicas().await
    }

    /// Waits until the configured number of replicas hold every write made so far on this
    /// connection. On a cluster the redis crate asks every master and reports the fewest.
    async fn wait_for_replicas(&self) -> Result<(), DirectoryError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let acked: u16 = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(self.replica_wait.as_millis().max(1) as u64)
            .query_async(&mut self.connection.clone())
            .await?;
        if acked < self.wait_replicas {
            return Err(DirectoryError::NotReplicated {
                wanted: self.wait_replicas,
                acked,
                waited_ms: self.replica_wait.as_millis() as u64,
            });
        }
        Ok(())
    }

    async fn put_cards(&self, records: &[CardRecord]) -> Result<(), DirectoryError> {
        self.write_grouped(
            records,
            |r| r.card_id,
            |pipe, record| {
                let fields = card_fields(record);
                pipe.hset_multiple(self.card_key(record.card_id), &fields)
                    .ignore();
                let mut entry = vec![("id", record.card_id.to_string())];
                entry.extend(fields);
                self.add_change(pipe, change_group(record.card_id), &entry);
            },
        )
        .await
    }

    async fn put_terminals(&self, records: &[TerminalRecord]) -> Result<(), DirectoryError> {
        self.write_grouped(
            records,
            |t| t.terminal_id,
            |pipe, t| {
                let fields = [
                    ("area", t.area.0.to_string()),
                    ("mode", t.mode.label().to_owned()),
                    ("operator", t.operator.to_string()),
                ];
                pipe.hset_multiple(self.terminal_key(t.terminal_id), &fields)
                    .ignore();
                let mut entry = vec![("terminal", t.terminal_id.to_string())];
                entry.extend(fields);
                self.add_change(pipe, change_group(t.terminal_id), &entry);
            },
        )
        .await
    }

    async fn revoke_terminal(&self, terminal_id: u64) -> Result<(), DirectoryError> {
        self.write_grouped(
            &[terminal_id],
            |t| *t,
            |pipe, t| {
                pipe.del(self.terminal_key(*t)).ignore();
                self.add_change(
                    pipe,
                    change_group(*t),
                    &[("terminal", t.to_string()), ("deleted", "1".to_owned())],
                );
            },
        )
        .await
    }

    /// Queues the change-stream entry that tells every gateway about a change.
    fn add_change(&self, pipe: &mut redis::Pipeline, group: u16, entry: &[(&str, String)]) {
        pipe.cmd("XADD")
            .arg(self.changes_key(group))
            .arg("MAXLEN")
            .arg("~")
            .arg(CHANGE_STREAM_MAXLEN)
            .arg("*")
            .arg(entry)
            .ignore();
    }

    async fn take_counted_ride(&self, card_id: u64) -> Result<RideClaim, DirectoryError> {
        let key = self.card_key(card_id);
        let left: i64 = self
            .take_ride
            .key(&key)
            .invoke_async(&mut self.connection.clone())
            .await?;
        match left {
            -1 => Ok(RideClaim::NoneLeft),
            left if left >= 0 => Ok(RideClaim::Taken {
                left: u32::try_from(left).unwrap_or(u32::MAX),
            }),
            _ => Err(DirectoryError::Malformed {
                key,
                detail: "no readable `rides` count".into(),
            }),
        }
    }

    fn decided_key(&self, terminal_id: u64) -> String {
        format!(
            "{}:decided:{terminal_id}",
            self.group_tag(change_group(terminal_id))
        )
    }

    async fn share_decisions(
        &self,
        records: &[JournalRecord],
        slots: u16,
    ) -> Result<(), DirectoryError> {
        // One pipeline per change group: a cluster runs a pipeline on one slot only.
        let mut groups: BTreeMap<u16, redis::Pipeline> = BTreeMap::new();
        let mut bytes = Vec::with_capacity(PAYLOAD_LEN);
        for record in records {
            bytes.clear();
            record.encode(&mut bytes);
            groups
                .entry(change_group(record.terminal_id))
                .or_default()
                .hset(
                    self.decided_key(record.terminal_id),
                    record.tap.sequence % u64::from(slots.max(1)),
                    bytes.as_slice(),
                )
                .ignore();
        }
        let writes = groups.into_values().map(|pipe| {
            let mut connection = self.connection.clone();
            async move { pipe.query_async::<()>(&mut connection).await }
        });
        for written in futures_util::future::join_all(writes).await {
            written?;
        }
        Ok(())
    }

    async fn shared_decisions(
        &self,
        terminal_id: u64,
    ) -> Result<Vec<JournalRecord>, DirectoryError> {
        let key = self.decided_key(terminal_id);
        let values: Vec<Vec<u8>> = self.connection.clone().hvals(&key).await?;
        values
            .iter()
            .map(|bytes| {
                JournalRecord::decode(bytes)
                    .filter(|r| r.terminal_id == terminal_id)
                    .ok_or_else(|| DirectoryError::Malformed {
                        key: key.clone(),
                        detail: "a shared decision that is not a tap record of this gate".into(),
                    })
            })
            .collect()
    }

    /// Follows every change group's stream, each on a connection of its own (XREAD BLOCK
    /// would stall lookups multiplexed on the shared one). The receiver gets every change
    /// written after this call returns.
    async fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
        let (tx, rx) = mpsc::channel(CHANGE_CHANNEL);
        let mut starting = tokio::task::JoinSet::new();
        for group in 0..CHANGE_GROUPS {
            let mut follower = ChangeFollower {
                target: self.target.clone(),
                health: self.health.clone(),
                group,
                key: self.changes_key(group),
                last_id: None,
                tx: tx.clone(),
                lost_since: None,
            };
            starting.spawn(async move {
                let first = match follower.target.blocking_connection(FEED_BLOCK).await {
                    Ok(mut conn) => match follower.start_at_end(&mut conn).await {
                        Ok(()) => Some(conn),
                        Err(e) => {
                            if group == 0 {
                                tracing::warn!(error = %bounded_error(&e), "cannot read the card change streams yet");
                            }
                            None
                        }
                    },
                    Err(e) => {
                        if group == 0 {
                            tracing::warn!(error = %bounded_error(&e), "Redis unreachable at start; following card changes once it is back");
                        }
                        None
                    }
                };
                (follower, first)
            });
        }
        while let Some(started) = starting.join_next().await {
            if let Ok((follower, first)) = started {
                if first.is_none() {
                    follower.health.feed[usize::from(follower.group)]
                        .fail(std::time::Instant::now(), "Redis unreachable");
                }
                let part = follower.health.feed[usize::from(follower.group)].clone();
                let panics = follower.health.panics.clone();
                supervise("change feed", part, panics, follower.run(first));
            }
        }
        supervise(
            "Redis probe",
            self.health.redis.clone(),
            self.health.panics.clone(),
            probe(self.connection.clone(), self.health.clone(), tx),
        );
        rx
    }
}

/// How long one XREAD waits for a change before asking again.
const FEED_BLOCK: Duration = Duration::from_secs(1);
/// First pause before reaching Redis again after the feed lost it; attempts that fail in a
/// row wait longer, up to `FEED_RECONNECT_CEILING`.
const FEED_RECONNECT: Duration = Duration::from_millis(200);
const FEED_RECONNECT_CEILING: Duration = Duration::from_secs(2);
/// While the feed stays lost, how often the log says so again.
const FEED_LOST_REPEAT: Duration = Duration::from_secs(60);

/// Follows one change group's stream.
struct ChangeFollower {
    target: Arc<RedisTarget>,
    health: Arc<DirectoryHealth>,
    group: u16,
    key: String,
    /// The last entry applied; `None` until the feed has found its place in the stream.
    last_id: Option<String>,
    tx: mpsc::Sender<ChangeEvent>,
    /// When the feed lost Redis and when that was last logged, while it stays lost.
    lost_since: Option<(tokio::time::Instant, tokio::time::Instant, u64)>,
}

impl ChangeFollower {
    async fn run(mut self, mut connection: Option<RedisConnection>) {
        loop {
            let mut conn = match connection.take() {
                Some(conn) => conn,
                None => match self.reconnect().await {
                    Some(conn) => conn,
                    None => return, // the cache went away
                },
            };
            if let Err(e) = self.position(&mut conn).await {
                self.lost(&e);
                continue;
            }
            self.health.feed[usize::from(self.group)].ok();
            if let Some((since, _, attempts)) = self.lost_since.take() {
                tracing::info!(group = self.group, after = ?since.elapsed(), attempts, "card change feed back");
            }
            match self.follow(&mut conn).await {
                Ok(()) => return,
                Err(e) => self.lost(&e),
            }
        }
    }

    /// Logs a lost feed at its start and then once a minute with the count of attempts, so an
    /// outage is one line a minute rather than five a second.
    fn lost(&mut self, e: &redis::RedisError) {
        self.health.feed[usize::from(self.group)].fail(std::time::Instant::now(), bounded_error(e));
        let now = tokio::time::Instant::now();
        match &mut self.lost_since {
            None => {
                tracing::warn!(group = self.group, error = %bounded_error(e), "card change feed lost; reconnecting");
                self.lost_since = Some((now, now, 1));
            }
            Some((since, logged, attempts)) => {
                *attempts += 1;
                if now.duration_since(*logged) >= FEED_LOST_REPEAT {
                    tracing::warn!(group = self.group, error = %bounded_error(e), lost_for = ?since.elapsed(), attempts = *attempts, "card change feed still lost");
                    *logged = now;
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Option<RedisConnection> {
        let mut retry = Backoff::new(FEED_RECONNECT, FEED_RECONNECT_CEILING);
        loop {
            retry.wait().await;
            if self.tx.is_closed() {
                return None;
            }
            match self.target.blocking_connection(FEED_BLOCK).await {
                Ok(conn) => return Some(conn),
                Err(e) => self.lost(&e),
            }
        }
    }

    /// The stream's newest entry becomes our position.
    async fn start_at_end(&mut self, conn: &mut RedisConnection) -> redis::RedisResult<()> {
        let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&self.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        self.last_id = Some(
            last.ids
                .first()
                .map(|e| e.id.clone())
                .unwrap_or_else(|| "0-0".to_owned()),
        );
        Ok(())
    }

    /// Before reading after a (re)connection: resume where we were if nothing was lost,
    /// otherwise start at the end and tell the cache to forget everything.
    async fn position(&mut self, conn: &mut RedisConnection) -> redis::RedisResult<()> {
        let resumed = match &self.last_id {
            None => {
                // Started while Redis was away: whatever was cached meanwhile has no feed
                // behind it.
                self.start_at_end(conn).await?;
                false
            }
            Some(_) => self.check_continuity(conn).await?,
        };
        if !resumed {
            tracing::warn!(
                group = self.group,
                "card changes may have been missed; dropping the cache"
            );
            // A closed channel means the cache is gone; follow() then returns at once.
            let _ = self.tx.send(ChangeEvent::Resync).await;
        }
        Ok(())
    }

    /// Whether reading on from `last_id` loses nothing: the stream is the one we were reading
    /// (not recreated, say by a Redis restart without persistence) and nothing after `last_id`
    /// was trimmed (Redis 7 reports the highest deleted id). When it returns false, `last_id`
    /// moves to the stream's end, since the cache is about to be dropped anyway.
    async fn check_continuity(&mut self, conn: &mut RedisConnection) -> redis::RedisResult<bool> {
        let info: Result<HashMap<String, redis::Value>, _> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.key)
            .query_async(conn)
            .await;
        let info = match info {
            Ok(info) => info,
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                let continuous = self.last_id.as_deref() == Some("0-0");
                self.last_id = Some("0-0".to_owned());
                return Ok(continuous);
            }
            Err(e) => return Err(e),
        };
        let id_field = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_else(|| "0-0".to_owned())
        };
        let last_generated = id_field("last-generated-id");
        let max_deleted = id_field("max-deleted-entry-id");
        let last_id = self.last_id.clone().unwrap_or_else(|| "0-0".to_owned());
        let recreated = stream_id_after(&last_id, &last_generated);
        let trimmed = stream_id_after(&max_deleted, &last_id);
        if recreated || trimmed {
            self.last_id = Some(last_generated);
            return Ok(false);
        }
        Ok(true)
    }

    async fn follow(&mut self, conn: &mut RedisConnection) -> redis::RedisResult<()> {
        loop {
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(FEED_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(self.last_id.as_deref().unwrap_or("$"))
                .query_async(conn)
                .await?;
            if self.tx.is_closed() {
                return Ok(());
            }
            let Some(reply) = reply else { continue };
            for stream in reply.keys {
                for entry in stream.ids {
                    self.last_id = Some(entry.id.clone());
                    let fields: HashMap<String, String> = entry
                        .map
                        .iter()
                        .filter_map(|(k, v)| {
                            redis::from_redis_value_ref::<String>(v)
                                .ok()
                                .map(|v| (k.clone(), v))
                        })
                        .collect();
                    let event = match change_event(&fields) {
                        Ok(event) => event,
                        Err(detail) => {
                            tracing::warn!(stream = %self.key, entry = %entry.id, %detail, "malformed change entry");
                            continue;
                        }
                    };
                    if self.tx.send(event).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Asks Redis every second whether it answers this process's commands (unreachable, refusing a
/// password, or a cluster that is down all show here), until the gateway is gone.
async fn probe(
    mut connection: RedisConnection,
    health: Arc<DirectoryHealth>,
    gateway: mpsc::Sender<ChangeEvent>,
) {
    let mut incident = Incident::new("the directory's Redis does not answer");
    while !gateway.is_closed() {
        let answered: redis::RedisResult<String> =
            redis::cmd("PING").query_async(&mut connection).await;
        let now = std::time::Instant::now();
        match answered {
            Ok(_) => {
                health.redis.ok();
                incident.recovered(now);
            }
            Err(e) => {
                let error = bounded_error(&e);
                health.redis.fail(now, &error);
                incident.failed(now, error);
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// A change-stream entry as an event: a gate's when it names a `terminal`, else a card's `id`;
/// either with its new fields, or `deleted`.
fn change_event(fields: &HashMap<String, String>) -> Result<ChangeEvent, String> {
    let deleted = fields.contains_key("deleted");
    if let Some(terminal) = fields.get("terminal") {
        let terminal_id = terminal
            .parse()
            .map_err(|_| format!("gate id `{terminal}`"))?;
        let record = (!deleted)
            .then(|| parse_terminal(terminal_id, fields))
            .transpose()?;
        return Ok(ChangeEvent::TerminalChanged(TerminalChange {
            terminal_id,
            record,
        }));
    }
    let card_id = fields
        .get("id")
        .and_then(|v| v.parse().ok())
        .ok_or("no card id")?;
    let record = (!deleted)
        .then(|| parse_card(card_id, fields))
        .transpose()?;
    Ok(ChangeEvent::Changed(CardChange { card_id, record }))
}

/// Whether stream id `a` sorts after `b`; an id that does not parse counts as `0-0`.
fn stream_id_after(a: &str, b: &str) -> bool {
    let id = |s: &str| s.parse::<EntryId>().unwrap_or_default();
    id(a) > id(b)
}

pub fn card_fields(record: &CardRecord) -> Vec<(&'static str, String)> {
    vec![
        ("state", record.state.label().to_owned()),
        ("issuer", record.issuer.label().to_owned()),
        ("concession", record.concession.label().to_owned()),
        ("rides", record.rides_left.to_string()),
        (
            "expires",
            record
                .expires_on
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default(),
        ),
    ]
}

pub fn parse_card(card_id: u64, fields: &HashMap<String, String>) -> Result<CardRecord, String> {
    let field = |name: &str| {
        fields
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("missing field `{name}`"))
    };
    let state = field("state")?;
    let issuer = field("issuer")?;
    let concession = fields.get("concession").map_or("none", String::as_str);
    let rides = fields.get("rides").map_or("0", String::as_str);
    let expires = fields.get("expires").map_or("", String::as_str);
    Ok(CardRecord {
        card_id,
        state: CardState::from_label(state).ok_or(format!("unknown state `{state}`"))?,
        issuer: Issuer::from_label(issuer).ok_or(format!("unknown issuer `{issuer}`"))?,
        concession: Concession::from_label(concession)
            .ok_or(format!("unknown concession `{concession}`"))?,
        rides_left: rides
            .parse()
            .map_err(|_| format!("rides `{rides}` is not a count"))?,
        expires_on: if expires.is_empty() {
            None
        } else {
            Some(
                NaiveDate::parse_from_str(expires, "%Y-%m-%d")
                    .map_err(|_| format!("expires `{expires}` is not YYYY-MM-DD"))?,
            )
        },
    })
}

fn parse_terminal(
    terminal_id: u64,
    fields: &HashMap<String, String>,
) -> Result<TerminalRecord, String> {
    let get = |name: &str| fields.get(name).ok_or(format!("missing field `{name}`"));
    let area = get("area")?;
    let mode = get("mode")?;
    let operator = get("operator")?;
    Ok(TerminalRecord {
        terminal_id,
        area: area
            .parse()
            .ok()
            .map(AreaCode)
            .filter(|a| a.area().is_some())
            .ok_or(format!("unknown area `{area}`"))?,
        mode: Mode::from_label(mode).ok_or(format!("unknown mode `{mode}`"))?,
        operator: operator
            .parse()
            .map_err(|_| format!("operator `{operator}` is not a number"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_fields_round_trip() {
        let record = CardRecord {
            card_id: 7,
            state: CardState::Blocked,
            issuer: Issuer::TUnion,
            concession: Concession::Elder,
            rides_left: 1200,
            expires_on: NaiveDate::from_ymd_opt(2030, 12, 31),
        };
        let fields: HashMap<String, String> = card_fields(&record)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(parse_card(7, &fields), Ok(record));
    }

    #[test]
    fn malformed_card_fields_say_what_is_wrong() {
        let mut fields: HashMap<String, String> = [("state", "gone"), ("issuer", "cq_ssc")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        assert_eq!(parse_card(1, &fields), Err("unknown state `gone`".into()));
        fields.insert("state".into(), "active".into());
        fields.insert("expires".into(), "31/12/2030".into());
        assert!(parse_card(1, &fields).unwrap_err().contains("YYYY-MM-DD"));
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id_after("10-0", "9-5"));
        assert!(stream_id_after("9-10", "9-9"));
        assert!(!stream_id_after("9-9", "9-9"));
    }
}
