//! The authorization decision: a pure function of the tap, the card, this node's memory of the
//! card, the policy and the time. No I/O, no clock, no locks: the caller supplies everything and
//! applies the returned state change.

use crate::card::{Boarding, CardActivity, CardRecord, CardState, OpenEntry};
use crate::policy::{DegradedMode, Policy};
use chrono::NaiveDate;
use tapgate_protocol::{
    AreaCode, Concession, Mode, Outcome, RIDES_LEFT_NOT_APPLICABLE, Reason, Tap, TapKind,
};
use tapgate_runtime::clock::local_date;

/// Where the tap happened: the gate and its provisioned place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatePlace {
    /// The gate; on a bus, the vehicle.
    pub terminal_id: u64,
    pub area: AreaCode,
    pub mode: Mode,
}

/// What the card directory said about the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardLookup {
    Found(CardRecord),
    Unknown,
    /// Not cached, and the directory could not be asked.
    Unavailable,
}

/// What taking a counted ride found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RideClaim {
    /// The ride is the tap's; this many are left.
    Taken { left: u32 },
    /// The allowance was used up (by this gateway or another): the tap pays the full fare.
    NoneLeft,
}

/// The counted ride a decision used: taken from the allowance period starting `period`, which
/// holds `allowance` rides when the card's count belongs to an earlier period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountedRide {
    pub period: NaiveDate,
    pub allowance: u32,
}

/// The verdict and the state change it implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub reason: Reason,
    pub concession: Concession,
    /// Share of the full fare the rider pays, in percent: the concession's, by the card's grade.
    pub pay_percent: u8,
    pub fare_fen: u32,
    pub rides_left: u16,
    /// The ride taken from the card's counted allowance, if the decision took one.
    pub counted_ride: Option<CountedRide>,
    /// The card boarded this vehicle moments ago: approved, not charged or counted again.
    pub repeat_boarding: bool,
    /// This node's memory of the card after the tap.
    pub activity: CardActivity,
}

impl Decision {
    fn deny(reason: Reason, activity: CardActivity) -> Self {
        Decision {
            outcome: Outcome::Deny,
            reason,
            concession: Concession::None,
            pay_percent: FULL_FARE,
            fare_fen: 0,
            rides_left: RIDES_LEFT_NOT_APPLICABLE,
            counted_ride: None,
            repeat_boarding: false,
            activity,
        }
    }
}

pub fn decide(
    tap: &Tap,
    place: GatePlace,
    card: &CardLookup,
    activity: CardActivity,
    policy: &Policy,
    now_ms: u64,
) -> Decision {
    let card = match card {
        CardLookup::Found(card) => card,
        CardLookup::Unknown => return Decision::deny(Reason::UnknownCard, activity),
        CardLookup::Unavailable => {
            return match policy.degraded_mode {
                DegradedMode::Deny => Decision::deny(Reason::DirectoryUnavailable, activity),
                DegradedMode::FirstRide => Decision {
                    outcome: Outcome::Approve,
                    reason: Reason::Approved,
                    concession: Concession::None,
                    pay_percent: FULL_FARE,
                    fare_fen: policy.fares.max(place.mode),
                    rides_left: RIDES_LEFT_NOT_APPLICABLE,
                    counted_ride: None,
                    repeat_boarding: false,
                    activity: activity_after(tap, place, activity, now_ms),
                },
            };
        }
    };
    match card.state {
        CardState::Active => {}
        CardState::Lost => return Decision::deny(Reason::CardLost, activity),
        CardState::Cancelled => return Decision::deny(Reason::CardCancelled, activity),
        CardState::Blocked => return Decision::deny(Reason::CardBlocked, activity),
    }
    let today = local_date(now_ms);
    if card.expires_on.is_some_and(|last_day| last_day < today) {
        return Decision::deny(Reason::CardExpired, activity);
    }
    if !policy.issuer_accepted(place.area, card.issuer) {
        return Decision::deny(Reason::IssuerNotAccepted, activity);
    }
    if is_pass_back(tap, place, &activity, policy, now_ms) {
        return Decision::deny(Reason::PassBack, activity);
    }
    if is_repeat_boarding(tap, place, &activity, policy, now_ms) {
        return Decision {
            outcome: Outcome::Approve,
            reason: Reason::Approved,
            concession: Concession::None,
            pay_percent: FULL_FARE,
            fare_fen: 0,
            rides_left: RIDES_LEFT_NOT_APPLICABLE,
            counted_ride: None,
            repeat_boarding: true,
            // The window runs from the charged boarding, not from each repeat.
            activity,
        };
    }

    let full_fare = match tap.kind {
        TapKind::Flat | TapKind::Entry => policy.fares.flat_or_min(place.mode),
        // With a known entry the distance fare is settled later; without one, the maximum.
        TapKind::Exit if activity.open_entry.is_some() => 0,
        TapKind::Exit => policy.fares.max(place.mode),
    };
    let mut decision = Decision {
        outcome: Outcome::Approve,
        reason: Reason::Approved,
        concession: Concession::None,
        pay_percent: FULL_FARE,
        fare_fen: full_fare,
        rides_left: RIDES_LEFT_NOT_APPLICABLE,
        counted_ride: None,
        repeat_boarding: false,
        activity: activity_after(tap, place, activity, now_ms),
    };
    let Some(rule) = policy.honoured(card, place.mode, today) else {
        return decision;
    };
    if let Some(allowance) = &rule.allowance {
        let period = allowance.period_start(card.renews_on, today);
        let left = u16::try_from(allowance.rides_left(card, period)).unwrap_or(u16::MAX - 1);
        // A paid-area trip uses one counted ride, at its entry; the exit is covered by it.
        if tap.kind == TapKind::Exit {
            decision.rides_left = left;
        } else if left == 0 {
            // Allowance used up: the ride is approved at the full fare.
            decision.rides_left = 0;
            return decision;
        } else {
            decision.rides_left = left - 1;
            decision.counted_ride = Some(CountedRide {
                period,
                allowance: allowance.rides,
            });
        }
    }
    decision.concession = card.concession;
    decision.pay_percent = rule.pay_percent_for(card.grade);
    decision.fare_fen = full_fare * u32::from(decision.pay_percent) / 100;
    decision
}

/// The pay share of a ride without a concession.
const FULL_FARE: u8 = 100;

/// The decision once the directory has answered for a counted ride the decision took: the
/// count it left, or — when another tap (perhaps at another gateway) used the last ride first —
/// the same approval at the full fare with nothing left.
pub fn with_ride_claim(
    decision: Decision,
    claim: RideClaim,
    place: GatePlace,
    policy: &Policy,
) -> Decision {
    match claim {
        RideClaim::Taken { left } => Decision {
            rides_left: u16::try_from(left).unwrap_or(u16::MAX - 1),
            ..decision
        },
        RideClaim::NoneLeft => Decision {
            concession: Concession::None,
            pay_percent: FULL_FARE,
            fare_fen: policy.fares.flat_or_min(place.mode),
            rides_left: 0,
            counted_ride: None,
            ..decision
        },
    }
}

fn is_pass_back(
    tap: &Tap,
    place: GatePlace,
    activity: &CardActivity,
    policy: &Policy,
    now_ms: u64,
) -> bool {
    tap.kind == TapKind::Entry
        && place.mode.needs_exit_tap()
        && activity.open_entry.is_some_and(|entry| {
            entry.terminal_area == place.area.0
                && entry.line == tap.line
                && entry.stop == tap.stop
                && now_ms.saturating_sub(entry.at_ms) < policy.pass_back_window_ms
        })
}

/// A second tap of one card on one bus within the policy's window: a rider unsure the first
/// tap took, not a second ride.
fn is_repeat_boarding(
    tap: &Tap,
    place: GatePlace,
    activity: &CardActivity,
    policy: &Policy,
    now_ms: u64,
) -> bool {
    tap.kind == TapKind::Flat
        && place.mode == Mode::Bus
        && activity.last_boarding.is_some_and(|boarding| {
            boarding.terminal_id == place.terminal_id
                && now_ms.saturating_sub(boarding.at_ms) < policy.bus_double_tap_window_ms
        })
}

fn activity_after(tap: &Tap, place: GatePlace, before: CardActivity, now_ms: u64) -> CardActivity {
    match tap.kind {
        TapKind::Entry if place.mode.needs_exit_tap() => CardActivity {
            open_entry: Some(OpenEntry {
                terminal_area: place.area.0,
                line: tap.line,
                stop: tap.stop,
                at_ms: now_ms,
            }),
            ..before
        },
        TapKind::Exit => CardActivity {
            open_entry: None,
            ..before
        },
        TapKind::Flat if place.mode == Mode::Bus => CardActivity {
            last_boarding: Some(Boarding {
                terminal_id: place.terminal_id,
                at_ms: now_ms,
            }),
            ..before
        },
        _ => before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use tapgate_protocol::Issuer;

    // 2026-11-29T08:00:00Z, 16:00 in Chongqing.
    const NOW: u64 = 1_795_939_200_000;
    const YUZHONG: AreaCode = AreaCode(500103);
    const WANZHOU: AreaCode = AreaCode(500101);
    const CHENGKOU: AreaCode = AreaCode(500229);

    fn policy() -> Policy {
        Policy::embedded_default()
    }

    fn card() -> CardRecord {
        CardRecord {
            card_id: 42,
            state: CardState::Active,
            issuer: Issuer::ChongqingSsc,
            concession: Concession::None,
            grade: None,
            // The shipped policy's example first area to carry concessions.
            home_area: Some(YUZHONG),
            rides_left: 0,
            rides_period: None,
            renews_on: None,
            expires_on: None,
        }
    }

    fn elder(rides_left: u32) -> CardRecord {
        CardRecord {
            concession: Concession::Elder,
            rides_left,
            ..card()
        }
    }

    fn tap(kind: TapKind) -> Tap {
        Tap {
            sequence: 1,
            card_id: 42,
            issuer: Issuer::ChongqingSsc,
            kind,
            line: 2,
            stop: 15,
            gate_time_ms: NOW,
        }
    }

    fn bus(area: AreaCode) -> GatePlace {
        GatePlace {
            terminal_id: 9,
            area,
            mode: Mode::Bus,
        }
    }

    fn metro() -> GatePlace {
        GatePlace {
            terminal_id: 10,
            area: YUZHONG,
            mode: Mode::Metro,
        }
    }

    fn run(card: CardLookup, place: GatePlace, kind: TapKind) -> Decision {
        decide(
            &tap(kind),
            place,
            &card,
            CardActivity::default(),
            &policy(),
            NOW,
        )
    }

    #[test]
    fn active_card_on_a_bus_is_approved_at_the_flat_fare() {
        let d = run(CardLookup::Found(card()), bus(WANZHOU), TapKind::Flat);
        assert_eq!(
            (d.outcome, d.reason, d.fare_fen),
            (Outcome::Approve, Reason::Approved, 200)
        );
        assert_eq!(d.rides_left, RIDES_LEFT_NOT_APPLICABLE);
    }

    #[test]
    fn card_states_deny_with_their_reasons() {
        for (state, reason) in [
            (CardState::Lost, Reason::CardLost),
            (CardState::Cancelled, Reason::CardCancelled),
            (CardState::Blocked, Reason::CardBlocked),
        ] {
            let d = run(
                CardLookup::Found(CardRecord { state, ..card() }),
                bus(WANZHOU),
                TapKind::Flat,
            );
            assert_eq!((d.outcome, d.reason), (Outcome::Deny, reason));
        }
    }

    #[test]
    fn unknown_card_is_denied() {
        let d = run(CardLookup::Unknown, bus(WANZHOU), TapKind::Flat);
        assert_eq!((d.outcome, d.reason), (Outcome::Deny, Reason::UnknownCard));
    }

    #[test]
    fn expired_card_is_denied_from_the_day_after_its_last_day() {
        let on = |y, m, d| {
            CardLookup::Found(CardRecord {
                expires_on: NaiveDate::from_ymd_opt(y, m, d),
                ..card()
            })
        };
        assert_eq!(
            run(on(2026, 11, 29), bus(WANZHOU), TapKind::Flat).outcome,
            Outcome::Approve
        );
        assert_eq!(
            run(on(2026, 11, 28), bus(WANZHOU), TapKind::Flat).reason,
            Reason::CardExpired
        );
    }

    #[test]
    fn issuer_not_accepted_in_the_area_is_denied() {
        let sichuan = CardLookup::Found(CardRecord {
            issuer: Issuer::SichuanTianfuTong,
            ..card()
        });
        assert_eq!(
            run(sichuan, bus(CHENGKOU), TapKind::Flat).reason,
            Reason::IssuerNotAccepted
        );
        assert_eq!(
            run(sichuan, bus(WANZHOU), TapKind::Flat).outcome,
            Outcome::Approve
        );
    }

    /// Milliseconds at 08:00 Chongqing time on a day.
    fn morning(y: i32, m: u32, d: u32) -> u64 {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis() as u64
    }

    fn bus_on(card: CardRecord, area: AreaCode, now: u64, policy: &Policy) -> Decision {
        decide(
            &tap(TapKind::Flat),
            bus(area),
            &CardLookup::Found(card),
            CardActivity::default(),
            policy,
            now,
        )
    }

    #[test]
    fn a_card_that_carries_its_concession_has_it_at_every_gate() {
        // Home area 渝中, loaded in the shipped example rollout: free in 万州 as in 渝中.
        for area in [YUZHONG, WANZHOU, CHENGKOU] {
            let d = run(CardLookup::Found(elder(10)), bus(area), TapKind::Flat);
            assert_eq!(
                (d.concession, d.pay_percent, d.fare_fen, d.rides_left),
                (Concession::Elder, 0, 0, 9),
                "{area:?}"
            );
            assert!(d.counted_ride.is_some());
        }
    }

    #[test]
    fn a_card_not_yet_loaded_pays_everywhere_until_its_home_area_is() {
        let wanzhou_home = CardRecord {
            home_area: Some(WANZHOU),
            ..elder(10)
        };
        let d = run(CardLookup::Found(wanzhou_home), bus(YUZHONG), TapKind::Flat);
        assert_eq!((d.concession, d.fare_fen), (Concession::None, 200));
        assert!(d.counted_ride.is_none());
        let loaded = bus_on(wanzhou_home, YUZHONG, morning(2027, 12, 31), &policy());
        assert_eq!((loaded.concession, loaded.fare_fen), (Concession::Elder, 0));
        // The city's own elder card works city-wide already.
        let city_card = CardRecord {
            issuer: Issuer::ChongqingCityCard,
            ..wanzhou_home
        };
        let d = run(CardLookup::Found(city_card), bus(YUZHONG), TapKind::Flat);
        assert_eq!(d.concession, Concession::Elder);
    }

    #[test]
    fn the_allowance_starts_afresh_each_period() {
        let used_up_last_year = CardRecord {
            rides_period: NaiveDate::from_ymd_opt(2025, 1, 1),
            ..elder(0)
        };
        let d = run(
            CardLookup::Found(used_up_last_year),
            bus(YUZHONG),
            TapKind::Flat,
        );
        assert_eq!((d.concession, d.rides_left), (Concession::Elder, 1199));
        assert_eq!(
            d.counted_ride,
            Some(CountedRide {
                period: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
                allowance: 1200
            })
        );
        // This year's count is used up until 1 January.
        let used_up = CardRecord {
            rides_period: NaiveDate::from_ymd_opt(2026, 1, 1),
            ..elder(0)
        };
        let d = bus_on(used_up, YUZHONG, morning(2026, 12, 31), &policy());
        assert_eq!(
            (d.concession, d.fare_fen, d.rides_left),
            (Concession::None, 200, 0)
        );
        let d = bus_on(used_up, YUZHONG, morning(2027, 1, 1), &policy());
        assert_eq!((d.concession, d.rides_left), (Concession::Elder, 1199));
    }

    #[test]
    fn a_birthday_allowance_renews_on_the_holders_day() {
        let mut p = policy();
        let rule = p.concession_rules.get_mut(&Concession::Elder).unwrap();
        rule.allowance.as_mut().unwrap().renewal = crate::policy::Renewal::Birthday;
        let card = CardRecord {
            renews_on: tapgate_city::MonthDay::new(12, 1),
            rides_period: NaiveDate::from_ymd_opt(2025, 12, 1),
            ..elder(0)
        };
        let d = bus_on(card, YUZHONG, morning(2026, 11, 30), &p);
        assert_eq!((d.concession, d.rides_left), (Concession::None, 0));
        let d = bus_on(card, YUZHONG, morning(2026, 12, 1), &p);
        assert_eq!((d.concession, d.rides_left), (Concession::Elder, 1199));
        assert_eq!(
            d.counted_ride.map(|r| r.period),
            NaiveDate::from_ymd_opt(2026, 12, 1)
        );
        // Without a birthday on the card, the year starts on 1 January.
        let no_day = CardRecord {
            renews_on: None,
            ..card
        };
        let d = bus_on(no_day, YUZHONG, morning(2026, 11, 30), &p);
        assert_eq!(d.rides_left, 1199);
    }

    #[test]
    fn graded_concessions_pay_by_grade() {
        for (grade, pays) in [
            (Some(1), 0),
            (Some(2), 0),
            (Some(3), 100),
            (Some(4), 100),
            (None, 0),
        ] {
            let card = CardRecord {
                concession: Concession::Disabled,
                grade,
                ..card()
            };
            let d = run(CardLookup::Found(card), bus(WANZHOU), TapKind::Flat);
            assert_eq!(
                (d.concession, d.fare_fen),
                (Concession::Disabled, pays),
                "{grade:?}"
            );
            assert_eq!(d.rides_left, RIDES_LEFT_NOT_APPLICABLE);
        }
    }

    #[test]
    fn elder_with_no_rides_left_pays_the_full_fare() {
        let d = run(CardLookup::Found(elder(0)), bus(YUZHONG), TapKind::Flat);
        assert_eq!(
            (d.outcome, d.concession, d.fare_fen, d.rides_left),
            (Outcome::Approve, Concession::None, 200, 0)
        );
        assert!(d.counted_ride.is_none());
    }

    #[test]
    fn the_directory_decides_who_gets_the_last_counted_ride() {
        // This gateway's cache still counts five rides; the shared count has three left after
        // this one, or none because another gateway took the last.
        let d = run(CardLookup::Found(elder(5)), bus(YUZHONG), TapKind::Flat);
        assert!(d.counted_ride.is_some());
        let taken = with_ride_claim(d, RideClaim::Taken { left: 3 }, bus(YUZHONG), &policy());
        assert_eq!(
            (taken.concession, taken.fare_fen, taken.rides_left),
            (Concession::Elder, 0, 3)
        );
        let refused = with_ride_claim(d, RideClaim::NoneLeft, bus(YUZHONG), &policy());
        assert_eq!(
            (
                refused.outcome,
                refused.concession,
                refused.fare_fen,
                refused.rides_left
            ),
            (Outcome::Approve, Concession::None, 200, 0)
        );
        assert!(refused.counted_ride.is_none());
        // The rest of the decision (the card's activity after the tap) is unchanged.
        assert_eq!(refused.activity, d.activity);
    }

    #[test]
    fn concessions_of_other_issuers_are_not_honoured() {
        let t_union_elder = CardRecord {
            issuer: Issuer::TUnion,
            ..elder(5)
        };
        let d = run(
            CardLookup::Found(t_union_elder),
            bus(YUZHONG),
            TapKind::Flat,
        );
        assert_eq!((d.concession, d.fare_fen), (Concession::None, 200));
    }

    /// A metro tap of `card` with this node's `activity`, at `now`, under the shipped policy.
    fn at_metro(tap: Tap, card: CardRecord, activity: CardActivity, now: u64) -> Decision {
        decide(
            &tap,
            metro(),
            &CardLookup::Found(card),
            activity,
            &policy(),
            now,
        )
    }

    #[test]
    fn metro_entry_then_second_entry_at_same_station_is_pass_back() {
        let entry = tap(TapKind::Entry);
        let first = at_metro(entry, card(), CardActivity::default(), NOW);
        assert_eq!((first.outcome, first.fare_fen), (Outcome::Approve, 200));
        let again = at_metro(entry, card(), first.activity, NOW + 60_000);
        assert_eq!(
            (again.outcome, again.reason),
            (Outcome::Deny, Reason::PassBack)
        );
        let later = at_metro(entry, card(), first.activity, NOW + 601_000);
        assert_eq!(later.outcome, Outcome::Approve);
        let other_station = Tap { stop: 16, ..entry };
        let elsewhere = at_metro(other_station, card(), first.activity, NOW + 60_000);
        assert_eq!(elsewhere.outcome, Outcome::Approve);
    }

    #[test]
    fn exit_closes_the_entry_and_an_exit_without_entry_estimates_the_maximum() {
        let entry = at_metro(tap(TapKind::Entry), card(), CardActivity::default(), NOW);
        let exit = at_metro(tap(TapKind::Exit), card(), entry.activity, NOW + 900_000);
        assert_eq!((exit.outcome, exit.fare_fen), (Outcome::Approve, 0));
        assert_eq!(exit.activity.open_entry, None);
        let orphan = at_metro(tap(TapKind::Exit), card(), CardActivity::default(), NOW);
        assert_eq!(orphan.fare_fen, 700);
    }

    #[test]
    fn elder_metro_trip_counts_one_ride_at_entry_only() {
        let entry = at_metro(tap(TapKind::Entry), elder(3), CardActivity::default(), NOW);
        assert!(entry.counted_ride.is_some());
        assert_eq!(entry.rides_left, 2);
        let exit = at_metro(tap(TapKind::Exit), elder(2), entry.activity, NOW + 1);
        assert!(exit.counted_ride.is_none());
        assert_eq!((exit.concession, exit.rides_left), (Concession::Elder, 2));
    }

    #[test]
    fn a_second_tap_on_the_same_bus_is_approved_without_a_charge_or_a_counted_ride() {
        let first = run(CardLookup::Found(elder(5)), bus(YUZHONG), TapKind::Flat);
        assert!(first.counted_ride.is_some());
        let again = |place, after_ms| {
            decide(
                &tap(TapKind::Flat),
                place,
                &CardLookup::Found(elder(4)),
                first.activity,
                &policy(),
                NOW + after_ms,
            )
        };
        let repeat = again(bus(YUZHONG), 60_000);
        assert_eq!(
            (repeat.outcome, repeat.fare_fen, repeat.repeat_boarding),
            (Outcome::Approve, 0, true)
        );
        assert!(repeat.counted_ride.is_none());
        // Past the window, or on another bus, it is a new ride.
        let later = again(bus(YUZHONG), 120_000);
        assert!(!later.repeat_boarding && later.counted_ride.is_some());
        let other_bus = GatePlace {
            terminal_id: 11,
            ..bus(YUZHONG)
        };
        let elsewhere = again(other_bus, 60_000);
        assert!(!elsewhere.repeat_boarding && elsewhere.counted_ride.is_some());
        // A lost card is refused however recently it boarded.
        let lost = decide(
            &tap(TapKind::Flat),
            bus(YUZHONG),
            &CardLookup::Found(CardRecord {
                state: CardState::Lost,
                ..elder(4)
            }),
            first.activity,
            &policy(),
            NOW + 1_000,
        );
        assert_eq!(lost.reason, Reason::CardLost);
    }

    #[test]
    fn directory_unavailable_follows_the_degraded_mode() {
        let unavailable = |p: &Policy| {
            decide(
                &tap(TapKind::Flat),
                bus(WANZHOU),
                &CardLookup::Unavailable,
                CardActivity::default(),
                p,
                NOW,
            )
        };
        let mut p = policy();
        let d = unavailable(&p);
        assert_eq!(
            (d.outcome, d.reason),
            (Outcome::Deny, Reason::DirectoryUnavailable)
        );
        p.degraded_mode = DegradedMode::FirstRide;
        let d = unavailable(&p);
        assert_eq!(
            (d.outcome, d.concession, d.fare_fen),
            (Outcome::Approve, Concession::None, 200)
        );
    }

    #[test]
    fn student_pays_half() {
        let student = CardRecord {
            concession: Concession::Student,
            issuer: Issuer::ChongqingCityCard,
            ..card()
        };
        let d = run(CardLookup::Found(student), bus(YUZHONG), TapKind::Flat);
        assert_eq!(
            (d.concession, d.fare_fen, d.rides_left),
            (Concession::Student, 100, RIDES_LEFT_NOT_APPLICABLE)
        );
    }
}
