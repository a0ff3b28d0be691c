//! What the load commands read from a gateway's ops endpoint: readiness, the settlement
//! counters, and the settlement lag of the taps a run made.

use std::time::Duration;
use tapgate_loadgen::report::SettlementLag;

/// The settlement counters of a gateway's `/metrics`.
#[derive(Debug, Clone, Default)]
pub(crate) struct SettlementCounters {
    lag_buckets: Vec<(Option<u64>, u64)>,
    lag_sum_ms: u64,
    settled: u64,
    behind_bytes: u64,
}

/// `GET url` (plain `http://HOST:PORT/PATH`) with a deadline for the whole exchange: the status
/// and the response as text, headers included; `None` when there is no answer in time.
pub(crate) fn http_get(url: &str, deadline: Duration) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = host.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, deadline).ok()?;
    stream.set_read_timeout(Some(deadline)).ok()?;
    stream.set_write_timeout(Some(deadline)).ok()?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response))
}

/// Reads a gateway's ops endpoint; `None` when it is not there or shows no settlement.
pub(crate) async fn scrape_settlement(url: &str) -> Option<SettlementCounters> {
    let url = url.to_owned();
    let (_, body) = tokio::task::spawn_blocking(move || http_get(&url, Duration::from_secs(2)))
        .await
        .ok()??;
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
        }
    }
    (!counters.lag_buckets.is_empty()).then_some(counters)
}

/// The settlement lag of what was settled between `before` and the moment settlement caught
/// up (nothing left to ship, the settled count steady), waiting at most 30 s for it.
pub(crate) async fn settlement_lag(
    url: &str,
    before: &SettlementCounters,
) -> Option<SettlementLag> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = scrape_settlement(url).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = scrape_settlement(url).await?;
        let steady = now.settled == last.settled && now.behind_bytes == 0;
        last = now;
        if steady || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    let delta: Vec<(Option<u64>, u64)> = last
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
    SettlementLag::from_buckets(&delta, last.lag_sum_ms.saturating_sub(before.lag_sum_ms))
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
";
        let c = parse_settlement_counters(body).unwrap();
        assert_eq!(c.lag_buckets, [(Some(1), 3), (None, 9)]);
        assert_eq!((c.lag_sum_ms, c.settled, c.behind_bytes), (120, 9, 87));
        assert!(parse_settlement_counters("tapgate_connections_active 3\n").is_none());
    }
}
