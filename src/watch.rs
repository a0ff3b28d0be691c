//! `tapgate watch`: card-use watching over the taps the gateways decided.

use crate::common::RedisTarget;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tapgate_city::CardState;
use tapgate_journal::{list_segments, read_segment};
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_runtime::health::{Panics, supervise};
use tapgate_runtime::ops::Exposition;
use tapgate_watch::live::{LiveSettings, LiveStats};
use tapgate_watch::ops::WatchCounters;
use tapgate_watch::score::{Injected, score};
use tapgate_watch::store::{AlertStore, StoredAlert};
use tapgate_watch::{Action, Alert, Observed, Rule, Rules, Watcher};

#[derive(Args)]
pub(crate) struct WatchArgs {
    #[command(subcommand)]
    action: WatchAction,
}

#[derive(Subcommand)]
enum WatchAction {
    /// Run the watching rules over journals (one per gateway), taps in time order, and list
    /// the alerts they raise.
    Journal {
        /// Journal directories.
        #[arg(long, required = true)]
        dir: Vec<PathBuf>,
        /// Watching rules (TOML); the built-in `watch.example.toml` when absent.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// The key that names cards in alerts (32 hex digits in a file), so alerts of several
        /// runs name a card alike; a key of this run's own when absent.
        #[arg(long)]
        card_key_file: Option<PathBuf>,
        /// One JSON object per alert instead of text.
        #[arg(long)]
        json: bool,
        /// Also keep the alerts in Redis (`P:{watch}:alerts`), where `tapgate alerts` lists them.
        #[arg(long)]
        record: bool,
        #[command(flatten)]
        redis: RedisTarget,
        /// How long recorded alerts are kept, in days.
        #[arg(long, default_value_t = 30)]
        retention_days: u64,
        /// Score the rules against the misuse a load run injected (`tapgate load --fraud-cards
        /// N --truth FILE`): each rule's recall and precision, and the ordinary riders alerted.
        #[arg(long)]
        truth: Option<PathBuf>,
    },
    /// Watch every gateway's decided taps as they are shipped (the gateways' `[settlement]
    /// watch_feed`), keep the alerts in Redis and take the rules' actions. Run two for a
    /// standby: one watches, the other takes over within the lease time when it stops.
    Run {
        #[command(flatten)]
        redis: RedisTarget,
        /// Watching rules (TOML); the built-in `watch.example.toml` when absent.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// This watcher's name in logs.
        #[arg(long, default_value = "watcher")]
        name: String,
        /// How long alerts are kept, in days.
        #[arg(long, default_value_t = 30)]
        retention_days: u64,
        /// How soon a standby takes over from a watcher that stopped.
        #[arg(long, default_value_t = 10_000)]
        lease_ttl_ms: u64,
        /// Feed entries read per partition per round.
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Where `/metrics`, `/healthz`, `/readyz` and the dashboard are served, or `off`.
        #[arg(
            long,
            env = "TAPGATE_WATCH_OPS_LISTEN",
            default_value = "127.0.0.1:9435"
        )]
        ops_listen: String,
    },
}

/// `tapgate alerts`: the alerts kept in Redis.
#[derive(Args)]
pub(crate) struct AlertsArgs {
    #[command(flatten)]
    redis: RedisTarget,
    /// Only alerts raised within this long before now: `30m`, `24h`, `7d`.
    #[arg(long, default_value = "24h", value_parser = parse_age)]
    since: Duration,
    /// Only this rule's alerts (velocity, impossible_travel, clone, denied_retry, concession,
    /// gate_denials).
    #[arg(long, value_parser = parse_rule)]
    rule: Option<Rule>,
    /// One JSON object per alert instead of text.
    #[arg(long)]
    json: bool,
    /// List at most this many.
    #[arg(long, default_value_t = 1_000)]
    max: usize,
}

fn parse_age(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}`: a number and m, h or d (30m, 24h, 7d)"))?;
    let minutes = match unit {
        "m" => n,
        "h" => n * 60,
        "d" => n * 24 * 60,
        _ => return Err(format!("`{s}`: a number and m, h or d (30m, 24h, 7d)")),
    };
    Ok(Duration::from_secs(minutes * 60))
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("no rule `{s}`"))
}

fn alert_store(target: &RedisTarget) -> anyhow::Result<AlertStore> {
    AlertStore::connect(
        &target.redis_url,
        target.redis_tls_ca_file.as_deref(),
        &target.key_prefix,
        Duration::from_secs(5),
    )
    .map_err(|e| anyhow::anyhow!("alert store: {e}"))
}

pub(crate) fn list_alerts(args: AlertsArgs) -> anyhow::Result<ExitCode> {
    let since_ms = tapgate_runtime::now_ms().saturating_sub(args.since.as_millis() as u64);
    let alerts = crate::runtime()?.block_on(async {
        alert_store(&args.redis)?
            .list(since_ms, args.rule, args.max)
            .await
            .map_err(|e| anyhow::anyhow!("alert store: {e}"))
    })?;
    for stored in &alerts {
        if args.json {
            println!(
                "{}",
                serde_json::to_string(stored).expect("an alert serializes")
            );
        } else {
            println!("{} {}", stored.id, describe(&stored.alert));
        }
    }
    eprintln!("{} alerts", alerts.len());
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        WatchAction::Run {
            redis,
            rules,
            name,
            retention_days,
            lease_ttl_ms,
            batch,
            ops_listen,
        } => {
            crate::common::init_logging("info");
            let rules = Rules::load(rules.as_deref())?;
            let settings = LiveSettings {
                name,
                lease_ttl: Duration::from_millis(lease_ttl_ms.max(300)),
                batch: batch.clamp(1, 10_000),
                retention: Duration::from_secs(retention_days.max(1) * 86_400),
            };
            let ops_listen = crate::common::parse_ops_listen(&ops_listen)?;
            crate::runtime()?.block_on(watch_live(redis, rules, settings, ops_listen))?;
            Ok(ExitCode::SUCCESS)
        }
        WatchAction::Journal {
            dir,
            rules,
            card_key_file,
            json,
            record,
            redis,
            retention_days,
            truth,
        } => {
            let rules = Rules::load(rules.as_deref())?;
            let watcher_rules = rules.clone();
            let key = match card_key_file {
                Some(path) => tapgate_settle::store::read_card_key(&path)?,
                None => rand::random(),
            };
            let dirs: Vec<&Path> = dir.iter().map(PathBuf::as_path).collect();
            let mut watcher = Watcher::new(watcher_rules, CardPseudonymizer::new(key));
            let (taps, alerts) = watch_journals(&dirs, &mut watcher)?;
            for alert in &alerts {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(alert).expect("an alert serializes")
                    );
                } else {
                    println!("{}", describe(alert));
                }
            }
            if record {
                let retention = Duration::from_secs(retention_days.max(1) * 86_400);
                crate::runtime()?.block_on(record_and_act(&redis, &rules, &alerts, retention))?;
            } else if alerts.iter().any(|a| rules.action_for(a).is_some()) {
                anyhow::bail!(
                    "the rules' [actions] act on cards, which is recorded: run with --record"
                );
            }
            eprintln!(
                "watched {} decided taps ({} approved): {} alerts",
                taps.0,
                taps.1,
                alerts.len()
            );
            if let Some(truth) = truth {
                print_score(&alerts, &read_truth(&truth)?, json);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the live watcher until SIGINT or SIGTERM, serving its counters.
async fn watch_live(
    redis: RedisTarget,
    rules: Rules,
    settings: LiveSettings,
    ops_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let feeds = tapgate_settle::store::RedisStore::connect(
        &redis.redis_url,
        redis.redis_tls_ca_file.as_deref(),
        &redis.key_prefix,
        Duration::from_secs(5),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = alert_store(&redis)?;
    let stats = Arc::new(LiveStats::default());
    let panics = Arc::new(Panics::default());
    let ops = crate::common::start_ops(
        ops_listen,
        Exposition::default().with(WatchCounters {
            stats: stats.clone(),
            panics: panics.clone(),
        }),
    )
    .await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let acting = (redis.clone(), rules.clone(), store.clone());
    let act = move |stored: Vec<StoredAlert>| {
        let (redis, rules, store) = acting.clone();
        async move {
            for alert in &stored {
                eprintln!("{} {}", alert.id, describe(&alert.alert));
            }
            if let Err(e) = act_on(&redis, &rules, &store, &stored).await {
                tracing::error!(error = %e, "watcher: an action on a card failed");
            }
        }
    };
    let task = supervise(
        "watcher",
        stats.health.clone(),
        panics,
        tapgate_watch::live::run(feeds, store, rules, settings, stats, act, stop_rx),
    );
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    let _ = stop.send(true);
    let _ = task.await;
    if let Some(ops) = ops {
        ops.abort();
    }
    Ok(())
}

/// Keeps the alerts, then takes the rules' actions on them.
async fn record_and_act(
    redis: &RedisTarget,
    rules: &Rules,
    alerts: &[Alert],
    retention: Duration,
) -> anyhow::Result<()> {
    let store = alert_store(redis)?;
    let ids = store
        .append(alerts, retention, tapgate_runtime::now_ms())
        .await
        .map_err(|e| anyhow::anyhow!("alert store: {e}"))?;
    let stored: Vec<StoredAlert> = ids
        .into_iter()
        .zip(alerts.iter().cloned())
        .map(|(id, alert)| StoredAlert { id, alert })
        .collect();
    act_on(redis, rules, &store, &stored).await
}

/// Takes the action the rules configure for each stored alert (watch list, or a block through
/// the card directory as `tapgate cards block` does) and records it.
async fn act_on(
    redis: &RedisTarget,
    rules: &Rules,
    store: &AlertStore,
    stored: &[StoredAlert],
) -> anyhow::Result<()> {
    let store_error = |e| anyhow::anyhow!("alert store: {e}");
    let mut directory = None;
    for StoredAlert { id, alert } in stored {
        let (Some(action), Some(card)) = (rules.action_for(alert), alert.card_id) else {
            continue;
        };
        let outcome = match action {
            Action::Watch => "on the watch list".to_owned(),
            Action::Block => {
                if directory.is_none() {
                    directory = Some(redis.directory(0)?);
                }
                let directory = directory.as_ref().expect("just made");
                match directory.set_state(card, CardState::Blocked).await? {
                    Some(_) => "blocked".to_owned(),
                    None => "not blocked: the card is not in the directory".to_owned(),
                }
            }
        };
        store
            .record_action(id, alert, action, &outcome, tapgate_runtime::now_ms())
            .await
            .map_err(store_error)?;
        eprintln!(
            "{action:?} card {}: {outcome} (alert {id})",
            alert.card.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

/// Feeds every decided tap of the journals to the watcher in gateway-time order; returns the
/// taps and the approved ones among them, and the alerts.
fn watch_journals(
    dirs: &[&Path],
    watcher: &mut Watcher,
) -> anyhow::Result<((u64, u64), Vec<Alert>)> {
    let mut taps = Vec::new();
    for dir in dirs {
        anyhow::ensure!(dir.is_dir(), "{}: no journal directory", dir.display());
        for segment in list_segments(dir).with_context(|| dir.display().to_string())? {
            read_segment(&segment, |r| taps.push(Observed::from(&r)))
                .with_context(|| segment.display().to_string())?;
        }
    }
    taps.sort_by_key(|t| t.at_ms);
    let alerts = taps.iter().flat_map(|t| watcher.observe(t)).collect();
    let approved = taps.iter().filter(|t| t.approved).count() as u64;
    Ok(((taps.len() as u64, approved), alerts))
}

/// The misuse a load run injected, one JSON object a line.
fn read_truth(path: &Path) -> anyhow::Result<Vec<Injected>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

fn print_score(alerts: &[Alert], truth: &[Injected], json: bool) {
    let (scores, ordinary) = score(alerts, truth);
    if json {
        let summary =
            serde_json::json!({ "scores": scores, "ordinary_cards_alerted": ordinary.len() });
        println!("{summary}");
        return;
    }
    let ratio = |r: Option<f64>| r.map_or("–".to_owned(), |r| format!("{r:.2}"));
    println!(
        "{:<18} {:>8} {:>7} {:>7} {:>7} {:>7} {:>10}",
        "rule", "injected", "caught", "recall", "alerts", "true", "precision"
    );
    for s in &scores {
        println!(
            "{:<18} {:>8} {:>7} {:>7} {:>7} {:>7} {:>10}",
            s.rule.name(),
            s.injected,
            s.caught,
            ratio(s.recall()),
            s.alerts,
            s.true_alerts,
            ratio(s.precision())
        );
    }
    println!("ordinary riders' cards alerted on: {}", ordinary.len());
}

fn describe(a: &Alert) -> String {
    let who = a
        .card
        .as_ref()
        .map_or_else(|| "a gate".to_owned(), |c| format!("card {c}"));
    format!(
        "{:?} {:?}: {who}, gates {:?}, areas {:?}, from {} to {} ms: {}",
        a.severity, a.rule, a.gates, a.areas, a.first_ms, a.last_ms, a.evidence
    )
}
