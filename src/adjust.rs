//! `tapgate settle adjust`: a correction to what settlement charged for one tap, priced from
//! the journals, audited, and put on the card's partition stream so that one settler books it
//! once on the open settlement day.

use crate::runtime;
use crate::settle::RedisArgs;
use anyhow::Context as _;
use clap::Args;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tapgate_settle::adjust::{self, Adjustment, Correction, tap_name};
use tapgate_settle::fares::FareTables;
use tapgate_settle::ledger::{card_histories, find_taps};
use tapgate_settle::partition_of;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("correction").required(true)
    .args(["refund_max_fare", "complete_trip", "desk_fen"])))]
pub(crate) struct AdjustArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// The tap to correct, as GATE-SEQUENCE (its gate's id and the gate's sequence number).
    #[arg(long)]
    tap: String,
    /// Journal directories that may hold the tap and the card's other taps (every gateway's,
    /// as for `settle reconcile`).
    #[arg(long, required = true)]
    journal: Vec<PathBuf>,
    /// Give back the maximum fare charged for the trip this tap entered (its exit was never
    /// tapped) or for this exit without an entry.
    #[arg(long)]
    refund_max_fare: bool,
    /// Complete the trip this entry tap began as if its exit had been tapped at LINE:STOP:
    /// the maximum charged less that trip's fare is given back.
    #[arg(long, value_name = "LINE:STOP")]
    complete_trip: Option<String>,
    /// A service desk's correction in fen, on the rider's side: negative gives money back.
    #[arg(long, allow_negative_numbers = true)]
    desk_fen: Option<i64>,
    /// Who made the correction (a name, a desk), for the audit trail.
    #[arg(long)]
    by: String,
    /// Why, for the audit trail.
    #[arg(long)]
    why: String,
    /// Fare tables (TOML) the settlers use; the built-in `fares.example.toml` when absent.
    #[arg(long)]
    fares: Option<PathBuf>,
}

impl AdjustArgs {
    fn correction(&self) -> anyhow::Result<Correction> {
        if let Some(fen) = self.desk_fen {
            return Ok(Correction::Desk { fen });
        }
        if let Some(exit) = &self.complete_trip {
            let (line, stop) = exit
                .split_once(':')
                .and_then(|(l, s)| Some((l.parse().ok()?, s.parse().ok()?)))
                .with_context(|| format!("--complete-trip {exit}: expected LINE:STOP"))?;
            return Ok(Correction::CompleteTrip {
                exit_line: line,
                exit_stop: stop,
            });
        }
        Ok(Correction::RefundMaxFare)
    }
}

fn parse_tap(s: &str) -> anyhow::Result<(u64, u64)> {
    s.split_once('-')
        .and_then(|(gate, seq)| Some((gate.parse().ok()?, seq.parse().ok()?)))
        .with_context(|| format!("--tap {s}: expected GATE-SEQUENCE, both numbers"))
}

pub(crate) fn run(args: &AdjustArgs) -> anyhow::Result<()> {
    adjust::audited(&args.by, &args.why)?;
    let correction = args.correction()?;
    let (terminal, sequence) = parse_tap(&args.tap)?;
    let tables = FareTables::load(args.fares.as_deref())?;
    let dirs: Vec<&Path> = args.journal.iter().map(PathBuf::as_path).collect();
    if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
        anyhow::bail!("{}: no journal directory", missing.display());
    }
    let tap = find_taps(&dirs, &BTreeSet::from([(terminal, sequence)]))?
        .remove(&(terminal, sequence))
        .ok_or_else(|| adjust::AdjustError::NoSuchTap(tap_name(terminal, sequence)))?;
    let card = tap.tap.card_id;
    let history = card_histories(&dirs, &BTreeSet::from([card]), &tables)?
        .remove(&card)
        .unwrap_or_default();
    let (fen, operator, area, mode) = adjust::price(correction, &tap, &history, &tables)?;
    let at_ms = tapgate_runtime::now_ms();
    let adjustment = Adjustment {
        id: format!("adj-{at_ms}-{terminal}-{sequence}"),
        terminal,
        sequence,
        correction,
        fen,
        issuer: tap.tap.issuer.label().to_owned(),
        operator,
        area,
        mode: mode.label().to_owned(),
        tapped: tables.day.day_of(tap.server_time_ms),
        by: args.by.trim().to_owned(),
        why: args.why.trim().to_owned(),
        at_ms,
        booked: None,
    };
    let partitions = args.redis.partitions;
    let written = runtime()?.block_on(async {
        let store = args.redis.store()?;
        store.init(partitions).await?;
        let partition = partition_of(tap.tap.card_id, partitions);
        anyhow::Ok(store.submit_adjustment(partition, &adjustment).await?)
    })?;
    if !written {
        anyhow::bail!(
            "the maximum fare of tap {} was settled by an earlier correction; a desk correction (--desk-fen) can still be made",
            args.tap
        );
    }
    println!(
        "correction {}: {} of tap {} ({}), {} fen on the rider's side, operator {operator}, area {area}, {}; settlement books it on the open day",
        adjustment.id,
        correction.label(),
        args.tap,
        adjustment.tapped,
        fen,
        adjustment.mode
    );
    Ok(())
}
