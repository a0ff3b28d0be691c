//! An operator's daily statement (`tapgate settle statement`): what its finance team books for
//! one settlement day, as CSV or JSON, from the settled ledgers.

use chrono::NaiveDate;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tapgate_protocol::registry::operator;
use tapgate_protocol::{Concession, Issuer, Mode};
use tapgate_settle::adjust::Adjustment;
use tapgate_settle::ledger::{DayLedger, Ledger, Totals};

/// One operator's books of one settlement day: the taps of the day, and the late taps of
/// closed days that reached settlement on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Statement {
    pub(crate) operator: u16,
    pub(crate) date: NaiveDate,
    pub(crate) fare_tables: Vec<String>,
    pub(crate) on_time: OperatorBooks,
    /// Late taps booked on this day, by the closed day they were tapped on.
    pub(crate) late: BTreeMap<NaiveDate, OperatorBooks>,
    /// Corrections of the operator's rides booked on this day.
    pub(crate) adjustments: Vec<Adjustment>,
}

/// One operator's share of one set of books.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OperatorBooks {
    /// Rides carried and fares earned, by area and mode.
    pub(crate) fares: BTreeMap<(u32, Mode), Totals>,
    /// What each card issuer owes the operator for those rides.
    pub(crate) receivable: BTreeMap<Issuer, Totals>,
    /// Concession rides and the fare they forgave (`fen`), by concession, area and mode.
    pub(crate) concessions: BTreeMap<(Concession, u32, Mode), Totals>,
    /// Transfer discounts the operator granted (`fen`), by area and mode.
    pub(crate) transfers: BTreeMap<(u32, Mode), Totals>,
    /// Rides and fares by area, mode and line (bus route, rail line).
    pub(crate) lines: BTreeMap<(u32, Mode, u16), Totals>,
    /// Flat rides and their fares by boarding gate (a bus's vehicle).
    pub(crate) vehicles: BTreeMap<u64, Totals>,
}

/// The CSV columns: every row is one line of one section, with the columns that do not apply
/// to its section left empty. `tapped` is the day the row's taps were made: the statement's
/// day, or an earlier, closed day for late taps.
const CSV_HEADER: &str =
    "section,date,tapped,operator,area,mode,line,gate,issuer,concession,rides,fen";

/// The columns of one CSV line that its section fills.
#[derive(Default)]
struct Row {
    area: Option<u32>,
    mode: Option<Mode>,
    line: Option<u16>,
    gate: Option<u64>,
    issuer: Option<Issuer>,
    concession: Option<Concession>,
}

impl OperatorBooks {
    fn of(day: &DayLedger, operator_id: u16) -> Self {
        let mut books = Self::default();
        let ours = |op: &u16| *op == operator_id;
        for ((area, op, mode), t) in &day.cells {
            if ours(op) {
                books.fares.entry((*area, *mode)).or_default().add(*t);
            }
        }
        for ((issuer, op), t) in &day.payables {
            if ours(op) {
                books.receivable.entry(*issuer).or_default().add(*t);
            }
        }
        for ((concession, op, area, mode), t) in &day.concessions {
            if ours(op) {
                let key = (*concession, *area, *mode);
                books.concessions.entry(key).or_default().add(*t);
            }
        }
        for ((op, area, mode), t) in &day.transfers {
            if ours(op) {
                books.transfers.entry((*area, *mode)).or_default().add(*t);
            }
        }
        for ((op, area, mode, line), t) in &day.lines {
            if ours(op) {
                let key = (*area, *mode, *line);
                books.lines.entry(key).or_default().add(*t);
            }
        }
        for ((op, gate), t) in &day.vehicles {
            if ours(op) {
                books.vehicles.entry(*gate).or_default().add(*t);
            }
        }
        books
    }

    fn total(&self) -> Totals {
        let mut total = Totals::default();
        self.fares.values().for_each(|t| total.add(*t));
        total
    }

    /// The rows of these books, each as (section, columns, totals), ending with their total.
    fn rows(&self) -> Vec<(&'static str, Row, Totals)> {
        let place = |area: u32, mode: Mode| Row {
            area: Some(area),
            mode: Some(mode),
            ..Row::default()
        };
        let mut rows = Vec::new();
        for ((area, mode), t) in &self.fares {
            rows.push(("fares", place(*area, *mode), *t));
        }
        for ((area, mode, line), t) in &self.lines {
            let by_line = Row {
                line: Some(*line),
                ..place(*area, *mode)
            };
            rows.push(("line", by_line, *t));
        }
        for (gate, t) in &self.vehicles {
            let by_gate = Row {
                gate: Some(*gate),
                ..Row::default()
            };
            rows.push(("vehicle", by_gate, *t));
        }
        for (issuer, t) in &self.receivable {
            let from = Row {
                issuer: Some(*issuer),
                ..Row::default()
            };
            rows.push(("receivable", from, *t));
        }
        for ((concession, area, mode), t) in &self.concessions {
            let forgone = Row {
                concession: Some(*concession),
                ..place(*area, *mode)
            };
            rows.push(("concession_forgone", forgone, *t));
        }
        for ((area, mode), t) in &self.transfers {
            rows.push(("transfer_discount", place(*area, *mode), *t));
        }
        rows.push(("total", Row::default(), self.total()));
        rows
    }

    fn to_json(&self) -> Value {
        json!({
            "fares": self.fares.iter().map(|((area, mode), t)| json!({
                "area": area, "mode": mode.label(), "rides": t.rides, "fen": t.fen,
            })).collect::<Vec<_>>(),
            "receivable": self.receivable.iter().map(|(issuer, t)| json!({
                "issuer": issuer.label(), "rides": t.rides, "fen": t.fen,
            })).collect::<Vec<_>>(),
            "concessions": self.concessions.iter().map(|((concession, area, mode), t)| json!({
                "concession": concession.label(), "area": area, "mode": mode.label(),
                "rides": t.rides, "forgone_fen": t.fen,
            })).collect::<Vec<_>>(),
            "transfers": self.transfers.iter().map(|((area, mode), t)| json!({
                "area": area, "mode": mode.label(), "rides": t.rides, "discount_fen": t.fen,
            })).collect::<Vec<_>>(),
            "lines": self.lines.iter().map(|((area, mode, line), t)| json!({
                "area": area, "mode": mode.label(), "line": line, "rides": t.rides, "fen": t.fen,
            })).collect::<Vec<_>>(),
            "vehicles": self.vehicles.iter().map(|(gate, t)| json!({
                "gate": gate, "rides": t.rides, "fen": t.fen,
            })).collect::<Vec<_>>(),
            "total": {"rides": self.total().rides, "fen": self.total().fen},
        })
    }
}

impl Statement {
    /// `operator`'s statement for `date` from `ledger`; all zeros when it carried nothing then.
    pub(crate) fn of(ledger: &Ledger, operator_id: u16, date: NaiveDate) -> anyhow::Result<Self> {
        if operator(operator_id).is_none() {
            anyhow::bail!("no operator {operator_id} (PROTOCOL.md section 3 lists them)");
        }
        let on_time = ledger
            .days
            .get(&date)
            .map(|day| OperatorBooks::of(day, operator_id))
            .unwrap_or_default();
        let late = ledger
            .late
            .iter()
            .filter(|((booked, _), _)| *booked == date)
            .map(|((_, tapped), day)| (*tapped, OperatorBooks::of(day, operator_id)))
            .collect();
        let adjustments = ledger
            .adjustments
            .iter()
            .filter(|a| a.operator == operator_id && a.booked == Some(date))
            .cloned()
            .collect();
        Ok(Statement {
            operator: operator_id,
            date,
            fare_tables: ledger.fare_tables.iter().cloned().collect(),
            on_time,
            late,
            adjustments,
        })
    }

    /// Everything booked on the day: its own taps, the late ones, and the corrections (fen can
    /// go below zero when refunds outweigh the fares).
    fn day_total(&self) -> (u64, i64) {
        let mut total = self.on_time.total();
        self.late.values().for_each(|b| total.add(b.total()));
        let corrected: i64 = self.adjustments.iter().map(|a| a.fen).sum();
        (
            total.rides,
            i64::try_from(total.fen).unwrap_or(i64::MAX) + corrected,
        )
    }

    /// The day's own taps, then each closed day's late taps, then `day_total`.
    pub(crate) fn to_csv(&self) -> String {
        let mut out = format!("{CSV_HEADER}\n");
        let groups = std::iter::once((self.date, &self.on_time))
            .chain(self.late.iter().map(|(tapped, books)| (*tapped, books)));
        let mut row =
            |section: &str, tapped: Option<NaiveDate>, line: Row, rides: u64, fen: i64| {
                let text = |v: Option<String>| v.unwrap_or_default();
                out.push_str(&format!(
                    "{section},{},{},{},{},{},{},{},{},{},{},{}\n",
                    self.date,
                    text(tapped.map(|d| d.to_string())),
                    self.operator,
                    text(line.area.map(|a| a.to_string())),
                    line.mode.map(Mode::label).unwrap_or_default(),
                    text(line.line.map(|l| l.to_string())),
                    text(line.gate.map(|g| g.to_string())),
                    line.issuer.map(Issuer::label).unwrap_or_default(),
                    line.concession.map(Concession::label).unwrap_or_default(),
                    rides,
                    fen
                ));
            };
        for (tapped, books) in groups {
            for (section, line, t) in books.rows() {
                let fen = i64::try_from(t.fen).unwrap_or(i64::MAX);
                row(section, Some(tapped), line, t.rides, fen);
            }
        }
        for a in &self.adjustments {
            let corrected = Row {
                area: Some(a.area),
                mode: Mode::from_label(&a.mode),
                gate: Some(a.terminal),
                issuer: Issuer::from_label(&a.issuer),
                ..Row::default()
            };
            let section = format!("adjustment_{}", a.correction.label());
            row(&section, Some(a.tapped), corrected, 1, a.fen);
        }
        let (rides, fen) = self.day_total();
        row("day_total", None, Row::default(), rides, fen);
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        let named = operator(self.operator);
        let total = self.day_total();
        json!({
            "operator": {
                "id": self.operator,
                "name_zh": named.map(|o| o.name_zh),
                "name_en": named.map(|o| o.name_en),
            },
            "date": self.date.to_string(),
            "fare_tables": self.fare_tables,
            "on_time": self.on_time.to_json(),
            "late": self.late.iter().map(|(tapped, books)| json!({
                "tapped": tapped.to_string(), "books": books.to_json(),
            })).collect::<Vec<_>>(),
            "adjustments": self.adjustments,
            "total": {"rides": total.0, "fen": total.1},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_settle::ledger::DayLedger;

    fn date() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 29).unwrap()
    }

    fn ledger() -> Ledger {
        let t = |rides, fen| Totals { fen, rides };
        let mut day = DayLedger::default();
        day.cells.insert((500103, 2, Mode::Metro), t(3, 1000));
        day.cells.insert((500105, 2, Mode::Metro), t(1, 300));
        day.cells.insert((500103, 1, Mode::Bus), t(5, 1000));
        day.payables.insert((Issuer::ChongqingSsc, 2), t(3, 900));
        day.payables
            .insert((Issuer::SichuanTianfuTong, 2), t(1, 400));
        day.payables.insert((Issuer::ChongqingSsc, 1), t(5, 1000));
        day.concessions
            .insert((Concession::Elder, 2, 500103, Mode::Metro), t(1, 400));
        day.transfers.insert((2, 500105, Mode::Metro), t(1, 200));
        day.lines.insert((2, 500103, Mode::Metro, 2), t(3, 1000));
        day.lines.insert((2, 500105, Mode::Metro, 3), t(1, 300));
        day.lines.insert((1, 500103, Mode::Bus, 871), t(5, 1000));
        day.vehicles.insert((1, 100_000_007), t(5, 1000));
        let mut ledger = Ledger::default();
        ledger.days.insert(date(), day);
        ledger
    }

    #[test]
    fn a_statement_holds_only_its_operators_books_for_its_day() {
        let s = Statement::of(&ledger(), 2, date()).unwrap();
        let csv = s.to_csv();
        assert_eq!(
            csv.lines().collect::<Vec<_>>(),
            [
                CSV_HEADER,
                "fares,2026-11-29,2026-11-29,2,500103,metro,,,,,3,1000",
                "fares,2026-11-29,2026-11-29,2,500105,metro,,,,,1,300",
                "line,2026-11-29,2026-11-29,2,500103,metro,2,,,,3,1000",
                "line,2026-11-29,2026-11-29,2,500105,metro,3,,,,1,300",
                "receivable,2026-11-29,2026-11-29,2,,,,,cq_ssc,,3,900",
                "receivable,2026-11-29,2026-11-29,2,,,,,sc_tianfutong,,1,400",
                "concession_forgone,2026-11-29,2026-11-29,2,500103,metro,,,,elder,1,400",
                "transfer_discount,2026-11-29,2026-11-29,2,500105,metro,,,,,1,200",
                "total,2026-11-29,2026-11-29,2,,,,,,,4,1300",
                "day_total,2026-11-29,,2,,,,,,,4,1300",
            ]
        );
        let json = s.to_json();
        assert_eq!(json["operator"]["name_en"], "Chongqing Rail Transit");
        assert_eq!(json["total"]["fen"], 1300);
        assert_eq!(json["on_time"]["concessions"][0]["forgone_fen"], 400);
    }

    #[test]
    fn late_taps_appear_on_the_day_they_were_booked_naming_their_own_day() {
        let mut ledger = ledger();
        let next_day = date().succ_opt().unwrap();
        let mut late = DayLedger::default();
        late.cells
            .insert((500103, 2, Mode::Metro), Totals { fen: 500, rides: 1 });
        ledger.late.insert((next_day, date()), late);
        let csv = Statement::of(&ledger, 2, next_day).unwrap().to_csv();
        assert!(
            csv.contains("\nfares,2026-11-30,2026-11-29,2,500103,metro,,,,,1,500\n"),
            "{csv}"
        );
        assert!(
            csv.ends_with("\nday_total,2026-11-30,,2,,,,,,,1,500\n"),
            "{csv}"
        );
        // The closed day's own statement is as it was.
        let closed = Statement::of(&ledger, 2, date()).unwrap().to_csv();
        assert!(
            closed.ends_with("\nday_total,2026-11-29,,2,,,,,,,4,1300\n"),
            "{closed}"
        );
    }

    #[test]
    fn an_idle_day_is_all_zeros_and_an_unknown_operator_is_refused() {
        let next_day = date().succ_opt().unwrap();
        let s = Statement::of(&ledger(), 2, next_day).unwrap();
        assert!(s.to_csv().ends_with("day_total,2026-11-30,,2,,,,,,,0,0\n"));
        let bus = Statement::of(&ledger(), 1, date()).unwrap().to_csv();
        assert!(
            bus.contains("\nvehicle,2026-11-29,2026-11-29,1,,,,100000007,,,5,1000\n"),
            "{bus}"
        );
        let e = Statement::of(&ledger(), 99, date()).unwrap_err();
        assert!(e.to_string().contains("no operator 99"), "{e}");
    }
}
