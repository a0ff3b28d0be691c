//! Settling a journal offline: every approved tap through the fare engine, in each card's tap
//! order, into totals per area × operator × mode and the clearing balance between regions.
//! The streaming pipeline through Redis will apply the same engine record by record.

use crate::fares::{FareTables, RiderState, settle};
use crate::journal::{JournalRecord, list_segments, read_segment};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tapgate_protocol::registry::operator;
use tapgate_protocol::{IssuerRegion, Mode, Outcome};

/// Money and rides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub fen: u64,
    pub rides: u64,
}

/// The result of settling a journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub approved_taps: u64,
    pub charges: u64,
    pub by_area_operator_mode: BTreeMap<(u32, u16, Mode), Totals>,
    /// What cards of the first region owe operators of the second (only across regions).
    pub clearing: BTreeMap<(IssuerRegion, IssuerRegion), u64>,
    /// Records that failed their checksum and were skipped (only at a torn end in practice).
    pub damaged_segments: u64,
}

impl Ledger {
    pub fn total(&self) -> Totals {
        self.by_area_operator_mode
            .values()
            .fold(Totals::default(), |a, t| Totals {
                fen: a.fen + t.fen,
                rides: a.rides + t.rides,
            })
    }

    fn add(
        &mut self,
        record: &JournalRecord,
        riders: &mut HashMap<u64, RiderState>,
        tables: &FareTables,
    ) {
        if record.result.outcome != Outcome::Approve {
            return;
        }
        self.approved_taps += 1;
        let rider = riders.entry(record.tap.card_id).or_default();
        for charge in settle(record, rider, tables) {
            self.charges += 1;
            let totals = self
                .by_area_operator_mode
                .entry((charge.area.0, charge.operator, charge.mode))
                .or_default();
            totals.fen += u64::from(charge.fare_fen);
            totals.rides += 1;
            let payer = record.tap.issuer.region();
            let payee = operator(charge.operator).map_or(IssuerRegion::Chongqing, |o| o.region);
            if payer != payee {
                *self.clearing.entry((payer, payee)).or_default() += u64::from(charge.fare_fen);
            }
        }
    }
}

/// Settles every record of the journal in `dir`. Records are taken in journal order, which is
/// each terminal's decision order; a card's taps at different gates are ordered by the gateway
/// time they were decided at, so records are sorted by it before settling.
pub fn settle_journal(dir: &Path, tables: &FareTables) -> std::io::Result<Ledger> {
    let mut records = Vec::new();
    let mut ledger = Ledger::default();
    for segment in list_segments(dir)? {
        let (_, clean) = read_segment(&segment, |r| records.push(r))?;
        if !clean {
            ledger.damaged_segments += 1;
        }
    }
    records.sort_by_key(|r| r.server_time_ms);
    let mut riders = HashMap::new();
    for record in &records {
        ledger.add(record, &mut riders, tables);
    }
    Ok(ledger)
}
