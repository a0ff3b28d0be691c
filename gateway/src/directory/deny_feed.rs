//! The deny list in Redis: written beside each card state change, numbered by a script, and
//! followed by every gateway.
//!
//! Keys (one hash tag, so one slot on a Redis Cluster and one script may touch them all):
//!
//! | key                  | type   | holds |
//! |----------------------|--------|-------|
//! | `P:{deny}:version`   | string | the version of the newest change |
//! | `P:{deny}:history`   | string | a digest of every change up to the newest (empty before the first) |
//! | `P:{deny}:cards`     | hash   | card id → reason label (`card_lost`, `card_blocked`, `card_cancelled`) |
//! | `P:{deny}:changes`   | stream | entry id `VERSION-1`, fields `card`, `reason` (`approved` takes a card off), `follows` (the history before the change) and `history` (after it) |
//!
//! The version is a counter the script keeps, so every gateway numbers every change alike and
//! a gate can move between gateways and go on from the version it holds.
//!
//! The history is there for failovers. A master that dies before its replica holds its
//! newest changes takes them with it, but a gateway may have read them already; the replica
//! that takes over numbers its next changes with those same versions. A follower that trusted
//! the numbers alone would take the new changes as the ones after the lost ones and keep the
//! lost ones for good. Each change names the history it follows, so the first change of the
//! new line tells a follower that its list went another way, and it loads the whole list.
//! Gates are sent the history too (the 16 hex digits as a number, 0 before the first change):
//! a gate that was sent a lost change and then connects to another gateway says so with it.
//! Writers and followers are upgraded together: an entry without the digests is taken as
//! malformed, and its followers load the whole list.

use super::feed::{entry_fields, read_after};
use super::redis_directory::RedisDirectory;
use super::{CHANGE_CHANNEL, DirectoryError};
use crate::deny::DenyEvent;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapgate_protocol::{DenyEntry, Reason};
use tapgate_runtime::health::PartHealth;
use tapgate_runtime::redis_target::{EntryId, RedisConnection, RedisTarget, bounded_error};
use tapgate_runtime::retry::Backoff;
use tokio::sync::mpsc;

/// Appends the changes ARGV[2..] (card, reason label pairs) whose reason differs from the
/// list's, numbering each with the next version and chaining the history digest through
/// them; the stream is trimmed to about ARGV[1]. Returns the version after them.
pub(super) const NOTE_DENY: &str = r"
local maxlen = ARGV[1]
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local history = redis.call('GET', KEYS[4]) or ''
for i = 2, #ARGV, 2 do
  local card, reason = ARGV[i], ARGV[i + 1]
  local held = redis.call('HGET', KEYS[2], card) or 'approved'
  if held ~= reason then
    if reason == 'approved' then
      redis.call('HDEL', KEYS[2], card)
    else
      redis.call('HSET', KEYS[2], card, reason)
    end
    version = version + 1
    local follows = history
    history = string.sub(redis.sha1hex(follows .. ' ' .. version .. ' ' .. card .. ' ' .. reason), 1, 16)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, version .. '-1',
      'card', card, 'reason', reason, 'follows', follows, 'history', history)
  end
end
redis.call('SET', KEYS[1], version)
redis.call('SET', KEYS[4], history)
return version
";

/// Changes kept in the stream, about; a gateway that fell further behind loads the whole list.
const DENY_STREAM_MAXLEN: usize = 100_000;
/// Card states sent to the script at once.
const NOTE_BATCH: usize = 500;
/// How long one XREAD waits before the follower checks the list's version.
const DENY_BLOCK: Duration = Duration::from_secs(1);
/// Cards read per HSCAN while loading the whole list.
const SCAN_COUNT: usize = 2000;

impl RedisDirectory {
    fn deny_key(&self, what: &str) -> String {
        format!("{}:{{deny}}:{what}", self.prefix)
    }

    /// Brings the deny list in line with these card states, which their masters hold;
    /// `replicated` says whether the replicas asked for hold them too. The list follows what
    /// the masters serve, as the gateways' caches do through the change feed, replicated or
    /// not: a state written while its master had lost its replica would otherwise stay off the
    /// list through every retry until a replica came back, and gates riding offline would
    /// approve a card every gateway refuses. The replicas' error is the caller's first.
    ///
    /// The list is in a slot of its own, so not in one transaction with the cards: gateways
    /// deciding online see a change first, gates deciding alone once the list reaches them.
    /// When the list's master cannot be reached, or its replicas do not hold the change, the
    /// cards stand and the caller is told [`DirectoryError::DenyListBehind`]; writing the
    /// states again completes it, since the list takes only what differs from it.
    pub(super) async fn note_deny(
        &self,
        replicated: Result<(), DirectoryError>,
        states: &[(u64, Reason)],
    ) -> Result<(), DirectoryError> {
        let behind = |e: DirectoryError| DirectoryError::DenyListBehind(e.to_string());
        let listed = match self.append_deny(states).await {
            Ok(()) => self
                .wait_for_replicas(&self.deny_key("changes"))
                .await
                .map_err(behind),
            Err(e) => Err(behind(e)),
        };
        replicated.and(listed)
    }

    async fn append_deny(&self, states: &[(u64, Reason)]) -> Result<(), DirectoryError> {
        for batch in states.chunks(NOTE_BATCH) {
            let mut invocation = self.note_deny.prepare_invoke();
            invocation
                .key(self.deny_key("version"))
                .key(self.deny_key("cards"))
                .key(self.deny_key("changes"))
                .key(self.deny_key("history"))
                .arg(DENY_STREAM_MAXLEN);
            for (card_id, reason) in batch {
                invocation.arg(card_id).arg(reason.label());
            }
            invocation
                .invoke_async::<u64>(&mut self.connection.clone())
                .await?;
        }
        Ok(())
    }

    /// Follows the deny list on a connection of its own.
    pub(super) async fn follow_deny_list(&self) -> mpsc::Receiver<DenyEvent> {
        let (tx, rx) = mpsc::channel(CHANGE_CHANNEL);
        let follower = DenyFollower {
            target: self.target.clone(),
            version_key: self.deny_key("version"),
            history_key: self.deny_key("history"),
            cards_key: self.deny_key("cards"),
            changes_key: self.deny_key("changes"),
            tx,
            health: self.health.deny_feed.clone(),
        };
        tokio::spawn(follower.run());
        rx
    }
}

struct DenyFollower {
    target: Arc<RedisTarget>,
    version_key: String,
    history_key: String,
    cards_key: String,
    changes_key: String,
    tx: mpsc::Sender<DenyEvent>,
    health: Arc<PartHealth>,
}

/// Why following stopped: Redis was lost, or the gateway is gone.
enum Stop {
    Lost(redis::RedisError),
    Gone,
}

impl From<redis::RedisError> for Stop {
    fn from(e: redis::RedisError) -> Self {
        Stop::Lost(e)
    }
}

impl DenyFollower {
    async fn run(self) {
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut lost = false;
        loop {
            let result = match self.target.blocking_connection(DENY_BLOCK).await {
                Ok(mut conn) => self.load_and_follow(&mut conn, &mut lost).await,
                Err(e) => Err(Stop::Lost(e)),
            };
            match result {
                Err(Stop::Gone) => return,
                Err(Stop::Lost(e)) => {
                    self.health.fail(Instant::now(), bounded_error(&e));
                    if !lost {
                        tracing::warn!(error = %bounded_error(&e), "deny list feed lost; gates keep the list they hold until it is back");
                        lost = true;
                    }
                }
            }
            retry.wait().await;
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// Loads the whole list, then follows its changes; loads it again whenever changes were
    /// missed, until Redis is lost or the gateway is gone.
    async fn load_and_follow(
        &self,
        conn: &mut RedisConnection,
        lost: &mut bool,
    ) -> Result<std::convert::Infallible, Stop> {
        loop {
            let mut head = self.load(conn).await?;
            self.health.ok();
            if std::mem::take(lost) {
                tracing::info!(version = head.version, "deny list feed back");
            }
            while let Followed::Waiting = self.follow(conn, &mut head).await? {}
            tracing::warn!(
                version = head.version,
                "deny list changes were missed, or their history went another way; loading the whole list again"
            );
        }
    }

    /// Sends the whole list and returns where it stands. The version and its history are
    /// read first and the cards after them, a part at a time, so the list sent may already
    /// hold some later changes; the changes read after it set those cards again to the same,
    /// so the list converges.
    async fn load(&self, conn: &mut RedisConnection) -> Result<Head, Stop> {
        let head = self.read_head(conn).await?;
        let history = history_digest(&head.history).ok_or_else(|| {
            Stop::Lost(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "deny list history is not 16 hex digits",
                head.history.chars().take(32).collect::<String>(),
            )))
        })?;
        let mut entries = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, pairs): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(&self.cards_key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(conn)
                .await?;
            entries.extend(
                pairs
                    .iter()
                    .filter_map(|(card, reason)| parse_entry(card, reason)),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.send(DenyEvent::Whole {
            version: head.version,
            history,
            entries,
        })
        .await?;
        Ok(head)
    }

    /// Where the list in Redis stands: its version and the history up to it, read together.
    async fn read_head(&self, conn: &mut RedisConnection) -> Result<Head, Stop> {
        let (version, history): (Option<u64>, Option<String>) = redis::cmd("MGET")
            .arg(&self.version_key)
            .arg(&self.history_key)
            .query_async(conn)
            .await?;
        Ok(Head {
            version: version.unwrap_or(0),
            history: history.unwrap_or_default(),
        })
    }

    async fn follow(&self, conn: &mut RedisConnection, head: &mut Head) -> Result<Followed, Stop> {
        let after = format!("{}-1", head.version);
        let reply = read_after(conn, &self.changes_key, &after, DENY_BLOCK).await?;
        let Some(reply) = reply else {
            // Nothing new. A list whose version went back (a failover that lost its newest
            // changes, a Redis restarted empty), or that reached this version another way,
            // numbers its next changes with versions this gateway already had: only the whole
            // list can say what they are.
            let now = self.read_head(conn).await?;
            return Ok(
                if now.version < head.version || (now.version == head.version && now != *head) {
                    Followed::Missed
                } else {
                    Followed::Waiting
                },
            );
        };
        for entry in reply.keys.into_iter().flat_map(|stream| stream.ids) {
            // The entry id is `VERSION-1`.
            let number = entry.id.parse::<EntryId>().ok().map(|id| id.ms);
            let mut fields = entry_fields(&entry);
            let parsed = fields
                .get("card")
                .zip(fields.get("reason"))
                .and_then(|(card, reason)| parse_entry(card, reason));
            let (follows, history) = (fields.remove("follows"), fields.remove("history"));
            match (number, parsed, follows, history) {
                // Trimmed past where this gateway was, numbered out of order, or the next
                // change of a history that went another way.
                (Some(number), _, follows, _)
                    if number != head.version + 1
                        || follows.as_deref().is_some_and(|f| f != head.history) =>
                {
                    return Ok(Followed::Missed);
                }
                (Some(number), Some(entry), Some(_), Some(history))
                    if let Some(digest) = history_digest(&history) =>
                {
                    self.send(DenyEvent::Changed {
                        version: number,
                        history: digest,
                        entry,
                    })
                    .await?;
                    *head = Head {
                        version: number,
                        history,
                    };
                }
                _ => {
                    tracing::warn!(stream = %self.changes_key, entry = %entry.id, "malformed deny list entry");
                    return Ok(Followed::Missed);
                }
            }
        }
        Ok(Followed::Waiting)
    }

    async fn send(&self, event: DenyEvent) -> Result<(), Stop> {
        self.tx.send(event).await.map_err(|_| Stop::Gone)
    }
}

/// Where a follower's list stands: the newest change it has, and the history up to it.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    version: u64,
    history: String,
}

enum Followed {
    Waiting,
    Missed,
}

/// The history as gates are sent it: the script's digest read as a number, 0 for the empty
/// history before the first change; `None` for anything the script does not write.
fn history_digest(history: &str) -> Option<u64> {
    match history.len() {
        0 => Some(0),
        16 => u64::from_str_radix(history, 16).ok(),
        _ => None,
    }
}

fn parse_entry(card: &str, reason: &str) -> Option<DenyEntry> {
    Some(DenyEntry {
        card_id: card.parse().ok()?,
        reason: Reason::from_label(reason)?,
    })
}
