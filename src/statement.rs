//! An operator's daily statement (`tapgate settle statement`): what its finance team books for
//! one settlement day, as CSV or JSON, from the settled ledgers.

use chrono::NaiveDate;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tapgate_protocol::registry::operator;
use tapgate_protocol::{Concession, Issuer, Mode};
use tapgate_settle::ledger::{Ledger, Totals};

/// One operator's books for one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Statement {
    pub(crate) operator: u16,
    pub(crate) date: NaiveDate,
    pub(crate) fare_tables: Vec<String>,
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
/// to its section left empty.
const CSV_HEADER: &str = "section,date,operator,area,mode,line,gate,issuer,concession,rides,fen";

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

impl Statement {
    /// `operator`'s statement for `date` from `ledger`; all zeros when it carried nothing then.
    pub(crate) fn of(ledger: &Ledger, operator_id: u16, date: NaiveDate) -> anyhow::Result<Self> {
        if operator(operator_id).is_none() {
            anyhow::bail!("no operator {operator_id} (PROTOCOL.md section 3 lists them)");
        }
        let mut statement = Statement {
            operator: operator_id,
            date,
            fare_tables: ledger.fare_tables.iter().cloned().collect(),
            fares: BTreeMap::new(),
            receivable: BTreeMap::new(),
            concessions: BTreeMap::new(),
            transfers: BTreeMap::new(),
            lines: BTreeMap::new(),
            vehicles: BTreeMap::new(),
        };
        let Some(day) = ledger.days.get(&date) else {
            return Ok(statement);
        };
        for ((area, op, mode), t) in &day.cells {
            if *op == operator_id {
                statement.fares.entry((*area, *mode)).or_default().add(*t);
            }
        }
        for ((issuer, op), t) in &day.payables {
            if *op == operator_id {
                statement.receivable.entry(*issuer).or_default().add(*t);
            }
        }
        for ((concession, op, area, mode), t) in &day.concessions {
            if *op == operator_id {
                let key = (*concession, *area, *mode);
                statement.concessions.entry(key).or_default().add(*t);
            }
        }
        for ((op, area, mode), t) in &day.transfers {
            if *op == operator_id {
                statement
                    .transfers
                    .entry((*area, *mode))
                    .or_default()
                    .add(*t);
            }
        }
        for ((op, area, mode, line), t) in &day.lines {
            if *op == operator_id {
                let key = (*area, *mode, *line);
                statement.lines.entry(key).or_default().add(*t);
            }
        }
        for ((op, gate), t) in &day.vehicles {
            if *op == operator_id {
                statement.vehicles.entry(*gate).or_default().add(*t);
            }
        }
        Ok(statement)
    }

    fn total(map: impl IntoIterator<Item = Totals>) -> Totals {
        let mut total = Totals::default();
        map.into_iter().for_each(|t| total.add(t));
        total
    }

    pub(crate) fn to_csv(&self) -> String {
        let mut out = format!("{CSV_HEADER}\n");
        let mut row = |section: &str, line: Row, t: &Totals| {
            let text = |v: Option<String>| v.unwrap_or_default();
            out.push_str(&format!(
                "{section},{},{},{},{},{},{},{},{},{},{}\n",
                self.date,
                self.operator,
                text(line.area.map(|a| a.to_string())),
                line.mode.map(Mode::label).unwrap_or_default(),
                text(line.line.map(|l| l.to_string())),
                text(line.gate.map(|g| g.to_string())),
                line.issuer.map(Issuer::label).unwrap_or_default(),
                line.concession.map(Concession::label).unwrap_or_default(),
                t.rides,
                t.fen
            ));
        };
        let place = |area: u32, mode: Mode| Row {
            area: Some(area),
            mode: Some(mode),
            ..Row::default()
        };
        for ((area, mode), t) in &self.fares {
            row("fares", place(*area, *mode), t);
        }
        for ((area, mode, line), t) in &self.lines {
            let by_line = Row {
                line: Some(*line),
                ..place(*area, *mode)
            };
            row("line", by_line, t);
        }
        for (gate, t) in &self.vehicles {
            let by_gate = Row {
                gate: Some(*gate),
                ..Row::default()
            };
            row("vehicle", by_gate, t);
        }
        for (issuer, t) in &self.receivable {
            let from = Row {
                issuer: Some(*issuer),
                ..Row::default()
            };
            row("receivable", from, t);
        }
        for ((concession, area, mode), t) in &self.concessions {
            let forgone = Row {
                concession: Some(*concession),
                ..place(*area, *mode)
            };
            row("concession_forgone", forgone, t);
        }
        for ((area, mode), t) in &self.transfers {
            row("transfer_discount", place(*area, *mode), t);
        }
        let total = Self::total(self.fares.values().copied());
        row("total", Row::default(), &total);
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        let named = operator(self.operator);
        json!({
            "operator": {
                "id": self.operator,
                "name_zh": named.map(|o| o.name_zh),
                "name_en": named.map(|o| o.name_en),
            },
            "date": self.date.to_string(),
            "fare_tables": self.fare_tables,
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
            "total": {
                "rides": Self::total(self.fares.values().copied()).rides,
                "fen": Self::total(self.fares.values().copied()).fen,
            },
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
                "fares,2026-11-29,2,500103,metro,,,,,3,1000",
                "fares,2026-11-29,2,500105,metro,,,,,1,300",
                "line,2026-11-29,2,500103,metro,2,,,,3,1000",
                "line,2026-11-29,2,500105,metro,3,,,,1,300",
                "receivable,2026-11-29,2,,,,,cq_ssc,,3,900",
                "receivable,2026-11-29,2,,,,,sc_tianfutong,,1,400",
                "concession_forgone,2026-11-29,2,500103,metro,,,,elder,1,400",
                "transfer_discount,2026-11-29,2,500105,metro,,,,,1,200",
                "total,2026-11-29,2,,,,,,,4,1300",
            ]
        );
        let json = s.to_json();
        assert_eq!(json["operator"]["name_en"], "Chongqing Rail Transit");
        assert_eq!(json["total"]["fen"], 1300);
        assert_eq!(json["concessions"][0]["forgone_fen"], 400);
    }

    #[test]
    fn an_idle_day_is_all_zeros_and_an_unknown_operator_is_refused() {
        let next_day = date().succ_opt().unwrap();
        let s = Statement::of(&ledger(), 2, next_day).unwrap();
        assert!(s.to_csv().ends_with("total,2026-11-30,2,,,,,,,0,0\n"));
        let bus = Statement::of(&ledger(), 1, date()).unwrap().to_csv();
        assert!(
            bus.contains("\nvehicle,2026-11-29,1,,,,100000007,,,5,1000\n"),
            "{bus}"
        );
        let e = Statement::of(&ledger(), 99, date()).unwrap_err();
        assert!(e.to_string().contains("no operator 99"), "{e}");
    }
}
