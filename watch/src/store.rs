//! Where alerts are kept: one Redis stream, `P:{watch}:alerts`, each entry an alert as JSON
//! (field `a`), trimmed by age as alerts are added, so the store is bounded by its retention
//! however many alerts the rules raise; beside it the audit stream of actions taken on cards
//! (`P:{watch}:actions`), the watch list (`P:{watch}:cards`), and for the live watcher its lease
//! (`P:{watch}:lease`) and how far it has read each partition's feed (`P:{watch}:read`). All
//! share the hash tag `{watch}`, so on a Redis Cluster they live in one slot and the live
//! watcher stores a round's alerts and its new places in one script, fenced by its lease.

use crate::{Action, Alert, Rule};
use std::collections::BTreeMap;
use std::time::Duration;
use tapgate_runtime::redis_target::{
    EntryId, RedisConnection, RedisTarget, bounded_error, release_lease, take_lease,
};

/// Entries read per XRANGE round trip.
const PAGE: usize = 1_000;

/// Stores a live watcher's round: if the caller still holds the lease (renewed), adds the
/// round's alerts (trimming those older than the retention) and moves its places in the feeds.
/// KEYS: lease, places, alerts. ARGV: token, lease ttl ms, oldest id kept, alert count, the
/// alerts as JSON, then (partition, `ENTRY-ID NUMBER`) pairs. Returns the alerts' ids, or nil when the
/// lease is someone else's: then nothing is stored.
const COMMIT_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local alerts = tonumber(ARGV[4])
local ids = {}
for i = 5, 4 + alerts do
  ids[#ids + 1] = redis.call('XADD', KEYS[3], 'MINID', '~', ARGV[3], '*', 'a', ARGV[i])
end
for i = 5 + alerts, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return ids
";

#[derive(Clone)]
pub struct AlertStore {
    connection: RedisConnection,
    /// `PREFIX:{watch}`: every key of the store starts so.
    tagged: String,
    key: String,
    commit: std::sync::Arc<redis::Script>,
}

/// An alert as stored, with the stream id it was stored under.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredAlert {
    pub id: String,
    #[serde(flatten)]
    pub alert: Alert,
}

impl AlertStore {
    /// Prepares the connection without waiting for Redis.
    pub fn connect(
        url: &str,
        tls_ca_file: Option<&std::path::Path>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let target = RedisTarget::parse(url, tls_ca_file)?;
        let connection = target
            .shared_connection(timeout)
            .map_err(|e| bounded_error(&e))?;
        let tagged = format!("{prefix}:{{watch}}");
        Ok(Self {
            connection,
            key: format!("{tagged}:alerts"),
            tagged,
            commit: std::sync::Arc::new(redis::Script::new(COMMIT_SCRIPT)),
        })
    }

    fn lease_key(&self) -> String {
        format!("{}:lease", self.tagged)
    }

    fn places_key(&self) -> String {
        format!("{}:read", self.tagged)
    }

    /// Takes or renews the live watcher's lease for `token`; true when it holds it.
    pub async fn hold_lease(&self, token: &str, ttl: Duration) -> Result<bool, String> {
        take_lease(&mut self.connection.clone(), &self.lease_key(), token, ttl)
            .await
            .map_err(|e| bounded_error(&e))
    }

    /// Gives the lease up, so a standby watcher takes over at once.
    pub async fn release_lease(&self, token: &str) -> Result<(), String> {
        release_lease(&mut self.connection.clone(), &self.lease_key(), token)
            .await
            .map_err(|e| bounded_error(&e))
    }

    /// How far the live watcher has read each partition's feed: the last entry's id and
    /// number.
    pub async fn places(&self) -> Result<BTreeMap<u16, (EntryId, u64)>, String> {
        let stored: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.places_key())
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| bounded_error(&e))?;
        let place = |p: &str, value: &str| {
            let (id, ordinal) = value.split_once(' ')?;
            Some((p.parse().ok()?, (id.parse().ok()?, ordinal.parse().ok()?)))
        };
        stored
            .iter()
            .map(|(p, value)| {
                place(p, value)
                    .ok_or_else(|| format!("{}: `{p}` = `{value}` is no place", self.places_key()))
            })
            .collect()
    }

    /// Stores a live round's alerts and places if `token` still holds the lease; the alerts'
    /// ids, or `None` when another watcher holds it and nothing was stored.
    pub async fn commit(
        &self,
        token: &str,
        ttl: Duration,
        alerts: &[Alert],
        retention: Duration,
        now_ms: u64,
        places: &[(u16, (EntryId, u64))],
    ) -> Result<Option<Vec<String>>, String> {
        let mut invocation = self.commit.prepare_invoke();
        invocation
            .key(self.lease_key())
            .key(self.places_key())
            .key(&self.key)
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .arg(now_ms.saturating_sub(retention.as_millis() as u64))
            .arg(alerts.len());
        for alert in alerts {
            invocation.arg(serde_json::to_string(alert).map_err(|e| e.to_string())?);
        }
        for (partition, (id, ordinal)) in places {
            invocation.arg(partition).arg(format!("{id} {ordinal}"));
        }
        invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| bounded_error(&e))
    }

    /// Adds alerts, dropping those stored more than `retention` before `now_ms`; returns the
    /// stream id of each.
    pub async fn append(
        &self,
        alerts: &[Alert],
        retention: Duration,
        now_ms: u64,
    ) -> Result<Vec<String>, String> {
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let oldest = now_ms.saturating_sub(retention.as_millis() as u64);
        let mut pipe = redis::pipe();
        for alert in alerts {
            let json = serde_json::to_string(alert).map_err(|e| e.to_string())?;
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("MINID")
                .arg("~")
                .arg(oldest)
                .arg("*")
                .arg("a")
                .arg(json);
        }
        pipe.query_async(&mut self.connection.clone())
            .await
            .map_err(|e| bounded_error(&e))
    }

    /// Records an action taken on an alert's card, in the audit stream `P:{watch}:actions` (the
    /// alert's id, rule, the card's pseudonym, the action and its outcome, when, by whom), and
    /// puts a watched card on the watch list `P:{watch}:cards` (card number → the alert's id).
    pub async fn record_action(
        &self,
        alert_id: &str,
        alert: &Alert,
        action: Action,
        outcome: &str,
        at_ms: u64,
    ) -> Result<(), String> {
        let entry = serde_json::json!({
            "alert": alert_id, "rule": alert.rule, "card": alert.card, "action": action,
            "outcome": outcome, "at_ms": at_ms, "by": "tapgate watch",
        });
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(format!("{}:actions", self.tagged))
            .arg("*")
            .arg("a")
            .arg(entry.to_string())
            .ignore();
        if let (Action::Watch, Some(card)) = (action, alert.card_id) {
            pipe.cmd("HSET")
                .arg(format!("{}:cards", self.tagged))
                .arg(card)
                .arg(alert_id)
                .ignore();
        }
        let _: () = pipe
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| bounded_error(&e))?;
        Ok(())
    }

    /// The alerts stored at or after `since_ms`, oldest first, of `rule` only when given, at
    /// most `max`.
    pub async fn list(
        &self,
        since_ms: u64,
        rule: Option<Rule>,
        max: usize,
    ) -> Result<Vec<StoredAlert>, String> {
        let mut out = Vec::new();
        let mut from = format!("{since_ms}-0");
        loop {
            let page: Vec<(String, std::collections::HashMap<String, String>)> =
                redis::cmd("XRANGE")
                    .arg(&self.key)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut self.connection.clone())
                    .await
                    .map_err(|e| bounded_error(&e))?;
            let full = page.len() == PAGE;
            let Some(last) = page.last().map(|(id, _)| id.clone()) else {
                return Ok(out);
            };
            for (id, fields) in page {
                let json = fields
                    .get("a")
                    .ok_or_else(|| format!("alert {id} has no `a` field"))?;
                let alert: Alert =
                    serde_json::from_str(json).map_err(|e| format!("alert {id}: {e}"))?;
                if rule.is_none_or(|r| r == alert.rule) {
                    out.push(StoredAlert { id, alert });
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
            from = format!("({last}");
        }
    }
}
