//! Corrections to what settlement charged (`tapgate settle adjust`): the refund of a maximum
//! fare, the completion of a trip whose exit was never tapped, and a service desk's correction.
//!
//! A correction is priced here, from the tap it corrects and the card's taps in the journals,
//! by a pure function; the same function checks it again in `settle reconcile`. It names its
//! tap, who asked for it, when and why; it carries no card number (the tap names the card).
//! It travels through the card's partition stream like a tap, so one settler books it exactly
//! once, on the open settlement day, and keeps it in the partition's audit stream.

use crate::fares::{ChargeKind, FareTables, MAX_FEN, completed_trip_fare};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use tapgate_journal::JournalRecord;
use tapgate_protocol::TapKind;

/// What a correction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Correction {
    /// Gives back a maximum fare charged for a trip missing its exit or its entry.
    RefundMaxFare,
    /// Charges a trip missing its exit as if its exit had been tapped at this stop: the
    /// maximum it was charged less the trip's fare is given back.
    CompleteTrip { exit_line: u16, exit_stop: u16 },
    /// A service desk's correction of any amount (negative gives money back to the rider).
    Desk { fen: i64 },
}

impl Correction {
    pub fn label(&self) -> &'static str {
        match self {
            Correction::RefundMaxFare => "refund_max_fare",
            Correction::CompleteTrip { .. } => "complete_trip",
            Correction::Desk { .. } => "desk",
        }
    }

    /// Whether the correction settles the tap's maximum fare, which can be done once per tap.
    pub fn settles_max_fare(&self) -> bool {
        !matches!(self, Correction::Desk { .. })
    }
}

/// A correction as booked: priced, placed and audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustment {
    pub id: String,
    /// The tap corrected: its gate and the gate's sequence number.
    pub terminal: u64,
    pub sequence: u64,
    pub correction: Correction,
    /// The rider's side: negative gives money back.
    pub fen: i64,
    /// Whose money it is: the card's issuer (label) and the operator, area and mode (label) of
    /// the ride corrected.
    pub issuer: String,
    pub operator: u16,
    pub area: u32,
    pub mode: String,
    /// The settlement day of the corrected tap.
    pub tapped: NaiveDate,
    pub by: String,
    pub why: String,
    /// When it was asked for (Unix milliseconds).
    pub at_ms: u64,
    /// The open day it was booked on, set by the settler that booked it.
    #[serde(default)]
    pub booked: Option<NaiveDate>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdjustError {
    #[error("tap {0} is not an approved tap in the journals given")]
    NoSuchTap(String),
    #[error(
        "tap {0} was not charged a maximum fare: it is neither an exit without an entry nor an entry whose exit was missing"
    )]
    NoMaxFare(String),
    #[error(
        "the trip entered with tap {0} has no charge yet: its exit can still come, and the card's next entry charges it if not"
    )]
    TripStillOpen(String),
    #[error("tap {0} is not an entry into a paid area, so there is no trip to complete")]
    NotAnEntry(String),
    #[error(
        "a desk correction of {0} fen: it must be non-zero and at most {MAX_FEN} fen either way"
    )]
    DeskAmount(i64),
    #[error("who asked (--by) and why (--why) are both required, each under 200 characters")]
    Unaudited,
}

/// The tap's identity as commands and logs write it: `GATE-SEQUENCE`.
pub fn tap_name(terminal: u64, sequence: u64) -> String {
    format!("{terminal}-{sequence}")
}

/// The charge of a trip's maximum fare that `tap` stands for, found in the card's priced
/// taps: on an exit without an entry, its own; on an entry, the missing-exit charge the card's
/// next entry revealed. Returns the charge's place and fare.
fn max_fare_of(
    tap: &JournalRecord,
    history: &[(JournalRecord, Vec<crate::fares::Charge>)],
) -> Result<crate::fares::Charge, AdjustError> {
    let name = tap_name(tap.terminal_id, tap.tap.sequence);
    let same =
        |r: &JournalRecord| r.terminal_id == tap.terminal_id && r.tap.sequence == tap.tap.sequence;
    let at = history
        .iter()
        .position(|(r, _)| same(r))
        .ok_or_else(|| AdjustError::NoSuchTap(name.clone()))?;
    let (record, charges) = &history[at];
    if let Some(c) = charges
        .iter()
        .find(|c| c.kind == ChargeKind::ExitWithoutEntry)
    {
        return Ok(*c);
    }
    if record.tap.kind != TapKind::Entry || !record.mode.needs_exit_tap() {
        return Err(AdjustError::NoMaxFare(name));
    }
    // The card's next tap in a paid area says what became of this trip.
    let next = history[at + 1..]
        .iter()
        .find(|(r, _)| r.mode.needs_exit_tap() && r.tap.kind != TapKind::Flat);
    match next {
        None => Err(AdjustError::TripStillOpen(name)),
        Some((r, charges)) if r.tap.kind == TapKind::Entry => charges
            .iter()
            .find(|c| c.kind == ChargeKind::MissingExit)
            .copied()
            .ok_or(AdjustError::NoMaxFare(name)),
        Some(_) => Err(AdjustError::NoMaxFare(name)),
    }
}

/// Prices a correction of `tap` from the card's priced taps (`history`, from
/// [`crate::ledger::card_histories`]) and the fare tables: the amount (rider's side) and the
/// place it is booked to (issuer, operator, area, mode).
pub fn price(
    correction: Correction,
    tap: &JournalRecord,
    history: &[(JournalRecord, Vec<crate::fares::Charge>)],
    tables: &FareTables,
) -> Result<(i64, u16, u32, tapgate_protocol::Mode), AdjustError> {
    let name = tap_name(tap.terminal_id, tap.tap.sequence);
    match correction {
        Correction::RefundMaxFare => {
            let c = max_fare_of(tap, history)?;
            Ok((-i64::from(c.fare_fen), c.operator, c.area.0, c.mode))
        }
        Correction::CompleteTrip {
            exit_line,
            exit_stop,
        } => {
            let fare = completed_trip_fare(tap, exit_line, exit_stop, tables)
                .ok_or(AdjustError::NotAnEntry(name))?;
            let c = max_fare_of(tap, history)?;
            let back = i64::from(c.fare_fen) - i64::from(fare.min(c.fare_fen));
            Ok((-back, c.operator, c.area.0, c.mode))
        }
        Correction::Desk { fen } => {
            if fen == 0 || fen.unsigned_abs() > u64::from(MAX_FEN) {
                return Err(AdjustError::DeskAmount(fen));
            }
            if !history.iter().any(|(r, _)| {
                r.terminal_id == tap.terminal_id && r.tap.sequence == tap.tap.sequence
            }) {
                return Err(AdjustError::NoSuchTap(name));
            }
            Ok((fen, tap.operator, tap.area, tap.mode))
        }
    }
}

/// Checks the audit fields a correction must carry.
pub fn audited(by: &str, why: &str) -> Result<(), AdjustError> {
    let fine = |s: &str| !s.trim().is_empty() && s.chars().count() < 200;
    if fine(by) && fine(why) {
        Ok(())
    } else {
        Err(AdjustError::Unaudited)
    }
}

/// What is wrong with booked corrections, checked against the journals as `settle reconcile`
/// does: each must name an approved tap, be priced as the journals price it now, and a tap's
/// maximum fare may be settled once.
pub fn check(
    adjustments: &[Adjustment],
    dirs: &[&std::path::Path],
    tables: &FareTables,
) -> std::io::Result<Vec<String>> {
    let ids = adjustments
        .iter()
        .map(|a| (a.terminal, a.sequence))
        .collect();
    let taps = crate::ledger::find_taps(dirs, &ids)?;
    let cards = taps.values().map(|t| t.tap.card_id).collect();
    let histories = crate::ledger::card_histories(dirs, &cards, tables)?;
    let mut problems = Vec::new();
    let mut settled_max = std::collections::BTreeSet::new();
    for a in adjustments {
        let name = tap_name(a.terminal, a.sequence);
        if a.correction.settles_max_fare() && !settled_max.insert(name.clone()) {
            problems.push(format!(
                "correction {}: tap {name}'s maximum fare was settled by another correction too",
                a.id
            ));
        }
        let Some(tap) = taps.get(&(a.terminal, a.sequence)) else {
            problems.push(format!(
                "correction {}: tap {name} is in none of the journals given",
                a.id
            ));
            continue;
        };
        let history = histories
            .get(&tap.tap.card_id)
            .map_or(&[][..], Vec::as_slice);
        match price(a.correction, tap, history, tables) {
            Ok((fen, operator, area, mode))
                if (fen, operator, area, mode.label()) == (a.fen, a.operator, a.area, &*a.mode) => {
            }
            Ok((fen, ..)) => problems.push(format!(
                "correction {}: booked {} fen, the journals price it {fen} fen",
                a.id, a.fen
            )),
            Err(e) => problems.push(format!("correction {}: {e}", a.id)),
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fares::{RiderState, settle};
    use tapgate_protocol::{Concession, Mode};

    const T0: u64 = 1_795_939_200_000;
    const MIN: u64 = 60_000;

    fn metro(sequence: u64, kind: TapKind, stop: u16, at: u64) -> JournalRecord {
        let mut r =
            crate::fares::tests::record(Mode::Metro, kind, 500103, 2, stop, at, Concession::None);
        (r.terminal_id, r.tap.sequence, r.result.sequence) = (9, sequence, sequence);
        r
    }

    fn priced(records: &[JournalRecord]) -> Vec<(JournalRecord, Vec<crate::fares::Charge>)> {
        let tables = FareTables::embedded_default();
        let mut rider = RiderState::default();
        records
            .iter()
            .map(|r| (*r, settle(r, &mut rider, &tables)))
            .collect()
    }

    #[test]
    fn an_entry_whose_exit_went_missing_is_refunded_or_completed() {
        let tables = FareTables::embedded_default();
        let entry = metro(1, TapKind::Entry, 10, T0);
        let next = metro(2, TapKind::Entry, 12, T0 + 60 * MIN);
        let history = priced(&[entry, next]);
        let max = i64::from(tables.metro.max);
        let (fen, operator, area, mode) =
            price(Correction::RefundMaxFare, &entry, &history, &tables).unwrap();
        assert_eq!((fen, operator, area, mode), (-max, 2, 500103, Mode::Metro));
        // Two stops on the same line is the first band: the rest of the maximum comes back.
        let complete = Correction::CompleteTrip {
            exit_line: 2,
            exit_stop: 12,
        };
        let (fen, ..) = price(complete, &entry, &history, &tables).unwrap();
        let first_band = i64::from(tables.metro.bands[0].1);
        assert_eq!(fen, -(max - first_band));
    }

    #[test]
    fn a_trip_that_was_completed_or_is_still_open_has_no_maximum_to_refund() {
        let tables = FareTables::embedded_default();
        let entry = metro(1, TapKind::Entry, 10, T0);
        let exit = metro(2, TapKind::Exit, 14, T0 + 20 * MIN);
        let completed = priced(&[entry, exit]);
        assert_eq!(
            price(Correction::RefundMaxFare, &entry, &completed, &tables),
            Err(AdjustError::NoMaxFare("9-1".into()))
        );
        let open = priced(&[entry]);
        assert_eq!(
            price(Correction::RefundMaxFare, &entry, &open, &tables),
            Err(AdjustError::TripStillOpen("9-1".into()))
        );
        // An exit without an entry carries its own maximum.
        let orphan = metro(3, TapKind::Exit, 14, T0);
        let (fen, ..) = price(
            Correction::RefundMaxFare,
            &orphan,
            &priced(&[orphan]),
            &tables,
        )
        .unwrap();
        assert_eq!(fen, -i64::from(tables.metro.max));
    }

    #[test]
    fn a_desk_correction_needs_an_amount_a_known_tap_and_an_audit_trail() {
        let tables = FareTables::embedded_default();
        let entry = metro(1, TapKind::Entry, 10, T0);
        let history = priced(&[entry]);
        assert_eq!(
            price(Correction::Desk { fen: 150 }, &entry, &history, &tables).map(|p| p.0),
            Ok(150)
        );
        assert_eq!(
            price(Correction::Desk { fen: 0 }, &entry, &history, &tables),
            Err(AdjustError::DeskAmount(0))
        );
        let stranger = metro(7, TapKind::Entry, 10, T0);
        assert!(matches!(
            price(Correction::Desk { fen: -100 }, &stranger, &history, &tables),
            Err(AdjustError::NoSuchTap(_))
        ));
        assert!(audited("desk 3, 解放碑", "gate 12 out of order").is_ok());
        assert_eq!(audited(" ", "why"), Err(AdjustError::Unaudited));
    }
}
