//! The gateway's configuration file (TOML). `tapgate.example.toml` at the repository root lists
//! every setting with its default; command-line flags and environment variables override it.

use crate::directory::{Directory, RedisSettings};
use crate::policy::{Policy, PolicyError};
use crate::server::{GatewaySettings, Limits};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tapgate_city::population::PopulationSpec;
use tapgate_journal::JournalSettings;
use tapgate_protocol::{KeyRing, MasterKey};
use tapgate_settle::SettlementSettings;
use tapgate_settle::fares::FareTables;
use tapgate_transport::tls::TlsSource;

/// The most decided taps a partition's watch feed may keep: a bound on Redis memory.
const MAX_WATCH_FEED: usize = 1_000_000;
/// How long settlers let a new tap wait for older taps of its card from other gateways by
/// default: forwarders ship within milliseconds while they keep up, and a second covers one that
/// paused for a Redis round trip gone slow.
pub const DEFAULT_ORDER_WINDOW_MS: u64 = 1_000;
pub const MAX_ORDER_WINDOW_MS: u64 = 60_000;

/// Master key version 1 of development setups (embedded directory, demo, tests of the CLI).
/// A Redis-backed gateway refuses to start without keys of its own.
pub const DEV_MASTER_KEY_HEX: &str = "7a6b5c4d3e2f10011001f2e3d4c5b6a7";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    /// Master keys by version: `"1" = "32 hex digits"`.
    pub keys: BTreeMap<String, String>,
    pub directory: DirectoryConfig,
    pub journal: JournalConfig,
    pub policy: PolicyConfig,
    pub settlement: SettlementConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlementConfig {
    /// Ship approved taps and settle them. With a Redis directory they go to the same Redis;
    /// with the embedded one they are settled in process.
    pub enabled: bool,
    /// This gateway's name; its forwarder checkpoint is kept under it, so every gateway
    /// sharing a Redis needs its own.
    pub node: String,
    /// Partition streams; fixed at first use of a Redis.
    pub partitions: u16,
    /// Settlers inside the gateway; 0 leaves settling to `tapgate settle run`.
    pub settlers: usize,
    /// Taps per forwarder and settler batch.
    pub batch: usize,
    /// Taps shipped and not yet settled above which the forwarder waits.
    pub max_backlog: u64,
    /// How soon a dead settler's partitions move to another one.
    pub lease_ttl_ms: u64,
    /// Decided taps (approvals and denials) kept per partition for `tapgate watch run`; 0
    /// feeds no watcher.
    pub watch_feed: usize,
    /// How long a settler lets a new tap wait, so that an older tap of its card still on its
    /// way (from another gateway's forwarder, or queued behind it for this journal) is priced
    /// first; 0 prices taps as they arrive.
    pub order_window_ms: u64,
    /// Fare tables; the built-in `fares.example.toml` when absent.
    pub fares: Option<PathBuf>,
}

impl Default for SettlementConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            node: "gateway-1".into(),
            partitions: 8,
            settlers: 1,
            batch: 512,
            max_backlog: 1_000_000,
            lease_ttl_ms: 10_000,
            watch_feed: tapgate_settle::forwarder::WATCH_FEED,
            order_window_ms: DEFAULT_ORDER_WINDOW_MS,
            fares: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub dev_cert_dir: PathBuf,
    pub max_connections: usize,
    pub max_in_flight: u16,
    pub resend_window: u16,
    pub hello_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub keep_alive_ms: u64,
    pub udp_buffer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryKind {
    Redis,
    /// In-process, filled with the synthetic population; for development and the demo.
    Embedded,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectoryConfig {
    pub kind: DirectoryKind,
    pub redis_url: String,
    /// CA certificates (PEM) a TLS Redis's certificate must chain to; the system's when absent.
    pub redis_tls_ca_file: Option<PathBuf>,
    pub key_prefix: String,
    pub response_timeout_ms: u64,
    /// Replicas that must hold a card or gate change this process writes (0: do not wait).
    pub wait_replicas: u16,
    pub negative_ttl_ms: u64,
    pub cache_capacity: usize,
    /// Size of the synthetic population of the embedded directory.
    pub embedded_cards: u64,
    pub embedded_terminals: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub min_sync_interval_us: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A policy file; the built-in policy when absent. Reloaded on SIGHUP.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. `info` or `tapgate_gateway=debug`.
    pub filter: String,
    /// Key of the card pseudonyms in logs (32 hex digits); random per start when absent.
    pub card_salt: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            listen: "127.0.0.1:4433".parse().expect("valid address"),
            cert: None,
            key: None,
            dev_cert_dir: PathBuf::from("tapgate-state/dev-cert"),
            max_connections: limits.max_connections,
            max_in_flight: limits.max_in_flight,
            resend_window: limits.resend_window,
            hello_timeout_ms: limits.hello_timeout.as_millis() as u64,
            idle_timeout_ms: limits.idle_timeout.as_millis() as u64,
            keep_alive_ms: limits.keep_alive.as_millis() as u64,
            udp_buffer_bytes: limits.udp_buffer_bytes,
        }
    }
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            kind: DirectoryKind::Redis,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_tls_ca_file: None,
            key_prefix: "tapgate".into(),
            response_timeout_ms: 100,
            wait_replicas: 0,
            negative_ttl_ms: 30_000,
            cache_capacity: 5_000_000,
            embedded_cards: PopulationSpec::default().cards,
            embedded_terminals: PopulationSpec::default().terminals,
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("tapgate-state/journal"),
            segment_bytes: 64 << 20,
            queue_capacity: 65_536,
            max_batch: 1024,
            min_sync_interval_us: 1000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            card_salt: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("key version `{0}`: versions are numbers from 0 to 255 and keys 32 hex digits")]
    BadKey(String),
    #[error("no master keys configured; a Redis-backed gateway needs [keys] or --master-key")]
    NoKeys,
    #[error("policy {path}: {source}")]
    Policy {
        path: PathBuf,
        #[source]
        source: PolicyError,
    },
    #[error("log.card_salt must be 32 hex digits")]
    BadSalt,
    #[error(transparent)]
    Directory(#[from] crate::directory::DirectoryError),
    #[error(transparent)]
    Fares(#[from] tapgate_settle::fares::FareTablesError),
    #[error(transparent)]
    Store(#[from] tapgate_settle::store::StoreError),
    #[error("settlement.partitions must be between 1 and 1024")]
    Partitions,
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Everything wrong with this configuration and the files it names (policy, fare tables,
    /// certificate), each as `key: why`; empty when a gateway can start with it. Checked
    /// before anything starts, so nonsense is refused up front rather than found under load.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut at_least = |key: &str, value: u64, least: u64| {
            if value < least {
                out.push(format!("{key}: {value} is less than {least}"));
            }
        };
        let server = &self.server;
        at_least("server.max_in_flight", server.max_in_flight.into(), 1);
        at_least("server.resend_window", server.resend_window.into(), 1);
        at_least("server.max_connections", server.max_connections as u64, 1);
        at_least("server.hello_timeout_ms", server.hello_timeout_ms, 1);
        at_least("server.idle_timeout_ms", server.idle_timeout_ms, 1000);
        at_least(
            "directory.response_timeout_ms",
            self.directory.response_timeout_ms,
            1,
        );
        at_least(
            "directory.cache_capacity",
            self.directory.cache_capacity as u64,
            1,
        );
        at_least(
            "journal.queue_capacity",
            self.journal.queue_capacity as u64,
            1,
        );
        at_least("journal.max_batch", self.journal.max_batch as u64, 1);
        at_least("journal.segment_bytes", self.journal.segment_bytes, 1 << 16);
        at_least(
            "settlement.partitions",
            self.settlement.partitions.into(),
            1,
        );
        at_least("settlement.batch", self.settlement.batch as u64, 1);
        at_least("settlement.max_backlog", self.settlement.max_backlog, 1);
        at_least("settlement.lease_ttl_ms", self.settlement.lease_ttl_ms, 300);
        if self.settlement.watch_feed > MAX_WATCH_FEED {
            out.push(format!(
                "settlement.watch_feed: more than {MAX_WATCH_FEED} taps per partition"
            ));
        }
        if self.settlement.order_window_ms > MAX_ORDER_WINDOW_MS {
            out.push(format!(
                "settlement.order_window_ms: more than {MAX_ORDER_WINDOW_MS} (every tap would wait that long before it is settled)"
            ));
        }
        if self.settlement.partitions > 1024 {
            out.push("settlement.partitions: more than 1024".into());
        }
        if server.keep_alive_ms >= server.idle_timeout_ms {
            out.push(format!(
                "server.keep_alive_ms: {} is not below idle_timeout_ms {}",
                server.keep_alive_ms, server.idle_timeout_ms
            ));
        }
        let node = &self.settlement.node;
        if node.is_empty() || node.chars().any(|c| c.is_whitespace() || c.is_control()) {
            out.push(format!(
                "settlement.node: `{node}` is not a name (no spaces, not empty)"
            ));
        }
        for (key, file) in [("server.cert", &server.cert), ("server.key", &server.key)] {
            if let Some(path) = file
                && !path.is_file()
            {
                out.push(format!("{key}: {}: no such file", path.display()));
            }
        }
        if self.directory.kind == DirectoryKind::Redis
            && let Err(e) = tapgate_runtime::redis_target::RedisTarget::parse(
                &self.directory.redis_url,
                self.directory.redis_tls_ca_file.as_deref(),
            )
        {
            out.push(format!("directory.redis_url: {e}"));
        }
        if let Err(e) = self.key_ring() {
            out.push(format!("keys: {e}"));
        }
        if let Err(e) = self.policy() {
            out.push(format!("policy.file: {e}"));
        }
        if let Err(e) = self.fare_tables() {
            out.push(format!("settlement.fares: {e}"));
        }
        out
    }

    pub fn key_ring(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = KeyRing::new();
        for (version, hex) in &self.keys {
            let v: u8 = version
                .parse()
                .map_err(|_| ConfigError::BadKey(version.clone()))?;
            let key = MasterKey::from_hex(hex).map_err(|_| ConfigError::BadKey(version.clone()))?;
            ring.insert(v, key);
        }
        if ring.versions().next().is_none() {
            if self.directory.kind == DirectoryKind::Redis {
                return Err(ConfigError::NoKeys);
            }
            ring.insert(
                1,
                MasterKey::from_hex(DEV_MASTER_KEY_HEX).expect("valid dev key"),
            );
        }
        Ok(ring)
    }

    pub fn policy(&self) -> Result<Policy, ConfigError> {
        match &self.policy.file {
            None => Ok(Policy::embedded_default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Policy::from_toml(&text).map_err(|source| ConfigError::Policy {
                    path: path.clone(),
                    source,
                })
            }
        }
    }

    pub fn population(&self) -> PopulationSpec {
        PopulationSpec {
            cards: self.directory.embedded_cards,
            terminals: self.directory.embedded_terminals,
            ..PopulationSpec::default()
        }
    }

    pub fn redis_settings(&self) -> RedisSettings {
        RedisSettings {
            url: self.directory.redis_url.clone(),
            tls_ca_file: self.directory.redis_tls_ca_file.clone(),
            key_prefix: self.directory.key_prefix.clone(),
            response_timeout: Duration::from_millis(self.directory.response_timeout_ms),
            wait_replicas: self.directory.wait_replicas,
        }
    }

    pub fn fare_tables(&self) -> Result<FareTables, ConfigError> {
        Ok(FareTables::load(self.settlement.fares.as_deref())?)
    }

    pub fn settlement_settings(&self) -> SettlementSettings {
        let s = &self.settlement;
        SettlementSettings {
            node: s.node.clone(),
            journal_dir: self.journal.dir.clone(),
            partitions: s.partitions,
            settlers: s.settlers,
            batch: s.batch.max(1),
            max_backlog: s.max_backlog.max(1),
            lease_ttl: Duration::from_millis(s.lease_ttl_ms.max(100)),
            watch_feed: s.watch_feed,
            order_window: Duration::from_millis(s.order_window_ms),
        }
    }

    pub fn gateway_settings(&self, directory: Directory) -> Result<GatewaySettings, ConfigError> {
        let s = &self.server;
        let tls = match (&s.cert, &s.key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => TlsSource::Dev {
                dir: s.dev_cert_dir.clone(),
            },
        };
        let log_salt = match &self.log.card_salt {
            Some(hex) => {
                tapgate_protocol::crypto::parse_key_hex(hex).map_err(|_| ConfigError::BadSalt)?
            }
            None => rand::random(),
        };
        Ok(GatewaySettings {
            listen: s.listen,
            tls,
            keys: self.key_ring()?,
            limits: Limits {
                max_connections: s.max_connections,
                max_in_flight: s.max_in_flight,
                resend_window: s.resend_window,
                hello_timeout: Duration::from_millis(s.hello_timeout_ms),
                idle_timeout: Duration::from_millis(s.idle_timeout_ms),
                keep_alive: Duration::from_millis(s.keep_alive_ms),
                udp_buffer_bytes: s.udp_buffer_bytes,
                ..Limits::default()
            },
            policy: self.policy()?,
            journal: JournalSettings {
                dir: self.journal.dir.clone(),
                segment_bytes: self.journal.segment_bytes,
                queue_capacity: self.journal.queue_capacity,
                max_batch: self.journal.max_batch,
                min_sync_interval: Duration::from_micros(self.journal.min_sync_interval_us),
            },
            directory,
            negative_ttl_ms: self.directory.negative_ttl_ms,
            cache_capacity: self.directory.cache_capacity,
            log_salt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_and_names_every_section() {
        let text = include_str!("../../tapgate.example.toml");
        let config: Config = toml::from_str(text).unwrap();
        assert_eq!(config.directory.kind, DirectoryKind::Redis);
        assert!(config.key_ring().unwrap().master(1).is_some());
    }

    #[test]
    fn redis_without_keys_refuses_and_embedded_falls_back_to_the_dev_key() {
        let mut config = Config::default();
        assert!(matches!(config.key_ring(), Err(ConfigError::NoKeys)));
        config.directory.kind = DirectoryKind::Embedded;
        assert!(config.key_ring().unwrap().master(1).is_some());
    }

    #[test]
    fn unknown_settings_are_errors() {
        assert!(toml::from_str::<Config>("[server]\nlisten_port = 1").is_err());
    }
}
