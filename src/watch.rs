//! `tapgate watch`: card-use watching over the taps the gateways decided.

use crate::common::RedisTarget;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tapgate_city::CardState;
use tapgate_journal::{list_segments, read_segment};
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_watch::store::AlertStore;
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
        /// Also keep the alerts in Redis (`P:alerts`), where `tapgate alerts` lists them.
        #[arg(long)]
        record: bool,
        #[command(flatten)]
        redis: RedisTarget,
        /// How long recorded alerts are kept, in days.
        #[arg(long, default_value_t = 30)]
        retention_days: u64,
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
        WatchAction::Journal {
            dir,
            rules,
            card_key_file,
            json,
            record,
            redis,
            retention_days,
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
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Keeps the alerts, then takes the action the rules configure for each (watch list, or a block
/// through the card directory as `tapgate cards block` does) and records it.
async fn record_and_act(
    redis: &RedisTarget,
    rules: &Rules,
    alerts: &[Alert],
    retention: Duration,
) -> anyhow::Result<()> {
    let store = alert_store(redis)?;
    let store_error = |e| anyhow::anyhow!("alert store: {e}");
    let ids = store
        .append(alerts, retention, tapgate_runtime::now_ms())
        .await
        .map_err(store_error)?;
    let mut directory = None;
    for (id, alert) in ids.iter().zip(alerts) {
        let (Some(action), Some(card)) = (rules.action_for(alert), alert.card_id) else {
            continue;
        };
        let outcome = match action {
            Action::Watch => "on the watch list".to_owned(),
            Action::Block => {
                if directory.is_none() {
                    directory = Some(crate::cards::redis_directory(redis, 0)?);
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
