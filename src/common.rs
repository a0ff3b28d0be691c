//! What several commands share: logging, the ops endpoint, durations on the command line, and
//! where the gateways' Redis is. Commands import this, never each other.

use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tapgate_gateway::directory::{Directory, RedisDirectory, RedisSettings};

pub(crate) fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// An `--ops-listen` value: HOST:PORT, or `off`.
pub(crate) fn parse_ops_listen(value: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value {
        "off" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("--ops-listen `{addr}`: expected HOST:PORT or off")),
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until the returned task is aborted.
pub(crate) async fn start_ops(
    addr: Option<SocketAddr>,
    counters: tapgate_runtime::ops::Exposition,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("ops endpoint {addr}: {e}"))?;
    tracing::info!(%addr, "ops endpoint: GET /metrics, /healthz");
    Ok(Some(tokio::spawn(tapgate_runtime::ops::serve(
        listener, counters,
    ))))
}

/// A protocol version on the command line: 1 or 2.
pub(crate) fn parse_version(s: &str) -> Result<tapgate_protocol::Version, String> {
    match s {
        "1" => Ok(tapgate_protocol::Version::V1),
        "2" => Ok(tapgate_protocol::Version::V2),
        other => Err(format!("{other:?}: expected 1 or 2")),
    }
}

/// A duration given as `30`, `30s`, `500ms` or `2m`.
pub(crate) fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("`{text}` is not a duration"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(anyhow::anyhow!("`{text}`: use ms, s or m")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(anyhow::anyhow!("`{text}` must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The gateways' Redis: the card directory, and settlement beside it.
#[derive(Args, Clone)]
pub(crate) struct RedisTarget {
    /// Redis of the gateways' directory (settlement keeps its streams and ledgers there too):
    /// `redis://[USER:PASSWORD@]HOST:PORT/`, `rediss://…` for TLS, or
    /// `redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT/` for a Redis Cluster.
    #[arg(
        long,
        env = "TAPGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    /// CA certificates (PEM) a TLS Redis's certificate must chain to (the system's roots when
    /// absent), as the gateways' `[directory] redis_tls_ca_file`.
    #[arg(long, env = "TAPGATE_REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<PathBuf>,
    /// Key prefix, as the gateways' `[directory] key_prefix`.
    #[arg(long, default_value = "tapgate")]
    pub key_prefix: String,
}

impl RedisTarget {
    /// The card directory in this Redis; a card change waits for `wait_replicas` replicas.
    pub(crate) fn directory(&self, wait_replicas: u16) -> anyhow::Result<Directory> {
        Ok(Directory::Redis(RedisDirectory::connect(&RedisSettings {
            url: self.redis_url.clone(),
            tls_ca_file: self.redis_tls_ca_file.clone(),
            key_prefix: self.key_prefix.clone(),
            response_timeout: Duration::from_secs(5),
            wait_replicas,
        })?))
    }
}
