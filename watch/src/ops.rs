//! The live watcher's counters as operators see them: taps watched, alerts by rule, whether
//! this watcher is the active one, how far behind it is, and taps it missed.

use crate::Rule;
use crate::live::LiveStats;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tapgate_runtime::health::{Panics, PartHealth};
use tapgate_runtime::ops::{Exposed, Sink};

#[derive(Clone)]
pub struct WatchCounters {
    pub stats: Arc<LiveStats>,
    /// Panics caught in the watcher's task.
    pub panics: Arc<Panics>,
}

impl Exposed for WatchCounters {
    fn parts(&self) -> Vec<(String, &PartHealth)> {
        vec![("watcher".into(), &self.stats.health)]
    }

    fn panics(&self) -> u64 {
        self.panics.count.load(Ordering::Relaxed)
    }

    fn render(&self, sink: &mut Sink) -> fmt::Result {
        let stats = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_rule: Vec<(&str, u64)> = Rule::ALL
            .iter()
            .map(|r| (r.name(), load(&stats.alerts[r.index()])))
            .collect();
        sink.labeled(
            "watch_alerts_total",
            "counter",
            "Alerts stored, by rule.",
            "rule",
            &by_rule,
        )?;
        let taps = load(&stats.taps);
        let denied = load(&stats.denied);
        sink.labeled(
            "watch_taps_total",
            "counter",
            "Decided taps watched, by outcome.",
            "outcome",
            &[("approved", taps - denied.min(taps)), ("denied", denied)],
        )?;
        sink.rows(&[
            (
                "watch_active",
                "gauge",
                "1 when this watcher holds the watch lease; 0 for a standby.",
                u64::from(stats.active.load(Ordering::Relaxed)),
            ),
            (
                "watch_behind_ms",
                "gauge",
                "How far behind the newest fed tap the watcher's place was after its last round (0: caught up).",
                load(&stats.behind_ms),
            ),
            (
                "watch_missed_total",
                "counter",
                "Decided taps trimmed from a feed before the watcher read them: taps no rule saw (raise [settlement] watch_feed).",
                load(&stats.missed),
            ),
            (
                "watch_takeovers_total",
                "counter",
                "Times this watcher started from the stored places: on taking the watch lease, and again after a store failure.",
                load(&stats.takeovers),
            ),
            (
                "watch_store_errors_total",
                "counter",
                "Watcher round trips to Redis that failed.",
                load(&stats.store_errors),
            ),
            (
                "watch_cards_remembered",
                "gauge",
                "Cards the watcher holds windows for.",
                load(&stats.cards_remembered),
            ),
        ])
    }
}
