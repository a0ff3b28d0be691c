//! The books as the commands show them: ledger files, settling journals directly, and the
//! report and reconciliation texts (`tapgate settle` and `tapgate demo`).

use std::fmt::Write as _;
use std::path::Path;
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_protocol::registry::{AREAS, operator};
use tapgate_protocol::{AreaCode, Concession, Mode};
use tapgate_settle::fares::FareTables;
use tapgate_settle::ledger::{
    JournalSettlement, Ledger, Reconciliation, Subject, Totals, card_name, settle_journals,
};
use tapgate_settle::store::{CARD_KEY_FILE, read_card_key};

/// Reads a ledger file written by an embedded gateway or the demo.
pub(crate) fn read_ledger_file(path: &Path) -> anyhow::Result<Ledger> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ledger::from_json(&value).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// What names cards in a ledger file's per-card books: the key file given, or the one an
/// embedded gateway keeps beside its ledger.
pub(crate) fn ledger_file_pseudonyms(
    ledger: &Path,
    key_file: Option<&Path>,
) -> anyhow::Result<CardPseudonymizer> {
    let beside = ledger.with_file_name(CARD_KEY_FILE);
    let path = key_file.unwrap_or(&beside);
    let key = read_card_key(path).map_err(|e| {
        anyhow::anyhow!(
            "{e} (the per-card books of {} name cards by it; give it with --card-key-file)",
            ledger.display()
        )
    })?;
    Ok(CardPseudonymizer::new(key))
}

/// Settles journals offline, naming cards by `cards` so the books compare with settled ones.
pub(crate) fn settle_dirs(
    dirs: &[&Path],
    tables: &FareTables,
    cards: &CardPseudonymizer,
) -> anyhow::Result<JournalSettlement> {
    if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
        return Err(anyhow::anyhow!(
            "{}: no journal directory",
            missing.display()
        ));
    }
    Ok(settle_journals(dirs, tables, cards)?)
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

pub(crate) fn report(ledger: &Ledger) -> String {
    let books = ledger.all_days();
    let total = books.total();
    let mut s = String::new();
    let days: Vec<String> = ledger.days.keys().map(|d| d.to_string()).collect();
    let _ = writeln!(
        s,
        "settled {} approved taps into {} fares: {} yuan ({})",
        books.taps,
        total.rides,
        yuan(total.fen),
        if days.is_empty() {
            "no days".to_string()
        } else {
            days.join(", ")
        }
    );
    s.push_str(&provenance_lines(ledger));
    let mut by_area: std::collections::BTreeMap<u32, Totals> = std::collections::BTreeMap::new();
    let mut by_operator: std::collections::BTreeMap<u16, Totals> =
        std::collections::BTreeMap::new();
    let mut by_mode: std::collections::BTreeMap<Mode, Totals> = std::collections::BTreeMap::new();
    for ((area, op, mode), t) in &books.cells {
        by_area.entry(*area).or_default().add(*t);
        by_operator.entry(*op).or_default().add(*t);
        by_mode.entry(*mode).or_default().add(*t);
    }
    let row = |s: &mut String, name: &str, t: Totals| {
        let _ = writeln!(s, "  {name:<64} {:>8} {:>12}", t.rides, yuan(t.fen));
    };
    let _ = writeln!(s, "\nby area (all 41):");
    let _ = writeln!(s, "  {:<64} {:>8} {:>12}", "area", "rides", "yuan");
    for area in AREAS.iter() {
        let t = by_area.remove(&area.code.0).unwrap_or_default();
        row(&mut s, &area_name(area.code.0), t);
    }
    for (code, t) in by_area {
        row(&mut s, &area_name(code), t);
    }
    let _ = writeln!(s, "\nby operator:");
    for (op, t) in &by_operator {
        row(&mut s, &operator_name(*op), *t);
    }
    let _ = writeln!(s, "\nby mode:");
    for (mode, t) in &by_mode {
        row(&mut s, mode.label(), *t);
    }
    let _ = writeln!(s, "\nclearing between issuers:");
    if books.clearing.is_empty() {
        let _ = writeln!(s, "  nothing owed across regions");
    }
    for ((payer, payee), t) in &books.clearing {
        let _ = writeln!(
            s,
            "  {} cards owe {} operators {} yuan for {} rides",
            payer.label(),
            payee.label(),
            yuan(t.fen),
            t.rides
        );
    }
    let _ = writeln!(s, "\npayable by card issuer to operator:");
    for ((issuer, op), t) in &books.payables {
        row(
            &mut s,
            &format!("{} → {}", issuer.label(), operator_name(*op)),
            *t,
        );
    }
    let _ = writeln!(s, "\nconcession rides and fare forgone (subsidy claims):");
    if books.concessions.is_empty() {
        let _ = writeln!(s, "  none");
    }
    let mut by_concession: std::collections::BTreeMap<(Concession, u16), Totals> =
        std::collections::BTreeMap::new();
    for ((concession, op, _, _), t) in &books.concessions {
        by_concession.entry((*concession, *op)).or_default().add(*t);
    }
    for ((concession, op), t) in &by_concession {
        row(
            &mut s,
            &format!("{} / {}", concession.label(), operator_name(*op)),
            *t,
        );
    }
    let _ = writeln!(s, "\ntransfer discounts granted:");
    let mut by_operator: std::collections::BTreeMap<u16, Totals> =
        std::collections::BTreeMap::new();
    for ((op, _, _), t) in &books.transfers {
        by_operator.entry(*op).or_default().add(*t);
    }
    if by_operator.is_empty() {
        let _ = writeln!(s, "  none");
    }
    for (op, t) in &by_operator {
        row(&mut s, &operator_name(*op), *t);
    }
    s
}

/// Which fare tables priced the books, and one line per closed day whose late taps were booked
/// on a later day.
fn provenance_lines(ledger: &Ledger) -> String {
    let mut s = String::new();
    if !ledger.fare_tables.is_empty() {
        let digests: Vec<&str> = ledger.fare_tables.iter().map(String::as_str).collect();
        let _ = writeln!(s, "priced with fare tables {}", digests.join(", "));
    }
    if !ledger.adjustments.is_empty() {
        let net: i64 = ledger.adjustments.iter().map(|a| a.fen).sum();
        let _ = writeln!(
            s,
            "corrections booked: {}, {net} fen net on the riders' side (settle statement lists them)",
            ledger.adjustments.len()
        );
    }
    for ((booked, tapped), late) in &ledger.late {
        let t = late.total();
        let _ = writeln!(
            s,
            "late taps booked on {booked}, tapped on {tapped} (closed before they arrived): {} taps, {} fares, {} yuan",
            late.taps,
            t.rides,
            yuan(t.fen)
        );
    }
    s
}

/// The books without their per-card part, which names cards by number and stays out of
/// reports.
fn without_cards(ledger: &Ledger) -> Ledger {
    let mut copy = ledger.clone();
    copy.restrict(None, false);
    copy
}

/// The report as JSON: the totals, and the books without their per-card part.
pub(crate) fn report_json(ledger: &Ledger) -> serde_json::Value {
    let books = ledger.all_days();
    let total = books.total();
    let mut by_area: std::collections::BTreeMap<u32, Totals> = std::collections::BTreeMap::new();
    for ((area, _, _), t) in &books.cells {
        by_area.entry(*area).or_default().add(*t);
    }
    serde_json::json!({
        "days": ledger.days.keys().map(|d| d.to_string()).collect::<Vec<_>>(),
        "fare_tables": ledger.fare_tables,
        "approved_taps": books.taps,
        "late_taps": ledger.late_taps(),
        "adjustments": ledger.adjustments.len(),
        "fares": total.rides,
        "total_fen": total.fen,
        "by_area": AREAS.iter().map(|a| {
            let t = by_area.get(&a.code.0).copied().unwrap_or_default();
            serde_json::json!({"area": a.code.0, "name_zh": a.name_zh, "name_en": a.name_en,
                               "rides": t.rides, "fen": t.fen})
        }).collect::<Vec<_>>(),
        "by_area_operator_mode": books.cells.iter().map(|((area, op, mode), t)| serde_json::json!({
            "area": area,
            "operator": op,
            "mode": mode.label(),
            "rides": t.rides,
            "fen": t.fen,
        })).collect::<Vec<_>>(),
        "clearing": books.clearing.iter().map(|((payer, payee), t)| serde_json::json!({
            "payer": payer.label(),
            "payee": payee.label(),
            "fen": t.fen,
            "rides": t.rides,
        })).collect::<Vec<_>>(),
        "payables": books.payables.iter().map(|((issuer, op), t)| serde_json::json!({
            "issuer": issuer.label(),
            "operator": op,
            "fen": t.fen,
            "rides": t.rides,
        })).collect::<Vec<_>>(),
        "concessions": books.concessions.iter().map(|((concession, op, area, mode), t)| serde_json::json!({
            "concession": concession.label(),
            "operator": op,
            "area": area,
            "mode": mode.label(),
            "forgone_fen": t.fen,
            "rides": t.rides,
        })).collect::<Vec<_>>(),
        "transfers": books.transfers.iter().map(|((op, area, mode), t)| serde_json::json!({
            "operator": op,
            "area": area,
            "mode": mode.label(),
            "discount_fen": t.fen,
            "rides": t.rides,
        })).collect::<Vec<_>>(),
        "ledger": without_cards(ledger).to_json(),
    })
}

/// What a reader needs to know before the differences: late taps, other fare tables.
fn reconcile_notes(r: &Reconciliation) -> String {
    let mut s = String::new();
    if r.adjustments > 0 {
        let _ = writeln!(
            s,
            "corrections: {} booked, {} fen net on the riders' side; {} not borne out by the journals",
            r.adjustments,
            r.adjustments_fen,
            r.adjustment_problems.len()
        );
        for problem in &r.adjustment_problems {
            let _ = writeln!(s, "  {problem}");
        }
    }
    if r.late_taps > 0 {
        let _ = writeln!(
            s,
            "note: {} taps reached settlement after their day closed; they are booked to a later day as late taps and compared here on the day they were tapped",
            r.late_taps
        );
    }
    if r.settled_fare_tables != r.journal_fare_tables {
        let list = |set: &std::collections::BTreeSet<String>| {
            set.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        let _ = if r.settled_fare_tables.is_empty() {
            writeln!(
                s,
                "note: the ledgers do not record which fare tables priced them (written before tapgate recorded it); this reconcile prices with {}",
                list(&r.journal_fare_tables)
            )
        } else {
            writeln!(
                s,
                "note: the ledgers were priced with fare tables {}; this reconcile prices with {}, so fares may differ (give it the settlers' tables with --fares)",
                list(&r.settled_fare_tables),
                list(&r.journal_fare_tables)
            )
        };
    }
    s
}

pub(crate) fn reconcile_text(r: &Reconciliation, show: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "reconcile: {} approved taps in the journals, {} settled; {} lost, {} duplicated; {} differences",
        r.journal_taps,
        r.settled_taps,
        r.lost,
        r.duplicated,
        r.differences.len()
    );
    s.push_str(&reconcile_notes(r));
    for d in r.differences.iter().take(show) {
        let what = match d.subject {
            Subject::Taps => "approved taps (rides = taps, yuan = day total)".to_string(),
            Subject::Cell {
                area,
                operator,
                mode,
            } => format!(
                "{} / {} / {}",
                area_name(area),
                operator_name(operator),
                mode.label()
            ),
            Subject::Card(card) => format!("card {}", card_name(card)),
            Subject::Clearing { payer, payee } => {
                format!("clearing {} → {}", payer.label(), payee.label())
            }
            Subject::Payable { issuer, operator } => {
                format!("payable {} → {}", issuer.label(), operator_name(operator))
            }
            Subject::Concession {
                concession,
                operator,
                area,
                mode,
            } => format!(
                "{} concession (yuan = forgone) {} / {} / {}",
                concession.label(),
                area_name(area),
                operator_name(operator),
                mode.label()
            ),
            Subject::Transfer {
                operator,
                area,
                mode,
            } => format!(
                "transfers (yuan = discount) {} / {} / {}",
                area_name(area),
                operator_name(operator),
                mode.label()
            ),
            Subject::Line {
                operator,
                area,
                mode,
                line,
            } => format!(
                "line {line} {} / {} / {}",
                area_name(area),
                operator_name(operator),
                mode.label()
            ),
            Subject::Vehicle { operator, gate } => {
                format!("gate {gate} of {}", operator_name(operator))
            }
        };
        let _ = writeln!(
            s,
            "  {} {what}: journals {} rides {} yuan, settled {} rides {} yuan",
            d.day,
            d.expected.rides,
            yuan(d.expected.fen),
            d.settled.rides,
            yuan(d.settled.fen)
        );
    }
    if r.differences.len() > show {
        let _ = writeln!(s, "  … and {} more", r.differences.len() - show);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_settle::ledger::DayLedger;

    #[test]
    fn a_report_leaves_the_per_card_books_out_and_the_ledger_names_cards_by_pseudonym() {
        let pseudonym = CardPseudonymizer::new([3; 16]).book_key(6_222_000_000_000_042);
        let mut day = DayLedger::default();
        day.cards.insert(pseudonym, Totals { fen: 200, rides: 1 });
        let mut ledger = Ledger::default();
        ledger
            .days
            .insert(chrono::NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(), day);
        let json = report_json(&ledger).to_string();
        assert!(!json.contains(&card_name(pseudonym)), "{json}");
        // The ledger itself keeps them, for reconcile, by pseudonym.
        let file = ledger.to_json().to_string();
        assert!(file.contains(&card_name(pseudonym)), "{file}");
        assert!(!file.contains("6222000000000042"), "{file}");
    }
}
