//! `tapgate settle`: settlement reports.

use clap::{Args, Subcommand};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tapgate_gateway::fares::FareTables;
use tapgate_gateway::settlement::{Ledger, settle_journal};
use tapgate_protocol::AreaCode;
use tapgate_protocol::registry::operator;

#[derive(Args)]
pub struct SettleArgs {
    #[command(subcommand)]
    action: SettleAction,
}

#[derive(Subcommand)]
enum SettleAction {
    /// Settle a gateway journal offline: fares per area, operator and mode, and the clearing
    /// balance between Chongqing, Sichuan and T-Union issuers.
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

pub fn run(args: SettleArgs) -> Result<(), String> {
    match args.action {
        SettleAction::Journal { dir, fares, json } => {
            let tables = load_tables(fares.as_deref())?;
            let ledger = settle(&dir, &tables)?;
            print!("{}", summary(&ledger));
            if let Some(path) = json {
                let text =
                    serde_json::to_string_pretty(&to_json(&ledger)).expect("a report serializes");
                std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
                println!("json: {}", path.display());
            }
            Ok(())
        }
    }
}

pub fn load_tables(path: Option<&Path>) -> Result<FareTables, String> {
    match path {
        None => Ok(FareTables::embedded_default()),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            FareTables::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

pub fn settle(dir: &Path, tables: &FareTables) -> Result<Ledger, String> {
    if !dir.is_dir() {
        return Err(format!("{}: no journal directory", dir.display()));
    }
    settle_journal(dir, tables).map_err(|e| format!("{}: {e}", dir.display()))
}

fn yuan(fen: u64) -> String {
    format!("{}.{:02}", fen / 100, fen % 100)
}

fn area_name(code: u32) -> String {
    AreaCode(code).area().map_or_else(
        || format!("{code}"),
        |a| format!("{code} {} {}", a.name_zh, a.name_en),
    )
}

fn operator_name(id: u16) -> String {
    operator(id).map_or_else(|| format!("operator {id}"), |o| o.name_en.to_owned())
}

pub fn summary(ledger: &Ledger) -> String {
    let mut s = String::new();
    let total = ledger.total();
    let _ = writeln!(
        s,
        "settled {} approved taps into {} fares: {} yuan",
        ledger.approved_taps,
        total.rides,
        yuan(total.fen)
    );
    if ledger.damaged_segments > 0 {
        let _ = writeln!(
            s,
            "warning: {} journal segments ended in a damaged record",
            ledger.damaged_segments
        );
    }
    let _ = writeln!(
        s,
        "{:<44} {:<34} {:<15} {:>8} {:>12}",
        "area", "operator", "mode", "rides", "yuan"
    );
    for ((area, op, mode), t) in &ledger.by_area_operator_mode {
        let _ = writeln!(
            s,
            "{:<44} {:<34} {:<15} {:>8} {:>12}",
            area_name(*area),
            operator_name(*op),
            mode.label(),
            t.rides,
            yuan(t.fen)
        );
    }
    if ledger.clearing.is_empty() {
        let _ = writeln!(s, "clearing: nothing owed across regions");
    }
    for ((payer, payee), fen) in &ledger.clearing {
        let _ = writeln!(
            s,
            "clearing: {} cards owe {} operators {} yuan",
            payer.label(),
            payee.label(),
            yuan(*fen)
        );
    }
    s
}

fn to_json(ledger: &Ledger) -> serde_json::Value {
    let total = ledger.total();
    serde_json::json!({
        "approved_taps": ledger.approved_taps,
        "fares": total.rides,
        "total_fen": total.fen,
        "by_area_operator_mode": ledger.by_area_operator_mode.iter().map(|((area, op, mode), t)| serde_json::json!({
            "area": area,
            "area_name": AreaCode(*area).area().map(|a| a.name_zh),
            "operator": op,
            "mode": mode.label(),
            "rides": t.rides,
            "fen": t.fen,
        })).collect::<Vec<_>>(),
        "clearing": ledger.clearing.iter().map(|((payer, payee), fen)| serde_json::json!({
            "payer": payer.label(),
            "payee": payee.label(),
            "fen": fen,
        })).collect::<Vec<_>>(),
    })
}
