//! The composition root: a running node — its card directory, the gateway, and settlement beside
//! it — built from configuration data. `tapgate serve` and `tapgate demo` both start through
//! here; the configuration itself only describes, it opens and connects nothing.

use crate::config::{Config, ConfigError, DirectoryKind};
use crate::directory::{Directory, EmbeddedDirectory, RedisDirectory};
use crate::server::{Gateway, GatewaySettings, StartError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tapgate_runtime::ops::Exposition;
use tapgate_settle::fares::FareTables;
use tapgate_settle::ops::SettlementCounters;
use tapgate_settle::store::{CARD_KEY_FILE, MemoryStore, RedisStore, Store, StoreError};
use tapgate_settle::{Settlement, SettlementSettings};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("starting the gateway: {0}")]
    Start(#[from] StartError),
    #[error("settlement store: {0}")]
    Store(#[from] StoreError),
    #[error("writing the ledger {path}: {detail}")]
    Ledger { path: PathBuf, detail: String },
}

/// What a node is made of: plain settings, with its directory and settlement store already
/// opened.
pub struct NodeParts {
    pub gateway: GatewaySettings,
    /// `None` runs the gateway alone (approved taps stay in its journal).
    pub settlement: Option<SettlementParts>,
    /// Where an embedded node writes its ledger when it stops.
    pub ledger_file: PathBuf,
}

pub struct SettlementParts {
    pub store: Store,
    pub settings: SettlementSettings,
    pub tables: Arc<FareTables>,
}

/// A started node.
pub struct Node {
    pub gateway: Gateway,
    /// `None` when the configuration turns settlement off.
    pub settlement: Option<Settlement>,
    ledger_file: PathBuf,
}

/// How long an exiting embedded node waits for its settlers.
const SETTLE_AT_EXIT: Duration = Duration::from_secs(60);

impl Node {
    /// Opens what the configuration names and starts the node on it (`serve`, `demo`).
    pub async fn start(config: &Config) -> Result<Node, NodeError> {
        let directory = open_directory(config)?;
        let settlement = if config.settlement.enabled {
            Some(SettlementParts {
                store: open_store(config)?,
                tables: Arc::new(config.fare_tables()?),
                settings: config.settlement_settings(),
            })
        } else {
            tracing::warn!("settlement is disabled: approved taps stay in the journal only");
            None
        };
        Node::assemble(NodeParts {
            gateway: config.gateway_settings(directory)?,
            settlement,
            ledger_file: ledger_file(config),
        })
        .await
    }

    /// Starts a node from its parts: the gateway on its opened directory, then settlement
    /// beside it following the gateway's journal. The one place both are wired together;
    /// `start` and the end-to-end tests come through here.
    pub async fn assemble(parts: NodeParts) -> Result<Node, NodeError> {
        let gateway = Gateway::start(parts.gateway).await?;
        let settlement = parts.settlement.map(|s| {
            tracing::info!(node = %s.settings.node, partitions = s.settings.partitions, settlers = s.settings.settlers, "settlement running");
            Settlement::start(s.store, &s.settings, s.tables, gateway.journal().durable())
        });
        Ok(Node {
            gateway,
            settlement,
            ledger_file: parts.ledger_file,
        })
    }

    /// What the ops endpoint reports of this node.
    pub fn exposition(&self) -> Exposition {
        let exposition = crate::ops::exposition(&self.gateway);
        match &self.settlement {
            Some(settlement) => exposition.with(SettlementCounters::of(settlement)),
            None => exposition,
        }
    }

    /// Where an embedded node writes its ledger when it stops.
    pub fn ledger_file(&self) -> &std::path::Path {
        &self.ledger_file
    }

    /// Stops the gateway (answering what is in flight), then ships the rest of the journal and
    /// stops the settlers. An in-process store lives only as long as the process, so an
    /// embedded node first waits for its settlers and saves its ledger.
    pub async fn stop(self) -> Result<(), NodeError> {
        self.gateway.shutdown().await;
        let Some(settlement) = self.settlement else {
            return Ok(());
        };
        if let Store::Memory(_) = settlement.store {
            if !settlement.wait_settled(SETTLE_AT_EXIT).await? {
                tracing::warn!(
                    "settlement did not catch up before exit; the ledger file is partial"
                );
            }
            settlement
                .write_ledger(&self.ledger_file)
                .await
                .map_err(|detail| NodeError::Ledger {
                    path: self.ledger_file.clone(),
                    detail,
                })?;
            tracing::info!(path = %self.ledger_file.display(), "ledger written");
        }
        settlement.shutdown().await;
        Ok(())
    }
}

/// The card directory the configuration names; the embedded one comes filled with the
/// synthetic population.
pub fn open_directory(config: &Config) -> Result<Directory, ConfigError> {
    Ok(match config.directory.kind {
        DirectoryKind::Redis => {
            Directory::Redis(RedisDirectory::connect(&config.redis_settings())?)
        }
        DirectoryKind::Embedded => {
            let embedded = Arc::new(EmbeddedDirectory::default());
            let spec = config.population();
            spec.cards().for_each(|c| embedded.put_card(c));
            spec.terminals().for_each(|t| embedded.put_terminal(t));
            Directory::Embedded(embedded)
        }
    })
}

/// Where settlement keeps its state: the directory's Redis, or in process for the embedded
/// directory.
fn open_store(config: &Config) -> Result<Store, ConfigError> {
    if !(1..=1024).contains(&config.settlement.partitions) {
        return Err(ConfigError::Partitions);
    }
    let d = &config.directory;
    Ok(match d.kind {
        DirectoryKind::Redis => Store::Redis(RedisStore::connect(
            &d.redis_url,
            d.redis_tls_ca_file.as_deref(),
            &d.key_prefix,
            Duration::from_millis(d.response_timeout_ms.max(1000)),
        )?),
        DirectoryKind::Embedded => Store::Memory(Arc::new(MemoryStore::with_card_key_file(
            &card_key_file(config),
        )?)),
    })
}

/// Where an embedded node keeps the key of the card pseudonyms in its ledger: beside the
/// ledger, where `settle reconcile --ledger` looks for it.
pub fn card_key_file(config: &Config) -> PathBuf {
    ledger_file(config).with_file_name(CARD_KEY_FILE)
}

/// Where an embedded node keeps its ledger: beside its journal directory.
pub fn ledger_file(config: &Config) -> PathBuf {
    let journal = &config.journal.dir;
    journal
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(journal)
        .join("ledger.json")
}
