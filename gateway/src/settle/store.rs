//! Where settlement keeps its streams, checkpoints, leases, riders and ledgers.
//!
//! [`Store::Redis`] for production; [`Store::Memory`] for the embedded demo, with the same
//! semantics in one process (nothing survives the process, and the demo writes its ledger to a
//! file at the end).
//!
//! Redis key schema (`P` is the key prefix):
//!
//! | key                          | type   | what |
//! |------------------------------|--------|------|
//! | `P:settle:partitions`        | string | partition count, fixed at first use |
//! | `P:taps:{N}`                 | stream | shipped approved taps of partition N: `tap` = `TERMINAL-SEQUENCE`, `r` = the journal record |
//! | `P:forward:NODE`             | string | the node's forwarder checkpoint, `JOURNAL@SEGMENT:OFFSET` (the journal's identity and a place in it) |
//! | `P:settle:watermarks`        | hash   | partition → last stream id applied |
//! | `P:settle:lease:N`           | string | token of the settler that owns partition N (expires) |
//! | `P:settle:members`           | zset   | live settlers by last heartbeat (server time, ms) |
//! | `P:settle:counts`            | hash   | `shipped`, `settled`: taps, for the backlog |
//! | `P:rider:{CARD}`             | string | the card's fare-engine state |
//! | `P:ledger-taps`              | hash   | day → approved taps settled |
//! | `P:ledger:DAY`               | hash   | `AREA:OPERATOR:MODE:fen` / `:rides` |
//! | `P:ledger-cards:DAY`         | hash   | `CARD:fen` / `CARD:rides` |
//! | `P:clearing:DAY`             | hash   | `PAYER:PAYEE:fen` / `:rides` (regions `chongqing`, `sichuan`, `t_union`) |
//! | `P:fare-tables`              | set    | digests of the fare tables that priced the ledgers, added with each batch |
//!
//! Days are `YYYY-MM-DD` on the Chongqing calendar. The consumer group on every partition
//! stream is `settlers`.

use super::ledger::{DayLedger, Ledger, Totals};
pub use crate::directory::EntryId;
use crate::fares::RiderState;
use crate::journal::{JournalPosition, JournalRecord, PAYLOAD_LEN};
use chrono::NaiveDate;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapgate_protocol::{IssuerRegion, Mode};
use tokio::sync::Notify;

pub const GROUP: &str = "settlers";

/// Fields per HSCAN round trip when reading ledgers back.
const HSCAN_PAGE: usize = 10_000;

/// How far a node's forwarder has shipped, in which journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The journal's identity ([`crate::journal::journal_id`]).
    pub journal: String,
    pub position: JournalPosition,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.journal, self.position)
    }
}

impl std::str::FromStr for Checkpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (journal, position) = s
            .split_once('@')
            .ok_or_else(|| format!("checkpoint `{s}`: expected JOURNAL@SEGMENT:OFFSET"))?;
        Ok(Self {
            journal: journal.to_owned(),
            position: position.parse()?,
        })
    }
}

/// A tap as a settler receives it. `record` is `None` for an entry that is not a journal
/// record (written by something else than a forwarder): it is acknowledged and never applied.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub id: EntryId,
    pub record: Option<JournalRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shipped {
    Done,
    /// The checkpoint was not the one the batch was read from (another forwarder with the
    /// same node name, or a Redis that lost data); nothing was shipped. Resume from here.
    Moved(Option<Checkpoint>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// This settler no longer owns the partition; nothing was applied.
    LeaseLost,
    /// The watermark moved since it was read; nothing was applied. Read again.
    WatermarkMoved,
}

/// One settler batch, applied whole or not at all.
#[derive(Debug, Clone)]
pub struct ApplyBatch {
    pub partition: u16,
    pub token: String,
    /// The watermark the batch was computed against.
    pub expected: Option<EntryId>,
    /// The last entry applied by this batch.
    pub watermark: EntryId,
    /// Every entry to acknowledge: the applied ones and redelivered ones already applied.
    pub acks: Vec<EntryId>,
    /// Entries older than this one are applied and can leave the stream.
    pub trim_below: EntryId,
    pub taps: u64,
    pub riders: Vec<(u64, RiderState)>,
    pub ledger: Ledger,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("settlement store unreachable: {0}")]
    Unavailable(String),
    #[error("settlement store: {0}")]
    Malformed(String),
    #[error(
        "settlement store is set up for {stored} partitions, this process for {configured}; one card's taps would split across partitions"
    )]
    PartitionMismatch { stored: u16, configured: u16 },
    #[error(
        "the checkpoint of node `{node}` belongs to journal {theirs}, this gateway's journal is {ours}: two gateways share a node name. Give this one its own `[settlement] node`, or delete the key `forward:{node}` if journal {theirs} is retired"
    )]
    ForeignCheckpoint {
        node: String,
        theirs: String,
        ours: String,
    },
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

#[derive(Clone)]
pub enum Store {
    Redis(RedisStore),
    Memory(Arc<MemoryStore>),
}

impl Store {
    /// Fixes the partition count on first use and creates the consumer groups.
    pub async fn init(&self, partitions: u16) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.init(partitions).await,
            Store::Memory(m) => m.init(partitions),
        }
    }

    pub async fn checkpoint(&self, node: &str) -> Result<Option<Checkpoint>, StoreError> {
        match self {
            Store::Redis(r) => r.checkpoint(node).await,
            Store::Memory(m) => Ok(m.lock().checkpoints.get(node).cloned()),
        }
    }

    /// Appends `taps` (partition, record) and moves the node's checkpoint from `expected` to
    /// `next`, atomically, if the checkpoint is still `expected`.
    pub async fn ship(
        &self,
        node: &str,
        expected: Option<&Checkpoint>,
        next: &Checkpoint,
        taps: &[(u16, JournalRecord)],
    ) -> Result<Shipped, StoreError> {
        match self {
            Store::Redis(r) => r.ship(node, expected, next, taps).await,
            Store::Memory(m) => Ok(m.ship(node, expected, next, taps)),
        }
    }

    /// Taps shipped and taps settled, over all nodes and settlers.
    pub async fn counts(&self) -> Result<(u64, u64), StoreError> {
        match self {
            Store::Redis(r) => r.counts().await,
            Store::Memory(m) => {
                let s = m.lock();
                Ok((s.shipped, s.settled))
            }
        }
    }

    /// Records a settler as alive and returns how many are.
    pub async fn heartbeat(&self, token: &str, ttl: Duration) -> Result<usize, StoreError> {
        match self {
            Store::Redis(r) => r.heartbeat(token, ttl).await,
            Store::Memory(m) => Ok(m.heartbeat(token, ttl)),
        }
    }

    /// Takes or renews the lease on a partition; false when another settler holds it.
    pub async fn lease(
        &self,
        partition: u16,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(r) => r.lease(partition, token, ttl).await,
            Store::Memory(m) => Ok(m.lease(partition, token, ttl)),
        }
    }

    pub async fn release(&self, partition: u16, token: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.release(partition, token).await,
            Store::Memory(m) => {
                m.release(partition, token);
                Ok(())
            }
        }
    }

    /// Entries delivered before and never acknowledged, oldest first, taken over by `consumer`.
    pub async fn pending(
        &self,
        partition: u16,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<Delivered>, StoreError> {
        match self {
            Store::Redis(r) => r.pending(partition, consumer, max).await,
            Store::Memory(m) => Ok(m.pending(partition, max)),
        }
    }

    /// New entries of the given partitions, waiting up to `block` for the first.
    pub async fn read_new(
        &self,
        partitions: &[u16],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<(u16, Vec<Delivered>)>, StoreError> {
        match self {
            Store::Redis(r) => r.read_new(partitions, consumer, max, block).await,
            Store::Memory(m) => Ok(m.read_new(partitions, max, block).await),
        }
    }

    pub async fn watermark(&self, partition: u16) -> Result<Option<EntryId>, StoreError> {
        match self {
            Store::Redis(r) => r.watermark(partition).await,
            Store::Memory(m) => Ok(m.lock().watermarks.get(&partition).copied()),
        }
    }

    pub async fn riders(&self, cards: &[u64]) -> Result<Vec<RiderState>, StoreError> {
        match self {
            Store::Redis(r) => r.riders(cards).await,
            Store::Memory(m) => {
                let s = m.lock();
                Ok(cards
                    .iter()
                    .map(|c| s.riders.get(c).cloned().unwrap_or_default())
                    .collect())
            }
        }
    }

    pub async fn apply(&self, batch: &ApplyBatch) -> Result<Applied, StoreError> {
        match self {
            Store::Redis(r) => r.apply(batch).await,
            Store::Memory(m) => Ok(m.apply(batch)),
        }
    }

    pub async fn ack(&self, partition: u16, ids: &[EntryId]) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ack(partition, ids).await,
            Store::Memory(m) => {
                m.ack(partition, ids);
                Ok(())
            }
        }
    }

    /// The settled books of one day, or of every day; the per-card books (the bulk of them)
    /// only when `with_cards`.
    pub async fn ledger(
        &self,
        day: Option<NaiveDate>,
        with_cards: bool,
    ) -> Result<Ledger, StoreError> {
        let mut ledger = match self {
            Store::Redis(r) => r.ledger(day, with_cards).await?,
            Store::Memory(m) => m.lock().ledger.clone(),
        };
        ledger.restrict(day, with_cards);
        Ok(ledger)
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// Appends a batch and moves the checkpoint, if the checkpoint is what the batch was read from.
/// KEYS: checkpoint, counts, stream 0..N-1. ARGV: expected, next, then (partition, tap id,
/// record) per tap. Returns the stored checkpoint ('' when none) if it was not the expected one.
const SHIP_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return {0, current} end
local n = 0
for i = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[3 + tonumber(ARGV[i])], '*', 'tap', ARGV[i + 1], 'r', ARGV[i + 2])
  n = n + 1
end
redis.call('SET', KEYS[1], ARGV[2])
if n > 0 then redis.call('HINCRBY', KEYS[2], 'shipped', n) end
return {1, ''}
";

/// Applies a settler batch if the lease and the watermark are what it was computed against.
/// KEYS: lease, watermarks, stream, counts, then one key per update. ARGV: partition, token,
/// expected watermark ('' when none), new watermark, trim-below id, taps, ack count, ack ids,
/// then (op, field, value) per update: `H` = HINCRBY key field value, `S` = SET key value,
/// `A` = SADD key value.
const APPLY_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 'lease' end
local current = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if current ~= ARGV[3] then return 'watermark' end
local acks = tonumber(ARGV[7])
local first = 8 + acks
local k = 5
for i = first, #ARGV, 3 do
  if ARGV[i] == 'H' then
    redis.call('HINCRBY', KEYS[k], ARGV[i + 1], ARGV[i + 2])
  elseif ARGV[i] == 'A' then
    redis.call('SADD', KEYS[k], ARGV[i + 2])
  else
    redis.call('SET', KEYS[k], ARGV[i + 2])
  end
  k = k + 1
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'settled', ARGV[6])
for i = 8, first - 1, 100 do
  redis.call('XACK', KEYS[3], 'settlers', unpack(ARGV, i, math.min(i + 99, first - 1)))
end
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[5])
return 'ok'
";

/// Heartbeat by server time so settlers on machines with skewed clocks agree on who is alive.
/// KEYS: members. ARGV: token, ttl ms. Returns the live count.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
";

/// KEYS: lease. ARGV: token, ttl ms. Takes a free lease or renews one's own.
const LEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    connection: ConnectionManager,
    /// Blocking reads get a connection of their own: XREADGROUP BLOCK on the shared one would
    /// hold up every other command behind it.
    reader: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    prefix: Arc<str>,
    partitions: Arc<std::sync::atomic::AtomicU16>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    ship: redis::Script,
    apply: redis::Script,
    heartbeat: redis::Script,
    lease: redis::Script,
    release: redis::Script,
}

impl RedisStore {
    /// Prepares the connection without waiting for Redis.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("bad Redis URL: {e}")))?;
        let connection = crate::directory::lazy_connection(&client, timeout)?;
        Ok(Self {
            client,
            connection,
            reader: Arc::default(),
            prefix: prefix.into(),
            partitions: Arc::default(),
            scripts: Arc::new(Scripts {
                ship: redis::Script::new(SHIP_SCRIPT),
                apply: redis::Script::new(APPLY_SCRIPT),
                heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
                lease: redis::Script::new(LEASE_SCRIPT),
                release: redis::Script::new(RELEASE_SCRIPT),
            }),
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn stream_key(&self, partition: u16) -> String {
        format!("{}:taps:{{{partition}}}", self.prefix)
    }

    fn lease_key(&self, partition: u16) -> String {
        format!("{}:settle:lease:{partition}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.connection.clone()
    }

    async fn init(&self, partitions: u16) -> Result<(), StoreError> {
        let key = self.key("settle:partitions");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(partitions)
            .arg("NX")
            .query_async(&mut self.conn())
            .await?;
        let stored: u16 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn())
            .await?;
        if stored != partitions {
            return Err(StoreError::PartitionMismatch {
                stored,
                configured: partitions,
            });
        }
        self.partitions
            .store(partitions, std::sync::atomic::Ordering::Relaxed);
        for p in 0..partitions {
            self.ensure_group(p).await?;
        }
        Ok(())
    }

    /// Creates the partition's stream and consumer group if missing (a Redis restarted empty).
    async fn ensure_group(&self, partition: u16) -> Result<(), StoreError> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream_key(partition))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn checkpoint(&self, node: &str) -> Result<Option<Checkpoint>, StoreError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(self.key(&format!("forward:{node}")))
            .query_async(&mut self.conn())
            .await?;
        value
            .map(|v| v.parse().map_err(StoreError::Malformed))
            .transpose()
    }

    async fn ship(
        &self,
        node: &str,
        expected: Option<&Checkpoint>,
        next: &Checkpoint,
        taps: &[(u16, JournalRecord)],
    ) -> Result<Shipped, StoreError> {
        let partitions = self.partitions.load(std::sync::atomic::Ordering::Relaxed);
        let mut invocation = self.scripts.ship.prepare_invoke();
        invocation
            .key(self.key(&format!("forward:{node}")))
            .key(self.key("settle:counts"));
        for p in 0..partitions {
            invocation.key(self.stream_key(p));
        }
        invocation
            .arg(expected.map(|p| p.to_string()).unwrap_or_default())
            .arg(next.to_string());
        let mut bytes = Vec::with_capacity(PAYLOAD_LEN);
        for (partition, record) in taps {
            bytes.clear();
            record.encode(&mut bytes);
            invocation
                .arg(partition)
                .arg(tap_id(record))
                .arg(bytes.as_slice());
        }
        let (done, current): (u8, String) = invocation.invoke_async(&mut self.conn()).await?;
        if done == 1 {
            return Ok(Shipped::Done);
        }
        let current = if current.is_empty() {
            None
        } else {
            Some(current.parse().map_err(StoreError::Malformed)?)
        };
        Ok(Shipped::Moved(current))
    }

    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let (shipped, settled): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.key("settle:counts"))
            .arg("shipped")
            .arg("settled")
            .query_async(&mut self.conn())
            .await?;
        Ok((shipped.unwrap_or(0), settled.unwrap_or(0)))
    }

    async fn heartbeat(&self, token: &str, ttl: Duration) -> Result<usize, StoreError> {
        Ok(self
            .scripts
            .heartbeat
            .key(self.key("settle:members"))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?)
    }

    async fn lease(&self, partition: u16, token: &str, ttl: Duration) -> Result<bool, StoreError> {
        let got: u8 = self
            .scripts
            .lease
            .key(self.lease_key(partition))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(got == 1)
    }

    async fn release(&self, partition: u16, token: &str) -> Result<(), StoreError> {
        let _: u8 = self
            .scripts
            .release
            .key(self.lease_key(partition))
            .arg(token)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn pending(
        &self,
        partition: u16,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<Delivered>, StoreError> {
        self.ensure_group(partition).await?;
        let reply: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(self.stream_key(partition))
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg("0-0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.conn())
            .await?;
        // [next-start, [[id, [field, value, ...]] | nil, ...], [deleted ids]]
        let redis::Value::Array(parts) = reply else {
            return Err(StoreError::Malformed("XAUTOCLAIM reply".into()));
        };
        let mut delivered = Vec::new();
        if let Some(redis::Value::Array(entries)) = parts.get(1) {
            for entry in entries {
                delivered.extend(parse_entry(entry));
            }
        }
        // Entries trimmed while pending were applied already (trimming follows the
        // watermark); acknowledging them clears them from the group.
        if let Some(redis::Value::Array(deleted)) = parts.get(2) {
            let ids: Vec<EntryId> = deleted
                .iter()
                .filter_map(|v| redis::from_redis_value_ref::<String>(v).ok())
                .filter_map(|s| s.parse().ok())
                .collect();
            if !ids.is_empty() {
                self.ack(partition, &ids).await?;
            }
        }
        delivered.sort_by_key(|d| d.id);
        Ok(delivered)
    }

    async fn reader(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut slot = self.reader.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn read_new(
        &self,
        partitions: &[u16],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<(u16, Vec<Delivered>)>, StoreError> {
        if partitions.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let mut conn = self.reader().await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS");
        for p in partitions {
            cmd.arg(self.stream_key(*p));
        }
        for _ in partitions {
            cmd.arg(">");
        }
        let reply: redis::RedisResult<redis::Value> = cmd.query_async(&mut conn).await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    for p in partitions {
                        self.ensure_group(*p).await?;
                    }
                } else {
                    // The connection may be dead; the next read opens a new one.
                    *self.reader.lock().await = None;
                }
                return Err(e.into());
            }
        };
        let mut out = Vec::new();
        let streams: Vec<(String, redis::Value)> = match reply {
            redis::Value::Nil => Vec::new(),
            redis::Value::Map(pairs) => pairs
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
                .collect(),
            redis::Value::Array(items) => items
                .into_iter()
                .filter_map(|item| match item {
                    redis::Value::Array(mut kv) if kv.len() == 2 => {
                        let v = kv.pop()?;
                        let k = redis::from_redis_value::<String>(kv.pop()?).ok()?;
                        Some((k, v))
                    }
                    _ => None,
                })
                .collect(),
            other => return Err(StoreError::Malformed(format!("XREADGROUP reply {other:?}"))),
        };
        for (key, entries) in streams {
            let Some(partition) = partitions.iter().find(|p| self.stream_key(**p) == key) else {
                continue;
            };
            let redis::Value::Array(entries) = entries else {
                continue;
            };
            let delivered: Vec<Delivered> = entries.iter().filter_map(parse_entry).collect();
            out.push((*partition, delivered));
        }
        Ok(out)
    }

    async fn watermark(&self, partition: u16) -> Result<Option<EntryId>, StoreError> {
        let value: Option<String> = redis::cmd("HGET")
            .arg(self.key("settle:watermarks"))
            .arg(partition)
            .query_async(&mut self.conn())
            .await?;
        value
            .map(|v| v.parse().map_err(StoreError::Malformed))
            .transpose()
    }

    async fn riders(&self, cards: &[u64]) -> Result<Vec<RiderState>, StoreError> {
        if cards.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for card in cards {
            cmd.arg(self.key(&format!("rider:{{{card}}}")));
        }
        let values: Vec<Option<Vec<u8>>> = cmd.query_async(&mut self.conn()).await?;
        values
            .into_iter()
            .zip(cards)
            .map(|(v, card)| match v {
                None => Ok(RiderState::default()),
                Some(bytes) => RiderState::decode(&bytes).ok_or_else(|| {
                    StoreError::Malformed(format!("rider state of card {card} is unreadable"))
                }),
            })
            .collect()
    }

    async fn apply(&self, batch: &ApplyBatch) -> Result<Applied, StoreError> {
        let mut invocation = self.scripts.apply.prepare_invoke();
        invocation
            .key(self.lease_key(batch.partition))
            .key(self.key("settle:watermarks"))
            .key(self.stream_key(batch.partition))
            .key(self.key("settle:counts"));
        invocation
            .arg(batch.partition)
            .arg(&batch.token)
            .arg(batch.expected.map(|e| e.to_string()).unwrap_or_default())
            .arg(batch.watermark.to_string())
            .arg(batch.trim_below.to_string())
            .arg(batch.taps)
            .arg(batch.acks.len());
        for id in &batch.acks {
            invocation.arg(id.to_string());
        }
        for (card, rider) in &batch.riders {
            invocation
                .key(self.key(&format!("rider:{{{card}}}")))
                .arg("S")
                .arg("")
                .arg(rider.encode());
        }
        for (key, field, value) in ledger_increments(&batch.ledger) {
            invocation
                .key(self.key(&key))
                .arg("H")
                .arg(field)
                .arg(value);
        }
        for digest in &batch.ledger.fare_tables {
            invocation
                .key(self.key("fare-tables"))
                .arg("A")
                .arg("")
                .arg(digest);
        }
        let outcome: String = invocation.invoke_async(&mut self.conn()).await?;
        Ok(match outcome.as_str() {
            "ok" => Applied::Done,
            "lease" => Applied::LeaseLost,
            _ => Applied::WatermarkMoved,
        })
    }

    async fn ack(&self, partition: u16, ids: &[EntryId]) -> Result<(), StoreError> {
        for chunk in ids.chunks(512) {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(self.stream_key(partition)).arg(GROUP);
            for id in chunk {
                cmd.arg(id.to_string());
            }
            let _: u64 = cmd.query_async(&mut self.conn()).await?;
        }
        Ok(())
    }

    async fn ledger(&self, day: Option<NaiveDate>, with_cards: bool) -> Result<Ledger, StoreError> {
        let taps: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.key("ledger-taps"))
            .query_async(&mut self.conn())
            .await?;
        let mut ledger = Ledger {
            fare_tables: redis::cmd("SMEMBERS")
                .arg(self.key("fare-tables"))
                .query_async(&mut self.conn())
                .await?,
            ..Ledger::default()
        };
        for (date, count) in taps {
            let date: NaiveDate = date
                .parse()
                .map_err(|_| StoreError::Malformed(format!("ledger day `{date}`")))?;
            if day.is_some_and(|d| d != date) {
                continue;
            }
            let mut books = DayLedger {
                taps: count,
                ..DayLedger::default()
            };
            let cells: HashMap<String, u64> = self.hash(&format!("ledger:{date}")).await?;
            for (field, value) in cells {
                let (key, what) = split_field(&field)?;
                let mut parts = key.splitn(3, ':');
                let area = parts.next().and_then(|a| a.parse().ok());
                let operator = parts.next().and_then(|o| o.parse().ok());
                let mode = parts.next().and_then(Mode::from_label);
                let (Some(area), Some(operator), Some(mode)) = (area, operator, mode) else {
                    return Err(StoreError::Malformed(format!("ledger field `{field}`")));
                };
                add_field(
                    books.cells.entry((area, operator, mode)).or_default(),
                    what,
                    value,
                );
            }
            let cards: HashMap<String, u64> = if with_cards {
                self.hash(&format!("ledger-cards:{date}")).await?
            } else {
                HashMap::new()
            };
            for (field, value) in cards {
                let (card, what) = split_field(&field)?;
                let card = card
                    .parse()
                    .map_err(|_| StoreError::Malformed(format!("card ledger field `{field}`")))?;
                add_field(books.cards.entry(card).or_default(), what, value);
            }
            let clearing: HashMap<String, u64> = self.hash(&format!("clearing:{date}")).await?;
            for (field, value) in clearing {
                let (pair, what) = split_field(&field)?;
                let parties = pair.split_once(':').and_then(|(a, b)| {
                    Some((IssuerRegion::from_label(a)?, IssuerRegion::from_label(b)?))
                });
                let Some(parties) = parties else {
                    return Err(StoreError::Malformed(format!("clearing field `{field}`")));
                };
                add_field(books.clearing.entry(parties).or_default(), what, value);
            }
            ledger.days.insert(date, books);
        }
        Ok(ledger)
    }

    /// A whole hash, read in HSCAN pages: a day's card ledger can hold millions of fields, and
    /// one HGETALL of it would stall the Redis every gateway is using.
    async fn hash(&self, rest: &str) -> Result<HashMap<String, u64>, StoreError> {
        let key = self.key(rest);
        let mut out = HashMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<(String, u64)>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(HSCAN_PAGE)
                .query_async(&mut self.conn())
                .await?;
            out.extend(page);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

fn split_field(field: &str) -> Result<(&str, &str), StoreError> {
    field
        .rsplit_once(':')
        .ok_or_else(|| StoreError::Malformed(format!("ledger field `{field}`")))
}

fn add_field(totals: &mut Totals, what: &str, value: u64) {
    match what {
        "fen" => totals.fen += value,
        _ => totals.rides += value,
    }
}

/// A tap's identity across the system: its gate and the gate's sequence number.
pub fn tap_id(record: &JournalRecord) -> String {
    format!("{}-{}", record.terminal_id, record.tap.sequence)
}

fn parse_entry(entry: &redis::Value) -> Option<Delivered> {
    let redis::Value::Array(parts) = entry else {
        return None;
    };
    let id: String = redis::from_redis_value_ref(parts.first()?).ok()?;
    let id: EntryId = id.parse().ok()?;
    // Fields come as a flat array (RESP2) or a map (RESP3).
    let fields: Vec<(&redis::Value, &redis::Value)> = match parts.get(1) {
        Some(redis::Value::Array(flat)) => flat
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?, kv.get(1)?)))
            .collect(),
        Some(redis::Value::Map(pairs)) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        _ => Vec::new(),
    };
    let record = fields.into_iter().find_map(|(name, value)| {
        let name: String = redis::from_redis_value_ref(name).ok()?;
        let value: Vec<u8> = redis::from_redis_value_ref(value).ok()?;
        (name == "r")
            .then(|| JournalRecord::decode(&value))
            .flatten()
    });
    Some(Delivered { id, record })
}

/// The ledger as (key without prefix, field, increment) for HINCRBY.
pub fn ledger_increments(ledger: &Ledger) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for (date, day) in &ledger.days {
        out.push(("ledger-taps".to_string(), date.to_string(), day.taps));
        let mut both = |key: &str, field: String, t: &Totals| {
            out.push((key.to_string(), format!("{field}:fen"), t.fen));
            out.push((key.to_string(), format!("{field}:rides"), t.rides));
        };
        let cells = format!("ledger:{date}");
        for ((area, operator, mode), t) in &day.cells {
            both(&cells, format!("{area}:{operator}:{}", mode.label()), t);
        }
        let cards = format!("ledger-cards:{date}");
        for (card, t) in &day.cards {
            both(&cards, card.to_string(), t);
        }
        let clearing = format!("clearing:{date}");
        for ((payer, payee), t) in &day.clearing {
            both(&clearing, format!("{}:{}", payer.label(), payee.label()), t);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// In process

/// The in-process store of the embedded demo. Streams are bounded by the forwarder's backlog
/// limit, as in Redis.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    arrived: Notify,
}

#[derive(Default)]
struct MemoryState {
    partitions: u16,
    next_ms: u64,
    checkpoints: HashMap<String, Checkpoint>,
    streams: BTreeMap<u16, MemoryStream>,
    watermarks: HashMap<u16, EntryId>,
    leases: HashMap<u16, (String, Instant)>,
    members: HashMap<String, Instant>,
    riders: HashMap<u64, RiderState>,
    ledger: Ledger,
    shipped: u64,
    settled: u64,
}

#[derive(Default)]
struct MemoryStream {
    entries: VecDeque<(EntryId, JournalRecord)>,
    /// Entries delivered and not yet acknowledged.
    pending: BTreeMap<EntryId, JournalRecord>,
    delivered_up_to: Option<EntryId>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().expect("settlement store lock")
    }

    fn init(&self, partitions: u16) -> Result<(), StoreError> {
        let mut s = self.lock();
        if s.partitions == 0 {
            s.partitions = partitions;
        }
        if s.partitions != partitions {
            return Err(StoreError::PartitionMismatch {
                stored: s.partitions,
                configured: partitions,
            });
        }
        Ok(())
    }

    fn ship(
        &self,
        node: &str,
        expected: Option<&Checkpoint>,
        next: &Checkpoint,
        taps: &[(u16, JournalRecord)],
    ) -> Shipped {
        let mut s = self.lock();
        let current = s.checkpoints.get(node).cloned();
        if current.as_ref() != expected {
            return Shipped::Moved(current);
        }
        s.next_ms += 1;
        let ms = s.next_ms;
        for (seq, (partition, record)) in taps.iter().enumerate() {
            let id = EntryId {
                ms,
                seq: seq as u64,
            };
            s.streams
                .entry(*partition)
                .or_default()
                .entries
                .push_back((id, *record));
        }
        s.checkpoints.insert(node.to_string(), next.clone());
        s.shipped += taps.len() as u64;
        drop(s);
        if !taps.is_empty() {
            self.arrived.notify_waiters();
        }
        Shipped::Done
    }

    fn heartbeat(&self, token: &str, ttl: Duration) -> usize {
        let mut s = self.lock();
        let now = Instant::now();
        s.members.insert(token.to_string(), now + ttl);
        s.members.retain(|_, until| *until > now);
        s.members.len()
    }

    fn lease(&self, partition: u16, token: &str, ttl: Duration) -> bool {
        let mut s = self.lock();
        let now = Instant::now();
        match s.leases.get(&partition) {
            Some((holder, until)) if holder != token && *until > now => false,
            _ => {
                s.leases.insert(partition, (token.to_string(), now + ttl));
                true
            }
        }
    }

    fn release(&self, partition: u16, token: &str) {
        let mut s = self.lock();
        if s.leases
            .get(&partition)
            .is_some_and(|(holder, _)| holder == token)
        {
            s.leases.remove(&partition);
        }
    }

    fn pending(&self, partition: u16, max: usize) -> Vec<Delivered> {
        let s = self.lock();
        s.streams.get(&partition).map_or_else(Vec::new, |stream| {
            stream
                .pending
                .iter()
                .take(max)
                .map(|(id, r)| Delivered {
                    id: *id,
                    record: Some(*r),
                })
                .collect()
        })
    }

    async fn read_new(
        &self,
        partitions: &[u16],
        max: usize,
        block: Duration,
    ) -> Vec<(u16, Vec<Delivered>)> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let arrived = self.arrived.notified();
            let out = self.take_new(partitions, max);
            if !out.is_empty() {
                return out;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Vec::new();
            }
        }
    }

    fn take_new(&self, partitions: &[u16], max: usize) -> Vec<(u16, Vec<Delivered>)> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for p in partitions {
            let Some(stream) = s.streams.get_mut(p) else {
                continue;
            };
            let after = stream.delivered_up_to;
            let fresh: Vec<(EntryId, JournalRecord)> = stream
                .entries
                .iter()
                .filter(|(id, _)| after.is_none_or(|a| *id > a))
                .take(max)
                .copied()
                .collect();
            if let Some((last, _)) = fresh.last() {
                stream.delivered_up_to = Some(*last);
                stream.pending.extend(fresh.iter().copied());
                out.push((
                    *p,
                    fresh
                        .into_iter()
                        .map(|(id, r)| Delivered {
                            id,
                            record: Some(r),
                        })
                        .collect(),
                ));
            }
        }
        out
    }

    fn apply(&self, batch: &ApplyBatch) -> Applied {
        let mut s = self.lock();
        let owner = s.leases.get(&batch.partition).map(|(t, _)| t.as_str());
        if owner != Some(batch.token.as_str()) {
            return Applied::LeaseLost;
        }
        if s.watermarks.get(&batch.partition).copied() != batch.expected {
            return Applied::WatermarkMoved;
        }
        for (card, rider) in &batch.riders {
            s.riders.insert(*card, rider.clone());
        }
        s.ledger.merge(&batch.ledger);
        s.watermarks.insert(batch.partition, batch.watermark);
        s.settled += batch.taps;
        let stream = s.streams.entry(batch.partition).or_default();
        for id in &batch.acks {
            stream.pending.remove(id);
        }
        while stream
            .entries
            .front()
            .is_some_and(|(id, _)| *id < batch.trim_below)
        {
            stream.entries.pop_front();
        }
        Applied::Done
    }

    fn ack(&self, partition: u16, ids: &[EntryId]) {
        let mut s = self.lock();
        if let Some(stream) = s.streams.get_mut(&partition) {
            for id in ids {
                stream.pending.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_numerically_and_round_trip() {
        let a: EntryId = "1700000000000-9".parse().unwrap();
        let b: EntryId = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string().parse::<EntryId>(), Ok(b));
        assert!("x-1".parse::<EntryId>().is_err());
    }
}
