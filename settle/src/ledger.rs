//! The ledgers settlement produces, in one shape whether they were computed offline from
//! journals or read back from Redis, so that the two can be compared entry by entry.
//!
//! Everything a tap costs is booked on the settlement day of the tap (its gateway time, by the
//! fare tables' cut-off; [`crate::day`]), including a missing-exit charge the tap revealed. A
//! tap whose day had closed before it reached settlement is booked to the open day instead, in
//! books of their own that name the day it was tapped ([`Ledger::late`]).

use super::recent::RecentTaps;
use crate::adjust::Adjustment;
use crate::fares::{Charge, FareTables, RiderState, settle};
use crate::order::{PricingOrder, pricing_order};
use chrono::NaiveDate;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use tapgate_journal::{JournalRecord, list_segments, read_segment};
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_protocol::registry::operator;
use tapgate_protocol::{Concession, Issuer, IssuerRegion, Mode, Outcome};

/// Money (fen) and a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub fen: u64,
    pub rides: u64,
}

impl Totals {
    pub fn add(&mut self, other: Totals) {
        self.fen += other.fen;
        self.rides += other.rides;
    }
}

/// One day's books.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayLedger {
    /// Approved taps settled (a tap may carry no charge, or two).
    pub taps: u64,
    /// Rides and fares per area × operator × mode.
    pub cells: BTreeMap<(u32, u16, Mode), Totals>,
    /// Rides and fares per card, by the card's keyed pseudonym ([`card_name`]), never its
    /// number: a hash map, since a busy day holds a few hundred thousand cards and settlement
    /// adds into it for every charge (sorted where it is written out).
    pub cards: HashMap<u64, Totals>,
    /// What cards of the first region owe operators of the second, only across regions.
    pub clearing: BTreeMap<(IssuerRegion, IssuerRegion), Totals>,
    /// What each card issuer owes each operator, for every ride: the stored value a rider
    /// spent sits with the card's issuer until it pays the operator that carried the ride.
    pub payables: BTreeMap<(Issuer, u16), Totals>,
    /// Concession rides and the fare the concession forgave (`fen`), by concession × operator
    /// × area × mode: what an operator claims a subsidy for.
    pub concessions: BTreeMap<(Concession, u16, u32, Mode), Totals>,
    /// Transfer discounts granted (`fen`) and the rides they went to, by the operator, area
    /// and mode of the discounted ride: the revenue an operator gave up to the transfer rule.
    pub transfers: BTreeMap<(u16, u32, Mode), Totals>,
    /// Rides and fares by operator × area × mode × line (bus route, rail line).
    pub lines: BTreeMap<(u16, u32, Mode, u16), Totals>,
    /// Rides and fares of flat rides by operator × boarding gate: a bus's vehicle, a pier,
    /// a cableway station.
    pub vehicles: BTreeMap<(u16, u64), Totals>,
}

impl DayLedger {
    /// Adds another set of books into these.
    pub fn add(&mut self, other: &DayLedger) {
        self.taps += other.taps;
        for (k, t) in &other.cells {
            self.cells.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.cards {
            self.cards.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.clearing {
            self.clearing.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.payables {
            self.payables.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.concessions {
            self.concessions.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.transfers {
            self.transfers.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.lines {
            self.lines.entry(*k).or_default().add(*t);
        }
        for (k, t) in &other.vehicles {
            self.vehicles.entry(*k).or_default().add(*t);
        }
    }

    pub fn total(&self) -> Totals {
        let mut total = Totals::default();
        self.cells.values().for_each(|t| total.add(*t));
        total
    }
}

/// How a card's pseudonym is written in the books: `p` and 16 hex digits, which no card number
/// looks like.
pub fn card_name(pseudonym: u64) -> String {
    format!("p{pseudonym:016x}")
}

pub fn parse_card_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('p').filter(|d| d.len() == 16)?;
    u64::from_str_radix(digits, 16).ok()
}

/// Where a tap's charges are booked: on the settlement day it was tapped, or, when that day had
/// closed before the tap reached settlement, on the open day it reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Booking {
    pub tapped: NaiveDate,
    pub booked: NaiveDate,
}

impl Booking {
    pub fn on_time(day: NaiveDate) -> Self {
        Self {
            tapped: day,
            booked: day,
        }
    }

    pub fn is_late(&self) -> bool {
        self.booked != self.tapped
    }
}

/// Books by day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Taps booked on the settlement day they were tapped.
    pub days: BTreeMap<NaiveDate, DayLedger>,
    /// Late taps by (day booked on, day tapped): a closed day's books never change, so a tap
    /// arriving after its day closed is booked to the open day, and named by its own day.
    pub late: BTreeMap<(NaiveDate, NaiveDate), DayLedger>,
    /// Corrections booked, each on the open day it reached settlement ([`Adjustment::booked`]).
    pub adjustments: Vec<Adjustment>,
    /// Digests of the fare tables that priced these books ([`FareTables::digest`]): one when
    /// every settler used the same tables.
    pub fare_tables: BTreeSet<String>,
}

/// Who owes whom for a charge between regions: the card's issuing region pays the operator's
/// region. `None` for an operator outside the regions (the national railway), which the
/// payables alone settle.
pub fn clearing_parties(
    record: &JournalRecord,
    charge: &Charge,
) -> Option<(IssuerRegion, IssuerRegion)> {
    let payer = record.tap.issuer.region();
    let payee = operator(charge.operator).map_or(Some(IssuerRegion::Chongqing), |o| o.region)?;
    Some((payer, payee))
}

impl Ledger {
    fn books_mut(&mut self, booking: Booking) -> &mut DayLedger {
        if booking.is_late() {
            self.late
                .entry((booking.booked, booking.tapped))
                .or_default()
        } else {
            self.days.entry(booking.booked).or_default()
        }
    }

    /// Books one approved tap and the charges the fare engine made for it, naming its card by
    /// the pseudonym `cards` gives it.
    pub fn book(
        &mut self,
        booking: Booking,
        record: &JournalRecord,
        charges: &[Charge],
        cards: &CardPseudonymizer,
    ) {
        let card = cards.book_key(record.tap.card_id);
        let day = self.books_mut(booking);
        day.taps += 1;
        for charge in charges {
            let ride = Totals {
                fen: u64::from(charge.fare_fen),
                rides: 1,
            };
            day.cells
                .entry((charge.area.0, charge.operator, charge.mode))
                .or_default()
                .add(ride);
            day.cards.entry(card).or_default().add(ride);
            if let Some((payer, payee)) = clearing_parties(record, charge)
                && payer != payee
            {
                day.clearing.entry((payer, payee)).or_default().add(ride);
            }
            day.payables
                .entry((record.tap.issuer, charge.operator))
                .or_default()
                .add(ride);
            let place = (charge.operator, charge.area.0, charge.mode);
            if charge.concession != Concession::None {
                day.concessions
                    .entry((charge.concession, place.0, place.1, place.2))
                    .or_default()
                    .add(Totals {
                        fen: u64::from(charge.forgone_fen),
                        rides: 1,
                    });
            }
            if charge.transfer_discount > 0 {
                day.transfers.entry(place).or_default().add(Totals {
                    fen: u64::from(charge.transfer_discount),
                    rides: 1,
                });
            }
            day.lines
                .entry((place.0, place.1, place.2, charge.line))
                .or_default()
                .add(ride);
            if let Some(vehicle) = charge.vehicle {
                day.vehicles
                    .entry((charge.operator, vehicle))
                    .or_default()
                    .add(ride);
            }
        }
    }

    pub fn merge(&mut self, other: &Ledger) {
        for (date, theirs) in &other.days {
            self.days.entry(*date).or_default().add(theirs);
        }
        for (days, theirs) in &other.late {
            self.late.entry(*days).or_default().add(theirs);
        }
        self.adjustments.extend(other.adjustments.iter().cloned());
        self.fare_tables.extend(other.fare_tables.iter().cloned());
    }

    /// Keeps only the books of settlement day `day` (every day when `None`): its own taps and
    /// the late taps and corrections booked on it. Drops the per-card books unless
    /// `with_cards`.
    pub fn restrict(&mut self, day: Option<NaiveDate>, with_cards: bool) {
        if let Some(day) = day {
            self.days.retain(|d, _| *d == day);
            self.late.retain(|(booked, _), _| *booked == day);
            self.adjustments.retain(|a| a.booked == Some(day));
        }
        if !with_cards {
            self.days
                .values_mut()
                .chain(self.late.values_mut())
                .for_each(|d| d.cards.clear());
        }
    }

    /// The books by the day each tap was tapped: late taps moved back to their own days. This
    /// is what settling the journals again computes, whenever each tap reached settlement.
    pub fn by_tap_day(&self) -> Ledger {
        let mut folded = Ledger {
            days: self.days.clone(),
            late: BTreeMap::new(),
            adjustments: self.adjustments.clone(),
            fare_tables: self.fare_tables.clone(),
        };
        for ((_, tapped), books) in &self.late {
            folded.days.entry(*tapped).or_default().add(books);
        }
        folded
    }

    /// Every day's books added into one, late taps included.
    pub fn all_days(&self) -> DayLedger {
        let mut all = DayLedger::default();
        self.days
            .values()
            .chain(self.late.values())
            .for_each(|d| all.add(d));
        all
    }

    pub fn taps(&self) -> u64 {
        self.days
            .values()
            .chain(self.late.values())
            .map(|d| d.taps)
            .sum()
    }

    /// Taps booked late, on a day after the one they were tapped on.
    pub fn late_taps(&self) -> u64 {
        self.late.values().map(|d| d.taps).sum()
    }

    pub fn total(&self) -> Totals {
        let mut total = Totals::default();
        self.days
            .values()
            .chain(self.late.values())
            .for_each(|d| total.add(d.total()));
        total
    }

    /// Books as JSON: `{"days": {"YYYY-MM-DD": {"taps", "cells": [...], "cards": {...},
    /// "clearing": [...], "payables": [...], "concessions": [...], "transfers": [...],
    /// "lines": [...], "vehicles": [...]}}, "late": [{"booked", "tapped", "books": {...}}],
    /// "adjustments": [...], "fare_tables": [digest, ...]}`; [`Ledger::from_json`] reads it back.
    pub fn to_json(&self) -> Value {
        let days: serde_json::Map<String, Value> = self
            .days
            .iter()
            .map(|(date, day)| (date.to_string(), day_json(day)))
            .collect();
        let late: Vec<Value> = self
            .late
            .iter()
            .map(|((booked, tapped), day)| {
                json!({"booked": booked.to_string(), "tapped": tapped.to_string(),
                       "books": day_json(day)})
            })
            .collect();
        json!({ "days": days, "late": late, "adjustments": self.adjustments,
                "fare_tables": self.fare_tables })
    }

    pub fn from_json(value: &Value) -> Result<Ledger, String> {
        let days = value["days"]
            .as_object()
            .ok_or("a ledger file has a `days` object")?;
        let mut ledger = Ledger::default();
        for (date, day) in days {
            ledger.days.insert(json_date(date)?, day_from_json(day)?);
        }
        // Absent from ledgers written before days closed.
        for entry in value["late"].as_array().into_iter().flatten() {
            let on = |what: &str| json_date(entry[what].as_str().unwrap_or_default());
            let days = (on("booked")?, on("tapped")?);
            ledger.late.insert(days, day_from_json(&entry["books"])?);
        }
        // Absent from ledgers written before corrections were made.
        if let Some(adjustments) = value.get("adjustments") {
            ledger.adjustments = serde_json::from_value(adjustments.clone())
                .map_err(|e| format!("adjustments: {e}"))?;
        }
        // Absent from ledgers written before the digest was recorded.
        for digest in value["fare_tables"].as_array().into_iter().flatten() {
            let digest = digest
                .as_str()
                .ok_or_else(|| format!("fare_tables: expected a digest, found {digest}"))?;
            ledger.fare_tables.insert(digest.to_owned());
        }
        Ok(ledger)
    }
}

/// One day's books as the ledger file writes them.
fn day_json(day: &DayLedger) -> Value {
    let cells: Vec<Value> = day
        .cells
        .iter()
        .map(|((area, operator, mode), t)| {
            json!({"area": area, "operator": operator, "mode": mode.label(),
                       "fen": t.fen, "rides": t.rides})
        })
        .collect();
    let cards: serde_json::Map<String, Value> = day
        .cards
        .iter()
        .map(|(card, t)| (card_name(*card), json!([t.fen, t.rides])))
        .collect();
    let clearing: Vec<Value> = day
        .clearing
        .iter()
        .map(|((payer, payee), t)| {
            json!({"payer": payer.label(), "payee": payee.label(),
                       "fen": t.fen, "rides": t.rides})
        })
        .collect();
    let payables: Vec<Value> = day
        .payables
        .iter()
        .map(|((issuer, operator), t)| {
            json!({"issuer": issuer.label(), "operator": operator,
                       "fen": t.fen, "rides": t.rides})
        })
        .collect();
    let concessions: Vec<Value> = day
        .concessions
        .iter()
        .map(|((concession, operator, area, mode), t)| {
            json!({"concession": concession.label(), "operator": operator,
                       "area": area, "mode": mode.label(),
                       "forgone_fen": t.fen, "rides": t.rides})
        })
        .collect();
    let transfers: Vec<Value> = day
        .transfers
        .iter()
        .map(|((operator, area, mode), t)| {
            json!({"operator": operator, "area": area, "mode": mode.label(),
                       "discount_fen": t.fen, "rides": t.rides})
        })
        .collect();
    let lines: Vec<Value> = day
        .lines
        .iter()
        .map(|((operator, area, mode, line), t)| {
            json!({"operator": operator, "area": area, "mode": mode.label(),
                       "line": line, "fen": t.fen, "rides": t.rides})
        })
        .collect();
    let vehicles: Vec<Value> = day
            .vehicles
            .iter()
            .map(|((operator, gate), t)| {
                json!({"operator": operator, "gate": gate, "fen": t.fen, "rides": t.rides})
            })
            .collect();
    json!({"taps": day.taps, "cells": cells, "cards": cards, "clearing": clearing,
           "payables": payables, "concessions": concessions,
           "transfers": transfers, "lines": lines, "vehicles": vehicles})
}

fn day_from_json(day: &Value) -> Result<DayLedger, String> {
    let mut books = DayLedger {
        taps: json_number(&day["taps"], "taps")?,
        ..DayLedger::default()
    };
    for cell in day["cells"].as_array().into_iter().flatten() {
        let area = json_number(&cell["area"], "cell area")?;
        let operator = json_number(&cell["operator"], "cell operator")?;
        let mode = cell["mode"]
            .as_str()
            .and_then(Mode::from_label)
            .ok_or_else(|| format!("cell: unknown mode {}", cell["mode"]))?;
        let key = (
            u32::try_from(area).map_err(|_| format!("area {area} out of range"))?,
            u16::try_from(operator).map_err(|_| format!("operator {operator} out of range"))?,
            mode,
        );
        books.cells.insert(key, json_totals(cell, "cell")?);
    }
    for (card, pair) in day["cards"].as_object().into_iter().flatten() {
        let card = parse_card_name(card).ok_or_else(|| {
            format!("`{card}` is not a card pseudonym (p and 16 hex digits): ledgers written before cards were pseudonymised are not read")
        })?;
        let t = Totals {
            fen: json_number(&pair[0], "card fen")?,
            rides: json_number(&pair[1], "card rides")?,
        };
        books.cards.insert(card, t);
    }
    for entry in day["clearing"].as_array().into_iter().flatten() {
        let key = (json_region(&entry["payer"])?, json_region(&entry["payee"])?);
        books.clearing.insert(key, json_totals(entry, "clearing")?);
    }
    // The next three are absent from ledgers written before they were kept.
    for entry in day["payables"].as_array().into_iter().flatten() {
        let issuer = entry["issuer"]
            .as_str()
            .and_then(Issuer::from_label)
            .ok_or_else(|| format!("payables: unknown issuer {}", entry["issuer"]))?;
        let key = (issuer, json_operator(&entry["operator"])?);
        books.payables.insert(key, json_totals(entry, "payables")?);
    }
    for entry in day["concessions"].as_array().into_iter().flatten() {
        let concession = entry["concession"]
            .as_str()
            .and_then(Concession::from_label)
            .ok_or_else(|| format!("concessions: unknown concession {}", entry["concession"]))?;
        let (operator, area, mode) = json_place(entry)?;
        let t = Totals {
            fen: json_number(&entry["forgone_fen"], "forgone_fen")?,
            rides: json_number(&entry["rides"], "concession rides")?,
        };
        books
            .concessions
            .insert((concession, operator, area, mode), t);
    }
    for entry in day["transfers"].as_array().into_iter().flatten() {
        let t = Totals {
            fen: json_number(&entry["discount_fen"], "discount_fen")?,
            rides: json_number(&entry["rides"], "transfer rides")?,
        };
        books.transfers.insert(json_place(entry)?, t);
    }
    for entry in day["lines"].as_array().into_iter().flatten() {
        let (operator, area, mode) = json_place(entry)?;
        let line = json_number(&entry["line"], "line")?;
        let line = u16::try_from(line).map_err(|_| format!("line {line} out of range"))?;
        let key = (operator, area, mode, line);
        books.lines.insert(key, json_totals(entry, "lines")?);
    }
    for entry in day["vehicles"].as_array().into_iter().flatten() {
        let key = (
            json_operator(&entry["operator"])?,
            json_number(&entry["gate"], "gate")?,
        );
        books.vehicles.insert(key, json_totals(entry, "vehicles")?);
    }
    Ok(books)
}

fn json_date(s: &str) -> Result<NaiveDate, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a YYYY-MM-DD date"))
}

// Readers of the ledger file's fields, for `Ledger::from_json`.
fn json_number(v: &Value, what: &str) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{what}: expected a number, found {v}"))
}
fn json_totals(v: &Value, what: &str) -> Result<Totals, String> {
    Ok(Totals {
        fen: json_number(&v["fen"], what)?,
        rides: json_number(&v["rides"], what)?,
    })
}
fn json_operator(v: &Value) -> Result<u16, String> {
    u16::try_from(json_number(v, "operator")?).map_err(|_| format!("operator {v} out of range"))
}
fn json_place(v: &Value) -> Result<(u16, u32, Mode), String> {
    let area = json_number(&v["area"], "area")?;
    let mode = v["mode"]
        .as_str()
        .and_then(Mode::from_label)
        .ok_or_else(|| format!("unknown mode {}", v["mode"]))?;
    Ok((
        json_operator(&v["operator"])?,
        u32::try_from(area).map_err(|_| format!("area {area} out of range"))?,
        mode,
    ))
}
fn json_region(v: &Value) -> Result<IssuerRegion, String> {
    v.as_str()
        .and_then(IssuerRegion::from_label)
        .ok_or_else(|| format!("clearing: unknown region {v}"))
}

/// What settling journals offline produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalSettlement {
    pub ledger: Ledger,
    /// Segments with a damaged record before their end; what followed the damage was skipped.
    pub damaged_segments: u64,
    /// Taps found in more than one journal (a gate that failed over and resent them): booked
    /// once, as settlement books them.
    pub copies: u64,
}

/// Settles the approved taps of one or more journals (one per gateway) through the fare engine.
/// Each journal is taken in its own order, the order its gateway decided and shipped the taps
/// in; journals are interleaved by gateway time, which is how a card that rode past several
/// gateways is seen.
pub fn settle_journals(
    dirs: &[&Path],
    tables: &FareTables,
    cards: &CardPseudonymizer,
) -> std::io::Result<JournalSettlement> {
    let mut ledger = Ledger::default();
    ledger.fare_tables.insert(tables.digest());
    let walked = walk_journals(
        dirs,
        tables,
        |_| true,
        |record, charges| {
            let day = Booking::on_time(tables.day.day_of(record.server_time_ms));
            ledger.book(day, record, charges, cards);
        },
    )?;
    Ok(JournalSettlement {
        ledger,
        damaged_segments: walked.damaged_segments,
        copies: walked.copies,
    })
}

/// A card's approved taps with the charges each made, in the order [`settle_journals`] prices
/// them: what a correction is checked against.
pub type CardHistory = Vec<(JournalRecord, Vec<Charge>)>;

/// The histories of these cards in the journals, in one pass over them.
pub fn card_histories(
    dirs: &[&Path],
    cards: &BTreeSet<u64>,
    tables: &FareTables,
) -> std::io::Result<HashMap<u64, CardHistory>> {
    let mut histories: HashMap<u64, CardHistory> = HashMap::new();
    walk_journals(
        dirs,
        tables,
        |r| cards.contains(&r.tap.card_id),
        |record, charges| {
            histories
                .entry(record.tap.card_id)
                .or_default()
                .push((*record, charges.to_vec()));
        },
    )?;
    Ok(histories)
}

/// The approved taps with these identities (gate, sequence) in the journals, in one pass.
pub fn find_taps(
    dirs: &[&Path],
    ids: &BTreeSet<(u64, u64)>,
) -> std::io::Result<HashMap<(u64, u64), JournalRecord>> {
    let mut found = HashMap::new();
    for dir in dirs {
        for segment in list_segments(dir)? {
            read_segment(&segment, |r| {
                let id = (r.terminal_id, r.tap.sequence);
                if r.result.outcome == Outcome::Approve && ids.contains(&id) {
                    found.entry(id).or_insert(r);
                }
            })?;
        }
    }
    Ok(found)
}

/// What walking the journals met besides taps.
struct Walked {
    damaged_segments: u64,
    copies: u64,
}

/// Prices the approved taps `wanted` keeps, each copy of a tap once, and hands each to `each`,
/// in the order settlers price them ([`crate::order`]): by [`pricing_order`], whichever
/// journal holds them. (A journal's own order is not quite time order: sessions stamp their
/// taps, then queue them for the writer.)
fn walk_journals(
    dirs: &[&Path],
    tables: &FareTables,
    wanted: impl Fn(&JournalRecord) -> bool,
    each: impl FnMut(&JournalRecord, &[Charge]),
) -> std::io::Result<Walked> {
    let mut walked = Walked {
        damaged_segments: 0,
        copies: 0,
    };
    let mut placed = Vec::new();
    for (journal, dir) in dirs.iter().enumerate() {
        let mut read = 0;
        for segment in list_segments(dir)? {
            let (_, clean) = read_segment(&segment, |r| {
                if r.result.outcome == Outcome::Approve && wanted(&r) {
                    read += 1;
                    placed.push(((pricing_order(&r), journal, read), r));
                }
            })?;
            if !clean {
                walked.damaged_segments += 1;
            }
        }
    }
    walked.copies = price_in_order(placed, tables, each);
    Ok(walked)
}

/// Where a journaled tap is priced: its [`PricingOrder`], then (for copies of one tap) its
/// journal and its place there.
type Place = (PricingOrder, usize, u64);

/// Prices the taps in the order of their places, each copy of a tap once (the copies are
/// counted and returned), and hands each to `each`.
fn price_in_order(
    mut placed: Vec<(Place, JournalRecord)>,
    tables: &FareTables,
    mut each: impl FnMut(&JournalRecord, &[Charge]),
) -> u64 {
    placed.sort_unstable_by_key(|(place, _)| *place);
    let mut copies = 0;
    let mut riders: HashMap<u64, (RiderState, RecentTaps)> = HashMap::new();
    for (_, record) in placed {
        let (fares, recent) = riders.entry(record.tap.card_id).or_default();
        if !recent.first_time(&record) {
            copies += 1;
            continue;
        }
        let charges = settle(&record, fares, tables);
        each(&record, &charges);
    }
    copies
}

/// What a difference between two ledgers is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    /// The day's approved taps (`rides` counts taps, `fen` the day's total).
    Taps,
    Cell {
        area: u32,
        operator: u16,
        mode: Mode,
    },
    Card(u64),
    Clearing {
        payer: IssuerRegion,
        payee: IssuerRegion,
    },
    Payable {
        issuer: Issuer,
        operator: u16,
    },
    /// `fen` is the fare forgone.
    Concession {
        concession: Concession,
        operator: u16,
        area: u32,
        mode: Mode,
    },
    /// `fen` is the discount granted.
    Transfer {
        operator: u16,
        area: u32,
        mode: Mode,
    },
    Line {
        operator: u16,
        area: u32,
        mode: Mode,
        line: u16,
    },
    Vehicle {
        operator: u16,
        gate: u64,
    },
}

/// One place where the books disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Difference {
    pub day: NaiveDate,
    pub subject: Subject,
    /// What the journals say.
    pub expected: Totals,
    /// What the settled ledger says.
    pub settled: Totals,
}

/// The books finance teams read beyond the cells: payables, concessions, transfers, lines and
/// boarding gates.
fn compare_finance_books(
    day: NaiveDate,
    a: Option<&DayLedger>,
    b: Option<&DayLedger>,
    out: &mut Vec<Difference>,
) {
    compare(
        day,
        a.map(|d| &d.payables),
        b.map(|d| &d.payables),
        |(issuer, operator)| Subject::Payable { issuer, operator },
        out,
    );
    compare(
        day,
        a.map(|d| &d.concessions),
        b.map(|d| &d.concessions),
        |(concession, operator, area, mode)| Subject::Concession {
            concession,
            operator,
            area,
            mode,
        },
        out,
    );
    compare(
        day,
        a.map(|d| &d.transfers),
        b.map(|d| &d.transfers),
        |(operator, area, mode)| Subject::Transfer {
            operator,
            area,
            mode,
        },
        out,
    );
    compare(
        day,
        a.map(|d| &d.lines),
        b.map(|d| &d.lines),
        |(operator, area, mode, line)| Subject::Line {
            operator,
            area,
            mode,
            line,
        },
        out,
    );
    compare(
        day,
        a.map(|d| &d.vehicles),
        b.map(|d| &d.vehicles),
        |(operator, gate)| Subject::Vehicle { operator, gate },
        out,
    );
}

/// Adds to `out` every key where the two maps of one day differ.
fn compare<K: Ord + Copy>(
    day: NaiveDate,
    a: Option<&BTreeMap<K, Totals>>,
    b: Option<&BTreeMap<K, Totals>>,
    subject: impl Fn(K) -> Subject,
    out: &mut Vec<Difference>,
) {
    let empty = BTreeMap::new();
    let (a, b) = (a.unwrap_or(&empty), b.unwrap_or(&empty));
    let keys: std::collections::BTreeSet<K> = a.keys().chain(b.keys()).copied().collect();
    for k in keys {
        let (x, y) = (
            a.get(&k).copied().unwrap_or_default(),
            b.get(&k).copied().unwrap_or_default(),
        );
        if x != y {
            out.push(Difference {
                day,
                subject: subject(k),
                expected: x,
                settled: y,
            });
        }
    }
}

/// Every entry where `settled` differs from `expected`, day by day.
pub fn differences(expected: &Ledger, settled: &Ledger) -> Vec<Difference> {
    let days: std::collections::BTreeSet<NaiveDate> = expected
        .days
        .keys()
        .chain(settled.days.keys())
        .copied()
        .collect();
    let mut out = Vec::new();
    for day in days {
        let (a, b) = (expected.days.get(&day), settled.days.get(&day));
        let taps = |d: Option<&DayLedger>| {
            d.map_or(Totals::default(), |d| Totals {
                fen: d.total().fen,
                rides: d.taps,
            })
        };
        if taps(a) != taps(b) {
            out.push(Difference {
                day,
                subject: Subject::Taps,
                expected: taps(a),
                settled: taps(b),
            });
        }
        compare(
            day,
            a.map(|d| &d.cells),
            b.map(|d| &d.cells),
            |(area, operator, mode)| Subject::Cell {
                area,
                operator,
                mode,
            },
            &mut out,
        );
        let sorted_cards = |d: Option<&DayLedger>| -> Option<BTreeMap<u64, Totals>> {
            d.map(|d| d.cards.iter().map(|(card, t)| (*card, *t)).collect())
        };
        compare(
            day,
            sorted_cards(a).as_ref(),
            sorted_cards(b).as_ref(),
            Subject::Card,
            &mut out,
        );
        compare(
            day,
            a.map(|d| &d.clearing),
            b.map(|d| &d.clearing),
            |(payer, payee)| Subject::Clearing { payer, payee },
            &mut out,
        );
        compare_finance_books(day, a, b, &mut out);
    }
    out
}

/// The answer to "was every approved tap settled exactly once?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    pub journal_taps: u64,
    pub settled_taps: u64,
    /// Approved taps in the journals and missing from the ledgers, summed over days.
    pub lost: u64,
    /// Taps in the ledgers more often than in the journals, summed over days.
    pub duplicated: u64,
    pub differences: Vec<Difference>,
    /// Settled taps booked late, on a day after their own closed; compared on their own day.
    pub late_taps: u64,
    /// Corrections booked and their net amount (rider's side, fen).
    pub adjustments: u64,
    pub adjustments_fen: i64,
    /// Corrections the journals do not bear out ([`crate::adjust::check`]).
    pub adjustment_problems: Vec<String>,
    /// The fare tables the journals were priced with here, and those the ledgers record. When
    /// they differ, fare differences are expected rather than a fault of settlement.
    pub journal_fare_tables: BTreeSet<String>,
    pub settled_fare_tables: BTreeSet<String>,
}

impl Reconciliation {
    /// Compares by the day each tap was tapped: the journals know nothing of when a tap
    /// reached settlement, so the settled books' late taps count on their tap days.
    pub fn new(expected: &Ledger, settled: &Ledger) -> Self {
        let by_tap_day;
        let comparable = if settled.late.is_empty() {
            settled
        } else {
            by_tap_day = settled.by_tap_day();
            &by_tap_day
        };
        let differences = differences(expected, comparable);
        let (mut lost, mut duplicated) = (0, 0);
        for d in differences.iter().filter(|d| d.subject == Subject::Taps) {
            lost += d.expected.rides.saturating_sub(d.settled.rides);
            duplicated += d.settled.rides.saturating_sub(d.expected.rides);
        }
        Self {
            journal_taps: expected.taps(),
            settled_taps: settled.taps(),
            lost,
            duplicated,
            differences,
            late_taps: settled.late_taps(),
            adjustments: settled.adjustments.len() as u64,
            adjustments_fen: settled.adjustments.iter().map(|a| a.fen).sum(),
            adjustment_problems: Vec::new(),
            journal_fare_tables: expected.fare_tables.clone(),
            settled_fare_tables: settled.fare_tables.clone(),
        }
    }

    pub fn is_exact(&self) -> bool {
        self.differences.is_empty() && self.adjustment_problems.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fares::ChargeKind;
    use tapgate_protocol::{AreaCode, Concession, Issuer, TapKind};

    // 2026-11-29T08:00:00Z = 16:00 in Chongqing.
    const T0: u64 = 1_795_939_200_000;

    fn record(card_id: u64, issuer: Issuer, at: u64) -> JournalRecord {
        let flat = (Mode::Bus, TapKind::Flat, 500103, 1, 1);
        let mut r = crate::fares::tests::record(
            flat.0,
            flat.1,
            flat.2,
            flat.3,
            flat.4,
            at,
            Concession::None,
        );
        (r.terminal_id, r.tap.card_id, r.tap.issuer) = (7, card_id, issuer);
        r
    }

    /// Reconcile prices what the settlers price in the order they do: taps by gateway time
    /// across journals, ties by gate and sequence, an offline upload by when it reached its
    /// gateway. Each journal's own order is a few milliseconds off.
    #[test]
    fn journals_are_priced_by_gateway_time_not_in_each_journal_s_order() {
        let tap = |card, at, gate, sequence| {
            let mut r = record(card, Issuer::ChongqingSsc, at);
            (r.terminal_id, r.tap.sequence) = (gate, sequence);
            r
        };
        let mut upload = tap(3, T0 - 600_000, 9, 1);
        upload.uploaded_ms = Some(T0 + 100);
        // Gateway A journaled card 1's tap after card 5's later one; then an upload.
        let a = [
            tap(5, T0 + 102, 1, 1),
            tap(1, T0 + 99, 2, 1),
            upload,
            tap(3, T0 + 150, 1, 2),
        ];
        // Gateway B: card 4 tapped at two gates in one millisecond, journaled gate 6 first.
        let b = [
            tap(1, T0 + 100, 3, 1),
            tap(3, T0 + 101, 4, 1),
            tap(4, T0 + 200, 6, 1),
            tap(4, T0 + 200, 5, 1),
        ];
        let mut placed = Vec::new();
        for (i, journal) in [&a[..], &b[..]].into_iter().enumerate() {
            placed.extend(
                (0..)
                    .zip(journal)
                    .map(|(read, r)| ((pricing_order(r), i, read), *r)),
            );
        }
        let mut priced = Vec::new();
        let tables = FareTables::embedded_default();
        price_in_order(placed, &tables, |r, _| {
            priced.push((r.tap.card_id, r.terminal_id));
        });
        let gates_of = |card| -> Vec<u64> {
            priced
                .iter()
                .filter(|(c, _)| *c == card)
                .map(|(_, gate)| *gate)
                .collect()
        };
        assert_eq!(gates_of(1), [2, 3], "by time, not A's order");
        assert_eq!(
            gates_of(3),
            [9, 4, 1],
            "the upload when it reached A, before B's tap at T0 + 101"
        );
        assert_eq!(gates_of(4), [5, 6], "one millisecond: by gate");
    }

    fn charge(fen: u32) -> Charge {
        Charge {
            kind: ChargeKind::Flat,
            area: AreaCode(500103),
            operator: 1,
            mode: Mode::Bus,
            fare_fen: fen,
            concession: Concession::None,
            forgone_fen: 0,
            line: 12,
            vehicle: Some(100_000_001),
            transfer_discount: 0,
        }
    }

    fn sample() -> Ledger {
        let mut ledger = Ledger::default();
        ledger.book(
            on(T0),
            &record(1, Issuer::ChongqingSsc, T0),
            &[charge(200)],
            &cards(),
        );
        ledger.book(
            on(T0),
            &record(2, Issuer::SichuanTianfuTong, T0),
            &[charge(150)],
            &cards(),
        );
        ledger.book(
            on(T0 + 86_400_000),
            &record(1, Issuer::ChongqingSsc, T0 + 86_400_000),
            &[],
            &cards(),
        );
        // A half-fare disability ride after a transfer: 200 at 50 % = 100, less 100 discount.
        let concession_ride = Charge {
            concession: Concession::Disabled,
            forgone_fen: 100,
            transfer_discount: 100,
            mode: Mode::Metro,
            operator: 2,
            ..charge(0)
        };
        ledger.book(
            on(T0),
            &record(3, Issuer::ChongqingCityCard, T0),
            &[concession_ride],
            &cards(),
        );
        ledger.fare_tables.insert("0123456789abcdef".into());
        ledger
    }

    fn cards() -> CardPseudonymizer {
        CardPseudonymizer::new([7; 16])
    }

    fn on(at: u64) -> Booking {
        Booking::on_time(FareTables::embedded_default().day.day_of(at))
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn a_late_tap_is_booked_apart_and_moves_back_to_its_day_for_reconcile() {
        let mut ledger = sample();
        let late = Booking {
            tapped: date("2026-11-29"),
            booked: date("2026-12-01"),
        };
        ledger.book(
            late,
            &record(4, Issuer::ChongqingSsc, T0),
            &[charge(200)],
            &cards(),
        );
        assert_eq!(
            ledger.days[&date("2026-11-29")].taps,
            3,
            "a closed day stays as it was"
        );
        assert_eq!(ledger.late_taps(), 1);
        assert_eq!(ledger.taps(), 5);
        assert_eq!(Ledger::from_json(&ledger.to_json()), Ok(ledger.clone()));
        let folded = ledger.by_tap_day();
        assert_eq!(folded.days[&date("2026-11-29")].taps, 4);
        assert!(folded.late.is_empty());
        // A settlement day's books hold the late taps booked on it, not those tapped on it.
        let mut booked_on = ledger.clone();
        booked_on.restrict(Some(date("2026-12-01")), false);
        assert_eq!((booked_on.taps(), booked_on.late_taps()), (1, 1));
        let mut tapped_on = ledger;
        tapped_on.restrict(Some(date("2026-11-29")), false);
        assert_eq!((tapped_on.taps(), tapped_on.late_taps()), (3, 0));
    }

    #[test]
    fn booking_fills_cells_cards_clearing_by_local_day() {
        let ledger = sample();
        assert_eq!(ledger.days.len(), 2);
        let day = &ledger.days[&NaiveDate::from_ymd_opt(2026, 11, 29).unwrap()];
        assert_eq!(day.taps, 3);
        assert_eq!(day.total(), Totals { fen: 350, rides: 3 });
        // Cards by their pseudonyms, never their numbers.
        assert_eq!(
            day.cards[&cards().book_key(2)],
            Totals { fen: 150, rides: 1 }
        );
        assert!(!day.cards.contains_key(&2));
        assert!(!ledger.to_json().to_string().contains("\"2\""));
        assert_eq!(
            day.clearing[&(IssuerRegion::Sichuan, IssuerRegion::Chongqing)],
            Totals { fen: 150, rides: 1 }
        );
        assert_eq!(
            day.clearing.len(),
            1,
            "Chongqing cards on Chongqing buses clear nothing"
        );
        // Every ride is payable by its card's issuer to its operator.
        assert_eq!(
            day.payables[&(Issuer::ChongqingSsc, 1)],
            Totals { fen: 200, rides: 1 }
        );
        assert_eq!(day.payables.len(), 3);
        assert_eq!(
            day.concessions[&(Concession::Disabled, 2, 500103, Mode::Metro)],
            Totals { fen: 100, rides: 1 }
        );
        assert_eq!(
            day.transfers[&(2, 500103, Mode::Metro)],
            Totals { fen: 100, rides: 1 }
        );
        assert_eq!(ledger.taps(), 4);
    }

    #[test]
    fn json_round_trips() {
        let ledger = sample();
        assert_eq!(Ledger::from_json(&ledger.to_json()), Ok(ledger));
        assert!(Ledger::from_json(&json!({"days": {"yesterday": {}}})).is_err());
        // A ledger written before the fare tables were recorded reads as recording none.
        let older = Ledger::from_json(&json!({"days": {}})).unwrap();
        assert!(older.fare_tables.is_empty());
    }

    #[test]
    fn a_duplicate_and_a_loss_are_both_listed() {
        let expected = sample();
        assert!(differences(&expected, &expected).is_empty());
        let mut doubled = expected.clone();
        doubled.book(
            on(T0),
            &record(2, Issuer::SichuanTianfuTong, T0),
            &[charge(150)],
            &cards(),
        );
        let found = differences(&expected, &doubled);
        let subjects: Vec<Subject> = found.iter().map(|d| d.subject).collect();
        assert_eq!(
            subjects,
            [
                Subject::Taps,
                Subject::Cell {
                    area: 500103,
                    operator: 1,
                    mode: Mode::Bus
                },
                Subject::Card(cards().book_key(2)),
                Subject::Clearing {
                    payer: IssuerRegion::Sichuan,
                    payee: IssuerRegion::Chongqing
                },
                Subject::Payable {
                    issuer: Issuer::SichuanTianfuTong,
                    operator: 1
                },
                Subject::Line {
                    operator: 1,
                    area: 500103,
                    mode: Mode::Bus,
                    line: 12
                },
                Subject::Vehicle {
                    operator: 1,
                    gate: 100_000_001
                },
            ]
        );
        assert_eq!(found[0].expected.rides + 1, found[0].settled.rides);
        let lost = differences(&doubled, &expected);
        assert_eq!(lost.len(), 7);
        assert!(lost.iter().all(|d| d.settled.rides < d.expected.rides));
        let r = Reconciliation::new(&expected, &doubled);
        assert_eq!((r.lost, r.duplicated, r.is_exact()), (0, 1, false));
        let r = Reconciliation::new(&doubled, &expected);
        assert_eq!((r.lost, r.duplicated), (1, 0));
        assert!(Reconciliation::new(&expected, &expected).is_exact());
    }
}
