//! The operators' window of every tapgate process: counters in the Prometheus text format,
//! liveness and readiness over HTTP (`GET /metrics`, `/healthz`, `/readyz`) and the dashboard
//! page, apart from the gates' QUIC port. Each role (gateway, settlement) exposes its own
//! counters through [`Exposed`]; this module knows none of them. Bounded like everything else:
//! a connection limit, a deadline for the request head and one for the whole connection.

use crate::health::{PartHealth, Readiness};
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

/// What one role running in this process shows operators. The endpoint holds only these
/// counters, so it keeps none of the role's tasks alive.
pub trait Exposed: Send + Sync + 'static {
    /// The parts whose health decides readiness, named as `/readyz` reports them.
    fn parts(&self) -> Vec<(String, &PartHealth)>;
    /// Background tasks of this role that panicked.
    fn panics(&self) -> u64;
    /// This role's metrics.
    fn render(&self, sink: &mut Sink) -> fmt::Result;
}

/// Everything this process shows: the roles running in it, in the order `/readyz` lists them.
#[derive(Clone, Default)]
pub struct Exposition {
    roles: Vec<Arc<dyn Exposed>>,
}

impl Exposition {
    /// Adds a role's counters.
    pub fn with(mut self, role: impl Exposed) -> Self {
        self.roles.push(Arc::new(role));
        self
    }

    /// Which parts of this process keep it from serving.
    pub fn readiness(&self, now: Instant) -> Readiness {
        Readiness::of(self.roles.iter().flat_map(|r| r.parts()), now)
    }

    fn panics(&self) -> u64 {
        self.roles.iter().map(|r| r.panics()).sum()
    }
}

/// Readiness and panics, the same for every kind of process.
fn render_health(sink: &mut Sink, exposition: &Exposition) -> fmt::Result {
    sink.labeled(
        "build_info",
        "gauge",
        "Always 1; the label says which tapgate this is.",
        "version",
        &[(env!("CARGO_PKG_VERSION"), 1)],
    )?;
    let ready = exposition.readiness(Instant::now()).ready();
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
        exposition.panics(),
    )
}

/// Writes metrics through prometheus-client's encoder, the same way for every kind.
pub struct Sink<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Sink<'_> {
    /// One sample without labels; `kind` is `counter` (the name ends in `_total`, which the
    /// encoder adds back) or `gauge`.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) -> fmt::Result {
        self.labeled(name, kind, help, "", &[("", value)])
    }

    /// One unlabeled sample per row of (name, kind, help, value).
    pub fn rows(&mut self, rows: &[(&str, &str, &str, u64)]) -> fmt::Result {
        rows.iter()
            .try_for_each(|(name, kind, help, value)| self.single(name, kind, help, *value))
    }

    /// Samples by the value of one label (`label` empty: a single unlabeled sample).
    pub fn labeled(
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
    pub fn counters_by_two<'v>(
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
    pub fn histogram_seconds(
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
struct Collected(Exposition);

impl std::fmt::Debug for Collected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collected")
    }
}

impl Collector for Collected {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut sink = Sink { encoder };
        render_health(&mut sink, &self.0)?;
        for role in &self.0.roles {
            role.render(&mut sink)?;
        }
        Ok(())
    }
}

/// What a process has used so far, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    /// User and system CPU time of all its threads.
    pub cpu: std::time::Duration,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Start time, in clock ticks after boot.
    start_ticks: u64,
}

/// `/proc/PID/stat` of process `pid` (`None` reads this process); `None` when it cannot be read.
pub fn process_usage(pid: Option<u32>) -> Option<ProcessUsage> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let (ticks, page) = clock_ticks_and_page_size();
    let cpu_ticks = field(14)? + field(15)?;
    Some(ProcessUsage {
        cpu: std::time::Duration::from_secs_f64(cpu_ticks as f64 / ticks as f64),
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        start_ticks: field(22)?,
    })
}

fn clock_ticks_and_page_size() -> (u64, u64) {
    // SAFETY: sysconf only reads configuration values.
    #[allow(
        unsafe_code,
        reason = "libc::sysconf has no safe wrapper in the dependencies"
    )]
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (ticks.max(1) as u64, page.max(1) as u64)
}

/// The process's own figures under their conventional names (`process_…`), from /proc.
#[derive(Debug)]
struct ProcessMetrics;

impl ProcessMetrics {
    /// CPU seconds, resident bytes, virtual bytes, start time (Unix seconds), open files.
    fn read() -> Option<(f64, u64, u64, f64, u64)> {
        let usage = process_usage(None)?;
        let (ticks, _) = clock_ticks_and_page_size();
        let boot: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let start = boot + usage.start_ticks as f64 / ticks as f64;
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some((
            usage.cpu.as_secs_f64(),
            usage.resident_bytes,
            usage.virtual_bytes,
            start,
            open,
        ))
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
pub fn render(exposition: &Exposition) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessMetrics));
    registry
        .sub_registry_with_prefix("tapgate")
        .register_collector(Box::new(Collected(exposition.clone())));
    let mut out = String::with_capacity(8192);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    out
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is aborted.
///
/// axum on hyper: a connection must send its request head within `HEADER_READ` and be done
/// within `CONNECTION_DEADLINE`, and at most `MAX_OPS_CONNECTIONS` are open at once, so
/// clients that connect and stall cannot keep a probe from being answered.
pub async fn serve(listener: TcpListener, exposition: Exposition) {
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(exposition)
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

async fn metrics(State(exposition): State<Exposition>) -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            ANY_ORIGIN,
        ],
        render(&exposition),
    )
}

async fn readyz(State(exposition): State<Exposition>) -> impl IntoResponse {
    let readiness = exposition.readiness(Instant::now());
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

    struct Role(PartHealth, u64);

    impl Exposed for Role {
        fn parts(&self) -> Vec<(String, &PartHealth)> {
            vec![("part".into(), &self.0)]
        }
        fn panics(&self) -> u64 {
            self.1
        }
        fn render(&self, sink: &mut Sink) -> fmt::Result {
            sink.single("role_things_total", "counter", "Things.", 9)
        }
    }

    #[test]
    fn every_role_is_rendered_and_its_panics_and_health_count() {
        let exposition = Exposition::default().with(Role(PartHealth::default(), 2));
        let text = render(&exposition);
        for line in [
            "tapgate_role_things_total 9",
            "tapgate_task_panics_total 2",
            "tapgate_ready 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
    }
}
