//! Time as the protocol and the books count it.

use chrono::{DateTime, NaiveDate};

/// Unix time in milliseconds, the unit of every timestamp on the wire and in the journal.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Chongqing local date (UTC+8, no daylight saving) of a Unix-millisecond instant.
pub fn local_date(now_ms: u64) -> NaiveDate {
    const OFFSET_MS: i64 = 8 * 3600 * 1000;
    let local_ms = i64::try_from(now_ms).unwrap_or(i64::MAX - OFFSET_MS) + OFFSET_MS;
    DateTime::from_timestamp_millis(local_ms)
        .map(|t| t.date_naive())
        .unwrap_or(NaiveDate::MAX)
}

/// Sleeps until `deadline`, or for ever without one: a `select!` branch for an optional timer.
pub async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_date_is_utc_plus_eight() {
        // 2026-11-29T15:59:59Z is 23:59:59 in Chongqing; one second later it is the next day.
        let before = 1_795_967_999_000;
        assert_eq!(
            local_date(before),
            NaiveDate::from_ymd_opt(2026, 11, 29).unwrap()
        );
        assert_eq!(
            local_date(before + 1000),
            NaiveDate::from_ymd_opt(2026, 11, 30).unwrap()
        );
    }
}
