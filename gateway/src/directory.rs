//! Card and terminal directories: where card records live, and how changes to them reach every
//! gateway's cache.
//!
//! Two implementations behind one type: [`Directory::Redis`] for production, and
//! [`Directory::Embedded`], an in-process store for the zero-setup demo and for tests.
//!
//! Redis key schema (`P` is the configured key prefix, `tapgate` by default):
//!
//! | key                    | type   | fields |
//! |------------------------|--------|--------|
//! | `P:card:{ID}`          | hash   | `state` (active/lost/cancelled/blocked), `issuer` (cq_ssc/cq_city/sc_tianfutong/t_union), `concession` (none/elder/disabled/veteran/student), `rides` (counted rides left), `expires` (YYYY-MM-DD or empty) |
//! | `P:terminal:ID`        | hash   | `area` (six-digit code), `mode` (bus/metro/ferry/cableway/intercity_rail), `operator` (number) |
//! | `P:card-changes`       | stream | one entry per change: `id` and the card's new fields, or `deleted` = 1; for a gate, `terminal` and its new fields, or `deleted` = 1 |
//!
//! The card id is in braces so a Redis Cluster keeps each card's key in one slot. Every change is
//! written with its stream entry in one MULTI/EXEC. Gateways follow the stream with XREAD BLOCK
//! from the last entry they applied, so a gateway that was disconnected reads what it missed
//! when it reconnects; plain pub/sub would have dropped it. If the stream was trimmed past that
//! point the gateway drops its whole cache instead.

use crate::card::{CardRecord, CardState};
use chrono::NaiveDate;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapgate_protocol::{AreaCode, Concession, Issuer, Mode};
use tokio::sync::{broadcast, mpsc};

/// A gate as provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalRecord {
    pub terminal_id: u64,
    pub area: AreaCode,
    pub mode: Mode,
    pub operator: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("card directory unreachable: {0}")]
    Unavailable(String),
    #[error("card directory holds a malformed record for {key}: {detail}")]
    Malformed { key: String, detail: String },
}

impl From<redis::RedisError> for DirectoryError {
    fn from(e: redis::RedisError) -> Self {
        DirectoryError::Unavailable(e.to_string())
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

    /// Takes one ride from the card's counted concession allowance. Not published as a change:
    /// each node decrements its own cached copy, and settlement recounts rides from the journal.
    pub async fn use_counted_ride(&self, card_id: u64) -> Result<(), DirectoryError> {
        match self {
            Directory::Embedded(d) => {
                d.use_counted_ride(card_id);
                Ok(())
            }
            Directory::Redis(d) => d.use_counted_ride(card_id).await,
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

    fn use_counted_ride(&self, card_id: u64) {
        if let Some(card) = self.cards.write().expect("card map lock").get_mut(&card_id) {
            card.rides_left = card.rides_left.saturating_sub(1);
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
    pub url: String,
    pub key_prefix: String,
    /// Longest a lookup may wait for Redis before the tap is answered without it.
    pub response_timeout: Duration,
}

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

/// A reconnecting Redis connection that does not wait for Redis: commands fail fast (after
/// `timeout`) while it is down, and it reconnects in the background.
pub fn lazy_connection(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

#[derive(Clone)]
pub struct RedisDirectory {
    client: redis::Client,
    connection: ConnectionManager,
    prefix: Arc<str>,
}

impl RedisDirectory {
    /// Prepares the connection without waiting for Redis: a gateway can start while Redis is
    /// down and serve what it can; lookups fail fast until Redis is back.
    pub fn connect(settings: &RedisSettings) -> Result<Self, DirectoryError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| DirectoryError::Unavailable(format!("bad Redis URL: {e}")))?;
        let connection = lazy_connection(&client, settings.response_timeout)?;
        Ok(Self {
            client,
            connection,
            prefix: settings.key_prefix.as_str().into(),
        })
    }

    fn card_key(&self, card_id: u64) -> String {
        format!("{}:card:{{{card_id}}}", self.prefix)
    }

    fn terminal_key(&self, terminal_id: u64) -> String {
        format!("{}:terminal:{terminal_id}", self.prefix)
    }

    fn changes_key(&self) -> String {
        format!("{}:card-changes", self.prefix)
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

    async fn put_cards(&self, records: &[CardRecord]) -> Result<(), DirectoryError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for record in records {
            let fields = card_fields(record);
            pipe.hset_multiple(self.card_key(record.card_id), &fields)
                .ignore();
            let mut entry = vec![("id", record.card_id.to_string())];
            entry.extend(fields);
            self.add_change(&mut pipe, &entry);
        }
        pipe.query_async::<()>(&mut self.connection.clone()).await?;
        Ok(())
    }

    async fn put_terminals(&self, records: &[TerminalRecord]) -> Result<(), DirectoryError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for t in records {
            let fields = [
                ("area", t.area.0.to_string()),
                ("mode", t.mode.label().to_owned()),
                ("operator", t.operator.to_string()),
            ];
            pipe.hset_multiple(self.terminal_key(t.terminal_id), &fields)
                .ignore();
            let mut entry = vec![("terminal", t.terminal_id.to_string())];
            entry.extend(fields);
            self.add_change(&mut pipe, &entry);
        }
        pipe.query_async::<()>(&mut self.connection.clone()).await?;
        Ok(())
    }

    async fn revoke_terminal(&self, terminal_id: u64) -> Result<(), DirectoryError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.del(self.terminal_key(terminal_id)).ignore();
        self.add_change(
            &mut pipe,
            &[
                ("terminal", terminal_id.to_string()),
                ("deleted", "1".to_owned()),
            ],
        );
        pipe.query_async::<()>(&mut self.connection.clone()).await?;
        Ok(())
    }

    /// Queues the change-stream entry that tells every gateway about a change.
    fn add_change(&self, pipe: &mut redis::Pipeline, entry: &[(&str, String)]) {
        pipe.cmd("XADD")
            .arg(self.changes_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(CHANGE_STREAM_MAXLEN)
            .arg("*")
            .arg(entry)
            .ignore();
    }

    async fn use_counted_ride(&self, card_id: u64) -> Result<(), DirectoryError> {
        let _: i64 = self
            .connection
            .clone()
            .hincr(self.card_key(card_id), "rides", -1)
            .await?;
        Ok(())
    }

    /// Follows the change stream on a connection of its own (XREAD BLOCK would stall lookups
    /// multiplexed on the shared one).
    async fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
        let (tx, rx) = mpsc::channel(CHANGE_CHANNEL);
        let mut follower = ChangeFollower {
            client: self.client.clone(),
            key: self.changes_key(),
            last_id: None,
            tx,
        };
        let first = match self.client.get_multiplexed_async_connection().await {
            Ok(mut conn) => match follower.start_at_end(&mut conn).await {
                Ok(()) => Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the card change stream yet");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "Redis unreachable at start; following card changes once it is back");
                None
            }
        };
        tokio::spawn(follower.run(first));
        rx
    }
}

struct ChangeFollower {
    client: redis::Client,
    key: String,
    /// The last entry applied; `None` until the feed has found its place in the stream.
    last_id: Option<String>,
    tx: mpsc::Sender<ChangeEvent>,
}

impl ChangeFollower {
    async fn run(mut self, mut connection: Option<redis::aio::MultiplexedConnection>) {
        loop {
            let mut conn = match connection.take() {
                Some(conn) => conn,
                None => match self.reconnect().await {
                    Some(conn) => conn,
                    None => return, // the cache went away
                },
            };
            if let Err(e) = self.position(&mut conn).await {
                tracing::warn!(error = %e, "could not find our place in the card change stream");
                continue;
            }
            match self.follow(&mut conn).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "card change feed lost; reconnecting"),
            }
        }
    }

    async fn reconnect(&self) -> Option<redis::aio::MultiplexedConnection> {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.tx.is_closed() {
                return None;
            }
            match self.client.get_multiplexed_async_connection().await {
                Ok(conn) => return Some(conn),
                Err(e) => tracing::debug!(error = %e, "Redis still unreachable"),
            }
        }
    }

    /// The stream's newest entry becomes our position.
    async fn start_at_end(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
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
    async fn position(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let resumed = match &self.last_id {
            None => {
                // Started while Redis was away: whatever was cached meanwhile has no feed
                // behind it.
                self.start_at_end(conn).await?;
                false
            }
            Some(_) => self.check_continuity(conn).await?,
        };
        if resumed {
            tracing::info!("card change feed resumed; catching up");
        } else {
            tracing::warn!("card changes may have been missed; dropping the cache");
            // A closed channel means the cache is gone; follow() then returns at once.
            let _ = self.tx.send(ChangeEvent::Resync).await;
        }
        Ok(())
    }

    /// Whether reading on from `last_id` loses nothing: the stream is the one we were reading
    /// (not recreated, say by a Redis restart without persistence) and nothing after `last_id`
    /// was trimmed (Redis 7 reports the highest deleted id). When it returns false, `last_id`
    /// moves to the stream's end, since the cache is about to be dropped anyway.
    async fn check_continuity(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<bool> {
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

    async fn follow(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        loop {
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(1000)
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
                            tracing::warn!(entry = %entry.id, %detail, "malformed change entry");
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
