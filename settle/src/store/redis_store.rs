//! The Redis store: one script per atomic step, every key of a step in one partition's slot.

use super::{
    Applied, ApplyBatch, CardSettlement, Checkpoint, Delivered, FedTap, FeedFrom, GROUP,
    HSCAN_PAGE, Progress, Shipped, ShippedTap, StoreError,
};
use crate::adjust::{Adjustment, tap_name};
use crate::fares::RiderState;
use crate::ledger::{Booking, DayLedger, Ledger, Totals, card_name, parse_card_name};
use crate::recent::RecentTaps;
use chrono::NaiveDate;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tapgate_journal::{JournalPosition, JournalRecord, PAYLOAD_LEN};
use tapgate_protocol::{Concession, Issuer, IssuerRegion, Mode, Outcome};
use tapgate_runtime::redis_target::{
    EntryId, RedisConnection, RedisTarget, bounded_line, release_lease, take_lease,
};

/// Ships one partition's share of a forwarder batch and moves the node's checkpoint for that
/// partition. Each partition keeps its own checkpoint (a shipment must stay in one slot), so
/// after a crash between partitions some are ahead of others: a partition ships only the taps
/// at or after its own checkpoint, which makes resending a batch harmless. Approved taps go to
/// the settlers' stream; with a feed length, every decided tap (denials too) also goes to the
/// watchers' feed, trimmed to about that many entries so a watcher that stops costs bounded
/// memory. The feed is written in the same step as the checkpoint, so it holds each tap once,
/// and numbers its entries (`n`, counted in `counts` field `fed`), so a reader tells exactly
/// how many were trimmed before it read them.
/// KEYS: checkpoint, stream, counts, feed. ARGV: journal id, expected segment, expected offset
/// ('' and '' when shipping from the start), next segment, next offset, feed length (0: no
/// feed), then (segment, offset, tap id or '' for a denial, record) per tap. Returns {1, ''}
/// when done, {0, stored checkpoint or ''} when the stored one is behind the batch (Redis lost
/// writes) or belongs to another journal.
const SHIP_SCRIPT: &str = r"
local function place(s)
  local journal, segment, offset = string.match(s, '^(.*)@(%d+):(%d+)$')
  return journal, tonumber(segment), tonumber(offset)
end
local function before(s1, o1, s2, o2)
  return s1 < s2 or (s1 == s2 and o1 < o2)
end
local current = redis.call('GET', KEYS[1])
local cs, co = -1, -1
if current then
  local journal
  journal, cs, co = place(current)
  if journal ~= ARGV[1] or cs == nil then return {0, current} end
  if ARGV[2] ~= '' and before(cs, co, tonumber(ARGV[2]), tonumber(ARGV[3])) then
    return {0, current}
  end
elseif ARGV[2] ~= '' then
  return {0, ''}
end
local feed = tonumber(ARGV[6])
local fed = tonumber(redis.call('HGET', KEYS[3], 'fed') or '0')
local n = 0
for i = 7, #ARGV, 4 do
  if not before(tonumber(ARGV[i]), tonumber(ARGV[i + 1]), cs, co) then
    if ARGV[i + 2] ~= '' then
      redis.call('XADD', KEYS[2], '*', 'tap', ARGV[i + 2], 'r', ARGV[i + 3])
      n = n + 1
    end
    if feed > 0 then
      fed = fed + 1
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', feed, '*', 'n', fed, 'r', ARGV[i + 3])
    end
  end
end
if feed > 0 then redis.call('HSET', KEYS[3], 'fed', fed) end
local ns, no = tonumber(ARGV[4]), tonumber(ARGV[5])
if before(cs, co, ns, no) then
  redis.call('SET', KEYS[1], ARGV[1] .. '@' .. ARGV[4] .. ':' .. ARGV[5])
end
if n > 0 then redis.call('HINCRBY', KEYS[3], 'shipped', n) end
return {1, ''}
";

/// Applies a settler batch if the lease and the watermark are what it was computed against,
/// and no day it books on time has been closed since. Every key is in the partition's slot.
/// KEYS: lease, watermark, stream, counts, closed, then one key per update. ARGV: token,
/// expected watermark ('' when none), new watermark, trim-below id, taps, ack count, the day
/// the batch is closed through (`YYYY-MM-DD`, which orders as text), ack ids, then (op, field,
/// value) per update: `H` = HINCRBY key field value, `S` = SET key value, `A` = SADD key value,
/// `X` = XADD key * a value.
const APPLY_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'lease' end
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[2] then return 'watermark' end
local closed = redis.call('GET', KEYS[5]) or ''
if closed > ARGV[7] then return 'closed' end
redis.call('SET', KEYS[5], ARGV[7])
local acks = tonumber(ARGV[6])
local first = 8 + acks
local k = 6
for i = first, #ARGV, 3 do
  if ARGV[i] == 'H' then
    redis.call('HINCRBY', KEYS[k], ARGV[i + 1], ARGV[i + 2])
  elseif ARGV[i] == 'A' then
    redis.call('SADD', KEYS[k], ARGV[i + 2])
  elseif ARGV[i] == 'X' then
    redis.call('XADD', KEYS[k], '*', 'a', ARGV[i + 2])
  else
    redis.call('SET', KEYS[k], ARGV[i + 2])
  end
  k = k + 1
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[4], 'settled', ARGV[5])
for i = 8, first - 1, 100 do
  redis.call('XACK', KEYS[3], 'settlers', unpack(ARGV, i, math.min(i + 99, first - 1)))
end
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[4])
return 'ok'
";

/// Puts a correction on a partition's stream, once per tap for one that settles the tap's
/// maximum fare. KEYS: the tap's guard, stream, counts. ARGV: the correction as JSON, whether
/// it is guarded ('1' or '0'), its id. Returns 1 when written, 0 when the guard was taken.
const SUBMIT_ADJUSTMENT_SCRIPT: &str = r"
if ARGV[2] == '1' and not redis.call('SET', KEYS[1], ARGV[3], 'NX') then return 0 end
redis.call('XADD', KEYS[2], '*', 'adjust', ARGV[1])
redis.call('HINCRBY', KEYS[3], 'shipped', 1)
return 1
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

/// How long a settler with nothing to read waits before asking again. Reads are not blocking:
/// one XREADGROUP may name streams of one slot only, and a blocking read per partition would
/// need a connection per partition.
const IDLE_POLL: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct RedisStore {
    connection: RedisConnection,
    prefix: Arc<str>,
    partitions: Arc<std::sync::atomic::AtomicU16>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    ship: redis::Script,
    apply: redis::Script,
    heartbeat: redis::Script,
    submit_adjustment: redis::Script,
}

impl RedisStore {
    /// Prepares the connection without waiting for Redis; `url` names a single Redis or a
    /// cluster ([`tapgate_runtime::redis_target`]), `tls_ca_file` the CA certificates of a TLS one.
    pub fn connect(
        url: &str,
        tls_ca_file: Option<&std::path::Path>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let target = RedisTarget::parse(url, tls_ca_file).map_err(StoreError::Unavailable)?;
        let connection = target.shared_connection(timeout)?;
        Ok(Self {
            connection,
            prefix: prefix.into(),
            partitions: Arc::default(),
            scripts: Arc::new(Scripts {
                ship: redis::Script::new(SHIP_SCRIPT),
                apply: redis::Script::new(APPLY_SCRIPT),
                heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
                submit_adjustment: redis::Script::new(SUBMIT_ADJUSTMENT_SCRIPT),
            }),
        })
    }

    pub(super) fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// A key in partition N's slot.
    pub(super) fn partition_key(&self, partition: u16, rest: &str) -> String {
        format!("{}:{{p{partition}}}:{rest}", self.prefix)
    }

    pub(super) fn stream_key(&self, partition: u16) -> String {
        self.partition_key(partition, "taps")
    }

    /// The watchers' feed of partition N: every decided tap of its cards, approvals and
    /// denials, as the forwarders shipped them.
    pub(super) fn feed_key(&self, partition: u16) -> String {
        self.partition_key(partition, "decided")
    }

    pub(super) fn conn(&self) -> RedisConnection {
        self.connection.clone()
    }

    pub(super) fn partition_count(&self) -> u16 {
        self.partitions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The partition count fixed in the store, for readers (reports) that do not set it.
    pub async fn stored_partitions(&self) -> Result<u16, StoreError> {
        if self.partition_count() > 0 {
            return Ok(self.partition_count());
        }
        let stored: Option<u16> = redis::cmd("GET")
            .arg(self.key("settle:partitions"))
            .query_async(&mut self.conn())
            .await?;
        let stored = stored.unwrap_or(0);
        self.partitions
            .store(stored, std::sync::atomic::Ordering::Relaxed);
        Ok(stored)
    }

    /// Runs `each` for every partition at once and collects the results in partition order.
    pub(super) async fn every_partition<T, F>(
        &self,
        each: impl Fn(u16) -> F,
    ) -> Result<Vec<T>, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let partitions = self.stored_partitions().await?;
        let mut out = Vec::with_capacity(usize::from(partitions));
        // A few at a time: enough to hide round trips, few enough not to flood a node.
        for chunk in (0..partitions).collect::<Vec<_>>().chunks(16) {
            let results = futures_util::future::join_all(chunk.iter().map(|p| each(*p))).await;
            for r in results {
                out.push(r?);
            }
        }
        Ok(out)
    }

    pub(super) async fn init(&self, partitions: u16) -> Result<(), StoreError> {
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
    pub(super) async fn ensure_group(&self, partition: u16) -> Result<(), StoreError> {
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

    pub(super) fn checkpoint_key(&self, partition: u16, node: &str) -> String {
        self.partition_key(partition, &format!("forward:{node}"))
    }

    /// The node's place: the earliest of its partitions' checkpoints, since every tap before it
    /// is in every partition. `None` when some partition holds none (it gets everything again).
    pub(super) async fn checkpoint(&self, node: &str) -> Result<Option<Checkpoint>, StoreError> {
        let stored: Vec<Option<String>> = self
            .every_partition(|p| {
                let key = self.checkpoint_key(p, node);
                let mut conn = self.conn();
                async move {
                    Ok(redis::cmd("GET")
                        .arg(key)
                        .query_async::<Option<String>>(&mut conn)
                        .await?)
                }
            })
            .await?;
        let mut earliest: Option<Checkpoint> = None;
        for value in stored {
            let Some(value) = value else {
                return Ok(None);
            };
            let c: Checkpoint = value.parse().map_err(StoreError::Malformed)?;
            earliest = match earliest {
                None => Some(c),
                Some(e) if e.journal != c.journal => {
                    return Err(StoreError::Malformed(format!(
                        "the checkpoints of node `{node}` name two journals, {} and {}",
                        e.journal, c.journal
                    )));
                }
                Some(e) => Some(if c.position < e.position { c } else { e }),
            };
        }
        Ok(earliest)
    }

    pub(super) async fn ship(
        &self,
        node: &str,
        expected: Option<&Checkpoint>,
        next: &Checkpoint,
        taps: &[ShippedTap],
        watch_feed: usize,
    ) -> Result<Shipped, StoreError> {
        let mut bytes = Vec::with_capacity(PAYLOAD_LEN);
        let mut by_partition: BTreeMap<u16, Vec<(JournalPosition, String, Vec<u8>)>> =
            BTreeMap::new();
        for tap in taps {
            let settled = tap.record.result.outcome == Outcome::Approve;
            if !settled && watch_feed == 0 {
                continue;
            }
            bytes.clear();
            tap.record.encode(&mut bytes);
            by_partition.entry(tap.partition).or_default().push((
                tap.position,
                if settled {
                    tap_id(&tap.record)
                } else {
                    String::new()
                },
                bytes.clone(),
            ));
        }
        let outcomes: Vec<(u8, String)> = self
            .every_partition(|p| {
                let mut invocation = self.scripts.ship.prepare_invoke();
                invocation
                    .key(self.checkpoint_key(p, node))
                    .key(self.stream_key(p))
                    .key(self.partition_key(p, "counts"))
                    .key(self.feed_key(p))
                    .arg(&next.journal);
                match expected {
                    Some(e) => invocation.arg(e.position.segment).arg(e.position.offset),
                    None => invocation.arg("").arg(""),
                };
                invocation
                    .arg(next.position.segment)
                    .arg(next.position.offset)
                    .arg(watch_feed);
                for (position, id, record) in by_partition.get(&p).into_iter().flatten() {
                    invocation
                        .arg(position.segment)
                        .arg(position.offset)
                        .arg(id)
                        .arg(record.as_slice());
                }
                let mut conn = self.conn();
                async move { Ok(invocation.invoke_async(&mut conn).await?) }
            })
            .await?;
        if outcomes.iter().all(|(done, _)| *done == 1) {
            return Ok(Shipped::Done);
        }
        Ok(Shipped::Moved(self.checkpoint(node).await?))
    }

    /// Up to `max` entries of partition `partition`'s feed of decided taps, oldest first.
    pub async fn read_feed(
        &self,
        partition: u16,
        from: FeedFrom,
        max: usize,
    ) -> Result<Vec<FedTap>, StoreError> {
        let start = match from {
            FeedFrom::Start => "-".to_owned(),
            FeedFrom::After(id) => format!("({id}"),
            FeedFrom::Since(ms) => format!("{ms}-0"),
        };
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(self.feed_key(partition))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(max.max(1))
            .query_async(&mut self.conn())
            .await?;
        let redis::Value::Array(entries) = reply else {
            return Err(StoreError::Malformed("XRANGE reply".into()));
        };
        Ok(entries.iter().filter_map(parse_fed).collect())
    }

    pub(super) async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let per_partition: Vec<(Option<u64>, Option<u64>)> = self
            .every_partition(|p| {
                let key = self.partition_key(p, "counts");
                let mut conn = self.conn();
                async move {
                    Ok(redis::cmd("HMGET")
                        .arg(key)
                        .arg("shipped")
                        .arg("settled")
                        .query_async(&mut conn)
                        .await?)
                }
            })
            .await?;
        Ok(per_partition
            .into_iter()
            .fold((0, 0), |(shipped, settled), (a, b)| {
                (shipped + a.unwrap_or(0), settled + b.unwrap_or(0))
            }))
    }

    pub(super) async fn heartbeat(&self, token: &str, ttl: Duration) -> Result<usize, StoreError> {
        Ok(self
            .scripts
            .heartbeat
            .key(self.key("settle:members"))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?)
    }

    pub(super) async fn lease(
        &self,
        partition: u16,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.partition_key(partition, "lease");
        Ok(take_lease(&mut self.conn(), &key, token, ttl).await?)
    }

    pub(super) async fn leave(&self, token: &str) -> Result<(), StoreError> {
        let _: u8 = redis::cmd("ZREM")
            .arg(self.key("settle:members"))
            .arg(token)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    pub(super) async fn release(&self, partition: u16, token: &str) -> Result<(), StoreError> {
        let key = self.partition_key(partition, "lease");
        Ok(release_lease(&mut self.conn(), &key, token).await?)
    }

    pub(super) async fn pending(
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

    pub(super) async fn read_partition(
        &self,
        partition: u16,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<Delivered>, StoreError> {
        let reply: redis::RedisResult<redis::Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(max)
            .arg("STREAMS")
            .arg(self.stream_key(partition))
            .arg(">")
            .query_async(&mut self.conn())
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    self.ensure_group(partition).await?;
                }
                return Err(e.into());
            }
        };
        // One stream: [[key, entries]] (RESP2) or {key: entries} (RESP3), or nil.
        let entries = match reply {
            redis::Value::Nil => return Ok(Vec::new()),
            redis::Value::Map(mut pairs) => pairs.pop().map(|(_, v)| v),
            redis::Value::Array(mut items) => match items.pop() {
                Some(redis::Value::Array(mut kv)) if kv.len() == 2 => kv.pop(),
                _ => None,
            },
            other => {
                return Err(StoreError::Malformed(format!(
                    "XREADGROUP reply {}",
                    bounded_line(&format!("{other:?}"))
                )));
            }
        };
        let Some(redis::Value::Array(entries)) = entries else {
            return Ok(Vec::new());
        };
        Ok(entries.iter().filter_map(parse_entry).collect())
    }

    pub(super) async fn read_new(
        &self,
        partitions: &[u16],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<(u16, Vec<Delivered>)>, StoreError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let reads = futures_util::future::join_all(
                partitions
                    .iter()
                    .map(|p| self.read_partition(*p, consumer, max)),
            )
            .await;
            let mut out = Vec::new();
            for (p, read) in partitions.iter().zip(reads) {
                let delivered = read?;
                if !delivered.is_empty() {
                    out.push((*p, delivered));
                }
            }
            let now = tokio::time::Instant::now();
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(IDLE_POLL.min(deadline - now)).await;
        }
    }

    pub(super) async fn submit_adjustment(
        &self,
        partition: u16,
        adjustment: &Adjustment,
    ) -> Result<bool, StoreError> {
        let tap = tap_name(adjustment.terminal, adjustment.sequence);
        let json = serde_json::to_string(adjustment)
            .map_err(|e| StoreError::Malformed(format!("correction: {e}")))?;
        let written: u8 = self
            .scripts
            .submit_adjustment
            .key(self.partition_key(partition, &format!("adjusted:{tap}")))
            .key(self.stream_key(partition))
            .key(self.partition_key(partition, "counts"))
            .arg(json)
            .arg(if adjustment.correction.settles_max_fare() {
                "1"
            } else {
                "0"
            })
            .arg(&adjustment.id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(written == 1)
    }

    /// The corrections partition N booked, oldest first, in pages.
    async fn adjustments(&self, p: u16) -> Result<Vec<Adjustment>, StoreError> {
        let key = self.partition_key(p, "adjustments");
        let mut out = Vec::new();
        let mut from = "-".to_string();
        loop {
            let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(HSCAN_PAGE)
                .query_async(&mut self.conn())
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(out);
            };
            from = format!("({last}");
            let full = page.len() == HSCAN_PAGE;
            for (id, fields) in page {
                let json = fields.get("a").ok_or_else(|| {
                    StoreError::Malformed(format!("correction {id} has no `a` field"))
                })?;
                out.push(
                    serde_json::from_str(json)
                        .map_err(|e| StoreError::Malformed(format!("correction {id}: {e}")))?,
                );
            }
            if !full {
                return Ok(out);
            }
        }
    }

    /// The card-pseudonym key in the store, after proposing `proposed` (SET NX) when given:
    /// the first proposal stands, so settlers starting together agree, and a settler that
    /// proposes the key it holds puts it back into a Redis that came back empty.
    pub(super) async fn card_key(
        &self,
        proposed: Option<[u8; 16]>,
    ) -> Result<Option<[u8; 16]>, StoreError> {
        let key = self.key("settle:card-key");
        if let Some(proposed) = proposed {
            let hex = tapgate_protocol::crypto::key_hex(&proposed);
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(hex)
                .arg("NX")
                .query_async(&mut self.conn())
                .await?;
        }
        self.get_parsed(key, |hex| {
            tapgate_protocol::crypto::parse_key_hex(hex).map_err(|e| e.to_string())
        })
        .await
    }

    /// A string key's value, parsed; `None` when the key is absent.
    async fn get_parsed<T>(
        &self,
        key: String,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, StoreError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn())
            .await?;
        parsed(&key, value, parse)
    }

    /// The partition's watermark and closed day, in one round trip (one slot).
    pub(super) async fn progress(&self, partition: u16) -> Result<Progress, StoreError> {
        let watermark_key = self.partition_key(partition, "watermark");
        let closed_key = self.partition_key(partition, "closed");
        let (watermark, closed): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(&watermark_key)
            .arg(&closed_key)
            .query_async(&mut self.conn())
            .await?;
        Ok(Progress {
            watermark: parsed(&watermark_key, watermark, str::parse)?,
            closed: parsed(&closed_key, closed, |v| {
                v.parse().map_err(|_| format!("`{v}` is not a day"))
            })?,
        })
    }

    pub(super) fn rider_key(&self, partition: u16, card: u64) -> String {
        self.partition_key(partition, &format!("rider:{card}"))
    }

    pub(super) fn recent_key(&self, partition: u16, card: u64) -> String {
        self.partition_key(partition, &format!("recent:{card}"))
    }

    pub(super) async fn riders(
        &self,
        partition: u16,
        cards: &[u64],
    ) -> Result<Vec<CardSettlement>, StoreError> {
        if cards.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for card in cards {
            cmd.arg(self.rider_key(partition, *card));
        }
        for card in cards {
            cmd.arg(self.recent_key(partition, *card));
        }
        let values: Vec<Option<Vec<u8>>> = cmd.query_async(&mut self.conn()).await?;
        let (fares, recent) = values.split_at(cards.len());
        cards
            .iter()
            .zip(fares.iter().zip(recent))
            .map(|(card, (fares, recent))| {
                let unreadable = |what: &str| {
                    StoreError::Malformed(format!("{what} of card {card} is unreadable"))
                };
                Ok(CardSettlement {
                    fares: match fares {
                        None => RiderState::default(),
                        Some(bytes) => {
                            RiderState::decode(bytes).ok_or_else(|| unreadable("rider state"))?
                        }
                    },
                    recent: match recent {
                        None => RecentTaps::default(),
                        Some(bytes) => {
                            RecentTaps::decode(bytes).ok_or_else(|| unreadable("recent taps"))?
                        }
                    },
                })
            })
            .collect()
    }

    pub(super) async fn apply(&self, batch: &ApplyBatch) -> Result<Applied, StoreError> {
        let p = batch.partition;
        let mut invocation = self.scripts.apply.prepare_invoke();
        invocation
            .key(self.partition_key(p, "lease"))
            .key(self.partition_key(p, "watermark"))
            .key(self.stream_key(p))
            .key(self.partition_key(p, "counts"))
            .key(self.partition_key(p, "closed"));
        invocation
            .arg(&batch.token)
            .arg(batch.expected.map(|e| e.to_string()).unwrap_or_default())
            .arg(batch.watermark.to_string())
            .arg(batch.trim_below.to_string())
            .arg(batch.taps)
            .arg(batch.acks.len())
            .arg(batch.closed.to_string());
        for id in &batch.acks {
            invocation.arg(id.to_string());
        }
        for (card, rider) in &batch.riders {
            invocation
                .key(self.rider_key(p, *card))
                .arg("S")
                .arg("")
                .arg(rider.fares.encode());
            invocation
                .key(self.recent_key(p, *card))
                .arg("S")
                .arg("")
                .arg(rider.recent.encode());
        }
        for (key, field, value) in ledger_increments(&batch.ledger) {
            invocation
                .key(self.partition_key(p, &key))
                .arg("H")
                .arg(field)
                .arg(value);
        }
        for adjustment in &batch.ledger.adjustments {
            let json = serde_json::to_string(adjustment)
                .map_err(|e| StoreError::Malformed(format!("correction: {e}")))?;
            invocation
                .key(self.partition_key(p, "adjustments"))
                .arg("X")
                .arg("")
                .arg(json);
        }
        for digest in &batch.ledger.fare_tables {
            invocation
                .key(self.partition_key(p, "fare-tables"))
                .arg("A")
                .arg("")
                .arg(digest);
        }
        let outcome: String = invocation.invoke_async(&mut self.conn()).await?;
        Ok(match outcome.as_str() {
            "ok" => Applied::Done,
            "lease" => Applied::LeaseLost,
            "closed" => Applied::DayClosed,
            _ => Applied::WatermarkMoved,
        })
    }

    pub(super) async fn ack(&self, partition: u16, ids: &[EntryId]) -> Result<(), StoreError> {
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

    /// The books of every partition, merged: each partition keeps the ledger cells its
    /// settlers wrote, in its own slot.
    pub(super) async fn ledger(
        &self,
        day: Option<NaiveDate>,
        with_cards: bool,
    ) -> Result<Ledger, StoreError> {
        let partitions = self.stored_partitions().await?;
        let mut ledger = Ledger::default();
        // One partition at a time: a day's books can be large, and reading them all at once
        // would hold every shard's worth in flight.
        for p in 0..partitions {
            ledger.merge(&self.partition_ledger(p, day, with_cards).await?);
        }
        Ok(ledger)
    }

    pub(super) async fn partition_ledger(
        &self,
        p: u16,
        day: Option<NaiveDate>,
        with_cards: bool,
    ) -> Result<Ledger, StoreError> {
        let taps: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.partition_key(p, "ledger-taps"))
            .query_async(&mut self.conn())
            .await?;
        let mut adjustments = self.adjustments(p).await?;
        if let Some(day) = day {
            adjustments.retain(|a| a.booked == Some(day));
        }
        let mut ledger = Ledger {
            adjustments,
            fare_tables: redis::cmd("SMEMBERS")
                .arg(self.partition_key(p, "fare-tables"))
                .query_async(&mut self.conn())
                .await?,
            ..Ledger::default()
        };
        for (label, count) in taps {
            let booking = parse_book_day(&label)?;
            if day.is_some_and(|d| d != booking.booked) {
                continue;
            }
            let date = label;
            let mut books = DayLedger {
                taps: count,
                ..DayLedger::default()
            };
            self.read_book(p, "ledger", &date, &mut books.cells).await?;
            let cards: HashMap<String, u64> = if with_cards {
                self.hash(&self.partition_key(p, &format!("ledger-cards:{date}")))
                    .await?
            } else {
                HashMap::new()
            };
            for (field, value) in cards {
                let (card, what) = split_field(&field)?;
                let card = parse_card_name(card).ok_or_else(|| {
                    StoreError::Malformed(format!(
                        "card ledger field `{field}`: not a card pseudonym (books written before cards were pseudonymised are not read)"
                    ))
                })?;
                add_field(books.cards.entry(card).or_default(), what, value);
            }
            self.read_book(p, "clearing", &date, &mut books.clearing)
                .await?;
            self.read_book(p, "payables", &date, &mut books.payables)
                .await?;
            self.read_book(p, "concessions", &date, &mut books.concessions)
                .await?;
            self.read_book(p, "transfers", &date, &mut books.transfers)
                .await?;
            self.read_book(p, "lines", &date, &mut books.lines).await?;
            self.read_book(p, "vehicles", &date, &mut books.vehicles)
                .await?;
            if booking.is_late() {
                ledger.late.insert((booking.booked, booking.tapped), books);
            } else {
                ledger.days.insert(booking.booked, books);
            }
        }
        Ok(ledger)
    }

    /// One of a partition's books of a day, from its hash `P:{pN}:NAME:DAY`.
    async fn read_book<K: FieldKey>(
        &self,
        p: u16,
        name: &str,
        date: &str,
        book: &mut BTreeMap<K, Totals>,
    ) -> Result<(), StoreError> {
        for (field, value) in self
            .hash(&self.partition_key(p, &format!("{name}:{date}")))
            .await?
        {
            let (key, what) = split_field(&field)?;
            let Some(key) = K::parse(key) else {
                return Err(StoreError::Malformed(format!("{name} field `{field}`")));
            };
            add_field(book.entry(key).or_default(), what, value);
        }
        Ok(())
    }

    /// A whole hash, read in HSCAN pages: a day's card ledger can hold millions of fields, and
    /// one HGETALL of it would stall the Redis every gateway is using.
    pub(super) async fn hash(&self, key: &str) -> Result<HashMap<String, u64>, StoreError> {
        let mut out = HashMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<(String, u64)>) = redis::cmd("HSCAN")
                .arg(key)
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

/// `book`'s increments into its hash `NAME:DAY`: `KEY:fen` and `KEY:rides` per entry.
fn book_increments<K: FieldKey>(
    out: &mut Vec<(String, String, u64)>,
    name: &str,
    date: &str,
    book: &BTreeMap<K, Totals>,
) {
    let key = format!("{name}:{date}");
    for (k, t) in book {
        let field = k.field();
        out.push((key.clone(), format!("{field}:fen"), t.fen));
        out.push((key.clone(), format!("{field}:rides"), t.rides));
    }
}

/// The key of a book's entry as its hash field names it, colon-separated (before the final
/// `:fen` or `:rides`), and back.
trait FieldKey: Ord + Sized {
    fn field(&self) -> String;
    fn parse(field: &str) -> Option<Self>;
}

/// The `N` colon-separated parts of a field key.
fn parts<const N: usize>(field: &str) -> Option<[&str; N]> {
    field.splitn(N, ':').collect::<Vec<_>>().try_into().ok()
}

/// Area × operator × mode cells.
impl FieldKey for (u32, u16, Mode) {
    fn field(&self) -> String {
        format!("{}:{}:{}", self.0, self.1, self.2.label())
    }
    fn parse(field: &str) -> Option<Self> {
        let [area, operator, mode] = parts(field)?;
        Some((
            area.parse().ok()?,
            operator.parse().ok()?,
            Mode::from_label(mode)?,
        ))
    }
}

/// Clearing: payer and payee regions.
impl FieldKey for (IssuerRegion, IssuerRegion) {
    fn field(&self) -> String {
        format!("{}:{}", self.0.label(), self.1.label())
    }
    fn parse(field: &str) -> Option<Self> {
        let [payer, payee] = parts(field)?;
        Some((
            IssuerRegion::from_label(payer)?,
            IssuerRegion::from_label(payee)?,
        ))
    }
}

/// Payables: card issuer and operator.
impl FieldKey for (Issuer, u16) {
    fn field(&self) -> String {
        format!("{}:{}", self.0.label(), self.1)
    }
    fn parse(field: &str) -> Option<Self> {
        let [issuer, operator] = parts(field)?;
        Some((Issuer::from_label(issuer)?, operator.parse().ok()?))
    }
}

/// Concessions: concession × operator × area × mode.
impl FieldKey for (Concession, u16, u32, Mode) {
    fn field(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.0.label(),
            self.1,
            self.2,
            self.3.label()
        )
    }
    fn parse(field: &str) -> Option<Self> {
        let [concession, operator, area, mode] = parts(field)?;
        Some((
            Concession::from_label(concession)?,
            operator.parse().ok()?,
            area.parse().ok()?,
            Mode::from_label(mode)?,
        ))
    }
}

/// Transfers: operator × area × mode.
impl FieldKey for (u16, u32, Mode) {
    fn field(&self) -> String {
        format!("{}:{}:{}", self.0, self.1, self.2.label())
    }
    fn parse(field: &str) -> Option<Self> {
        let [operator, area, mode] = parts(field)?;
        Some((
            operator.parse().ok()?,
            area.parse().ok()?,
            Mode::from_label(mode)?,
        ))
    }
}

/// Lines: operator × area × mode × line.
impl FieldKey for (u16, u32, Mode, u16) {
    fn field(&self) -> String {
        format!("{}:{}:{}:{}", self.0, self.1, self.2.label(), self.3)
    }
    fn parse(field: &str) -> Option<Self> {
        let [operator, area, mode, line] = parts(field)?;
        Some((
            operator.parse().ok()?,
            area.parse().ok()?,
            Mode::from_label(mode)?,
            line.parse().ok()?,
        ))
    }
}

/// Boarding gates: operator × gate.
impl FieldKey for (u16, u64) {
    fn field(&self) -> String {
        format!("{}:{}", self.0, self.1)
    }
    fn parse(field: &str) -> Option<Self> {
        let [operator, gate] = parts(field)?;
        Some((operator.parse().ok()?, gate.parse().ok()?))
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

/// A string key's value, parsed; `None` when the key was absent.
fn parsed<T>(
    key: &str,
    value: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, StoreError> {
    value
        .map(|v| parse(&v).map_err(|e| StoreError::Malformed(format!("{key}: {e}"))))
        .transpose()
}

/// A tap's identity across the system: its gate and the gate's sequence number.
pub fn tap_id(record: &JournalRecord) -> String {
    tap_name(record.terminal_id, record.tap.sequence)
}

/// A stream entry's fields, by name.
type Fields = Vec<(String, Vec<u8>)>;

/// A stream entry's id and fields.
fn entry_fields(entry: &redis::Value) -> Option<(EntryId, Fields)> {
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
    let fields = fields
        .into_iter()
        .map(|(name, value)| {
            Some((
                redis::from_redis_value_ref(name).ok()?,
                redis::from_redis_value_ref(value).ok()?,
            ))
        })
        .collect::<Option<_>>()?;
    Some((id, fields))
}

fn parse_entry(entry: &redis::Value) -> Option<Delivered> {
    let (id, fields) = entry_fields(entry)?;
    let mut delivered = Delivered {
        id,
        record: None,
        adjustment: None,
    };
    for (name, value) in fields {
        match name.as_str() {
            "r" => delivered.record = JournalRecord::decode(&value),
            "adjust" => {
                delivered.adjustment = serde_json::from_slice(&value).ok().map(Box::new);
            }
            _ => {}
        }
    }
    Some(delivered)
}

/// A feed entry: its number (`n`) and record (`r`).
fn parse_fed(entry: &redis::Value) -> Option<FedTap> {
    let (id, fields) = entry_fields(entry)?;
    let field = |wanted: &str| {
        fields
            .iter()
            .find_map(|(name, value)| (name == wanted).then_some(value.as_slice()))
    };
    Some(FedTap {
        id,
        ordinal: std::str::from_utf8(field("n")?).ok()?.parse().ok()?,
        record: JournalRecord::decode(field("r")?)?,
    })
}

/// The label of a book day in keys and in `ledger-taps`: `DAY`, or `BOOKED~TAPPED` for late
/// taps.
fn book_day(booking: Booking) -> String {
    if booking.is_late() {
        format!("{}~{}", booking.booked, booking.tapped)
    } else {
        booking.booked.to_string()
    }
}

fn parse_book_day(label: &str) -> Result<Booking, StoreError> {
    let date = |s: &str| {
        s.parse::<NaiveDate>()
            .map_err(|_| StoreError::Malformed(format!("ledger day `{label}`")))
    };
    Ok(match label.split_once('~') {
        Some((booked, tapped)) => Booking {
            booked: date(booked)?,
            tapped: date(tapped)?,
        },
        None => Booking::on_time(date(label)?),
    })
}

/// The ledger as (key without prefix, field, increment) for HINCRBY.
pub fn ledger_increments(ledger: &Ledger) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    let on_time = ledger.days.iter().map(|(d, b)| (Booking::on_time(*d), b));
    let late = ledger.late.iter().map(|((booked, tapped), b)| {
        let booking = Booking {
            booked: *booked,
            tapped: *tapped,
        };
        (booking, b)
    });
    for (booking, day) in on_time.chain(late) {
        let date = book_day(booking);
        out.push(("ledger-taps".to_string(), date.clone(), day.taps));
        book_increments(&mut out, "ledger", &date, &day.cells);
        let cards = format!("ledger-cards:{date}");
        for (card, t) in &day.cards {
            for (what, n) in [("fen", t.fen), ("rides", t.rides)] {
                out.push((cards.clone(), format!("{}:{what}", card_name(*card)), n));
            }
        }
        book_increments(&mut out, "clearing", &date, &day.clearing);
        book_increments(&mut out, "payables", &date, &day.payables);
        book_increments(&mut out, "concessions", &date, &day.concessions);
        book_increments(&mut out, "transfers", &date, &day.transfers);
        book_increments(&mut out, "lines", &date, &day.lines);
        book_increments(&mut out, "vehicles", &date, &day.vehicles);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<K: FieldKey + std::fmt::Debug + PartialEq>(key: K) {
        assert_eq!(K::parse(&key.field()), Some(key));
    }

    #[test]
    fn every_books_key_reads_back_from_its_field_and_nonsense_does_not() {
        round_trip((500103u32, 2u16, Mode::Metro));
        round_trip((IssuerRegion::Sichuan, IssuerRegion::Chongqing));
        round_trip((Issuer::TUnion, 7u16));
        round_trip((Concession::Elder, 1u16, 500101u32, Mode::Bus));
        round_trip((2u16, 509001u32, Mode::Metro));
        round_trip((1u16, 500103u32, Mode::Bus, 871u16));
        round_trip((1u16, 100_000_042u64));
        assert_eq!(<(u16, u64)>::parse("1"), None);
        assert_eq!(<(u16, u32, Mode)>::parse("1:500103:tram"), None);
        assert_eq!(<(Issuer, u16)>::parse("cq_ssc:1:2"), None);
    }
}
