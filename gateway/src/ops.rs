//! The operators' window: counters in the Prometheus text format, liveness and readiness over
//! HTTP (`GET /metrics`, `/healthz`, `/readyz`), separate from the gates' QUIC port. Bounded like
//! everything else: a connection limit, a deadline for the request head and one for the whole
//! connection.

use crate::cache::CardCache;
use crate::directory::DirectoryHealth;
use crate::health::{Panics, PartHealth, Readiness};
use crate::journal::JournalStats;
use crate::metrics::Metrics;
use crate::server::Gateway;
use crate::settle::Settlement;
use crate::settle::forwarder::Backlog;
use crate::settle::forwarder::ForwarderStats;
use crate::settle::settler::SettlerStats;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Open connections at most; more are closed at once.
const MAX_OPS_CONNECTIONS: usize = 256;
/// How long a client may take to send its request head.
const HEADER_READ: Duration = Duration::from_secs(2);
/// How long one connection may last, reading the answer included.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long one request may take once its head has arrived.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Requests worked on at once (each takes microseconds; the bound is for a flood).
const MAX_REQUESTS_AT_ONCE: usize = 64;

/// What the ops endpoint reads: counters shared with whatever runs in this process (a gateway,
/// its forwarder and settlers, or standalone settlers), so the endpoint keeps none of them alive.
#[derive(Clone, Default)]
pub struct Counters {
    gateway: Option<GatewayCounters>,
    forwarder: Option<Arc<ForwarderStats>>,
    backlog: Option<Backlog>,
    settlers: Option<Arc<SettlerStats>>,
    /// Panics caught in settlement's tasks.
    settlement_panics: Option<Arc<Panics>>,
}

#[derive(Clone)]
struct GatewayCounters {
    metrics: Arc<Metrics>,
    cache: Arc<CardCache>,
    journal: Arc<JournalStats>,
    directory: Option<Arc<DirectoryHealth>>,
    tasks: Arc<PartHealth>,
    panics: Arc<Panics>,
}

impl Counters {
    pub fn of(gateway: &Gateway) -> Self {
        Self {
            gateway: Some(GatewayCounters {
                metrics: gateway.metrics().clone(),
                cache: gateway.cache().clone(),
                journal: gateway.journal().stats.clone(),
                directory: gateway.directory().health(),
                tasks: gateway.tasks_health().clone(),
                panics: gateway.panics().clone(),
            }),
            ..Self::default()
        }
    }

    /// Adds the counters of the forwarder and settlers running beside the gateway.
    pub fn with_settlement(mut self, settlement: &Settlement) -> Self {
        self.forwarder = Some(settlement.forwarder.clone());
        self.backlog = Some(settlement.backlog());
        self.settlers = Some(settlement.settlers.clone());
        self.settlement_panics = Some(settlement.panics.clone());
        self
    }

    /// The counters of settlers running on their own (`tapgate settle run`).
    pub fn of_settlers(settlers: Arc<SettlerStats>, panics: Arc<Panics>) -> Self {
        Self {
            settlers: Some(settlers),
            settlement_panics: Some(panics),
            ..Self::default()
        }
    }

    /// Which parts of this process keep it from serving: the directory's Redis and each change
    /// feed, the journal, the gateway's tasks, the forwarder, the settlers.
    pub fn readiness(&self, now: Instant) -> Readiness {
        let mut parts: Vec<(String, &PartHealth)> = Vec::new();
        if let Some(g) = &self.gateway {
            if let Some(directory) = &g.directory {
                parts.push(("directory".into(), &*directory.redis));
                for (group, feed) in directory.feed.iter().enumerate() {
                    parts.push((format!("change feed g{group:02}"), &**feed));
                }
            }
            parts.push(("journal".into(), &g.journal.health));
            parts.push(("gateway tasks".into(), &g.tasks));
        }
        if let Some(f) = &self.forwarder {
            parts.push(("forwarder".into(), &f.health));
        }
        if let Some(s) = &self.settlers {
            parts.push(("settlers".into(), &s.health));
        }
        Readiness::of(parts, now)
    }

    fn panics(&self) -> u64 {
        let load = |p: &Arc<Panics>| p.count.load(Ordering::Relaxed);
        self.gateway.as_ref().map_or(0, |g| {
            load(&g.panics) + g.directory.as_ref().map_or(0, |d| load(&d.panics))
        }) + self.settlement_panics.as_ref().map_or(0, load)
    }
}

/// Readiness and panics, the same for every kind of process.
fn render_health(sink: &mut Sink, counters: &Counters) -> fmt::Result {
    sink.labeled(
        "build_info",
        "gauge",
        "Always 1; the label says which tapgate this is.",
        "version",
        &[(env!("CARGO_PKG_VERSION"), 1)],
    )?;
    let ready = counters.readiness(Instant::now()).ready();
    sink.single(
        "ready",
        "gauge",
        "1 when every part of this process works (GET /readyz names what does not).",
        u64::from(ready),
    )?;
    sink.single(
        "task_panics_total",
        "counter",
        "Background tasks that panicked (logged with their message; the process is then not ready).",
        counters.panics(),
    )?;
    if let Some(directory) = counters.gateway.as_ref().and_then(|g| g.directory.as_ref()) {
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
    }
    if let Some(backlog) = &counters.backlog {
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
    }
    Ok(())
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
    for (name, kind, help, value) in counters {
        sink.single(name, kind, help, value)?;
    }
    Ok(())
}

fn render_settlers(sink: &mut Sink, settlers: &SettlerStats) -> fmt::Result {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let counters: [(&str, &str, &str, u64); 9] = [
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
            "settle_malformed_total",
            "counter",
            "Stream entries that were not tap records.",
            load(&settlers.malformed),
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
    for (name, kind, help, value) in counters {
        sink.single(name, kind, help, value)?;
    }
    let lag = &settlers.lag;
    let buckets: Vec<(f64, u64)> = lag
        .cumulative()
        .into_iter()
        .map(|(bound, count)| (bound.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0), count))
        .collect();
    sink.histogram_seconds(
        "settlement_lag",
        "Time from a tap's approval to its ledger update.",
        load(&lag.sum_ms) as f64 / 1000.0,
        load(&lag.count),
        &buckets,
    )
}

/// Writes metrics through prometheus-client's encoder, the same way for every kind.
struct Sink<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Sink<'_> {
    /// One sample without labels; `kind` is `counter` (the name ends in `_total`, which the
    /// encoder adds back) or `gauge`.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) -> fmt::Result {
        self.labeled(name, kind, help, "", &[("", value)])
    }

    /// Samples by the value of one label (`label` empty: a single unlabeled sample).
    fn labeled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: &[(&str, u64)],
    ) -> fmt::Result {
        let (name, metric_type) = match kind {
            "counter" => (
                name.strip_suffix("_total").unwrap_or(name),
                MetricType::Counter,
            ),
            _ => (name, MetricType::Gauge),
        };
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, metric_type)?;
        let write = |sample: &mut MetricEncoder, value: u64| match metric_type {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None),
            _ => sample.encode_gauge(&(value as i64)),
        };
        for (value_label, value) in samples {
            if label.is_empty() {
                write(&mut metric, *value)?;
            } else {
                write(&mut metric.encode_family(&[(label, *value_label)])?, *value)?;
            }
        }
        Ok(())
    }

    /// Counters by the values of two labels.
    fn counters_by_two<'v>(
        &mut self,
        name: &str,
        help: &str,
        labels: (&str, &str),
        samples: impl Iterator<Item = (&'v str, &'v str, u64)>,
    ) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (first, second, value) in samples {
            metric
                .encode_family(&[(labels.0, first), (labels.1, second)])?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        Ok(())
    }

    /// A histogram in seconds: cumulative counts by upper bound (the last `+Inf`).
    fn histogram_seconds(
        &mut self,
        name: &str,
        help: &str,
        sum: f64,
        count: u64,
        cumulative: &[(f64, u64)],
    ) -> fmt::Result {
        // The encoder takes counts per bucket and adds them up itself.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = cumulative
            .iter()
            .map(|(bound, total)| {
                let here = total - below;
                below = *total;
                (*bound, here)
            })
            .collect();
        self.encoder
            .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// The collector prometheus-client asks at every scrape.
struct Collected(Counters);

impl std::fmt::Debug for Collected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collected")
    }
}

impl Collector for Collected {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let counters = &self.0;
        let mut sink = Sink { encoder };
        render_health(&mut sink, counters)?;
        if let Some(gateway) = &counters.gateway {
            render_gateway(&mut sink, gateway)?;
        }
        if let Some(forwarder) = &counters.forwarder {
            render_forwarder(&mut sink, forwarder)?;
        }
        if let Some(settlers) = &counters.settlers {
            render_settlers(&mut sink, settlers)?;
        }
        Ok(())
    }
}

/// The process's own figures under their conventional names (`process_…`), from /proc.
#[derive(Debug)]
struct ProcessMetrics;

impl ProcessMetrics {
    /// CPU seconds, resident bytes, virtual bytes, start time (Unix seconds), open files.
    fn read() -> Option<(f64, u64, u64, f64, u64)> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        // SAFETY: sysconf only reads configuration values.
        #[allow(
            unsafe_code,
            reason = "libc::sysconf has no safe wrapper in the dependencies"
        )]
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
            )
        };
        let cpu = (field(14)? + field(15)?) as f64 / ticks;
        let virtual_bytes = field(23)?;
        let resident = field(24)? * page;
        let boot: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let start = boot + field(22)? as f64 / ticks;
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some((cpu, resident, virtual_bytes, start, open))
    }
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some((cpu, resident, virtual_bytes, start, open)) = Self::read() else {
            return Ok(());
        };
        encoder
            .encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&cpu, None)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size.",
                resident as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size.",
                virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time since the Unix epoch.",
                start,
            ),
            ("process_open_fds", "Open file descriptors.", open as f64),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

/// Every counter this process has, in the Prometheus text format.
pub fn render(counters: &Counters) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessMetrics));
    registry
        .sub_registry_with_prefix("tapgate")
        .register_collector(Box::new(Collected(counters.clone())));
    let mut out = String::with_capacity(8192);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    out
}

fn render_gateway(sink: &mut Sink, counters: &GatewayCounters) -> fmt::Result {
    let m = counters.metrics.snapshot();
    let cache = &counters.cache;
    let s = &cache.stats;
    let journal = &counters.journal;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let single: [(&str, &str, &str, u64); 22] = [
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
    for (name, kind, help, value) in single {
        sink.single(name, kind, help, value)?;
    }
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
    )?;
    let (sum, count, buckets) = counters.metrics.answer_latency.snapshot();
    sink.histogram_seconds(
        "answer_latency",
        "From a Tap frame read to its answer written, in the gateway.",
        sum,
        count,
        &buckets,
    )?;
    let (sum, count, buckets) = counters.journal.sync_latency.snapshot();
    sink.histogram_seconds(
        "journal_sync",
        "Writing and syncing one journal batch.",
        sum,
        count,
        &buckets,
    )
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is aborted.
///
/// axum on hyper: a connection must send its request head within [`HEADER_READ`] and be done
/// within [`CONNECTION_DEADLINE`], and at most [`MAX_OPS_CONNECTIONS`] are open at once, so
/// clients that connect and stall cannot keep a probe from being answered.
pub async fn serve(listener: TcpListener, counters: Counters) {
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(counters)
        // Past the request head: a request is answered within a deadline or refused, and only
        // so many are worked on at once.
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async { StatusCode::SERVICE_UNAVAILABLE },
                ))
                .timeout(REQUEST_DEADLINE)
                .concurrency_limit(MAX_REQUESTS_AT_ONCE),
        );
    let limit = Arc::new(Semaphore::new(MAX_OPS_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Over the limit: drop the connection rather than queue it.
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
        });
    }
}

/// The operators' page: one self-contained file built into the binary (no CDN), reading
/// `/metrics` and `/readyz` every second, of this node and of any named in `?nodes=`.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> impl IntoResponse {
    let names: serde_json::Map<String, serde_json::Value> = tapgate_protocol::AREAS
        .iter()
        .map(|a| {
            (
                a.code.to_string(),
                serde_json::Value::String(format!("{} {}", a.name_zh, a.name_en)),
            )
        })
        .collect();
    let page = DASHBOARD.replace(
        "/*AREA_NAMES*/{}",
        &serde_json::Value::Object(names).to_string(),
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page)
}

/// Other nodes' pages read this endpoint too (the fleet view): reads are allowed from anywhere.
const ANY_ORIGIN: (header::HeaderName, &str) = (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");

async fn metrics(State(counters): State<Counters>) -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            ANY_ORIGIN,
        ],
        render(&counters),
    )
}

async fn readyz(State(counters): State<Counters>) -> impl IntoResponse {
    let readiness = counters.readiness(Instant::now());
    let status = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json"), ANY_ORIGIN],
        format!("{}\n", readiness.to_json()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlement_counters_and_the_lag_histogram_render_as_prometheus_text() {
        let forwarder = ForwarderStats::default();
        forwarder.shipped.store(7, Ordering::Relaxed);
        let settlers = SettlerStats::default();
        settlers.settled.store(5, Ordering::Relaxed);
        for lag in [1, 4, 40, 20_000] {
            settlers.lag.record(lag);
        }
        let text = render(&Counters {
            forwarder: Some(Arc::new(forwarder)),
            settlers: Some(Arc::new(settlers)),
            ..Counters::default()
        });
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
        let text = render(&Counters::of_settlers(settlers, Arc::default()));
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
