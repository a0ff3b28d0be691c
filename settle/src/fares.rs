//! The fare engine: what each approved tap costs, as pure functions of the tap's journal record,
//! the rider's settlement state and the fare tables (`fares.example.toml`). No clock, no I/O:
//! the tap's own gateway time is the time.
//!
//! Order of rules for a fare-bearing ride: base fare (flat, or distance from the entry/exit
//! pair, or the maximum for a trip missing its exit or its entry), then the concession the
//! gateway applied, at the pay share its record carries (the gateway's policy prices concessions
//! by grade and counts allowances in the directory before answering, so its record is the
//! authority and nothing is recounted here), then the bus–rail transfer
//! discount, then the daily cap.

use crate::day::SettlementDay;
use crate::stations::{NetworkCache, StationLine};
use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tapgate_journal::{JournalRecord, version_1_pay_percent};
use tapgate_protocol::{AreaCode, Concession, Mode, Outcome, TapKind};

/// The fare tables shipped with tapgate; `fares.example.toml` documents them.
pub const DEFAULT_FARES_TOML: &str = include_str!("../../fares.example.toml");

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlatTable {
    pub default: u32,
    #[serde(default)]
    pub areas: HashMap<String, u32>,
    #[serde(default)]
    pub routes: HashMap<String, u32>,
}

impl FlatTable {
    fn fare(&self, area: u32, line: u16) -> u32 {
        self.routes
            .get(&format!("{area}:{line}"))
            .or_else(|| self.areas.get(&area.to_string()))
            .copied()
            .unwrap_or(self.default)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetroTable {
    pub km_per_stop: f64,
    pub line_change_km: f64,
    /// (upper bound in km, fare), ascending.
    pub bands: Vec<(f64, u32)>,
    pub max: u32,
    /// The longest a trip may stay inside the paid area, in seconds; 0 for no limit.
    pub time_limit_s: u64,
    /// Added to the fare of a trip that stayed longer than `time_limit_s`.
    pub overtime_fen: u32,
    /// The station table: lines whose stations and distances are known. A trip between two
    /// stops it lists is priced by the shortest distance through the network; any other by
    /// `km_per_stop` and `line_change_km`.
    #[serde(default)]
    pub lines: Vec<StationLine>,
    #[serde(skip)]
    pub network: NetworkCache,
}

impl MetroTable {
    fn fare(&self, entry: &OpenTrip, exit_line: u16, exit_stop: u16) -> u32 {
        let from_table = self
            .network
            .get(&self.lines)
            .km((entry.line, entry.stop), (exit_line, exit_stop));
        let km = from_table.unwrap_or_else(|| {
            let stops = f64::from(entry.stop.abs_diff(exit_stop));
            let change = if entry.line == exit_line {
                0.0
            } else {
                self.line_change_km
            };
            stops * self.km_per_stop + change
        });
        self.bands
            .iter()
            .find(|(upper, _)| km <= *upper)
            .map_or(self.max, |(_, fare)| *fare)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IntercityTable {
    pub km_per_stop: f64,
    pub fen_per_km: u32,
    pub min: u32,
    pub max: u32,
}

/// The transfer discount: a bus–bus, bus–rail or rail–bus ride within `window_s` of the first
/// (counted from the bus tap, or from the rail exit) is discounted by at most the first fare
/// paid and at most `max_discount`, once per window, when both rides are in `areas` and the
/// card's concession is one of `concessions` ("none" for an ordinary card).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRule {
    pub window_s: u64,
    pub max_discount: u32,
    pub areas: Vec<u32>,
    pub concessions: Vec<String>,
    /// A second bus of the same route counts as a transfer only this long after the first;
    /// the same vehicle never does.
    pub same_route_after_s: u64,
}

impl TransferRule {
    fn covers(&self, area: u32, concession: Concession) -> bool {
        self.areas.contains(&area) && self.concessions.iter().any(|c| c == concession.label())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FareTables {
    /// When settlement days begin and close; the daily cap counts by the same days.
    pub day: SettlementDay,
    pub daily_cap: u32,
    pub transfer: TransferRule,
    pub bus: FlatTable,
    pub ferry: FlatTable,
    pub cableway: FlatTable,
    pub metro: MetroTable,
    pub intercity: IntercityTable,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fare tables: {0}")]
pub struct FareTablesError(String);

/// The most any one fare, cap or discount may be, in fen (10,000 yuan): far above any ticket,
/// and low enough that no sum of a day's fares can overflow.
pub const MAX_FEN: u32 = 1_000_000;
/// The longest transfer window, in seconds (a week).
const MAX_TRANSFER_WINDOW_S: u64 = 7 * 24 * 3600;

impl FareTables {
    /// Reads and checks tables: every problem is named by its key, and tables that pass never
    /// make the fare engine fail.
    pub fn from_toml(text: &str) -> Result<Self, FareTablesError> {
        let tables: FareTables =
            toml::from_str(text).map_err(|e| FareTablesError(e.to_string()))?;
        let problems = tables.problems();
        if !problems.is_empty() {
            return Err(FareTablesError(problems.join("; ")));
        }
        Ok(tables)
    }

    /// What is wrong with these tables, each as `key: why`; empty when they can be used.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.day.problems();
        out.extend(crate::stations::problems(&self.metro.lines));
        let mut money = |key: &str, fen: u32| {
            if fen > MAX_FEN {
                out.push(format!("{key}: {fen} fen is more than {MAX_FEN}"));
            }
        };
        money("daily_cap", self.daily_cap);
        money("transfer.max_discount", self.transfer.max_discount);
        money("metro.overtime_fen", self.metro.overtime_fen);
        for (name, table) in [
            ("bus", &self.bus),
            ("ferry", &self.ferry),
            ("cableway", &self.cableway),
        ] {
            money(&format!("{name}.default"), table.default);
            for (area, fen) in &table.areas {
                money(&format!("{name}.areas.{area}"), *fen);
            }
            for (route, fen) in &table.routes {
                money(&format!("{name}.routes.\"{route}\""), *fen);
            }
        }
        money("metro.max", self.metro.max);
        for (i, (_, fen)) in self.metro.bands.iter().enumerate() {
            money(&format!("metro.bands[{i}]"), *fen);
        }
        money("intercity.min", self.intercity.min);
        money("intercity.max", self.intercity.max);
        money("intercity.fen_per_km", self.intercity.fen_per_km);
        for (key, seconds) in [
            ("transfer.window_s", self.transfer.window_s),
            (
                "transfer.same_route_after_s",
                self.transfer.same_route_after_s,
            ),
            ("metro.time_limit_s", self.metro.time_limit_s),
        ] {
            if seconds > MAX_TRANSFER_WINDOW_S {
                out.push(format!("{key}: {seconds} s is longer than a week"));
            }
        }
        for area in &self.transfer.areas {
            if AreaCode(*area).area().is_none() {
                out.push(format!(
                    "transfer.areas: {area} is not one of the 41 area codes"
                ));
            }
        }
        for label in &self.transfer.concessions {
            if Concession::from_label(label).is_none() {
                out.push(format!("transfer.concessions: no concession `{label}`"));
            }
        }
        for (name, table) in [
            ("bus", &self.bus),
            ("ferry", &self.ferry),
            ("cableway", &self.cableway),
        ] {
            for area in table.areas.keys() {
                if !known_area(area) {
                    out.push(format!("{name}.areas.{area}: not one of the 41 area codes"));
                }
            }
            for route in table.routes.keys() {
                let known = route
                    .split_once(':')
                    .is_some_and(|(area, line)| known_area(area) && line.parse::<u16>().is_ok());
                if !known {
                    out.push(format!(
                        "{name}.routes.\"{route}\": expected \"AREA:LINE\" with one of the 41 area codes"
                    ));
                }
            }
        }
        let distance = |key: &str, km: f64, out: &mut Vec<String>| {
            if !(km.is_finite() && km >= 0.0) {
                out.push(format!("{key}: {km} is not a distance in km"));
            }
        };
        distance("metro.km_per_stop", self.metro.km_per_stop, &mut out);
        distance("metro.line_change_km", self.metro.line_change_km, &mut out);
        distance(
            "intercity.km_per_stop",
            self.intercity.km_per_stop,
            &mut out,
        );
        for (i, (upper, _)) in self.metro.bands.iter().enumerate() {
            distance(&format!("metro.bands[{i}]"), *upper, &mut out);
        }
        if self.metro.bands.windows(2).any(|w| w[0].0 >= w[1].0) {
            out.push("metro.bands: must ascend by distance".into());
        }
        if self.intercity.min > self.intercity.max {
            out.push(format!(
                "intercity: min {} is more than max {}",
                self.intercity.min, self.intercity.max
            ));
        }
        out
    }

    /// A fingerprint of the tables, recorded with the books they price so that a reconcile run
    /// with other tables can say why its fares differ: SM3 over the tables as JSON with sorted
    /// keys, so the TOML's layout and comments do not count, first 8 bytes in hex.
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_value(self)
            .expect("fare tables serialize")
            .to_string();
        tapgate_protocol::crypto::sm3(canonical.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_FARES_TOML).expect("the shipped fare tables are valid")
    }

    /// The tables in the TOML file at `path`, or the shipped ones when there is none.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, FareTablesError> {
        let Some(path) = path else {
            return Ok(Self::embedded_default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| FareTablesError(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| FareTablesError(format!("{}: {}", path.display(), e.0)))
    }
}

fn known_area(code: &str) -> bool {
    code.parse::<u32>()
        .is_ok_and(|c| AreaCode(c).area().is_some())
}

/// A paid-area trip waiting for its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTrip {
    pub mode: Mode,
    pub area: u32,
    pub operator: u16,
    pub line: u16,
    pub stop: u16,
    pub concession: Concession,
    /// The share of the fare the entry's concession pays, in percent.
    pub pay_percent: u8,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferClass {
    Bus,
    Rail,
}

/// The last ride a transfer may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PaidRide {
    class: TransferClass,
    fare: u32,
    /// When the transfer window opened: the bus tap, or the rail exit.
    at_ms: u64,
    /// In the transfer areas, by a card type the transfer covers.
    transferable: bool,
    /// The bus's gate (the vehicle) and route, for the bus–bus rules.
    terminal_id: u64,
    area: u32,
    line: u16,
}

/// What settlement remembers about one card.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RiderState {
    day: Option<NaiveDate>,
    paid_today: u32,
    open: Option<OpenTrip>,
    last_paid: Option<PaidRide>,
    last_transfer_ms: Option<u64>,
}

/// Version 3 added the open trip's pay share and the place of the last paid ride; version 2
/// states are still read.
const RIDER_STATE_VERSION: u8 = 3;
const NO_DAY: i32 = i32::MIN;

impl RiderState {
    /// When the latest tap this state remembers was approved (an open trip, a paid ride, a
    /// transfer): a tap approved before it reaches pricing out of time order.
    pub fn latest_ms(&self) -> Option<u64> {
        [
            self.open.map(|trip| trip.at_ms),
            self.last_paid.map(|paid| paid.at_ms),
            self.last_transfer_ms,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Fixed-layout bytes, as settlement keeps them between batches (in Redis, one value per
    /// card). Versioned so a later layout can still read these.
    pub fn encode(&self) -> Vec<u8> {
        use bytes::BufMut;
        let mut out = Vec::with_capacity(64);
        out.put_u8(RIDER_STATE_VERSION);
        out.put_i32(self.day.map_or(NO_DAY, |d| d.num_days_from_ce()));
        out.put_u32(self.paid_today);
        match &self.open {
            Some(trip) => {
                out.put_u8(1);
                out.put_u8(trip.mode.code());
                out.put_u32(trip.area);
                out.put_u16(trip.operator);
                out.put_u16(trip.line);
                out.put_u16(trip.stop);
                out.put_u8(trip.concession.code());
                out.put_u8(trip.pay_percent);
                out.put_u64(trip.at_ms);
            }
            None => out.put_u8(0),
        }
        match &self.last_paid {
            Some(paid) => {
                out.put_u8(1);
                out.put_u8(match paid.class {
                    TransferClass::Bus => 0,
                    TransferClass::Rail => 1,
                });
                out.put_u32(paid.fare);
                out.put_u64(paid.at_ms);
                out.put_u8(u8::from(paid.transferable));
                out.put_u64(paid.terminal_id);
                out.put_u32(paid.area);
                out.put_u16(paid.line);
            }
            None => out.put_u8(0),
        }
        match self.last_transfer_ms {
            Some(at) => {
                out.put_u8(1);
                out.put_u64(at);
            }
            None => out.put_u8(0),
        }
        out
    }

    /// Reads [`RiderState::encode`]'s bytes; `None` when they are not such bytes.
    pub fn decode(mut p: &[u8]) -> Option<Self> {
        use bytes::Buf;
        fn flag(p: &mut &[u8]) -> Option<bool> {
            match p.try_get_u8().ok()? {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            }
        }
        let version = p.try_get_u8().ok()?;
        if !(2..=RIDER_STATE_VERSION).contains(&version) {
            return None;
        }
        let day = match p.try_get_i32().ok()? {
            NO_DAY => None,
            days => Some(NaiveDate::from_num_days_from_ce_opt(days)?),
        };
        let paid_today = p.try_get_u32().ok()?;
        let open = if flag(&mut p)? {
            let mode = Mode::from_code(p.try_get_u8().ok()?)?;
            let area = p.try_get_u32().ok()?;
            let operator = p.try_get_u16().ok()?;
            let line = p.try_get_u16().ok()?;
            let stop = p.try_get_u16().ok()?;
            let concession = Concession::from_code(p.try_get_u8().ok()?)?;
            let pay_percent = match version {
                2 => version_1_pay_percent(concession),
                _ => Some(p.try_get_u8().ok()?).filter(|percent| *percent <= 100)?,
            };
            Some(OpenTrip {
                mode,
                area,
                operator,
                line,
                stop,
                concession,
                pay_percent,
                at_ms: p.try_get_u64().ok()?,
            })
        } else {
            None
        };
        let last_paid = if flag(&mut p)? {
            let class = match p.try_get_u8().ok()? {
                0 => TransferClass::Bus,
                1 => TransferClass::Rail,
                _ => return None,
            };
            let fare = p.try_get_u32().ok()?;
            let at_ms = p.try_get_u64().ok()?;
            if version == 2 {
                // Version 2 kept no place: a transfer from such a ride is taken as allowed.
                Some(PaidRide {
                    class,
                    fare,
                    at_ms,
                    transferable: true,
                    terminal_id: 0,
                    area: 0,
                    line: 0,
                })
            } else {
                Some(PaidRide {
                    class,
                    fare,
                    at_ms,
                    transferable: flag(&mut p)?,
                    terminal_id: p.try_get_u64().ok()?,
                    area: p.try_get_u32().ok()?,
                    line: p.try_get_u16().ok()?,
                })
            }
        } else {
            None
        };
        let last_transfer_ms = if flag(&mut p)? {
            Some(p.try_get_u64().ok()?)
        } else {
            None
        };
        let state = Self {
            day,
            paid_today,
            open,
            last_paid,
            last_transfer_ms,
        };
        p.is_empty().then_some(state)
    }
}

/// Why a charge was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChargeKind {
    /// Bus, ferry, cableway boarding.
    Flat,
    /// A paid-area trip with its entry and exit.
    Trip,
    /// An entry whose exit never came: charged the maximum when the card's next entry shows it.
    MissingExit,
    /// An exit with no entry: the maximum.
    ExitWithoutEntry,
}

/// Money owed for one ride, to the operator of the area where it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub kind: ChargeKind,
    pub area: AreaCode,
    pub operator: u16,
    pub mode: Mode,
    pub fare_fen: u32,
    pub concession: Concession,
    /// What the concession took off the fare, in fen: the ground of a subsidy claim.
    pub forgone_fen: u32,
    /// The line (bus route, rail line) the ride started on.
    pub line: u16,
    /// The gate a flat ride was boarded at: on a bus, the vehicle. `None` for a paid-area
    /// trip, which starts and ends at station gates.
    pub vehicle: Option<u64>,
    /// Transfer discount granted, in fen.
    pub transfer_discount: u32,
}

/// Where and how a ride was taken, as far as pricing needs it.
#[derive(Debug, Clone, Copy)]
struct Ride {
    kind: ChargeKind,
    area: u32,
    operator: u16,
    mode: Mode,
    line: u16,
    terminal_id: u64,
    concession: Concession,
    pay_percent: u8,
    /// When the transfer window of this ride opens (the bus tap, the rail exit).
    at_ms: u64,
}

/// Settles one journal record for its card. Records must come in the card's tap order.
/// Denials, busy answers and a repeated boarding of one vehicle cost nothing.
pub fn settle(record: &JournalRecord, rider: &mut RiderState, tables: &FareTables) -> Vec<Charge> {
    if record.result.outcome != Outcome::Approve || record.repeat_boarding {
        return Vec::new();
    }
    let now = record.server_time_ms;
    let today = tables.day.day_of(now);
    if rider.day != Some(today) {
        rider.day = Some(today);
        rider.paid_today = 0;
    }
    let tap = &record.tap;
    let here = Ride {
        kind: ChargeKind::Flat,
        area: record.area,
        operator: record.operator,
        mode: record.mode,
        line: tap.line,
        terminal_id: record.terminal_id,
        concession: record.result.concession,
        pay_percent: record.pay_percent,
        at_ms: now,
    };
    let full_fare = |ride: Ride| Ride {
        concession: Concession::None,
        pay_percent: 100,
        ..ride
    };
    let mut charges = Vec::new();
    match (tap.kind, record.mode.needs_exit_tap()) {
        (TapKind::Entry, true) => {
            if let Some(open) = rider.open.take() {
                let missing = Ride {
                    kind: ChargeKind::MissingExit,
                    ..full_fare(open_ride(&open, record.terminal_id))
                };
                charges.push(price(missing, max_fare(open.mode, tables), rider, tables));
            }
            rider.open = Some(OpenTrip {
                mode: record.mode,
                area: record.area,
                operator: record.operator,
                line: tap.line,
                stop: tap.stop,
                concession: record.result.concession,
                pay_percent: record.pay_percent,
                at_ms: now,
            });
        }
        (TapKind::Exit, true) => match rider.open.take() {
            Some(open) => {
                let trip = Ride {
                    kind: ChargeKind::Trip,
                    at_ms: now,
                    ..open_ride(&open, record.terminal_id)
                };
                let base = trip_fare(&open, tap.line, tap.stop, now, tables);
                charges.push(price(trip, base, rider, tables));
            }
            None => {
                let orphan = Ride {
                    kind: ChargeKind::ExitWithoutEntry,
                    ..full_fare(here)
                };
                charges.push(price(orphan, max_fare(record.mode, tables), rider, tables));
            }
        },
        _ => {
            let base = flat_fare(record.mode, record.area, tap.line, tables);
            charges.push(price(here, base, rider, tables));
        }
    }
    charges
}

/// What a paid-area trip from `entry` to a stop would have cost at the entry's pay share, with
/// no transfer discount and no in-system surcharge: what a trip whose exit was never tapped is
/// completed at (`tapgate settle adjust --complete-trip`). `None` for a tap that opens no trip.
pub fn completed_trip_fare(
    entry: &JournalRecord,
    exit_line: u16,
    exit_stop: u16,
    tables: &FareTables,
) -> Option<u32> {
    if entry.tap.kind != TapKind::Entry || !entry.mode.needs_exit_tap() {
        return None;
    }
    let open = OpenTrip {
        mode: entry.mode,
        area: entry.area,
        operator: entry.operator,
        line: entry.tap.line,
        stop: entry.tap.stop,
        concession: entry.result.concession,
        pay_percent: entry.pay_percent,
        at_ms: entry.server_time_ms,
    };
    let base = trip_fare(&open, exit_line, exit_stop, entry.server_time_ms, tables);
    Some(base * u32::from(entry.pay_percent.min(100)) / 100)
}

/// The ride an open trip makes, charged to where it entered.
fn open_ride(open: &OpenTrip, exit_terminal: u64) -> Ride {
    Ride {
        kind: ChargeKind::Trip,
        area: open.area,
        operator: open.operator,
        mode: open.mode,
        line: open.line,
        terminal_id: exit_terminal,
        concession: open.concession,
        pay_percent: open.pay_percent,
        at_ms: open.at_ms,
    }
}

fn flat_fare(mode: Mode, area: u32, line: u16, tables: &FareTables) -> u32 {
    match mode {
        Mode::Bus => tables.bus.fare(area, line),
        Mode::Ferry => tables.ferry.fare(area, line),
        Mode::Cableway => tables.cableway.fare(area, line),
        Mode::Metro => tables.metro.bands.first().map_or(tables.metro.max, |b| b.1),
        Mode::IntercityRail => tables.intercity.min,
    }
}

fn max_fare(mode: Mode, tables: &FareTables) -> u32 {
    match mode {
        Mode::IntercityRail => tables.intercity.max,
        _ => tables.metro.max,
    }
}

fn trip_fare(
    entry: &OpenTrip,
    exit_line: u16,
    exit_stop: u16,
    exit_ms: u64,
    tables: &FareTables,
) -> u32 {
    match entry.mode {
        Mode::IntercityRail => {
            let t = &tables.intercity;
            let km = f64::from(entry.stop.abs_diff(exit_stop)) * t.km_per_stop;
            ((km * f64::from(t.fen_per_km)) as u32).clamp(t.min, t.max)
        }
        _ => {
            let metro = &tables.metro;
            let inside_ms = exit_ms.saturating_sub(entry.at_ms);
            let overtime = metro.time_limit_s > 0 && inside_ms > metro.time_limit_s * 1000;
            let surcharge = if overtime { metro.overtime_fen } else { 0 };
            (metro.fare(entry, exit_line, exit_stop) + surcharge).min(MAX_FEN)
        }
    }
}

/// The transfer discount `ride` gets after the card's last paid ride: at most that ride's fare
/// and the table's maximum, for bus–bus, bus–rail and rail–bus (not rail–rail, which is one
/// trip), once per window, never for the same vehicle and for the same route only after
/// `same_route_after_s`.
fn transfer_discount(
    ride: &Ride,
    class: TransferClass,
    fare: u32,
    rider: &RiderState,
    tables: &FareTables,
) -> u32 {
    let rule = &tables.transfer;
    let window = rule.window_s * 1000;
    let Some(last) = rider.last_paid else {
        return 0;
    };
    let since = ride.at_ms.saturating_sub(last.at_ms);
    let allowed_pair = match (last.class, class) {
        (TransferClass::Rail, TransferClass::Rail) => false,
        (TransferClass::Bus, TransferClass::Bus) => {
            last.terminal_id != ride.terminal_id
                && ((last.area, last.line) != (ride.area, ride.line)
                    || since >= rule.same_route_after_s * 1000)
        }
        _ => true,
    };
    let window_free = rider
        .last_transfer_ms
        .is_none_or(|t| ride.at_ms.saturating_sub(t) >= window);
    if allowed_pair
        && last.transferable
        && rule.covers(ride.area, ride.concession)
        && since <= window
        && window_free
        && ride.kind != ChargeKind::MissingExit
    {
        fare.min(last.fare).min(rule.max_discount)
    } else {
        0
    }
}

fn price(ride: Ride, base: u32, rider: &mut RiderState, tables: &FareTables) -> Charge {
    let mut fare = base * u32::from(ride.pay_percent.min(100)) / 100;
    let forgone_fen = base - fare;
    let class = match ride.mode {
        Mode::Bus => Some(TransferClass::Bus),
        Mode::Metro => Some(TransferClass::Rail),
        _ => None,
    };
    let mut discount = 0;
    if let Some(class) = class {
        discount = transfer_discount(&ride, class, fare, rider, tables);
        if discount > 0 {
            rider.last_transfer_ms = Some(ride.at_ms);
        }
        fare -= discount;
        if fare > 0 || discount > 0 {
            rider.last_paid = Some(PaidRide {
                class,
                fare: fare + discount,
                at_ms: ride.at_ms,
                transferable: tables.transfer.covers(ride.area, ride.concession),
                terminal_id: ride.terminal_id,
                area: ride.area,
                line: ride.line,
            });
        }
    }

    // The cap is for city transit: an intercity train ticket neither counts towards it nor is
    // cut by it.
    if ride.mode != Mode::IntercityRail {
        if tables.daily_cap > 0 {
            fare = fare.min(tables.daily_cap.saturating_sub(rider.paid_today));
        }
        rider.paid_today = rider.paid_today.saturating_add(fare);
    }
    Charge {
        kind: ride.kind,
        area: AreaCode(ride.area),
        operator: ride.operator,
        mode: ride.mode,
        fare_fen: fare,
        concession: ride.concession,
        forgone_fen,
        line: ride.line,
        vehicle: (ride.kind == ChargeKind::Flat).then_some(ride.terminal_id),
        transfer_discount: discount,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use tapgate_protocol::{AREAS, Issuer, RIDES_LEFT_NOT_APPLICABLE, Reason, Tap, TapResult};

    /// Money from the whole range a table may hold, its ends included.
    fn fen() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0), Just(MAX_FEN), 0..=MAX_FEN]
    }

    fn km() -> impl Strategy<Value = f64> {
        prop_oneof![Just(0.0), 0.0..100.0f64, Just(1e12)]
    }

    fn flat() -> impl Strategy<Value = FlatTable> {
        (
            fen(),
            proptest::collection::vec((0..AREAS.len(), fen()), 0..3),
        )
            .prop_map(|(default, areas)| FlatTable {
                default,
                areas: areas
                    .into_iter()
                    .map(|(i, fen)| (AREAS[i].code.0.to_string(), fen))
                    .collect(),
                routes: HashMap::new(),
            })
    }

    /// Tables across the whole range the checks allow, and one draw in ten past it (bands out
    /// of order, min above max), so both sides of the checks are drawn.
    fn tables() -> impl Strategy<Value = FareTables> {
        (
            (fen(), 0..=MAX_TRANSFER_WINDOW_S, fen()),
            (flat(), flat(), flat()),
            (
                km(),
                km(),
                proptest::collection::vec((km(), fen()), 0..6),
                fen(),
            ),
            (km(), fen(), fen(), fen(), proptest::bool::weighted(0.1)),
        )
            .prop_map(
                |(
                    (daily_cap, window_s, max_discount),
                    (bus, ferry, cableway),
                    (km_per_stop, line_change_km, mut bands, metro_max),
                    (intercity_km, fen_per_km, a, b, out_of_order),
                )| {
                    if !out_of_order {
                        bands.sort_by(|x, y| x.0.total_cmp(&y.0));
                        bands.dedup_by(|x, y| x.0 == y.0);
                    }
                    let (min, max) = if out_of_order {
                        (a.max(b), a.min(b))
                    } else {
                        (a.min(b), a.max(b))
                    };
                    FareTables {
                        day: FareTables::embedded_default().day,
                        daily_cap,
                        transfer: TransferRule {
                            window_s,
                            max_discount,
                            areas: vec![500103, 500101],
                            concessions: vec!["none".into(), "student".into()],
                            same_route_after_s: window_s / 4,
                        },
                        bus,
                        ferry,
                        cableway,
                        metro: MetroTable {
                            km_per_stop,
                            line_change_km,
                            bands,
                            max: metro_max,
                            time_limit_s: window_s,
                            overtime_fen: max_discount,
                            lines: FareTables::embedded_default().metro.lines,
                            network: NetworkCache::default(),
                        },
                        intercity: IntercityTable {
                            km_per_stop: intercity_km,
                            fen_per_km,
                            min,
                            max,
                        },
                    }
                },
            )
    }

    fn taps() -> impl Strategy<Value = Vec<JournalRecord>> {
        let modes = [
            Mode::Bus,
            Mode::Metro,
            Mode::Ferry,
            Mode::Cableway,
            Mode::IntercityRail,
        ];
        let kinds = [TapKind::Flat, TapKind::Entry, TapKind::Exit];
        let concessions = [Concession::None, Concession::Elder, Concession::Student];
        proptest::collection::vec(
            (
                0..modes.len(),
                0..kinds.len(),
                0..AREAS.len(),
                any::<u16>(),
                any::<u16>(),
                0..3 * 24 * 3_600_000u64,
                0..concessions.len(),
                0..=100u8,
            )
                .prop_map(move |(m, k, a, line, stop, after, c, pay_percent)| {
                    let concession = concessions[c];
                    JournalRecord {
                        pay_percent: if concession == Concession::None {
                            100
                        } else {
                            pay_percent
                        },
                        ..record(
                            modes[m],
                            kinds[k],
                            AREAS[a].code.0,
                            line,
                            stop,
                            T0 + after,
                            concession,
                        )
                    }
                }),
            1..60,
        )
        .prop_map(|mut taps| {
            taps.sort_by_key(|r| r.server_time_ms);
            taps
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Whatever tables pass the checks, pricing any three days of taps finishes (no
        /// overflow, no clamp with min above max) and charges within the money range.
        #[test]
        fn tables_that_pass_the_checks_never_make_the_engine_fail(
            tables in tables(),
            taps in taps(),
        ) {
            let valid = tables.problems().is_empty();
            prop_assert_eq!(
                valid,
                tables.intercity.min <= tables.intercity.max
                    && tables.metro.bands.windows(2).all(|w| w[0].0 < w[1].0)
            );
            prop_assume!(valid);
            let mut rider = RiderState::default();
            for record in &taps {
                for charge in settle(record, &mut rider, &tables) {
                    prop_assert!(charge.fare_fen <= MAX_FEN);
                }
            }
        }
    }

    #[test]
    fn each_problem_names_its_key() {
        let mut tables = FareTables::embedded_default();
        tables.intercity.min = 3000;
        tables.intercity.max = 2000;
        tables.metro.km_per_stop = -1.6;
        tables.bus.areas.insert("999999".into(), 100);
        let problems = tables.problems().join("\n");
        for expected in [
            "intercity: min 3000 is more than max 2000",
            "metro.km_per_stop: -1.6 is not a distance",
            "bus.areas.999999: not one of the 41 area codes",
        ] {
            assert!(problems.contains(expected), "{problems}");
        }
        assert!(FareTables::embedded_default().problems().is_empty());
    }

    #[test]
    fn the_digest_follows_the_tables_not_their_layout() {
        let shipped = FareTables::embedded_default();
        assert_eq!(shipped.digest().len(), 16);
        let reworded = format!("# the same tables, commented\n\n{DEFAULT_FARES_TOML}");
        assert_eq!(
            FareTables::from_toml(&reworded).unwrap().digest(),
            shipped.digest()
        );
        let mut dearer = shipped.clone();
        dearer.daily_cap += 100;
        assert_ne!(dearer.digest(), shipped.digest());
    }

    // 2026-11-29T08:00:00Z = 16:00 in Chongqing.
    const T0: u64 = 1_795_939_200_000;
    const MIN: u64 = 60_000;

    /// An approved tap of card 42 at gate 1 (sequence 1), as the gateway journals it: the
    /// record the settlement crate's tests build theirs from.
    pub(crate) fn record(
        mode: Mode,
        kind: TapKind,
        area: u32,
        line: u16,
        stop: u16,
        at: u64,
        concession: Concession,
    ) -> JournalRecord {
        JournalRecord {
            terminal_id: 1,
            tag: [0; 16],
            tap: Tap {
                sequence: 1,
                card_id: 42,
                issuer: Issuer::ChongqingSsc,
                kind,
                line,
                stop,
                gate_time_ms: at,
            },
            server_time_ms: at,
            area,
            mode,
            operator: if mode == Mode::Metro { 2 } else { 1 },
            result: TapResult {
                sequence: 1,
                outcome: Outcome::Approve,
                reason: Reason::Approved,
                concession,
                fare_fen: 0,
                rides_left: RIDES_LEFT_NOT_APPLICABLE,
            },
            pay_percent: version_1_pay_percent(concession),
            repeat_boarding: false,
            uploaded_ms: None,
        }
    }

    /// A bus boarding in 渝中 by [`record`]'s card.
    pub(crate) fn bus(at: u64) -> JournalRecord {
        record(
            Mode::Bus,
            TapKind::Flat,
            500103,
            12,
            3,
            at,
            Concession::None,
        )
    }

    fn metro(kind: TapKind, line: u16, stop: u16, at: u64) -> JournalRecord {
        record(Mode::Metro, kind, 500103, line, stop, at, Concession::None)
    }

    fn run(records: &[JournalRecord]) -> Vec<Charge> {
        run_with(&FareTables::embedded_default(), records)
    }

    fn run_with(tables: &FareTables, records: &[JournalRecord]) -> Vec<Charge> {
        let mut rider = RiderState::default();
        records
            .iter()
            .flat_map(|r| settle(r, &mut rider, tables))
            .collect()
    }

    /// The shipped tables with a daily cap of 15 yuan.
    fn capped() -> FareTables {
        FareTables {
            daily_cap: 1500,
            ..FareTables::embedded_default()
        }
    }

    #[test]
    fn intercity_rail_is_outside_the_daily_cap() {
        let intercity = |kind, stop, at| {
            let mut r = record(
                Mode::IntercityRail,
                kind,
                500106,
                1,
                stop,
                at,
                Concession::None,
            );
            r.operator = 7;
            r
        };
        let mut day: Vec<JournalRecord> = (0..8).map(|i| bus(T0 + i * 2 * MIN)).collect();
        day.push(intercity(TapKind::Entry, 1, T0 + 30 * MIN));
        day.push(intercity(TapKind::Exit, 5, T0 + 90 * MIN));
        day.push(bus(T0 + 120 * MIN));
        let charges = run_with(&capped(), &day);
        // Eight buses: 1,600 fen capped to 1,500 (the eighth pays 100); the train's 100 km at
        // full fare; the bus after it still capped.
        assert_eq!(fares(&charges[7..]), [100, 3000, 0]);
        assert_eq!(charges.iter().map(|c| c.fare_fen).sum::<u32>(), 1500 + 3000);
    }

    #[test]
    fn rider_state_round_trips_through_its_bytes() {
        let tables = FareTables::embedded_default();
        let mut rider = RiderState::default();
        assert_eq!(RiderState::decode(&rider.encode()), Some(rider.clone()));
        let elder_bus = record(
            Mode::Bus,
            TapKind::Flat,
            500103,
            12,
            3,
            T0,
            Concession::Elder,
        );
        for r in [
            elder_bus,
            bus(T0 + 5 * MIN),
            metro(TapKind::Entry, 1, 2, T0 + 20 * MIN),
        ] {
            settle(&r, &mut rider, &tables);
        }
        assert!(rider.open.is_some() && rider.last_paid.is_some());
        let bytes = rider.encode();
        assert_eq!(RiderState::decode(&bytes), Some(rider));
        assert_eq!(RiderState::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(RiderState::decode(&[bytes.as_slice(), &[0]].concat()), None);
    }

    fn fares(charges: &[Charge]) -> Vec<u32> {
        charges.iter().map(|c| c.fare_fen).collect()
    }

    #[test]
    fn a_trip_the_station_table_lists_is_priced_by_its_shortest_way() {
        // 朝天门 (line 1, stop 1) to 鱼洞 (line 2, stop 25): 29.36 km changing at 大坪, the
        // 6-yuan band; the per-stop estimate (24 stops and a change, 40.4 km) would be 7.
        let trip = [
            metro(TapKind::Entry, 1, 1, T0),
            metro(TapKind::Exit, 2, 25, T0 + 50 * MIN),
        ];
        assert_eq!(fares(&run(&trip)), [600]);
        let mut no_table = FareTables::embedded_default();
        no_table.metro.lines.clear();
        assert_eq!(fares(&run_with(&no_table, &trip)), [700]);
        // A stop beyond the table's stations falls back to the estimate.
        let beyond = [
            metro(TapKind::Entry, 2, 24, T0),
            metro(TapKind::Exit, 2, 30, T0 + 10 * MIN),
        ];
        assert_eq!(fares(&run(&beyond)), [300]);
    }

    #[test]
    fn flat_fares_by_default_area_and_route() {
        assert_eq!(fares(&run(&[bus(T0)])), [200]);
        assert_eq!(
            fares(&run(&[record(
                Mode::Bus,
                TapKind::Flat,
                500101,
                5,
                1,
                T0,
                Concession::None
            )])),
            [100]
        );
        assert_eq!(
            fares(&run(&[record(
                Mode::Bus,
                TapKind::Flat,
                500103,
                871,
                1,
                T0,
                Concession::None
            )])),
            [300]
        );
        assert_eq!(
            fares(&run(&[record(
                Mode::Ferry,
                TapKind::Flat,
                500103,
                1,
                1,
                T0,
                Concession::None
            )])),
            [200]
        );
        assert_eq!(
            fares(&run(&[record(
                Mode::Cableway,
                TapKind::Flat,
                500103,
                1,
                1,
                T0,
                Concession::None
            )])),
            [2000]
        );
    }

    #[test]
    fn metro_fare_by_distance_between_entry_and_exit() {
        // 3 stops × 1.6 km = 4.8 km → first band.
        let c = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Exit, 2, 13, T0 + 20 * MIN),
        ]);
        assert_eq!((c[0].kind, c[0].fare_fen), (ChargeKind::Trip, 200));
        // 10 stops = 16 km, plus 2 km for the line change = 18 km → 500.
        let c = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Exit, 3, 20, T0 + 40 * MIN),
        ]);
        assert_eq!(fares(&c), [500]);
        // Beyond the last band: the maximum.
        let c = run(&[
            metro(TapKind::Entry, 2, 1, T0),
            metro(TapKind::Exit, 2, 40, T0 + 80 * MIN),
        ]);
        assert_eq!(fares(&c), [700]);
    }

    #[test]
    fn a_missing_exit_is_charged_the_maximum_at_the_next_entry() {
        let c = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Entry, 2, 12, T0 + 5 * 60 * MIN),
        ]);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].kind, c[0].fare_fen), (ChargeKind::MissingExit, 700));
    }

    #[test]
    fn an_exit_without_entry_is_charged_the_maximum() {
        let c = run(&[metro(TapKind::Exit, 2, 10, T0)]);
        assert_eq!(
            (c[0].kind, c[0].fare_fen),
            (ChargeKind::ExitWithoutEntry, 700)
        );
    }

    #[test]
    fn bus_then_metro_within_the_hour_gets_the_transfer_discount_once() {
        let c = run(&[
            bus(T0),
            metro(TapKind::Entry, 2, 10, T0 + 20 * MIN),
            metro(TapKind::Exit, 2, 20, T0 + 50 * MIN),
        ]);
        // Bus 200; metro 10 stops = 16 km → 400, minus min(200 paid, 200 cap) = 200.
        assert_eq!(fares(&c), [200, 200]);
        assert_eq!(c[1].transfer_discount, 200);
        // A second transfer within the same hour gets nothing.
        let c = run(&[
            bus(T0),
            metro(TapKind::Entry, 2, 10, T0 + 10 * MIN),
            metro(TapKind::Exit, 2, 12, T0 + 20 * MIN),
            bus(T0 + 30 * MIN),
        ]);
        assert_eq!(fares(&c), [200, 0, 200]);
    }

    /// The fare of a card's rides depends on the order they are priced in, so settlement must
    /// be able to tell when a tap comes after a later one of its card.
    #[test]
    fn a_tap_older_than_what_the_state_remembers_is_out_of_order() {
        let tables = FareTables::embedded_default();
        let mut rider = RiderState::default();
        assert_eq!(rider.latest_ms(), None);
        settle(&bus(T0 + 30 * MIN), &mut rider, &tables);
        assert_eq!(rider.latest_ms(), Some(T0 + 30 * MIN));
        settle(
            &metro(TapKind::Entry, 2, 10, T0 + 40 * MIN),
            &mut rider,
            &tables,
        );
        assert_eq!(rider.latest_ms(), Some(T0 + 40 * MIN));
        let late = bus(T0);
        assert!(rider.latest_ms().is_some_and(|t| late.server_time_ms < t));
        // A bus then a short metro trip: in time order the metro trip gets the transfer
        // discount; priced with the bus last, the bus does. Same total, other operators.
        let by_mode = |charges: Vec<Charge>| -> Vec<(Mode, u32)> {
            let mut v: Vec<_> = charges.iter().map(|c| (c.mode, c.fare_fen)).collect();
            v.sort();
            v
        };
        let (entry, exit) = (
            metro(TapKind::Entry, 2, 10, T0 + 10 * MIN),
            metro(TapKind::Exit, 2, 12, T0 + 20 * MIN),
        );
        let in_time_order = by_mode(run(&[bus(T0), entry, exit]));
        let in_arrival_order = by_mode(run(&[entry, exit, bus(T0)]));
        assert_eq!(in_time_order, [(Mode::Bus, 200), (Mode::Metro, 0)]);
        assert_eq!(in_arrival_order, [(Mode::Bus, 0), (Mode::Metro, 200)]);
    }

    #[test]
    fn rail_to_bus_counts_the_hour_from_the_exit() {
        let c = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Exit, 2, 12, T0 + 90 * MIN),
            bus(T0 + 140 * MIN),
        ]);
        assert_eq!(fares(&c), [200, 0]);
        assert_eq!(c[1].transfer_discount, 200);
        let c = run(&[bus(T0), bus(T0 + 10 * MIN)]);
        assert_eq!(fares(&c), [200, 200], "the same vehicle is no transfer");
        let c = run(&[
            bus(T0),
            metro(TapKind::Entry, 2, 1, T0 + 61 * MIN),
            metro(TapKind::Exit, 2, 2, T0 + 70 * MIN),
        ]);
        assert_eq!(fares(&c), [200, 200], "outside the hour");
    }

    #[test]
    fn the_discount_is_at_most_the_first_fare_paid() {
        let mut tables = FareTables::embedded_default();
        tables.bus.routes.insert("500103:5".into(), 100);
        let cheap_bus = record(Mode::Bus, TapKind::Flat, 500103, 5, 1, T0, Concession::None);
        let c = run_with(
            &tables,
            &[
                cheap_bus,
                metro(TapKind::Entry, 2, 10, T0 + MIN),
                metro(TapKind::Exit, 2, 20, T0 + 30 * MIN),
            ],
        );
        assert_eq!(fares(&c), [100, 300]);
    }

    /// A bus ride `at`, on route `line` of `area`, through the gate (vehicle) `vehicle`.
    fn bus_ride(vehicle: u64, area: u32, line: u16, at: u64) -> JournalRecord {
        JournalRecord {
            terminal_id: vehicle,
            ..record(
                Mode::Bus,
                TapKind::Flat,
                area,
                line,
                3,
                at,
                Concession::None,
            )
        }
    }

    #[test]
    fn bus_to_bus_is_a_transfer_on_another_vehicle_and_on_the_same_route_after_15_minutes() {
        let other_route = run(&[
            bus_ride(1, 500103, 12, T0),
            bus_ride(2, 500103, 13, T0 + 5 * MIN),
        ]);
        assert_eq!(fares(&other_route), [200, 0]);
        let same_route_soon = run(&[
            bus_ride(1, 500103, 12, T0),
            bus_ride(2, 500103, 12, T0 + 10 * MIN),
        ]);
        assert_eq!(fares(&same_route_soon), [200, 200]);
        let same_route_later = run(&[
            bus_ride(1, 500103, 12, T0),
            bus_ride(2, 500103, 12, T0 + 15 * MIN),
        ]);
        assert_eq!(fares(&same_route_later), [200, 0]);
        let same_vehicle = run(&[
            bus_ride(1, 500103, 12, T0),
            bus_ride(1, 500103, 12, T0 + 30 * MIN),
        ]);
        assert_eq!(fares(&same_vehicle), [200, 200]);
    }

    #[test]
    fn rail_to_rail_is_one_network_not_a_transfer() {
        let c = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Exit, 2, 20, T0 + 20 * MIN),
            metro(TapKind::Entry, 2, 20, T0 + 30 * MIN),
            metro(TapKind::Exit, 2, 30, T0 + 50 * MIN),
        ]);
        assert_eq!(fares(&c), [400, 400]);
    }

    #[test]
    fn transfers_hold_in_the_main_city_for_the_card_types_covered() {
        // 万州 is outside the main city: no discount there.
        let c = run(&[
            bus_ride(1, 500101, 12, T0),
            bus_ride(2, 500101, 13, T0 + 5 * MIN),
        ]);
        assert_eq!(fares(&c), [100, 100]);
        // A student card is not covered; a half-fare disability card is.
        let with = |concession, pay_percent, r: JournalRecord| JournalRecord {
            result: TapResult {
                concession,
                ..r.result
            },
            pay_percent,
            ..r
        };
        let student = |r| with(Concession::Student, 50, r);
        let c = run(&[
            student(bus_ride(1, 500103, 12, T0)),
            student(bus_ride(2, 500103, 13, T0 + 5 * MIN)),
        ]);
        assert_eq!(fares(&c), [100, 100]);
        let half = |r| with(Concession::Disabled, 50, r);
        let c = run(&[
            half(bus_ride(1, 500103, 12, T0)),
            half(metro(TapKind::Entry, 2, 10, T0 + 10 * MIN)),
            half(metro(TapKind::Exit, 2, 20, T0 + 30 * MIN)),
        ]);
        // Bus 200 at 50 % = 100; metro 400 at 50 % = 200, less min(100 paid, 200) = 100.
        assert_eq!(fares(&c), [100, 100]);
        assert_eq!(c[1].transfer_discount, 100);
        assert_eq!(
            c.iter().map(|c| c.forgone_fen).collect::<Vec<_>>(),
            [100, 200]
        );
    }

    #[test]
    fn a_trip_longer_than_the_time_limit_pays_the_surcharge() {
        let within = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Exit, 2, 13, T0 + 180 * MIN),
        ]);
        assert_eq!(fares(&within), [200]);
        let over = run(&[
            metro(TapKind::Entry, 2, 10, T0),
            metro(TapKind::Exit, 2, 13, T0 + 181 * MIN),
        ]);
        assert_eq!(fares(&over), [900]);
    }

    #[test]
    fn a_repeated_boarding_costs_nothing_and_leaves_the_state_alone() {
        let tables = FareTables::embedded_default();
        let mut rider = RiderState::default();
        assert_eq!(fares(&settle(&bus(T0), &mut rider, &tables)), [200]);
        let before = rider.clone();
        let repeat = JournalRecord {
            repeat_boarding: true,
            ..bus(T0 + MIN)
        };
        assert!(settle(&repeat, &mut rider, &tables).is_empty());
        assert_eq!(rider, before);
    }

    #[test]
    fn a_concession_is_priced_as_the_gateway_recorded_it() {
        // The gateway took the elder card's last counted ride for the first tap and answered
        // the second at the full fare: settlement books exactly that, whatever it saw before.
        let elder =
            |at, concession| record(Mode::Bus, TapKind::Flat, 500103, 12, 3, at, concession);
        let c = run(&[
            elder(T0, Concession::Elder),
            elder(T0 + MIN, Concession::None),
        ]);
        assert_eq!(fares(&c), [0, 200]);
        assert_eq!(
            c.iter().map(|c| c.concession).collect::<Vec<_>>(),
            [Concession::Elder, Concession::None]
        );
    }

    #[test]
    fn the_daily_cap_limits_what_a_card_pays_per_settlement_day() {
        let rides: Vec<_> = (0..10).map(|i| bus(T0 + i * 2 * 60 * MIN / 10)).collect();
        let c = run_with(&capped(), &rides);
        assert_eq!(c.iter().map(|c| c.fare_fen).sum::<u32>(), 1500);
        assert_eq!(c[8].fare_fen, 0);
        // The night after midnight still counts with the day (16:00 + 9 h = 01:00, before the
        // 04:00 cut-off); the next settlement day starts afresh (16:00 + 13 h = 05:00).
        let mut after_midnight = rides.clone();
        after_midnight.push(bus(T0 + 9 * 60 * MIN));
        assert_eq!(
            run_with(&capped(), &after_midnight)
                .last()
                .unwrap()
                .fare_fen,
            0
        );
        let mut with_next_day = rides.clone();
        with_next_day.push(bus(T0 + 13 * 60 * MIN));
        assert_eq!(
            run_with(&capped(), &with_next_day).last().unwrap().fare_fen,
            200
        );
        // The shipped tables have no cap.
        assert_eq!(fares(&run(&rides)).iter().sum::<u32>(), 2000);
    }

    #[test]
    fn transfer_then_cap_in_order() {
        // Seven buses (1,400), then a metro trip of 400 less the 200 transfer: 200, capped to
        // the 100 left of 1,500.
        let mut rides: Vec<_> = (0..7).map(|i| bus(T0 + i * 2 * MIN)).collect();
        rides.push(metro(TapKind::Entry, 2, 10, T0 + 20 * MIN));
        rides.push(metro(TapKind::Exit, 2, 20, T0 + 40 * MIN));
        let c = run_with(&capped(), &rides);
        assert_eq!(
            c.last().map(|c| (c.fare_fen, c.transfer_discount)),
            Some((100, 200))
        );
    }

    #[test]
    fn intercity_rail_by_distance_within_bounds() {
        let entry = record(
            Mode::IntercityRail,
            TapKind::Entry,
            500103,
            1,
            1,
            T0,
            Concession::None,
        );
        let exit = record(
            Mode::IntercityRail,
            TapKind::Exit,
            500103,
            1,
            12,
            T0 + 90 * MIN,
            Concession::None,
        );
        // 11 stops × 25 km × 30 fen = 8,250 fen, within [1,000, 15,400].
        assert_eq!(fares(&run(&[entry, exit])), [8250]);
    }

    #[test]
    fn denials_cost_nothing_and_bad_tables_are_refused() {
        let mut denied = bus(T0);
        denied.result.outcome = Outcome::Deny;
        assert!(run(&[denied]).is_empty());
        let bad = DEFAULT_FARES_TOML.replace("[[6, 200], [11, 300]", "[[11, 200], [6, 300]");
        assert!(FareTables::from_toml(&bad).is_err());
    }
}
