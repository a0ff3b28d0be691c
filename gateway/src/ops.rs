//! The gateway's counters as operators see them: connections, answers by outcome, place and
//! mode, the card cache, the directory and its change feeds, the journal.

use crate::cache::CardCache;
use crate::directory::DirectoryHealth;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::server::Gateway;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tapgate_journal::JournalStats;
use tapgate_runtime::health::{Panics, PartHealth};
use tapgate_runtime::ops::{Exposed, Exposition, Sink};

/// The gateway's counters, shared with it.
#[derive(Clone)]
pub struct GatewayCounters {
    metrics: Arc<Metrics>,
    cache: Arc<CardCache>,
    journal: Arc<JournalStats>,
    directory: Option<Arc<DirectoryHealth>>,
    tasks: Arc<PartHealth>,
    panics: Arc<Panics>,
}

impl GatewayCounters {
    pub fn of(gateway: &Gateway) -> Self {
        GatewayCounters {
            metrics: gateway.metrics().clone(),
            cache: gateway.cache().clone(),
            journal: gateway.journal().stats.clone(),
            directory: gateway.directory().health(),
            tasks: gateway.tasks_health().clone(),
            panics: gateway.panics().clone(),
        }
    }
}

/// What a process running only this gateway shows.
pub fn exposition(gateway: &Gateway) -> Exposition {
    Exposition::default().with(GatewayCounters::of(gateway))
}

impl Exposed for GatewayCounters {
    /// The directory's Redis and each change feed, the journal, the gateway's tasks.
    fn parts(&self) -> Vec<(String, &PartHealth)> {
        let mut parts: Vec<(String, &PartHealth)> = Vec::new();
        if let Some(directory) = &self.directory {
            parts.push(("directory".into(), &*directory.redis));
            for (group, feed) in directory.feed.iter().enumerate() {
                parts.push((format!("change feed g{group:02}"), &**feed));
            }
        }
        parts.push(("journal".into(), &self.journal.health));
        parts.push(("gateway tasks".into(), &self.tasks));
        parts
    }

    fn panics(&self) -> u64 {
        let load = |p: &Arc<Panics>| p.count.load(Ordering::Relaxed);
        load(&self.panics) + self.directory.as_ref().map_or(0, |d| load(&d.panics))
    }

    fn render(&self, sink: &mut Sink) -> fmt::Result {
        if let Some(directory) = &self.directory {
            sink.single(
                "redis_up",
                "gauge",
                "1 while the directory's Redis answers this gateway (probed every second).",
                u64::from(!directory.redis.failing()),
            )?;
            sink.single(
                "change_feeds_behind",
                "gauge",
                "Change groups whose feed is not following its stream now (of 16).",
                directory.feed.iter().filter(|f| f.failing()).count() as u64,
            )?;
            sink.single(
                "deny_list_feed_up",
                "gauge",
                "1 while this gateway follows the deny list's stream; at 0 its version-2 gates' lists go stale (online taps are decided as usual).",
                u64::from(!directory.deny_feed.failing()),
            )?;
        }
        render_gateway(sink, self)
    }
}

fn render_gateway(sink: &mut Sink, counters: &GatewayCounters) -> fmt::Result {
    let m = counters.metrics.snapshot();
    render_sessions(sink, &m)?;
    render_cache_and_journal(sink, counters)?;
    sink.labeled(
        "answers_total",
        "counter",
        "Tap answers sent, by outcome.",
        "outcome",
        &[
            ("approve", m.approved),
            ("deny", m.denied),
            ("busy", m.busy),
        ],
    )?;
    let reasons: Vec<(String, u64)> = m
        .decisions
        .iter()
        .map(|(r, n)| (r.to_string(), *n))
        .collect();
    let reasons: Vec<(&str, u64)> = reasons.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    sink.labeled(
        "decisions_total",
        "counter",
        "Tap answers sent, by reason.",
        "reason",
        &reasons,
    )?;
    let errors: Vec<(String, u64)> = m.errors.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    let errors: Vec<(&str, u64)> = errors.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    sink.labeled(
        "errors_total",
        "counter",
        "Error frames and closes, by code.",
        "code",
        &errors,
    )?;
    sink.labeled(
        "gates_connected",
        "gauge",
        "Authenticated gates connected now, by mode.",
        "mode",
        &counters.metrics.gates_by_mode(),
    )?;
    render_places(sink, counters)?;
    let (sum, count, buckets) = counters.metrics.answer_latency.snapshot();
    sink.histogram_seconds(
        "answer_latency",
        "From a Tap frame read to its answer written, in the gateway.",
        sum,
        count,
        &buckets,
    )?;
    render_deny_list(sink, &counters.metrics)?;
    let (sum, count, buckets) = counters.journal.sync_latency.snapshot();
    sink.histogram_seconds(
        "journal_sync",
        "Writing and syncing one journal batch.",
        sum,
        count,
        &buckets,
    )
}

/// The card cache's and the journal's counters.
fn render_cache_and_journal(sink: &mut Sink, counters: &GatewayCounters) -> fmt::Result {
    let cache = &counters.cache;
    let s = &cache.stats;
    let journal = &counters.journal;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let single: [(&str, &str, &str, u64); 14] = [
        (
            "cache_entries",
            "gauge",
            "Cards held in the cache.",
            cache.len() as u64,
        ),
        (
            "cache_hits_total",
            "counter",
            "Taps decided from the cache.",
            load(&s.hits),
        ),
        (
            "cache_misses_total",
            "counter",
            "Taps that needed a directory lookup.",
            load(&s.misses),
        ),
        (
            "cache_fetches_total",
            "counter",
            "Directory lookups (one per card however many taps wait).",
            load(&s.fetches),
        ),
        (
            "cache_fetch_errors_total",
            "counter",
            "Directory lookups that failed.",
            load(&s.fetch_errors),
        ),
        (
            "card_records_malformed_total",
            "counter",
            "Card records in the directory that could not be read (logged with their key).",
            load(&s.malformed_records),
        ),
        (
            "cache_evictions_total",
            "counter",
            "Cards dropped at the cache capacity.",
            load(&s.evictions),
        ),
        (
            "cache_changes_applied_total",
            "counter",
            "Card changes received from the directory.",
            load(&s.changes_applied),
        ),
        (
            "cache_resyncs_total",
            "counter",
            "Times the whole cache was dropped after missed changes.",
            load(&s.resyncs),
        ),
        (
            "journal_records_total",
            "counter",
            "Tap records written to the journal.",
            load(&journal.records),
        ),
        (
            "journal_syncs_total",
            "counter",
            "Journal batches written and synced.",
            load(&journal.syncs),
        ),
        (
            "journal_bytes_total",
            "counter",
            "Bytes written to the journal.",
            load(&journal.bytes),
        ),
        (
            "journal_write_errors_total",
            "counter",
            "Journal batches that failed.",
            load(&journal.write_errors),
        ),
        (
            "journal_batches_total",
            "counter",
            "Journal batches attempted.",
            load(&journal.batches),
        ),
    ];
    sink.rows(&single)
}

/// Answers by where the gate is: area, operator and mode.
fn render_places(sink: &mut Sink, counters: &GatewayCounters) -> fmt::Result {
    let by_area = counters.metrics.by_place.by_area();
    sink.counters_by_two(
        "area_answers",
        "Tap answers by the gate's area (six-digit code) and outcome.",
        ("area", "outcome"),
        by_area.iter().map(|(a, o, n)| (a.as_str(), *o, *n)),
    )?;
    let by_operator = counters.metrics.by_place.by_operator();
    sink.counters_by_two(
        "operator_answers",
        "Tap answers by the gate's operator (registry id) and outcome.",
        ("operator", "outcome"),
        by_operator
            .iter()
            .map(|(o, outcome, n)| (o.as_str(), *outcome, *n)),
    )?;
    sink.counters_by_two(
        "mode_answers",
        "Tap answers by the gate's mode and outcome.",
        ("mode", "outcome"),
        counters.metrics.by_place.by_mode().into_iter(),
    )
}

/// The deny list at this node and how it reaches the version-2 gates.
fn render_deny_list(sink: &mut Sink, m: &Metrics) -> fmt::Result {
    let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
    let rows: [(&str, &str, &str, u64); 11] = [
        (
            "deny_list_version",
            "gauge",
            "The deny list's version at this node; every node of a city should show the same.",
            load(&m.deny_version),
        ),
        (
            "deny_list_cards",
            "gauge",
            "Cards on the deny list (lost, blocked, cancelled).",
            load(&m.deny_entries),
        ),
        (
            "deny_list_gates",
            "gauge",
            "Version-2 gates following the deny list at this node.",
            m.deny_gates.load(Ordering::Relaxed).max(0) as u64,
        ),
        (
            "deny_list_changes_frames_total",
            "counter",
            "DenyChanges frames sent to gates.",
            load(&m.deny_changes_sent),
        ),
        (
            "deny_list_parts_total",
            "counter",
            "DenyList frames (parts of the whole list) sent to gates.",
            load(&m.deny_list_parts_sent),
        ),
        (
            "deny_list_resyncs_total",
            "counter",
            "Whole deny lists started for a gate that was new, too far behind, ahead of this node, or held a list of another history.",
            load(&m.deny_resyncs),
        ),
        (
            "deny_list_other_history_total",
            "counter",
            "Gates that said they hold a deny-list version this node has, of another history (a Redis failover lost changes they had been sent); each was sent the whole list.",
            load(&m.deny_other_history),
        ),
        (
            "deny_list_reloads_total",
            "counter",
            "Times this node loaded the whole deny list again: its feed was lost, it missed changes, or a Redis failover took changes it had (every gate it follows is then sent the whole list).",
            load(&m.deny_reloads),
        ),
        (
            "offline_taps_total",
            "counter",
            "Taps gates approved offline and uploaded, recorded at this node.",
            load(&m.offline_taps),
        ),
        (
            "offline_taps_flagged_total",
            "counter",
            "Uploaded offline taps that broke an offline rule or could not be charged as usual.",
            load(&m.offline_flagged),
        ),
        (
            "offline_taps_other_history_total",
            "counter",
            "Uploaded offline taps a gate decided by a deny list of another history (changes a Redis failover lost): not flagged under rule 1, since what that list held cannot be told.",
            load(&m.offline_other_history),
        ),
    ];
    sink.rows(&rows)?;
    let (sum, count, buckets) = m.deny_propagation.snapshot();
    sink.histogram_seconds(
        "deny_list_propagation",
        "From a deny-list change reaching this node to a gate acknowledging it.",
        sum,
        count,
        &buckets,
    )
}

fn render_sessions(sink: &mut Sink, m: &MetricsSnapshot) -> fmt::Result {
    let single: [(&str, &str, &str, u64); 12] = [
        (
            "connections_active",
            "gauge",
            "Gate connections open now.",
            m.connections_active.max(0) as u64,
        ),
        (
            "connections_total",
            "counter",
            "Gate connections accepted.",
            m.connections_total,
        ),
        (
            "connections_refused_total",
            "counter",
            "Connections closed at the connection limit.",
            m.connections_refused,
        ),
        (
            "connection_migrations_total",
            "counter",
            "Times a gate's address changed under its live connection (a bus moving between cell towers); its session carried on.",
            m.migrations,
        ),
        (
            "tls_resumptions_total",
            "counter",
            "Gate handshakes that resumed a TLS session from this node's ticket (no certificate sent or checked).",
            m.tls_resumptions,
        ),
        (
            "early_hellos_total",
            "counter",
            "Hellos received as 0-RTT early data on a resumed connection and answered before the handshake completed.",
            m.early_hellos,
        ),
        (
            "connection_retries_total",
            "counter",
            "Connection attempts asked to prove their address first (QUIC Retry) because over half the connection limit was in use.",
            m.retries,
        ),
        (
            "sessions_authenticated_total",
            "counter",
            "Gates that passed Hello.",
            m.sessions_authenticated,
        ),
        (
            "resends_total",
            "counter",
            "Taps answered again from the resend window.",
            m.resends,
        ),
        (
            "ride_updates_dropped_total",
            "counter",
            "Counted-ride updates not sent to the directory.",
            m.ride_updates_dropped,
        ),
        (
            "decisions_unshared_total",
            "counter",
            "Decisions answered without being shared with the other gateways (Redis unreachable or its queue full).",
            m.decisions_unshared,
        ),
        (
            "decisions_restored_total",
            "counter",
            "Decisions of other gateways loaded into a gate's resend window at its Hello.",
            m.decisions_restored,
        ),
    ];
    sink.rows(&single)
}
