//! The outcome of a load run: counts, latency percentiles from HdrHistograms, decisions by
//! reason, throughput per second; as text, as JSON and as an SVG chart.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "tapgate" or "echo".
    pub target: String,
    pub connections: usize,
    /// Gates that completed their handshake.
    pub connected: usize,
    pub closed_loop: bool,
    /// Taps per second asked for; 0 in closed loop.
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub duration_s: f64,
    pub sent: u64,
    /// Taps a connection left unanswered, sent again on the next one (included in `sent`).
    pub resent: u64,
    pub answered: u64,
    /// Everything that went wrong: connection losses, refusals, unanswered taps.
    pub errors: u64,
    pub busy: u64,
    /// Taps the generator could not send on time because a gate's queue was full.
    pub behind: u64,
    /// Latency from each tap's intended send time (no coordinated omission).
    pub latency_us: Percentiles,
    /// Latency from the moment the tap was actually sent.
    pub latency_from_send_us: Percentiles,
    pub decisions: BTreeMap<String, u64>,
    pub error_kinds: BTreeMap<String, u64>,
    /// Answers received in each second of the run.
    pub throughput_per_s: Vec<u64>,
    /// Answers received in each tenth of a second of the run.
    pub throughput_per_100ms: Vec<u64>,
    /// Approval-to-ledger time of the taps settled during the run, when the gateway's
    /// settlement counters were available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settlement: Option<SettlementLag>,
    /// Misuse injected on purpose and fully sent ([`crate::fraud`]): the truth the card-use
    /// watcher's alerts are scored against.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub injected: Vec<crate::fraud::Injected>,
    /// With injected misuse, ordinary riders' taps beyond a person's day
    /// ([`crate::workload::RIDER_TAPS`]): above 0, ordinary riders may set off rules.
    #[serde(skip_serializing_if = "is_zero")]
    pub riders_over_budget: u64,
    /// Gates that moved to another address mid-run (`--migrate`) and went on tapping.
    pub moved: u64,
    /// Connections the gates made again during the run (after `--drop`, a loss or a refusal).
    pub reconnects: Reconnects,
    /// The deny list as the version-2 gates (`--protocol 2`) held it at the end.
    #[serde(skip_serializing_if = "DenyFollowed::is_empty")]
    pub deny: DenyFollowed,
    /// What the gates that lost their link (`--offline`) did offline and uploaded.
    #[serde(skip_serializing_if = "OfflineRidden::is_empty")]
    pub offline: OfflineRidden,
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

/// How the version-2 gates followed the deny list during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DenyFollowed {
    /// Gates that negotiated version 2 and followed the list.
    pub gates: u64,
    /// The lowest and highest version a gate held at the end: equal when every gate caught up.
    pub lowest_version: u64,
    pub highest_version: u64,
    /// Cards on the list of the gate with the highest version.
    pub cards: u64,
    pub changes_frames: u64,
    pub list_parts: u64,
    /// Whole lists received (the first list of each gate included).
    pub whole_lists: u64,
}

impl DenyFollowed {
    pub fn is_empty(&self) -> bool {
        self.gates == 0
    }

    pub fn line(&self) -> String {
        format!(
            "deny list: {} gates followed it; versions {}..{} at the end, {} cards; {} change frames, {} list parts, {} whole lists",
            self.gates,
            self.lowest_version,
            self.highest_version,
            self.cards,
            self.changes_frames,
            self.list_parts,
            self.whole_lists
        )
    }

    pub fn merge(&mut self, other: &DenyFollowed) {
        if other.gates == 0 {
            return;
        }
        self.lowest_version = if self.gates == 0 {
            other.lowest_version
        } else {
            self.lowest_version.min(other.lowest_version)
        };
        if other.highest_version >= self.highest_version {
            self.cards = other.cards;
        }
        self.highest_version = self.highest_version.max(other.highest_version);
        self.gates += other.gates;
        self.changes_frames += other.changes_frames;
        self.list_parts += other.list_parts;
        self.whole_lists += other.whole_lists;
    }
}

/// What the gates that lost their link during a run decided offline and uploaded afterwards.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OfflineRidden {
    /// Gates that lost their link.
    pub gates: u64,
    /// Taps they approved offline, and those they refused, by why.
    pub approved: u64,
    pub refused: BTreeMap<String, u64>,
    /// Receipts: recorded now, recorded before (a resend), busy (uploaded again).
    pub recorded: u64,
    pub already: u64,
    pub busy: u64,
    /// Recorded taps the gateway flagged, by the rule broken.
    pub flagged: BTreeMap<String, u64>,
    /// Approved taps still kept, not uploaded, when the run ended.
    pub not_uploaded: u64,
    /// From the first upload sent to the last receipt, over every gate (s), and the uploads
    /// recorded per second over that time.
    pub upload_s: f64,
    pub upload_rate: f64,
}

impl OfflineRidden {
    pub fn is_empty(&self) -> bool {
        self.gates == 0
    }

    pub fn line(&self) -> String {
        format!(
            "offline: {} gates lost their link; {} taps approved offline, {} refused {:?}; uploaded: {} recorded, {} already, {} busy (sent again), {} flagged {:?}, {} never uploaded; {:.0} uploads/s over {:.2} s",
            self.gates,
            self.approved,
            self.refused.values().sum::<u64>(),
            self.refused,
            self.recorded,
            self.already,
            self.busy,
            self.flagged.values().sum::<u64>(),
            self.flagged,
            self.not_uploaded,
            self.upload_rate,
            self.upload_s
        )
    }

    pub fn merge(&mut self, other: &OfflineRidden) {
        self.gates += other.gates;
        self.approved += other.approved;
        self.recorded += other.recorded;
        self.already += other.already;
        self.busy += other.busy;
        self.not_uploaded += other.not_uploaded;
        for (into, from) in [
            (&mut self.refused, &other.refused),
            (&mut self.flagged, &other.flagged),
        ] {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        }
    }
}

/// Gates' reconnections during a run and how long each took.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Reconnects {
    pub reconnected: u64,
    /// Reconnections whose Hello went as early data and was answered.
    pub early_hellos_answered: u64,
    /// Reconnections whose early Hello the gateway did not take (said again after the
    /// handshake).
    pub early_hellos_refused: u64,
    /// From the gate deciding to reconnect to its HelloAck, retries included (µs).
    pub time_us: Percentiles,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Settlement lag from a cumulative histogram (Prometheus buckets): each percentile is the
/// upper bound of the bucket it falls in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettlementLag {
    pub settled: u64,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub p999_ms: Option<u64>,
    pub mean_ms: f64,
}

impl SettlementLag {
    /// From cumulative bucket counts (`le` bound in ms, `None` for +Inf) and the sum of lags;
    /// `None` when nothing was settled.
    pub fn from_buckets(buckets: &[(Option<u64>, u64)], sum_ms: u64) -> Option<Self> {
        let settled = buckets.last()?.1;
        if settled == 0 {
            return None;
        }
        let at = |q: f64| {
            let rank = (q * settled as f64).ceil() as u64;
            buckets
                .iter()
                .find(|(_, count)| *count >= rank.max(1))
                .and_then(|(bound, _)| *bound)
        };
        Some(Self {
            settled,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            mean_ms: sum_ms as f64 / settled as f64,
        })
    }

    pub fn line(&self) -> String {
        let show =
            |v: Option<u64>| v.map_or_else(|| "over 10 s".to_string(), |v| format!("≤ {v} ms"));
        format!(
            "settlement lag (approval → ledger) of {} taps: p50 {} · p99 {} · p99.9 {} · mean {:.1} ms",
            self.settled,
            show(self.p50_ms),
            show(self.p99_ms),
            show(self.p999_ms),
            self.mean_ms
        )
    }
}

impl Report {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let pacing = if self.closed_loop {
            "closed loop, one tap in flight per gate".to_owned()
        } else {
            format!("open loop at {:.0} taps/s", self.target_rate)
        };
        let _ = writeln!(
            s,
            "{} · {} gates ({} connected) · {} · {:.1} s",
            self.target, self.connections, self.connected, pacing, self.duration_s
        );
        let _ = writeln!(
            s,
            "achieved {:.0} taps/s · sent {} · answered {} · busy {} · errors {} · behind {}",
            self.achieved_rate, self.sent, self.answered, self.busy, self.errors, self.behind
        );
        if self.resent > 0 {
            let _ = writeln!(
                s,
                "resent after a reconnect: {} taps the old connection left unanswered",
                self.resent
            );
        }
        if !self.deny.is_empty() {
            let _ = writeln!(s, "{}", self.deny.line());
        }
        if !self.offline.is_empty() {
            let _ = writeln!(s, "{}", self.offline.line());
        }
        if self.moved > 0 {
            let _ = writeln!(
                s,
                "moved mid-run: {} gates changed address and kept their connections (errors above include any they met)",
                self.moved
            );
        }
        let r = &self.reconnects;
        if r.reconnected > 0 {
            let _ = writeln!(
                s,
                "reconnected: {} times ({} with an early Hello answered, {} refused) · reconnect to HelloAck (µs): p50 {} · p90 {} · p99 {} · max {}",
                r.reconnected,
                r.early_hellos_answered,
                r.early_hellos_refused,
                r.time_us.p50,
                r.time_us.p90,
                r.time_us.p99,
                r.time_us.max
            );
        }
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "latency from intended send (µs): p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let l = &self.latency_from_send_us;
        let _ = writeln!(
            s,
            "latency from actual send (µs):   p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if let Some(lag) = &self.settlement {
            let _ = writeln!(s, "{}", lag.line());
        }
        if !self.decisions.is_empty() {
            let parts: Vec<String> = self
                .decisions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "decisions: {}", parts.join(" · "));
        }
        if !self.error_kinds.is_empty() {
            let parts: Vec<String> = self
                .error_kinds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "errors: {}", parts.join(" · "));
        }
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// Two charts side by side: the latency distribution (percentile on a log scale) and the
    /// answers per second over the run.
    pub fn svg(&self) -> String {
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
            2.0 * CHART_WIDTH + 20.0,
            CHART_HEIGHT + 40.0
        );
        svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
        self.latency_chart(&mut svg);
        self.rate_chart(&mut svg);
        svg.push_str("</svg>\n");
        svg
    }

    fn latency_chart(&self, svg: &mut String) {
        const W: f64 = CHART_WIDTH;
        const H: f64 = CHART_HEIGHT;
        const M: f64 = CHART_MARGIN;
        // Latency by percentile: x = nines (0 = p0, 1 = p90, 2 = p99, 3 = p99.9, 4 = p99.99),
        // y = latency on a log scale in whole decades, so a millisecond median and a stall of
        // half a second are both readable.
        let (low_decade, high_decade) = if self.histogram.is_empty() {
            (0, 1)
        } else {
            // Bucket bounds, not the slightly larger values a bucket reports, so 10 ms recorded
            // does not stretch the axis to 100 ms.
            let decade = |v: u64| (self.histogram.lowest_equivalent(v).max(1) as f64).log10();
            let low = decade(self.histogram.min()).floor() as i32;
            let high = (decade(self.histogram.max()).ceil() as i32).max(low + 1);
            (low, high)
        };
        let span = f64::from(high_decade - low_decade);
        let bottom = H - M + 20.0;
        let latency_y = |us: f64| {
            bottom - ((us.max(1.0).log10() - f64::from(low_decade)) / span) * (H - 2.0 * M)
        };
        let mut points = Vec::new();
        if !self.histogram.is_empty() {
            for v in self.histogram.iter_quantiles(2) {
                let q = v.quantile_iterated_to().min(0.9999);
                let nines = -(1.0 - q).log10();
                let x = M + nines / 4.0 * (W - 2.0 * M);
                let y = latency_y(v.value_iterated_to() as f64);
                points.push(format!("{x:.1},{y:.1}"));
            }
        }
        chart_frame(
            svg,
            0.0,
            W,
            H,
            M,
            "latency from intended send by percentile",
            None,
        );
        for decade in low_decade..=high_decade {
            let y = latency_y(10f64.powi(decade));
            let _ = write!(
                svg,
                r##"<line x1="{M:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - M,
                M - 4.0,
                y + 4.0,
                decade_label(decade)
            );
        }
        for (i, label) in ["p0", "p90", "p99", "p99.9", "p99.99"].iter().enumerate() {
            let x = M + i as f64 / 4.0 * (W - 2.0 * M);
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                H - M + 35.0
            );
        }
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="#c0392b" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
    }

    fn rate_chart(&self, svg: &mut String) {
        const W: f64 = CHART_WIDTH;
        const H: f64 = CHART_HEIGHT;
        const M: f64 = CHART_MARGIN;
        // Answer rate over the run, measured in tenths of a second so short stalls show.
        let offset = W + 20.0;
        let rates: Vec<u64> = self
            .throughput_per_100ms
            .iter()
            .map(|&count| count * 10)
            .collect();
        let peak = rates.iter().copied().max().unwrap_or(1).max(1) as f64;
        let n = rates.len().max(2) as f64;
        let points: Vec<String> = rates
            .iter()
            .enumerate()
            .map(|(i, &rate)| {
                let x = offset + M + i as f64 / (n - 1.0) * (W - 2.0 * M);
                let y = H - M + 20.0 - rate as f64 / peak * (H - 2.0 * M);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        chart_frame(
            svg,
            offset,
            W,
            H,
            M,
            "answers per second, by tenth of a second, over the run (s)",
            Some(&format!("{}", peak as u64)),
        );
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="#2471a3" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            offset + W - M,
            H - M + 35.0,
            self.duration_s
        );
    }
}

/// Size of each of the report's two charts, and the margin inside it, in SVG units.
const CHART_WIDTH: f64 = 480.0;
const CHART_HEIGHT: f64 = 300.0;
const CHART_MARGIN: f64 = 50.0;

/// Title and axes of one chart; a linear chart also gets its top value and zero on the y axis.
fn chart_frame(
    svg: &mut String,
    x0: f64,
    w: f64,
    h: f64,
    m: f64,
    title: &str,
    top_label: Option<&str>,
) {
    let (left, right, top, bottom) = (x0 + m, x0 + w - m, m - 10.0, h - m + 20.0);
    let label_x = left - 4.0;
    let _ = write!(
        svg,
        r##"<text x="{left:.1}" y="16" font-size="13">{title}</text><line x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{bottom:.1}" stroke="#333"/><line x1="{left:.1}" y1="{bottom:.1}" x2="{right:.1}" y2="{bottom:.1}" stroke="#333"/>"##,
    );
    if let Some(top_label) = top_label {
        let _ = write!(
            svg,
            r#"<text x="{label_x:.1}" y="{top:.1}" text-anchor="end">{top_label}</text><text x="{label_x:.1}" y="{bottom:.1}" text-anchor="end">0</text>"#,
        );
    }
}

/// A power of ten of microseconds as a reader would say it.
fn decade_label(decade: i32) -> String {
    match decade {
        ..=2 => format!("{} µs", 10u64.pow(decade.max(0) as u32)),
        3..=5 => format!("{} ms", 10u64.pow(decade as u32 - 3)),
        _ => format!("{} s", 10u64.pow(decade as u32 - 6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            histogram.record(v * 10).unwrap();
        }
        Report {
            target: "tapgate".into(),
            connections: 4,
            connected: 4,
            closed_loop: false,
            target_rate: 100.0,
            achieved_rate: 99.0,
            duration_s: 10.0,
            sent: 1000,
            resent: 0,
            answered: 1000,
            errors: 0,
            busy: 0,
            behind: 0,
            latency_us: Percentiles::of(&histogram),
            latency_from_send_us: Percentiles::of(&histogram),
            decisions: BTreeMap::from([("approved".into(), 990), ("card_lost".into(), 10)]),
            error_kinds: BTreeMap::new(),
            throughput_per_s: vec![100; 10],
            throughput_per_100ms: vec![10; 100],
            settlement: None,
            injected: Vec::new(),
            riders_over_budget: 0,
            moved: 0,
            deny: DenyFollowed::default(),
            offline: OfflineRidden::default(),
            reconnects: Reconnects::default(),
            histogram,
        }
    }

    #[test]
    fn settlement_lag_percentiles_are_bucket_bounds() {
        let buckets = [(Some(1), 40), (Some(5), 98), (Some(10), 100), (None, 100)];
        let lag = SettlementLag::from_buckets(&buckets, 300).unwrap();
        assert_eq!(
            (lag.p50_ms, lag.p99_ms, lag.p999_ms),
            (Some(5), Some(10), Some(10))
        );
        assert_eq!(lag.settled, 100);
        assert!((lag.mean_ms - 3.0).abs() < 1e-9);
        let slow = [(Some(1), 0), (None, 10)];
        assert_eq!(SettlementLag::from_buckets(&slow, 1).unwrap().p50_ms, None);
        assert_eq!(SettlementLag::from_buckets(&[(None, 0)], 0), None);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let value: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        for key in [
            "connections",
            "target_rate",
            "achieved_rate",
            "duration_s",
            "sent",
            "answered",
            "errors",
            "latency_us",
            "decisions",
            "throughput_per_s",
            "throughput_per_100ms",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                value["latency_us"].get(key).is_some(),
                "missing latency_us.{key}"
            );
        }
        assert_eq!(value["latency_us"]["p50"], 5003);
        assert_eq!(value["decisions"]["card_lost"], 10);
    }

    #[test]
    fn svg_is_a_complete_document_with_both_charts() {
        let svg = report().svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }

    #[test]
    fn the_latency_axis_is_marked_in_whole_decades_around_the_recorded_values() {
        // Recorded from 10 µs to 10 ms.
        let svg = report().svg();
        for label in ["10 µs", "100 µs", "1 ms", "10 ms"] {
            assert!(svg.contains(&format!(">{label}</text>")), "no {label} mark");
        }
        assert!(!svg.contains(">1 µs</text>") && !svg.contains(">100 ms</text>"));
        assert_eq!(decade_label(0), "1 µs");
        assert_eq!(decade_label(5), "100 ms");
        assert_eq!(decade_label(6), "1 s");
    }
}
