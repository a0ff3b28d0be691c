//! Settlement's counters as operators see them: the forwarder's backlog and shipping, the
//! settlers' batches, leases and lag.

use crate::Settlement;
use crate::forwarder::{Backlog, ForwarderStats};
use crate::settler::SettlerStats;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tapgate_runtime::health::{Panics, PartHealth};
use tapgate_runtime::ops::{Exposed, Sink};

/// Settlement's counters: a forwarder (with its journal backlog) where settlement runs beside
/// a gateway, and the settlers.
#[derive(Clone)]
pub struct SettlementCounters {
    forwarder: Option<Backlog>,
    settlers: Arc<SettlerStats>,
    /// Panics caught in settlement's tasks.
    panics: Arc<Panics>,
}

impl SettlementCounters {
    /// The forwarder and settlers running beside a gateway.
    pub fn of(settlement: &Settlement) -> Self {
        SettlementCounters {
            forwarder: Some(settlement.backlog()),
            settlers: settlement.settlers.clone(),
            panics: settlement.panics.clone(),
        }
    }

    /// Settlers running on their own (`tapgate settle run`).
    pub fn of_settlers(settlers: Arc<SettlerStats>, panics: Arc<Panics>) -> Self {
        SettlementCounters {
            forwarder: None,
            settlers,
            panics,
        }
    }
}

impl Exposed for SettlementCounters {
    fn parts(&self) -> Vec<(String, &PartHealth)> {
        let mut parts: Vec<(String, &PartHealth)> = Vec::new();
        if let Some(backlog) = &self.forwarder {
            parts.push(("forwarder".into(), &backlog.forwarder.health));
        }
        parts.push(("settlers".into(), &self.settlers.health));
        parts
    }

    fn panics(&self) -> u64 {
        self.panics.count.load(Ordering::Relaxed)
    }

    fn render(&self, sink: &mut Sink) -> fmt::Result {
        if let Some(backlog) = &self.forwarder {
            let (bytes, taps) = backlog.measure();
            sink.single(
                "forwarder_behind_bytes",
                "gauge",
                "Journal bytes durable but not yet read by the forwarder.",
                bytes,
            )?;
            sink.single(
                "forwarder_backlog_taps",
                "gauge",
                "Decided taps (journal records) durable but not yet read by the forwarder.",
                taps,
            )?;
            render_forwarder(sink, &backlog.forwarder)?;
        }
        render_settlers(sink, &self.settlers)
    }
}

fn render_forwarder(sink: &mut Sink, forwarder: &ForwarderStats) -> fmt::Result {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let counters: [(&str, &str, &str, u64); 7] = [
        (
            "forwarder_checkpoint_moved_total",
            "counter",
            "Times the stored checkpoint was not where the forwarder left it (Redis restarted older or empty).",
            load(&forwarder.checkpoint_moved),
        ),
        (
            "forwarder_failed",
            "gauge",
            "1 when the forwarder stopped on an error an operator must clear (see the log).",
            u64::from(forwarder.failed.load(Ordering::Relaxed)),
        ),
        (
            "forwarded_taps_total",
            "counter",
            "Approved taps shipped to the settlement streams.",
            load(&forwarder.shipped),
        ),
        (
            "forwarder_batches_total",
            "counter",
            "Forwarder batches shipped.",
            load(&forwarder.batches),
        ),
        (
            "forwarder_store_errors_total",
            "counter",
            "Forwarder round trips that failed.",
            load(&forwarder.store_errors),
        ),
        (
            "forwarder_backlog_pauses_total",
            "counter",
            "Times shipping waited for settlers to catch up.",
            load(&forwarder.backlog_pauses),
        ),
        (
            "forwarder_damaged_segments_total",
            "counter",
            "Journal segments with damage the forwarder skipped.",
            load(&forwarder.damaged_segments),
        ),
    ];
    sink.rows(&counters)
}

fn render_settlers(sink: &mut Sink, settlers: &SettlerStats) -> fmt::Result {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let counters: [(&str, &str, &str, u64); 12] = [
        (
            "settle_batches_total",
            "counter",
            "Batches applied by this process's settlers.",
            load(&settlers.batches),
        ),
        (
            "settle_leases_lost_total",
            "counter",
            "Partitions this process's settlers lost to another settler (a pause longer than the lease).",
            load(&settlers.leases_lost),
        ),
        (
            "settled_taps_total",
            "counter",
            "Taps applied to the ledgers by this process's settlers.",
            load(&settlers.settled),
        ),
        (
            "settled_charges_total",
            "counter",
            "Charges booked by this process's settlers.",
            load(&settlers.charges),
        ),
        (
            "settle_redelivered_total",
            "counter",
            "Entries delivered again after they were applied (acknowledged, not applied).",
            load(&settlers.redelivered),
        ),
        (
            "settle_tap_copies_total",
            "counter",
            "Taps that reached settlement a second time from another gateway's journal (booked once).",
            load(&settlers.copies),
        ),
        (
            "settle_out_of_order_total",
            "counter",
            "Taps priced after a later tap of the same card (out of time order, e.g. behind another gateway's); their fares follow arrival order.",
            load(&settlers.out_of_order),
        ),
        (
            "settle_late_taps_total",
            "counter",
            "Taps that reached settlement after their day closed, booked to the open day as late taps naming their tap day.",
            load(&settlers.late),
        ),
        (
            "settle_malformed_total",
            "counter",
            "Stream entries that were not tap records.",
            load(&settlers.malformed),
        ),
        (
            "settle_waiting",
            "gauge",
            "Taps read and waiting out the order window, so an older tap of their card still on its way from another gateway is priced first.",
            load(&settlers.waiting),
        ),
        (
            "settle_partitions_held",
            "gauge",
            "Partitions this process's settlers own.",
            load(&settlers.partitions_held),
        ),
        (
            "settle_store_errors_total",
            "counter",
            "Settler round trips that failed.",
            load(&settlers.store_errors),
        ),
    ];
    sink.rows(&counters)?;
    let lag = &settlers.lag;
    let buckets: Vec<(f64, u64)> = lag
        .cumulative()
        .into_iter()
        .map(|(bound, count)| (bound.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0), count))
        .collect();
    sink.histogram_seconds(
        "settlement_lag",
        "Time from a tap's approval (an offline tap's upload) to its ledger update.",
        load(&lag.sum_ms) as f64 / 1000.0,
        load(&lag.count),
        &buckets,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_runtime::ops::{Exposition, render};

    #[test]
    fn settlement_counters_and_the_lag_histogram_render_as_prometheus_text() {
        let forwarder = ForwarderStats::default();
        forwarder.shipped.store(7, Ordering::Relaxed);
        let settlers = SettlerStats::default();
        settlers.settled.store(5, Ordering::Relaxed);
        for lag in [1, 4, 40, 20_000] {
            settlers.lag.record(lag);
        }
        let counters = SettlementCounters {
            forwarder: Some(Backlog {
                journal_dir: "/nonexistent/journal".into(),
                durable: tokio::sync::watch::channel(Default::default()).1,
                forwarder: Arc::new(forwarder),
            }),
            settlers: Arc::new(settlers),
            panics: Arc::default(),
        };
        let text = render(&Exposition::default().with(counters));
        for line in [
            "tapgate_forwarded_taps_total 7",
            "tapgate_settled_taps_total 5",
            "tapgate_forwarder_failed 0",
            "# TYPE tapgate_settlement_lag_seconds histogram",
            "tapgate_settlement_lag_seconds_bucket{le=\"0.001\"} 1",
            "tapgate_settlement_lag_seconds_bucket{le=\"0.005\"} 2",
            "tapgate_settlement_lag_seconds_bucket{le=\"0.05\"} 3",
            "tapgate_settlement_lag_seconds_bucket{le=\"+Inf\"} 4",
            "tapgate_settlement_lag_seconds_sum 20.045",
            "tapgate_settlement_lag_seconds_count 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }

    #[test]
    fn standalone_settlers_show_only_their_own_counters() {
        let settlers = Arc::new(SettlerStats::default());
        settlers.settled.store(3, Ordering::Relaxed);
        let text = render(
            &Exposition::default().with(SettlementCounters::of_settlers(settlers, Arc::default())),
        );
        assert!(text.lines().any(|l| l == "tapgate_settled_taps_total 3"));
        assert!(text.contains("tapgate_settlement_lag_seconds_count 0"));
        assert!(
            !text.contains("tapgate_forward"),
            "no forwarder here:\n{text}"
        );
        assert!(
            !text.contains("tapgate_connections"),
            "no gateway here:\n{text}"
        );
    }
}
