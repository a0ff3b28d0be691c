//! Following a change group's stream: changes to the gateway's cache, reconnecting with backoff
//! when Redis is lost.

use super::redis_directory::parse_terminal;
use super::{CardChange, ChangeEvent, DirectoryHealth, TerminalChange, parse_card};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tapgate_runtime::redis_target::{EntryId, RedisConnection, RedisTarget, bounded_error};
use tapgate_runtime::retry::Backoff;
use tokio::sync::mpsc;

/// How long one XREAD waits for a change before asking again.
pub(super) const FEED_BLOCK: Duration = Duration::from_secs(1);
/// First pause before reaching Redis again after the feed lost it; attempts that fail in a
/// row wait longer, up to `FEED_RECONNECT_CEILING`.
pub(super) const FEED_RECONNECT: Duration = Duration::from_millis(200);
pub(super) const FEED_RECONNECT_CEILING: Duration = Duration::from_secs(2);
/// While the feed stays lost, how often the log says so again.
pub(super) const FEED_LOST_REPEAT: Duration = Duration::from_secs(60);

/// Follows one change group's stream.
pub(super) struct ChangeFollower {
    pub(super) target: Arc<RedisTarget>,
    pub(super) health: Arc<DirectoryHealth>,
    pub(super) group: u16,
    pub(super) key: String,
    /// The last entry applied; `None` until the feed has found its place in the stream.
    pub(super) last_id: Option<String>,
    pub(super) tx: mpsc::Sender<ChangeEvent>,
    /// When the feed lost Redis and when that was last logged, while it stays lost.
    pub(super) lost_since: Option<(tokio::time::Instant, tokio::time::Instant, u64)>,
}

impl ChangeFollower {
    pub(super) async fn run(mut self, mut connection: Option<RedisConnection>) {
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
    pub(super) fn lost(&mut self, e: &redis::RedisError) {
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

    pub(super) async fn reconnect(&mut self) -> Option<RedisConnection> {
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
    pub(super) async fn start_at_end(
        &mut self,
        conn: &mut RedisConnection,
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
    pub(super) async fn position(&mut self, conn: &mut RedisConnection) -> redis::RedisResult<()> {
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
    pub(super) async fn check_continuity(
        &mut self,
        conn: &mut RedisConnection,
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

    pub(super) async fn follow(&mut self, conn: &mut RedisConnection) -> redis::RedisResult<()> {
        loop {
            let after = self.last_id.as_deref().unwrap_or("$");
            let reply = read_after(conn, &self.key, after, FEED_BLOCK).await?;
            if self.tx.is_closed() {
                return Ok(());
            }
            let Some(reply) = reply else { continue };
            for stream in reply.keys {
                for entry in stream.ids {
                    self.last_id = Some(entry.id.clone());
                    let event = match change_event(&entry_fields(&entry)) {
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

/// Up to 512 entries of `key` after the entry id `after`, waiting up to `block` for the first;
/// `None` when none came.
pub(super) async fn read_after(
    conn: &mut RedisConnection,
    key: &str,
    after: &str,
    block: Duration,
) -> redis::RedisResult<Option<redis::streams::StreamReadReply>> {
    redis::cmd("XREAD")
        .arg("COUNT")
        .arg(512)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .query_async(conn)
        .await
}

/// A stream entry's fields that read as text; others are left out (the parsers then say
/// what is missing).
pub(super) fn entry_fields(entry: &redis::streams::StreamId) -> HashMap<String, String> {
    entry
        .map
        .iter()
        .filter_map(|(k, v)| {
            redis::from_redis_value_ref::<String>(v)
                .ok()
                .map(|v| (k.clone(), v))
        })
        .collect()
}

/// A change-stream entry as an event: a gate's when it names a `terminal`, else a card's `id`;
/// either with its new fields, or `deleted`.
pub(super) fn change_event(fields: &HashMap<String, String>) -> Result<ChangeEvent, String> {
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
pub(super) fn stream_id_after(a: &str, b: &str) -> bool {
    let id = |s: &str| s.parse::<EntryId>().unwrap_or_default();
    id(a) > id(b)
}
