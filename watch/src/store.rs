//! Where alerts are kept: one Redis stream, `P:alerts`, each entry an alert as JSON (field
//! `a`), trimmed by age as alerts are added, so the store is bounded by its retention however
//! many alerts the rules raise. One key, so it works the same on a single Redis and a cluster.

use crate::{Alert, Rule};
use std::time::Duration;
use tapgate_runtime::redis_target::{RedisConnection, RedisTarget, bounded_error};

/// Entries read per XRANGE round trip.
const PAGE: usize = 1_000;

#[derive(Clone)]
pub struct AlertStore {
    connection: RedisConnection,
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
            key: format!("{prefix}:alerts"),
        })
    }

    /// Adds alerts, dropping those stored more than `retention` before `now_ms`.
    pub async fn append(
        &self,
        alerts: &[Alert],
        retention: Duration,
        now_ms: u64,
    ) -> Result<(), String> {
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
                .arg(json)
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
