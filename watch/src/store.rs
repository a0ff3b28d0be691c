//! Where alerts are kept: one Redis stream, `P:alerts`, each entry an alert as JSON (field
//! `a`), trimmed by age as alerts are added, so the store is bounded by its retention however
//! many alerts the rules raise; beside it the audit stream of actions taken on cards
//! (`P:watch:actions`) and the watch list (`P:watch:cards`). Each is one key, and no command
//! touches two, so they work the same on a single Redis and on a cluster.

use crate::{Action, Alert, Rule};
use std::time::Duration;
use tapgate_runtime::redis_target::{RedisConnection, RedisTarget, bounded_error};

/// Entries read per XRANGE round trip.
const PAGE: usize = 1_000;

#[derive(Clone)]
pub struct AlertStore {
    connection: RedisConnection,
    prefix: String,
    key: String,
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
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            key: format!("{prefix}:alerts"),
        })
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

    /// Records an action taken on an alert's card, in the audit stream `P:watch:actions` (the
    /// alert's id, rule, the card's pseudonym, the action and its outcome, when, by whom), and
    /// puts a watched card on the watch list `P:watch:cards` (card number → the alert's id).
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
            .arg(format!("{}:watch:actions", self.prefix))
            .arg("*")
            .arg("a")
            .arg(entry.to_string())
            .ignore();
        if let (Action::Watch, Some(card)) = (action, alert.card_id) {
            pipe.cmd("HSET")
                .arg(format!("{}:watch:cards", self.prefix))
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
