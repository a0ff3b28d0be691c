//! Whether each part of a process works, and what the operator is told about it.
//!
//! Every part that can fail on its own — the directory, the change feed, the journal, the
//! forwarder, the settlers, each background task — keeps a [`PartHealth`]. Readiness
//! ([`Readiness::of`]) is the list of parts failing for longer than a short grace (a single lost
//! round trip does not flap it) or dead, with their reasons; `/readyz` serves it. Times are
//! passed in, so the rules are tested without waiting.
//!
//! [`Incident`] is how a failure that repeats reaches the log: once when it starts, then at most
//! once per interval with how often it happened, and once when it ends.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a part may fail before the process stops being ready.
pub const GRACE: Duration = Duration::from_secs(2);
/// While a failure lasts, how often the log says so again.
pub const REPEAT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    since: Instant,
    reason: String,
    /// Will not recover: a task that ended or panicked.
    dead: bool,
}

/// The health of one part.
#[derive(Debug, Default)]
pub struct PartHealth {
    failure: Mutex<Option<Failure>>,
}

impl PartHealth {
    pub fn ok(&self) {
        let mut failure = self.failure.lock().expect("health lock");
        if failure.as_ref().is_some_and(|f| !f.dead) {
            *failure = None;
        }
    }

    /// Failing now, for `reason`; the start of the failure is kept while it lasts.
    pub fn fail(&self, now: Instant, reason: impl Display) {
        let mut failure = self.failure.lock().expect("health lock");
        match failure.as_mut() {
            Some(f) if f.dead => {}
            Some(f) => f.reason = reason.to_string(),
            None => {
                *failure = Some(Failure {
                    since: now,
                    reason: reason.to_string(),
                    dead: false,
                })
            }
        }
    }

    /// Failed for good (a task that ended or panicked): stays failing.
    pub fn dead(&self, now: Instant, reason: impl Display) {
        *self.failure.lock().expect("health lock") = Some(Failure {
            since: now,
            reason: reason.to_string(),
            dead: true,
        });
    }

    /// Why the part is failing, if it is.
    pub fn reason(&self) -> Option<String> {
        self.failure
            .lock()
            .expect("health lock")
            .as_ref()
            .map(|f| f.reason.clone())
    }

    /// Whether the part is failing at all (without the grace readiness allows).
    pub fn failing(&self) -> bool {
        self.failure.lock().expect("health lock").is_some()
    }

    /// The reason and how long, when this part keeps the process from being ready at `now`.
    fn unready(&self, now: Instant) -> Option<(String, Duration)> {
        let failure = self.failure.lock().expect("health lock");
        let f = failure.as_ref()?;
        let lasted = now.saturating_duration_since(f.since);
        (f.dead || lasted >= GRACE).then(|| (f.reason.clone(), lasted))
    }
}

/// One part keeping the process from being ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Unready {
    pub part: String,
    pub reason: String,
    pub for_s: f64,
}

/// The parts that keep the process from being ready, if any.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Readiness {
    pub failing: Vec<Unready>,
}

impl Readiness {
    pub fn of<'a>(parts: impl IntoIterator<Item = (String, &'a PartHealth)>, now: Instant) -> Self {
        let failing = parts
            .into_iter()
            .filter_map(|(part, health)| {
                health.unready(now).map(|(reason, lasted)| Unready {
                    part,
                    reason,
                    for_s: lasted.as_secs_f64(),
                })
            })
            .collect();
        Self { failing }
    }

    pub fn ready(&self) -> bool {
        self.failing.is_empty()
    }

    /// `{"ready": false, "failing": [{"part": …, "reason": …, "for_s": …}]}`
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.ready(),
            "failing": self.failing.iter().map(|f| serde_json::json!({
                "part": f.part,
                "reason": f.reason,
                "for_s": (f.for_s * 10.0).round() / 10.0,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A failure that may repeat, as the log should tell it.
#[derive(Debug)]
pub struct Incident {
    what: &'static str,
    current: Option<Ongoing>,
}

#[derive(Debug)]
struct Ongoing {
    since: Instant,
    logged: Instant,
    times: u64,
}

impl Incident {
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            current: None,
        }
    }

    /// The failure happened (again) at `now`: logged when it starts and once per [`REPEAT`]
    /// while it lasts. True when this call logged.
    pub fn failed(&mut self, now: Instant, error: impl Display) -> bool {
        match &mut self.current {
            None => {
                tracing::warn!(error = %error, "{}", self.what);
                self.current = Some(Ongoing {
                    since: now,
                    logged: now,
                    times: 1,
                });
                true
            }
            Some(ongoing) => {
                ongoing.times += 1;
                if now.saturating_duration_since(ongoing.logged) < REPEAT {
                    return false;
                }
                ongoing.logged = now;
                tracing::warn!(error = %error, times = ongoing.times, lasting = ?now.saturating_duration_since(ongoing.since), "{} (still)", self.what);
                true
            }
        }
    }

    /// The failure is over; logged once if it was on.
    pub fn recovered(&mut self, now: Instant) -> bool {
        let Some(ongoing) = self.current.take() else {
            return false;
        };
        tracing::info!(times = ongoing.times, lasted = ?now.saturating_duration_since(ongoing.since), "{}: over", self.what);
        true
    }
}

/// Background tasks whose panics have been caught.
#[derive(Debug, Default)]
pub struct Panics {
    pub count: AtomicU64,
}

/// Runs `task` on its own tokio task and watches it: a panic is logged with its message,
/// counted, and marks `part` dead, so the process reports itself not ready instead of carrying
/// on without the task. A task that returns reports its own outcome on `part` before it does.
pub fn supervise(
    name: &'static str,
    part: Arc<PartHealth>,
    panics: Arc<Panics>,
    task: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let inner = tokio::spawn(task);
    let stop_inner = AbortOnDrop(inner.abort_handle());
    tokio::spawn(async move {
        // Aborting the watcher (at shutdown) stops the task too.
        let _stop_inner = stop_inner;
        match inner.await {
            Ok(()) => {}
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                panics.count.fetch_add(1, Ordering::Relaxed);
                tracing::error!(task = name, panic = %message, "background task panicked; this process is not ready until it restarts");
                part.dead(Instant::now(), format!("{name} panicked: {message}"));
            }
            // Aborted at shutdown.
            Err(_) => {}
        }
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_counts_after_the_grace_and_clears_when_the_part_recovers() {
        let t0 = Instant::now();
        let part = PartHealth::default();
        let readiness = |now| Readiness::of([("directory".to_owned(), &part)], now);
        assert!(readiness(t0).ready());
        part.fail(t0, "unreachable");
        assert!(
            readiness(t0 + GRACE / 2).ready(),
            "one lost round trip does not flap"
        );
        part.fail(t0 + GRACE / 2, "NOAUTH");
        let r = readiness(t0 + GRACE);
        assert_eq!(r.failing.len(), 1);
        assert_eq!(r.failing[0].reason, "NOAUTH");
        assert_eq!(r.failing[0].for_s, GRACE.as_secs_f64());
        assert_eq!(r.to_json()["ready"], false);
        part.ok();
        assert!(readiness(t0 + GRACE * 2).ready());
    }

    #[test]
    fn a_dead_part_is_unready_at_once_and_stays_so() {
        let t0 = Instant::now();
        let part = PartHealth::default();
        part.dead(t0, "settler panicked: min > max");
        part.ok();
        part.fail(t0, "something else");
        let r = Readiness::of([("settler".to_owned(), &part)], t0);
        assert_eq!(r.failing[0].reason, "settler panicked: min > max");
    }

    #[test]
    fn a_repeating_failure_is_logged_at_its_start_once_a_minute_and_at_its_end() {
        let t0 = Instant::now();
        let mut incident = Incident::new("could not zero journal space ahead");
        let mut lines = 0;
        // Eight thousand failures in ten seconds, as a full disk produces.
        for i in 0..8_000u64 {
            lines += u64::from(incident.failed(t0 + Duration::from_micros(i * 1_250), "ENOSPC"));
        }
        assert_eq!(lines, 1);
        assert!(incident.failed(t0 + REPEAT + Duration::from_secs(1), "ENOSPC"));
        assert!(incident.recovered(t0 + REPEAT * 2));
        assert!(!incident.recovered(t0 + REPEAT * 2));
    }

    #[tokio::test]
    async fn a_panicking_task_is_caught_counted_and_marks_its_part_dead() {
        let part = Arc::new(PartHealth::default());
        let panics = Arc::new(Panics::default());
        supervise("settler", part.clone(), panics.clone(), async {
            panic!("intercity min 3000 > max 2000");
        })
        .await
        .unwrap();
        assert_eq!(panics.count.load(Ordering::Relaxed), 1);
        let r = Readiness::of([("settler".to_owned(), &*part)], Instant::now());
        assert!(r.failing[0].reason.contains("min 3000 > max 2000"), "{r:?}");
    }
}
