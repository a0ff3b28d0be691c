//! `tapgate settle`: the settlement pipeline's tools — settlers, a one-shot forwarder for a
//! stopped gateway's journal, reports, and reconciliation against the journals.

use crate::books::{
    ledger_file_pseudonyms, read_ledger_file, reconcile_text, report, report_json, settle_dirs,
};
use crate::common::RedisTarget;
use crate::runtime;
use crate::statement::Statement;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_runtime::health::Panics;
use tapgate_runtime::ops::Exposition;
use tapgate_settle::fares::FareTables;
use tapgate_settle::forwarder::{self, ForwarderSettings, ForwarderStats, Until};
use tapgate_settle::ledger::{Ledger, Reconciliation};
use tapgate_settle::ops::SettlementCounters;
use tapgate_settle::settler::{self, SettlerSettings, SettlerStats};
use tapgate_settle::store::{RedisStore, Store};

#[derive(Clone, Copy, clap::ValueEnum)]
enum StatementFormat {
    Csv,
    Json,
}

#[derive(Args)]
pub(crate) struct SettleArgs {
    #[command(subcommand)]
    action: SettleAction,
}

/// Where the settled ledgers are.
#[derive(Args, Clone)]
pub(crate) struct RedisArgs {
    #[command(flatten)]
    target: RedisTarget,
    /// Partition streams, as the gateway's `[settlement] partitions`.
    #[arg(long, default_value_t = 8)]
    pub(crate) partitions: u16,
}

impl RedisArgs {
    pub(crate) fn store(&self) -> anyhow::Result<Store> {
        let RedisTarget {
            redis_url,
            redis_tls_ca_file,
            key_prefix,
        } = &self.target;
        RedisStore::connect(
            redis_url,
            redis_tls_ca_file.as_deref(),
            key_prefix,
            Duration::from_secs(5),
        )
        .map(Store::Redis)
        .context("settlement store")
    }
}

#[derive(Args, Clone)]
struct LedgerSource {
    #[command(flatten)]
    redis: RedisArgs,
    /// Read the books from a ledger file (written by `tapgate demo` or an embedded gateway)
    /// instead of Redis.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// The key that names cards in the ledger file's per-card books; the `card-pseudonym.key`
    /// beside the ledger file when absent. (With Redis the key is in the store.)
    #[arg(long, requires = "ledger")]
    card_key_file: Option<PathBuf>,
}

impl LedgerSource {
    /// Nodes that ship to these books from a journal not among `dirs`.
    fn journals_missing(&self, dirs: &[&Path]) -> anyhow::Result<Vec<(String, String)>> {
        if self.ledger.is_some() {
            return Ok(Vec::new());
        }
        let given: Vec<String> = dirs
            .iter()
            .filter_map(|dir| tapgate_journal::existing_journal_id(dir))
            .collect();
        let nodes =
            runtime()?.block_on(async { anyhow::Ok(self.redis.store()?.nodes().await?) })?;
        Ok(nodes
            .into_iter()
            .filter(|(_, journal)| !given.contains(journal))
            .collect())
    }

    /// What names cards in these books' per-card part.
    fn card_pseudonyms(&self) -> anyhow::Result<CardPseudonymizer> {
        match &self.ledger {
            Some(path) => ledger_file_pseudonyms(path, self.card_key_file.as_deref()),
            None => runtime()?.block_on(async { Ok(self.redis.store()?.card_pseudonyms().await?) }),
        }
    }

    fn read(&self, day: Option<chrono::NaiveDate>, with_cards: bool) -> anyhow::Result<Ledger> {
        match &self.ledger {
            Some(path) => {
                let mut ledger = read_ledger_file(path)?;
                ledger.restrict(day, with_cards);
                Ok(ledger)
            }
            None => runtime()?.block_on(async {
                let store = self.redis.store()?;
                Ok(store.ledger(day, with_cards).await?)
            }),
        }
    }
}

#[derive(Subcommand)]
enum SettleAction {
    /// Run settlers against Redis until interrupted: take partitions, price taps, apply them
    /// to the ledgers exactly once.
    Run {
        #[command(flatten)]
        redis: RedisArgs,
        /// Settlers in this process.
        #[arg(long, default_value_t = 1)]
        settlers: usize,
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// How soon a dead settler's partitions move to another one.
        #[arg(long, default_value_t = 10_000)]
        lease_ttl_ms: u64,
        /// How long a new tap waits before it is priced, so that an older tap of its card
        /// from a gateway whose forwarder is behind is priced first (0: as they arrive).
        #[arg(
            long,
            default_value_t = tapgate_gateway::config::DEFAULT_ORDER_WINDOW_MS,
            value_parser = clap::value_parser!(u64).range(..=tapgate_gateway::config::MAX_ORDER_WINDOW_MS)
        )]
        order_window_ms: u64,
        /// Fare tables (TOML); the built-in `fares.example.toml` when absent.
        #[arg(long)]
        fares: Option<PathBuf>,
        /// Exit once every shipped tap is settled and nothing new arrived for this long
        /// (milliseconds); report the settling rate. For benchmarks and batch jobs.
        #[arg(long)]
        until_idle_ms: Option<u64>,
        /// Address of the operators' HTTP endpoint (GET /metrics with the settlers' counters
        /// and lag histogram, /healthz); "off" disables it.
        #[arg(
            long,
            env = "TAPGATE_SETTLE_OPS_LISTEN",
            default_value = "127.0.0.1:9434"
        )]
        ops_listen: String,
    },
    /// Ship a stopped gateway's journal to Redis (what its forwarder would have done), from
    /// the node's checkpoint to the end of the files.
    Forward {
        #[command(flatten)]
        redis: RedisArgs,
        /// The journal directory.
        #[arg(long)]
        journal: PathBuf,
        /// The gateway's node name (`[settlement] node`).
        #[arg(long, default_value = "gateway-1")]
        node: String,
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Decided taps kept per partition for `tapgate watch run` (`[settlement] watch_feed`);
        /// 0 feeds no watcher.
        #[arg(long, default_value_t = tapgate_settle::forwarder::WATCH_FEED)]
        watch_feed: usize,
    },
    /// Settled totals per area (all 41), operator and mode, and the clearing balance.
    Report {
        #[command(flatten)]
        source: LedgerSource,
        /// One day (YYYY-MM-DD, Chongqing calendar); every day when absent.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One operator's statement for one settlement day, as its finance team books it: rides
    /// and fares by area and mode, what each card issuer owes it, concession rides with the
    /// fare forgone, and the transfer discounts it granted. CSV (one row per line of each
    /// section) or JSON, to standard output or `--out`.
    Statement {
        #[command(flatten)]
        source: LedgerSource,
        /// The operator's id (PROTOCOL.md section 3).
        #[arg(long)]
        operator: u16,
        /// The settlement day (YYYY-MM-DD, Chongqing calendar).
        #[arg(long)]
        date: chrono::NaiveDate,
        #[arg(long, value_enum, default_value_t = StatementFormat::Csv)]
        format: StatementFormat,
        /// Write the statement here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prove every approved tap in the journals was settled exactly once: settle the journals
    /// again offline and compare with the settled ledgers, day by day, area × operator × mode,
    /// card and clearing. Exits 1 when anything differs.
    Reconcile {
        #[command(flatten)]
        source: LedgerSource,
        /// Journal directories, one per gateway that ships to this store. Taps of a running
        /// gateway that are not settled yet count as lost: reconcile once settlement has caught
        /// up (`tapgate_forwarder_behind_bytes` 0, streams drained).
        #[arg(long, required = true)]
        journal: Vec<PathBuf>,
        /// Fare tables (TOML) the settlers use; the built-in `fares.example.toml` when absent.
        #[arg(long)]
        fares: Option<PathBuf>,
        /// Print at most this many differences.
        #[arg(long, default_value_t = 50)]
        show: usize,
    },
    /// Correct what settlement charged for one tap: refund a maximum fare, complete a trip
    /// whose exit was never tapped, or a service desk's correction. Priced from the journals,
    /// audited (--by, --why), booked once on the open settlement day, and checked by
    /// `settle reconcile`.
    Adjust(crate::adjust::AdjustArgs),
    /// Settle a journal offline, without Redis: what the pipeline should arrive at.
    Journal {
        /// The journal directory (`[journal] dir` of the gateway).
        #[arg(long, default_value = "tapgate-state/journal")]
        dir: PathBuf,
        /// Fare tables (TOML); the built-in `fares.example.toml` when absent.
        #[arg(long)]
        fares: Option<PathBuf>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub(crate) fn run(args: SettleArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        SettleAction::Run {
            redis,
            settlers,
            batch,
            lease_ttl_ms,
            order_window_ms,
            fares,
            until_idle_ms,
            ops_listen,
        } => {
            let ops_listen = crate::common::parse_ops_listen(&ops_listen)?;
            crate::common::init_logging("info");
            let tables = Arc::new(FareTables::load(fares.as_deref())?);
            let settings = SettlerSettings {
                name: "settle-run".into(),
                partitions: redis.partitions,
                batch: batch.max(1),
                lease_ttl: Duration::from_millis(lease_ttl_ms.max(100)),
                order_window: Duration::from_millis(order_window_ms),
            };
            runtime()?.block_on(async {
                let store = redis.store()?;
                let idle = until_idle_ms.map(Duration::from_millis);
                run_settlers(store, settings, settlers.max(1), tables, idle, ops_listen).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        SettleAction::Adjust(args) => {
            crate::adjust::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        SettleAction::Forward {
            redis,
            journal,
            node,
            batch,
            watch_feed,
        } => forward(&redis, journal, node, batch, watch_feed),
        SettleAction::Report { source, date, json } => {
            let ledger = source.read(date, false)?;
            print!("{}", report(&ledger));
            if let Some(path) = json {
                write_json(&path, &report_json(&ledger))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        SettleAction::Reconcile {
            source,
            journal,
            fares,
            show,
        } => reconcile(&source, &journal, fares.as_deref(), show),
        SettleAction::Statement {
            source,
            operator,
            date,
            format,
            out,
        } => {
            let ledger = source.read(Some(date), false)?;
            if ledger.days.is_empty() && !ledger.late.keys().any(|(booked, _)| *booked == date) {
                eprintln!("note: no taps were settled on {date}; the statement is all zeros");
            }
            let statement = Statement::of(&ledger, operator, date)?;
            let text = match format {
                StatementFormat::Csv => statement.to_csv(),
                StatementFormat::Json => {
                    let json = serde_json::to_string_pretty(&statement.to_json())
                        .expect("a statement serializes");
                    format!("{json}\n")
                }
            };
            match out {
                Some(path) => std::fs::write(&path, text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        SettleAction::Journal { dir, fares, json } => {
            let tables = FareTables::load(fares.as_deref())?;
            // The report leaves the per-card books out, so their names need no lasting key.
            let cards = CardPseudonymizer::new(rand::random());
            let settled = settle_dirs(&[dir.as_path()], &tables, &cards)?;
            if settled.damaged_segments > 0 {
                println!(
                    "warning: {} journal segments hold damaged records",
                    settled.damaged_segments
                );
            }
            print!("{}", report(&settled.ledger));
            if let Some(path) = json {
                write_json(&path, &report_json(&settled.ledger))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Ships a stopped gateway's journal to the settlement streams (`settle forward`).
fn forward(
    redis: &RedisArgs,
    journal: PathBuf,
    node: String,
    batch: usize,
    watch_feed: usize,
) -> anyhow::Result<ExitCode> {
    crate::common::init_logging("warn");
    if !journal.is_dir() {
        return Err(anyhow::anyhow!(
            "{}: no journal directory",
            journal.display()
        ));
    }
    let stats = Arc::new(ForwarderStats::default());
    let settings = ForwarderSettings {
        node,
        journal_dir: journal,
        partitions: redis.partitions,
        batch: batch.max(1),
        max_backlog: u64::MAX,
        watch_feed,
    };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    runtime()?.block_on(async {
        let store = redis.store()?;
        forwarder::run(store, settings, Until::EndOfFiles, stats.clone(), stop_rx).await?;
        anyhow::Ok(())
    })?;
    println!(
        "shipped {} approved taps in {} batches",
        stats.shipped.load(Ordering::Relaxed),
        stats.batches.load(Ordering::Relaxed)
    );
    Ok(ExitCode::SUCCESS)
}

/// Compares the books with the journals settled offline (`settle reconcile`); exits 1 unless
/// they are the same.
fn reconcile(
    source: &LedgerSource,
    journal: &[PathBuf],
    fares: Option<&Path>,
    show: usize,
) -> anyhow::Result<ExitCode> {
    let tables = FareTables::load(fares)?;
    let dirs: Vec<&Path> = journal.iter().map(PathBuf::as_path).collect();
    let expected = settle_dirs(&dirs, &tables, &source.card_pseudonyms()?)?;
    let settled = source.read(None, true)?;
    let mut reconciliation = Reconciliation::new(&expected.ledger, &settled);
    reconciliation.adjustment_problems =
        tapgate_settle::adjust::check(&settled.adjustments, &dirs, &tables)?;
    print!("{}", reconcile_text(&reconciliation, show));
    for (node, journal) in source.journals_missing(&dirs)? {
        println!(
            "journal of node {node} missing (journal {journal} ships to these books but was not given with --journal): its taps count as duplicated above"
        );
    }
    if expected.copies > 0 {
        println!(
            "note: {} taps are in more than one journal (sent to more than one gateway); each counts once",
            expected.copies
        );
    }
    if expected.damaged_segments > 0 {
        println!(
            "warning: {} journal segments hold damaged records; taps after the damage are in neither book",
            expected.damaged_segments
        );
    }
    Ok(if reconciliation.is_exact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_settlers(
    store: Store,
    settings: SettlerSettings,
    count: usize,
    tables: Arc<FareTables>,
    until_idle: Option<Duration>,
    ops_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let stats = Arc::new(SettlerStats::default());
    let panics = Arc::new(Panics::default());
    let ops = crate::common::start_ops(
        ops_listen,
        Exposition::default().with(SettlementCounters::of_settlers(
            stats.clone(),
            panics.clone(),
        )),
    )
    .await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let settings = SettlerSettings {
                name: format!("{}-{i}", settings.name),
                ..settings.clone()
            };
            settler::spawn_supervised(
                store.clone(),
                settings,
                tables.clone(),
                stats.clone(),
                stop_rx.clone(),
                panics.clone(),
            )
        })
        .collect();
    let started = Instant::now();
    let mut first_settled: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut logged = Instant::now();
    let mut failed = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = tick.tick() => {}
        }
        // A settler that stopped on an error or panicked does not come back: stop with it,
        // rather than wait for settling that will not happen.
        if tasks.iter().any(|t| t.is_finished()) {
            failed = Some(
                stats
                    .health
                    .reason()
                    .unwrap_or_else(|| "a settler stopped".to_owned()),
            );
            break;
        }
        let settled = stats.settled.load(Ordering::Relaxed);
        if settled != last {
            first_settled.get_or_insert_with(Instant::now);
            last = settled;
            last_change = Instant::now();
        }
        if logged.elapsed() >= Duration::from_secs(10) {
            tracing::info!(
                settled,
                partitions = stats.partitions_held.load(Ordering::Relaxed),
                "settling"
            );
            logged = Instant::now();
        }
        if let Some(idle) = until_idle
            && last_change.elapsed() >= idle
            && started.elapsed() >= idle
        {
            let (shipped, total_settled) = store.counts().await?;
            if shipped == total_settled {
                break;
            }
        }
    }
    let _ = stop.send(true);
    if let Some(ops) = ops {
        ops.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    if let Some(reason) = failed {
        return Err(anyhow::anyhow!(reason));
    }
    let settled = stats.settled.load(Ordering::Relaxed);
    let busy = first_settled.map_or(Duration::ZERO, |t| last_change.duration_since(t));
    println!(
        "settled {settled} taps ({} charges) with {count} settler(s); {:.0} taps/s while settling ({:.1} s); {} redelivered entries skipped",
        stats.charges.load(Ordering::Relaxed),
        settled as f64 / busy.as_secs_f64().max(1e-3),
        busy.as_secs_f64(),
        stats.redelivered.load(Ordering::Relaxed),
    );
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).expect("a report serializes");
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("json: {}", path.display());
    Ok(())
}
