//! Counters the gateway keeps about itself. Plain atomics: reading them never slows a tap.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tapgate_protocol::{ErrorCode, Outcome, Reason};

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_active: AtomicI64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub sessions_authenticated: AtomicU64,
    decisions: [AtomicU64; 10],
    pub approved: AtomicU64,
    pub denied: AtomicU64,
    pub busy: AtomicU64,
    pub resends: AtomicU64,
    errors: [AtomicU64; 18],
    /// Counted-ride updates to the directory dropped because their queue was full.
    pub ride_updates_dropped: AtomicU64,
    /// Decisions answered without being shared with the other gateways (Redis unreachable or
    /// the queue to it full): a gate moving to another gateway would get a new decision.
    pub decisions_unshared: AtomicU64,
    /// Decisions other gateways made, loaded into a gate's window at its Hello here.
    pub decisions_restored: AtomicU64,
}

/// A consistent-enough copy of the counters for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub connections_active: i64,
    pub connections_total: u64,
    pub connections_refused: u64,
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
