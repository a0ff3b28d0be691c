//! `tapgate serve`.

use crate::common::{init_logging, parse_ops_listen, start_ops};
use anyhow::Context as _;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use tapgate_gateway::config::{Config, DirectoryKind};
use tapgate_gateway::node::Node;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Configuration file (TOML); see tapgate.example.toml. Defaults apply without one.
    #[arg(long, short, env = "TAPGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (UDP).
    #[arg(long, env = "TAPGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Redis URL of the card directory.
    #[arg(long, env = "TAPGATE_REDIS_URL")]
    redis_url: Option<String>,
    /// Use the in-process directory with the synthetic population instead of Redis.
    #[arg(long)]
    embedded: bool,
    /// Gates in the embedded population.
    #[arg(long)]
    embedded_terminals: Option<u64>,
    /// Cards in the embedded population.
    #[arg(long)]
    embedded_cards: Option<u64>,
    /// Journal directory.
    #[arg(long, env = "TAPGATE_JOURNAL_DIR")]
    journal_dir: Option<PathBuf>,
    /// Where the development certificate is kept.
    #[arg(long, env = "TAPGATE_DEV_CERT_DIR")]
    dev_cert_dir: Option<PathBuf>,
    /// Policy file; reloaded on SIGHUP.
    #[arg(long, env = "TAPGATE_POLICY")]
    policy: Option<PathBuf>,
    /// Master key as VERSION=HEX; repeatable. Adds to or replaces the file's `[keys]`.
    #[arg(
        long = "master-key",
        env = "TAPGATE_MASTER_KEYS",
        value_delimiter = ','
    )]
    master_keys: Vec<String>,
    /// Address of the operators' HTTP endpoint (GET /metrics, /healthz); "off" disables it.
    #[arg(long, env = "TAPGATE_OPS_LISTEN", default_value = "127.0.0.1:9433")]
    ops_listen: String,
    /// tracing filter (overrides `[log] filter`), e.g. debug or tapgate_gateway=debug.
    #[arg(long, env = "TAPGATE_LOG")]
    log: Option<String>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(url) = &self.redis_url {
            config.directory.redis_url = url.clone();
        }
        if self.embedded {
            config.directory.kind = DirectoryKind::Embedded;
        }
        if let Some(n) = self.embedded_terminals {
            config.directory.embedded_terminals = n;
        }
        if let Some(n) = self.embedded_cards {
            config.directory.embedded_cards = n;
        }
        if let Some(dir) = &self.journal_dir {
            config.journal.dir = dir.clone();
        }
        if let Some(dir) = &self.dev_cert_dir {
            config.server.dev_cert_dir = dir.clone();
        }
        if let Some(policy) = &self.policy {
            config.policy.file = Some(policy.clone());
        }
        for entry in &self.master_keys {
            let (version, hex) = entry
                .split_once('=')
                .with_context(|| format!("--master-key `{entry}`: expected VERSION=HEX"))?;
            config
                .keys
                .insert(version.trim().to_owned(), hex.trim().to_owned());
        }
        if let Some(filter) = &self.log {
            config.log.filter = filter.clone();
        }
        Ok(config)
    }
}

impl ServeArgs {
    /// The configuration with its flags applied, refused with every problem it has.
    fn checked_config(&self) -> anyhow::Result<Config> {
        let config = self.config()?;
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        let source = self
            .config
            .as_ref()
            .map_or("the built-in defaults".to_owned(), |p| {
                p.display().to_string()
            });
        Err(anyhow::anyhow!(
            "configuration ({source} with its flags) cannot be used:\n  {}",
            problems.join("\n  ")
        ))
    }
}

/// `tapgate check-config`: checks what `serve` would use and starts nothing.
pub(crate) fn check(args: ServeArgs) -> anyhow::Result<()> {
    args.checked_config()?;
    let source = args
        .config
        .as_ref()
        .map_or("the built-in defaults".to_owned(), |p| {
            p.display().to_string()
        });
    println!("{source}: ok (with its policy, fare tables and flags)");
    Ok(())
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.checked_config()?;
    let ops_listen = parse_ops_listen(&args.ops_listen)?;
    init_logging(&config.log.filter);
    crate::runtime()?.block_on(serve(config, ops_listen))
}

/// How often the gateway logs its throughput.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve(config: Config, ops_listen: Option<SocketAddr>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let node = Node::start(&config).await?;
    let ops = start_ops(ops_listen, node.exposition()).await?;
    let reporter = tokio::spawn(report_throughput(node.gateway.metrics().clone()));
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => match config.policy() {
                Ok(policy) => {
                    node.gateway.set_policy(policy);
                    tracing::info!("policy reloaded");
                }
                Err(e) => tracing::error!(error = %e, "policy reload failed; keeping the current policy"),
            },
        }
    }
    reporter.abort();
    if let Some(ops) = ops {
        ops.abort();
    }
    Ok(node.stop().await?)
}

/// Logs answers per second every REPORT_EVERY, so an operator tailing the log sees throughput.
async fn report_throughput(metrics: std::sync::Arc<tapgate_gateway::metrics::Metrics>) {
    let mut last = metrics.snapshot();
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = metrics.snapshot();
        let per_s = |a: u64, b: u64| (a - b) as f64 / REPORT_EVERY.as_secs_f64();
        tracing::info!(
            connections = now.connections_active,
            approved_per_s = per_s(now.approved, last.approved),
            denied_per_s = per_s(now.denied, last.denied),
            busy_per_s = per_s(now.busy, last.busy),
            "throughput"
        );
        last = now;
    }
}
