//! Counters the gateway keeps about itself. Plain atomics: reading them never slows a tap.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tapgate_protocol::registry::OPERATORS;
use tapgate_protocol::{AREAS, AreaCode, ErrorCode, Mode, Outcome, Reason};
use tapgate_runtime::histogram::DurationHistogram;

/// Answers by where the gate stands: per area, per mode and per operator, each by outcome.
/// Fixed arrays over the registries (41 areas, 5 modes, the operators, 3 outcomes), so the label
/// sets are bounded.
#[derive(Debug)]
pub struct AnswersByPlace {
    areas: Vec<[AtomicU64; 3]>,
    modes: Vec<[AtomicU64; 3]>,
    operators: Vec<[AtomicU64; 3]>,
}

impl Default for AnswersByPlace {
    fn default() -> Self {
        Self {
            areas: AREAS.iter().map(|_| Default::default()).collect(),
            modes: Mode::ALL.iter().map(|_| Default::default()).collect(),
            operators: OPERATORS.iter().map(|_| Default::default()).collect(),
        }
    }
}

const OUTCOME_LABELS: [&str; 3] = ["approve", "deny", "busy"];

/// Where a gate's answers are counted: its indexes in the registries, looked up once per
/// session rather than on every answer.
#[derive(Debug, Clone, Copy)]
pub struct PlaceSlot {
    area: Option<usize>,
    mode: Option<usize>,
    operator: Option<usize>,
}

impl PlaceSlot {
    pub fn of(area: AreaCode, mode: Mode, operator: u16) -> Self {
        Self {
            area: AREAS.binary_search_by_key(&area, |x| x.code).ok(),
            mode: Mode::ALL.iter().position(|x| *x == mode),
            operator: OPERATORS.iter().position(|x| x.id == operator),
        }
    }
}

impl AnswersByPlace {
    pub fn count(&self, slot: PlaceSlot, outcome: Outcome) {
        let o = match outcome {
            Outcome::Approve => 0,
            Outcome::Deny => 1,
            Outcome::Busy => 2,
        };
        for (counts, index) in [
            (&self.areas, slot.area),
            (&self.modes, slot.mode),
            (&self.operators, slot.operator),
        ] {
            if let Some(i) = index {
                counts[i][o].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// (operator id, outcome label, answers) for every operator and outcome.
    pub fn by_operator(&self) -> Vec<(String, &'static str, u64)> {
        let mut out = Vec::new();
        for (operator, counts) in OPERATORS.iter().zip(&self.operators) {
            for (label, n) in OUTCOME_LABELS.iter().zip(counts) {
                out.push((operator.id.to_string(), *label, n.load(Ordering::Relaxed)));
            }
        }
        out
    }

    /// (area code, outcome label, answers) for every area and outcome.
    pub fn by_area(&self) -> Vec<(String, &'static str, u64)> {
        let mut out = Vec::new();
        for (area, counts) in AREAS.iter().zip(&self.areas) {
            for (label, n) in OUTCOME_LABELS.iter().zip(counts) {
                out.push((area.code.to_string(), *label, n.load(Ordering::Relaxed)));
            }
        }
        out
    }

    /// (mode label, outcome label, answers) for every mode and outcome.
    pub fn by_mode(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (mode, counts) in Mode::ALL.iter().zip(&self.modes) {
            for (label, n) in OUTCOME_LABELS.iter().zip(counts) {
                out.push((mode.label(), *label, n.load(Ordering::Relaxed)));
            }
        }
        out
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_active: AtomicI64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Times a gate's address changed under a live connection (QUIC migration).
    pub migrations: AtomicU64,
    /// Handshakes that resumed a TLS session from a ticket this node issued (shared with the
    /// endpoint's ticket store, which counts them).
    pub tls_resumptions: std::sync::Arc<AtomicU64>,
    /// Hellos that came as early data and were answered before the handshake completed.
    pub early_hellos: AtomicU64,
    /// Connection attempts asked to prove their address first (QUIC Retry), past half the
    /// connection limit.
    pub retries: AtomicU64,
    pub sessions_authenticated: AtomicU64,
    decisions: [AtomicU64; Reason::ALL.len()],
    pub approved: AtomicU64,
    pub denied: AtomicU64,
    pub busy: AtomicU64,
    pub resends: AtomicU64,
    errors: [AtomicU64; 19],
    /// Counted-ride updates to the directory dropped because their queue was full.
    pub ride_updates_dropped: AtomicU64,
    /// Decisions answered without being shared with the other gateways (Redis unreachable or
    /// the queue to it full): a gate moving to another gateway would get a new decision.
    pub decisions_unshared: AtomicU64,
    /// Decisions other gateways made, loaded into a gate's window at its Hello here.
    pub decisions_restored: AtomicU64,
    /// From a Tap frame read to its answer written.
    pub answer_latency: DurationHistogram,
    /// The deny list's version at this node, and how many cards are on it.
    pub deny_version: AtomicU64,
    pub deny_entries: AtomicU64,
    /// Version-2 gates following the deny list here.
    pub deny_gates: AtomicI64,
    pub deny_changes_sent: AtomicU64,
    pub deny_list_parts_sent: AtomicU64,
    /// Whole lists started: gates that were new, too far behind, ahead of this node, or held a
    /// list of another history.
    pub deny_resyncs: AtomicU64,
    /// Gates whose first DenyAck named a version this node has, of another history: a Redis
    /// failover lost changes they had been sent.
    pub deny_other_history: AtomicU64,
    /// Times this node loaded the whole list again after its first load.
    pub deny_reloads: AtomicU64,
    /// From a change reaching this node to a gate acknowledging it.
    pub deny_propagation: DurationHistogram,
    /// Offline taps recorded (resends not counted), and those that broke an offline rule.
    pub offline_taps: AtomicU64,
    pub offline_flagged: AtomicU64,
    /// Offline taps decided by a deny list of another history (changes a failover lost), so
    /// not judged under rule 1.
    pub offline_other_history: AtomicU64,
    pub by_place: AnswersByPlace,
    /// Authenticated gates connected now, by mode (in the order of `Mode::ALL`).
    pub gates_by_mode: [AtomicI64; 5],
}

impl Metrics {
    /// Counts an authenticated gate of `mode` as connected until the guard is dropped.
    pub fn gate_connected(self: &std::sync::Arc<Self>, mode: Mode) -> ConnectedGate {
        let index = Mode::ALL.iter().position(|m| *m == mode).unwrap_or(0);
        self.gates_by_mode[index].fetch_add(1, Ordering::Relaxed);
        ConnectedGate {
            metrics: self.clone(),
            index,
        }
    }

    /// (mode label, gates connected now).
    pub fn gates_by_mode(&self) -> Vec<(&'static str, u64)> {
        Mode::ALL
            .iter()
            .zip(&self.gates_by_mode)
            .map(|(m, n)| (m.label(), n.load(Ordering::Relaxed).max(0) as u64))
            .collect()
    }
}

/// One connected gate, counted while it lives.
pub struct ConnectedGate {
    metrics: std::sync::Arc<Metrics>,
    index: usize,
}

impl Drop for ConnectedGate {
    fn drop(&mut self) {
        self.metrics.gates_by_mode[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A consistent-enough copy of the counters for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub connections_active: i64,
    pub connections_total: u64,
    pub connections_refused: u64,
    pub migrations: u64,
    pub tls_resumptions: u64,
    pub early_hellos: u64,
    pub retries: u64,
    pub sessions_authenticated: u64,
    pub approved: u64,
    pub denied: u64,
    pub busy: u64,
    pub resends: u64,
    pub decisions: Vec<(Reason, u64)>,
    pub errors: Vec<(ErrorCode, u64)>,
    pub ride_updates_dropped: u64,
    pub decisions_unshared: u64,
    pub decisions_restored: u64,
}

impl Metrics {
    pub fn count_answer(&self, outcome: Outcome, reason: Reason) {
        let counter = match outcome {
            Outcome::Approve => &self.approved,
            Outcome::Deny => &self.denied,
            Outcome::Busy => &self.busy,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.decisions.get(usize::from(reason.code())) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_error(&self, code: ErrorCode) {
        if let Some(c) = self.errors.get(usize::from(code.code())) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_total: load(&self.connections_total),
            connections_refused: load(&self.connections_refused),
            migrations: load(&self.migrations),
            tls_resumptions: load(&self.tls_resumptions),
            early_hellos: load(&self.early_hellos),
            retries: load(&self.retries),
            sessions_authenticated: load(&self.sessions_authenticated),
            approved: load(&self.approved),
            denied: load(&self.denied),
            busy: load(&self.busy),
            resends: load(&self.resends),
            decisions: Reason::ALL
                .iter()
                .map(|r| (*r, load(&self.decisions[usize::from(r.code())])))
                .filter(|(_, n)| *n > 0)
                .collect(),
            errors: ErrorCode::ALL
                .iter()
                .map(|c| (*c, load(&self.errors[usize::from(c.code())])))
                .filter(|(_, n)| *n > 0)
                .collect(),
            ride_updates_dropped: load(&self.ride_updates_dropped),
            decisions_unshared: load(&self.decisions_unshared),
            decisions_restored: load(&self.decisions_restored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_area_and_mode() {
        let p = AnswersByPlace::default();
        p.count(
            PlaceSlot::of(AreaCode(500103), Mode::Metro, 2),
            Outcome::Deny,
        );
        p.count(
            PlaceSlot::of(AreaCode(999999), Mode::Bus, 99),
            Outcome::Approve,
        );
        assert!(p.by_operator().contains(&("2".into(), "deny", 1)));
        assert_eq!(p.by_operator().iter().map(|(_, _, n)| n).sum::<u64>(), 1);
        assert!(p.by_area().contains(&("500103".into(), "deny", 1)));
        assert_eq!(p.by_area().iter().map(|(_, _, n)| n).sum::<u64>(), 1);
        assert!(p.by_mode().contains(&("bus", "approve", 1)));
        assert_eq!(p.by_area().len(), 41 * 3);
    }

    #[test]
    fn every_reason_and_error_code_has_a_counter() {
        let m = Metrics::default();
        for r in Reason::ALL {
            m.count_answer(Outcome::Deny, *r);
        }
        for c in ErrorCode::ALL {
            m.count_error(*c);
        }
        let s = m.snapshot();
        assert_eq!(s.decisions.len(), Reason::ALL.len());
        assert_eq!(s.errors.len(), ErrorCode::ALL.len());
        assert_eq!(s.denied, Reason::ALL.len() as u64);
    }
}
