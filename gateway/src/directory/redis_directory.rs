//! The Redis directory: card and terminal hashes, counted rides, the change streams, and the
//! probe behind readiness.

use super::feed::{ChangeFollower, FEED_BLOCK};
use super::{
    CHANGE_CHANNEL, CHANGE_GROUPS, CHANGE_STREAM_MAXLEN, ChangeEvent, DirectoryError, RideClaim,
    TerminalRecord, change_group,
};
use crate::card::{CardRecord, CardState};
use crate::decide::CountedRide;
use crate::deny::deny_reason;
use chrono::NaiveDate;
use redis::AsyncCommands;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tapgate_city::MonthDay;
use tapgate_journal::{JournalRecord, PAYLOAD_LEN};
use tapgate_protocol::{AreaCode, Concession, Issuer, Mode, Reason};
use tapgate_runtime::health::{Incident, Panics, PartHealth, supervise};
use tapgate_runtime::redis_target::{RedisConnection, RedisTarget, bounded_error};
use tokio::sync::mpsc;

/// Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// A single Redis or a Redis Cluster ([`tapgate_runtime::redis_target`]).
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
pub(super) const REPLICA_WAIT: Duration = Duration::from_secs(2);

/// Counted rides are taken in Redis, never below zero, so gateways racing on one card cannot
/// overdraw it. KEYS: the card. Returns the rides left after taking one, -1 when none was left,
/// -2 when the card has no readable count.
/// The head both allowance scripts share: reads the card KEYS[1]'s count as `n` as of the
/// period starting ARGV[1] (dates as YYYY-MM-DD sort as text), starting a fresh allowance of
/// ARGV[2] rides when the stored count belongs to an earlier period and stamping the period on a
/// count that had none; returns -2 for a record without a readable count. A stored period later
/// than ARGV[1] (the caller's clock is behind) keeps its count.
const READ_ALLOWANCE: &str = r"
local h = redis.call('HMGET', KEYS[1], 'rides', 'period')
if not h[1] then return -2 end
local n = tonumber(h[1])
if n == nil or n ~= math.floor(n) then return -2 end
local period = h[2]
if period and period ~= '' and period < ARGV[1] then
  n = tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'rides', n, 'period', ARGV[1])
elseif (not period) or period == '' then
  redis.call('HSET', KEYS[1], 'period', ARGV[1])
end
";

/// The tail both record-changing scripts share: publishes the card KEYS[1] on the change
/// stream KEYS[2] (trimmed to about `maxlen` entries) as `id` with every field, as a write of
/// the whole record does, so every gateway's cache sees the change; leaves the fields in
/// `fields`.
const PUBLISH_RECORD: &str = r"
local fields = redis.call('HGETALL', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'id', id, unpack(fields))
";

/// Sets the card KEYS[1]'s state to ARGV[1] and publishes it (maxlen ARGV[2], id ARGV[3]).
/// Returns the fields, or nothing for a card that is not there.
const SET_STATE: &str = r"
local maxlen, id = ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
PUBLISH_RECORD
return fields
";

/// Takes one ride: returns the rides left after it, or -1 when none was left.
const TAKE_RIDE: &str = r"
if n <= 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'rides', -1)
";

/// Adds ARGV[3] rides and publishes the record (maxlen ARGV[4], id ARGV[5]). Returns the rides
/// left.
const TOP_UP: &str = r"
local maxlen, id = ARGV[4], ARGV[5]
n = n + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'rides', n)
PUBLISH_RECORD
return n
";

/// How the directory's Redis looks from this process.
#[derive(Debug)]
pub struct DirectoryHealth {
    /// Redis answering this process's commands, probed every second while a gateway runs.
    pub redis: Arc<PartHealth>,
    /// Each change group's feed following its stream.
    pub feed: Vec<Arc<PartHealth>>,
    /// The deny list's feed following its stream. It does not gate readiness: a node without
    /// it still decides every tap online, and the `{deny}` slot failing would otherwise take
    /// every node out at once. Operators watch `tapgate_deny_list_feed_up`.
    pub deny_feed: Arc<PartHealth>,
    /// Panics caught in the feed's and the probe's tasks.
    pub panics: Arc<Panics>,
}

impl Default for DirectoryHealth {
    fn default() -> Self {
        Self {
            redis: Arc::default(),
            feed: (0..CHANGE_GROUPS).map(|_| Arc::default()).collect(),
            deny_feed: Arc::default(),
            panics: Arc::default(),
        }
    }
}

/// How often a gateway asks its Redis whether it answers.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct RedisDirectory {
    pub(super) target: Arc<RedisTarget>,
    pub(super) health: Arc<DirectoryHealth>,
    pub(super) connection: RedisConnection,
    pub(super) prefix: Arc<str>,
    pub(super) wait_replicas: u16,
    pub(super) replica_wait: Duration,
    pub(super) take_ride: Arc<redis::Script>,
    pub(super) top_up: Arc<redis::Script>,
    pub(super) set_state: Arc<redis::Script>,
    pub(super) note_deny: Arc<redis::Script>,
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
            take_ride: Arc::new(redis::Script::new(&format!("{READ_ALLOWANCE}{TAKE_RIDE}"))),
            top_up: Arc::new(redis::Script::new(&format!(
                "{READ_ALLOWANCE}{}",
                TOP_UP.replace("PUBLISH_RECORD", PUBLISH_RECORD)
            ))),
            set_state: Arc::new(redis::Script::new(
                &SET_STATE.replace("PUBLISH_RECORD", PUBLISH_RECORD),
            )),
            note_deny: Arc::new(redis::Script::new(super::deny_feed::NOTE_DENY)),
        })
    }

    /// The hash tag of a change group: its keys all hash to one slot.
    pub(super) fn group_tag(&self, group: u16) -> String {
        format!("{}:{{g{group:02}}}", self.prefix)
    }

    pub(super) fn card_key(&self, card_id: u64) -> String {
        format!("{}:card:{card_id}", self.group_tag(change_group(card_id)))
    }

    pub(super) fn terminal_key(&self, terminal_id: u64) -> String {
        format!(
            "{}:terminal:{terminal_id}",
            self.group_tag(change_group(terminal_id))
        )
    }

    pub(super) fn changes_key(&self, group: u16) -> String {
        format!("{}:changes", self.group_tag(group))
    }

    pub(super) async fn card(&self, card_id: u64) -> Result<Option<CardRecord>, DirectoryError> {
        let key = self.card_key(card_id);
        let fields: HashMap<String, String> = self.connection.clone().hgetall(&key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_card(card_id, &fields)
            .map(Some)
            .map_err(|detail| DirectoryError::Malformed { key, detail })
    }

    pub(super) async fn terminal(
        &self,
        terminal_id: u64,
    ) -> Result<Option<TerminalRecord>, DirectoryError> {
        let key = self.terminal_key(terminal_id);
        let fields: HashMap<String, String> = self.connection.clone().hgetall(&key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_terminal(terminal_id, &fields)
            .map(Some)
            .map_err(|detail| DirectoryError::Malformed { key, detail })
    }

    /// Writes records with their change entries (one MULTI/EXEC per change group, since a
    /// transaction may touch one slot only), and waits for the replicas asked for.
    pub(super) async fn write_grouped<T>(
        &self,
        items: &[T],
        id_of: impl Fn(&T) -> u64,
        queue: impl FnMut(&mut redis::Pipeline, &T),
    ) -> Result<(), DirectoryError> {
        let groups = self.write_grouped_unwaited(items, id_of, queue).await?;
        self.wait_for_groups(&groups).await
    }

    /// Waits for the replicas of each group written.
    async fn wait_for_groups(&self, groups: &[u16]) -> Result<(), DirectoryError> {
        for group in groups {
            self.wait_for_replicas(&self.changes_key(*group)).await?;
        }
        Ok(())
    }

    /// [`Self::write_grouped`] without the wait for replicas, for a caller with more to write;
    /// the groups written.
    async fn write_grouped_unwaited<T>(
        &self,
        items: &[T],
        id_of: impl Fn(&T) -> u64,
        mut queue: impl FnMut(&mut redis::Pipeline, &T),
    ) -> Result<Vec<u16>, DirectoryError> {
        let mut groups: BTreeMap<u16, Vec<&T>> = BTreeMap::new();
        for item in items {
            groups
                .entry(change_group(id_of(item)))
                .or_default()
                .push(item);
        }
        for group in groups.values() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for item in group {
                queue(&mut pipe, item);
            }
            pipe.query_async::<()>(&mut self.connection.clone()).await?;
        }
        Ok(groups.into_keys().collect())
    }

    /// Waits until the configured number of replicas hold every write made so far on this
    /// connection to the node that holds `key` (on a cluster, that node alone: a master
    /// elsewhere that lost its replicas says nothing about these writes).
    pub(super) async fn wait_for_replicas(&self, key: &str) -> Result<(), DirectoryError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let acked = self
            .connection
            .clone()
            .wait_for_replicas_of(
                key,
                self.wait_replicas,
                self.replica_wait.as_millis().max(1) as u64,
            )
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

    pub(super) async fn put_cards(&self, records: &[CardRecord]) -> Result<(), DirectoryError> {
        let groups = self
            .write_grouped_unwaited(
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
            .await?;
        let states: Vec<(u64, Reason)> = records
            .iter()
            .map(|r| (r.card_id, deny_reason(r.state)))
            .collect();
        let replicated = self.wait_for_groups(&groups).await;
        self.note_deny(replicated, &states).await
    }

    pub(super) async fn put_terminals(
        &self,
        records: &[TerminalRecord],
    ) -> Result<(), DirectoryError> {
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

    pub(super) async fn revoke_terminal(&self, terminal_id: u64) -> Result<(), DirectoryError> {
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
    pub(super) fn add_change(
        &self,
        pipe: &mut redis::Pipeline,
        group: u16,
        entry: &[(&str, String)],
    ) {
        pipe.cmd("XADD")
            .arg(self.changes_key(group))
            .arg("MAXLEN")
            .arg("~")
            .arg(CHANGE_STREAM_MAXLEN)
            .arg("*")
            .arg(entry)
            .ignore();
    }

    pub(super) async fn take_counted_ride(
        &self,
        card_id: u64,
        ride: CountedRide,
    ) -> Result<RideClaim, DirectoryError> {
        let key = self.card_key(card_id);
        let left: i64 = self
            .take_ride
            .key(&key)
            .arg(period_text(ride.period))
            .arg(ride.allowance)
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

    pub(super) async fn set_state(
        &self,
        card_id: u64,
        state: CardState,
    ) -> Result<Option<CardRecord>, DirectoryError> {
        let key = self.card_key(card_id);
        let fields: Option<HashMap<String, String>> = self
            .set_state
            .key(&key)
            .key(self.changes_key(change_group(card_id)))
            .arg(state.label())
            .arg(CHANGE_STREAM_MAXLEN)
            .arg(card_id)
            .invoke_async(&mut self.connection.clone())
            .await?;
        let Some(fields) = fields else {
            return Ok(None);
        };
        let replicated = self.wait_for_replicas(&key).await;
        self.note_deny(replicated, &[(card_id, deny_reason(state))])
            .await?;
        parse_card(card_id, &fields)
            .map(Some)
            .map_err(|detail| DirectoryError::Malformed { key, detail })
    }

    pub(super) async fn top_up(
        &self,
        card_id: u64,
        ride: CountedRide,
        rides: u32,
    ) -> Result<Option<u32>, DirectoryError> {
        let key = self.card_key(card_id);
        if !self.connection.clone().exists::<_, bool>(&key).await? {
            return Ok(None);
        }
        let left: i64 = self
            .top_up
            .key(&key)
            .key(self.changes_key(change_group(card_id)))
            .arg(period_text(ride.period))
            .arg(ride.allowance)
            .arg(rides)
            .arg(CHANGE_STREAM_MAXLEN)
            .arg(card_id)
            .invoke_async(&mut self.connection.clone())
            .await?;
        self.wait_for_replicas(&key).await?;
        u32::try_from(left)
            .map(Some)
            .map_err(|_| DirectoryError::Malformed {
                key,
                detail: "no readable `rides` count".into(),
            })
    }

    pub(super) fn decided_key(&self, terminal_id: u64) -> String {
        format!(
            "{}:decided:{terminal_id}",
            self.group_tag(change_group(terminal_id))
        )
    }

    pub(super) async fn share_decisions(
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

    pub(super) async fn shared_decisions(
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
    pub(super) async fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
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

/// Asks Redis every second whether it answers this process's commands (unreachable, refusing a
/// password, or a cluster that is down all show here), until the gateway is gone.
pub(super) async fn probe(
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

pub fn card_fields(record: &CardRecord) -> Vec<(&'static str, String)> {
    vec![
        ("state", record.state.label().to_owned()),
        ("issuer", record.issuer.label().to_owned()),
        ("concession", record.concession.label().to_owned()),
        ("rides", record.rides_left.to_string()),
        (
            "period",
            record.rides_period.map(period_text).unwrap_or_default(),
        ),
        (
            "home",
            record
                .home_area
                .map(|a| a.0.to_string())
                .unwrap_or_default(),
        ),
        (
            "grade",
            record.grade.map(|g| g.to_string()).unwrap_or_default(),
        ),
        (
            "renews",
            record.renews_on.map(|d| d.to_string()).unwrap_or_default(),
        ),
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
    // Absent and empty are the same: a field the record does not use.
    let optional = |name: &str| {
        fields
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    Ok(CardRecord {
        card_id,
        state: CardState::from_label(state).ok_or(format!("unknown state `{state}`"))?,
        issuer: Issuer::from_label(issuer).ok_or(format!("unknown issuer `{issuer}`"))?,
        concession: Concession::from_label(concession)
            .ok_or(format!("unknown concession `{concession}`"))?,
        rides_left: rides
            .parse()
            .map_err(|_| format!("rides `{rides}` is not a count"))?,
        rides_period: optional("period")
            .map(|p| {
                NaiveDate::parse_from_str(p, "%Y-%m-%d")
                    .map_err(|_| format!("period `{p}` is not YYYY-MM-DD"))
            })
            .transpose()?,
        home_area: optional("home")
            .map(|h| {
                h.parse()
                    .ok()
                    .map(AreaCode)
                    .filter(|a| a.area().is_some())
                    .ok_or(format!("unknown home area `{h}`"))
            })
            .transpose()?,
        grade: optional("grade")
            .map(|g| {
                g.parse()
                    .ok()
                    .filter(|g| *g > 0)
                    .ok_or(format!("grade `{g}` is not 1, 2, …"))
            })
            .transpose()?,
        renews_on: optional("renews")
            .map(|r| MonthDay::parse(r).ok_or(format!("renews `{r}` is not MM-DD")))
            .transpose()?,
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

fn period_text(period: NaiveDate) -> String {
    period.format("%Y-%m-%d").to_string()
}

pub(super) fn parse_terminal(
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
