//! `tapgate watch`: card-use watching over the taps the gateways decided.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tapgate_journal::{list_segments, read_segment};
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_watch::{Alert, Observed, Rules, Watcher};

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
    },
}

pub(crate) fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        WatchAction::Journal {
            dir,
            rules,
            card_key_file,
            json,
        } => {
            let rules = Rules::load(rules.as_deref())?;
            let key = match card_key_file {
                Some(path) => tapgate_settle::store::read_card_key(&path)?,
                None => rand::random(),
            };
            let dirs: Vec<&Path> = dir.iter().map(PathBuf::as_path).collect();
            let mut watcher = Watcher::new(rules, CardPseudonymizer::new(key));
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
