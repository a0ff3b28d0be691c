//! Reading ops endpoints, for the commands that watch or measure a node: one HTTP GET (hyper's
//! client), a gateway's settlement counters, and the settlement lag of the taps a run made.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use std::time::Duration;
use tapgate_loadgen::report::SettlementLag;

/// The settlement counters of a gateway's `/metrics`.
#[derive(Debug, Clone, Default)]
pub(crate) struct SettlementCounters {
    lag_buckets: Vec<(Option<u64>, u64)>,
    lag_sum_ms: u64,
    settled: u64,
    behind_bytes: u64,
    /// Taps read and waiting out the order window.
    waiting: u64,
    /// Taps this process's settlers priced out of time order.
    pub(crate) out_of_order: u64,
}

/// The HTTP client commands read ops endpoints with.
pub(crate) type OpsClient = Client<HttpConnector, Empty<Bytes>>;

pub(crate) fn ops_client() -> OpsClient {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// `GET url`: the status and the body, each within 2 s.
pub(crate) async fn get(client: &OpsClient, url: &str) -> anyhow::Result<(u16, String)> {
    let uri: hyper::Uri = url.parse().map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(uri))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within 2 s"))?
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
        .await
        .map_err(|_| anyhow::anyhow!("{url}: answer not finished within 2 s"))?
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Reads a gateway's ops endpoint; `None` when it is not there or shows no settlement.
pub(crate) async fn scrape_settlement(client: &OpsClient, url: &str) -> Option<SettlementCounters> {
    let (_, body) = get(client, url).await.ok()?;
    parse_settlement_counters(&body)
}

/// The settlement counters in a `/metrics` response; `None` when it has none.
fn parse_settlement_counters(body: &str) -> Option<SettlementCounters> {
    let mut counters = SettlementCounters::default();
    for line in body.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        // The lag histogram is in seconds; the report speaks milliseconds.
        let ms = |seconds: f64| (seconds * 1000.0).round() as u64;
        if let Some(le) = name
            .strip_prefix("tapgate_settlement_lag_seconds_bucket{le=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            counters.lag_buckets.push((
                le.parse::<f64>().ok().filter(|b| b.is_finite()).map(ms),
                value as u64,
            ));
        } else if name == "tapgate_settlement_lag_seconds_sum" {
            counters.lag_sum_ms = ms(value);
        } else if name == "tapgate_settled_taps_total" {
            counters.settled = value as u64;
        } else if name == "tapgate_forwarder_behind_bytes" {
            counters.behind_bytes = value as u64;
        } else if name == "tapgate_settle_waiting" {
            counters.waiting = value as u64;
        } else if name == "tapgate_settle_out_of_order_total" {
            counters.out_of_order = value as u64;
        }
    }
    (!counters.lag_buckets.is_empty()).then_some(counters)
}

/// The settlement counters once settlement has caught up (nothing left to ship, nothing
/// waiting, the settled count steady), waiting at most 30 s for it.
pub(crate) async fn caught_up(client: &OpsClient, url: &str) -> Option<SettlementCounters> {
    caught_up_together(&[(client, url.to_owned())])
        .await
        .pop()
        .flatten()
}

/// The settlement counters of several nodes sharing a store, once all of them have caught up
/// in the same look: one node's settlers keep pricing what another node's forwarder ships, so
/// a node that looked steady before the other had shipped everything was not done. `None` for
/// a node that does not show settlement.
pub(crate) async fn caught_up_together(
    nodes: &[(&OpsClient, String)],
) -> Vec<Option<SettlementCounters>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = Vec::with_capacity(nodes.len());
    for (client, url) in nodes {
        last.push(scrape_settlement(client, url).await);
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut now = Vec::with_capacity(nodes.len());
        for (client, url) in nodes {
            now.push(scrape_settlement(client, url).await);
        }
        let steady = now.iter().zip(&last).all(|(now, last)| match (now, last) {
            (Some(now), Some(last)) => {
                now.settled == last.settled && now.behind_bytes == 0 && now.waiting == 0
            }
            (None, None) => true,
            _ => false,
        });
        last = now;
        if steady || tokio::time::Instant::now() >= deadline {
            return last;
        }
    }
}

impl SettlementCounters {
    /// The settlement lag of what was settled between `before` and these counters.
    pub(crate) fn lag_since(&self, before: &SettlementCounters) -> Option<SettlementLag> {
        let delta: Vec<(Option<u64>, u64)> = self
            .lag_buckets
            .iter()
            .map(|(le, n)| {
                let earlier = before
                    .lag_buckets
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0, |(_, n)| *n);
                (*le, n.saturating_sub(earlier))
            })
            .collect();
        SettlementLag::from_buckets(&delta, self.lag_sum_ms.saturating_sub(before.lag_sum_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlement_counters_are_read_from_metrics_text() {
        let body = "HTTP/1.1 200 OK\r\n\r\n\
# TYPE tapgate_settlement_lag_seconds histogram
tapgate_settlement_lag_seconds_bucket{le=\"0.001\"} 3
tapgate_settlement_lag_seconds_bucket{le=\"+Inf\"} 9
tapgate_settlement_lag_seconds_sum 0.12
tapgate_settled_taps_total 9
tapgate_forwarder_behind_bytes 87
tapgate_settle_out_of_order_total 2
";
        let c = parse_settlement_counters(body).unwrap();
        assert_eq!(c.lag_buckets, [(Some(1), 3), (None, 9)]);
        assert_eq!(
            (c.lag_sum_ms, c.settled, c.behind_bytes, c.out_of_order),
            (120, 9, 87, 2)
        );
        assert!(parse_settlement_counters("tapgate_connections_active 3\n").is_none());
    }
}
