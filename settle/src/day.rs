//! The settlement day: which day's books a tap belongs to, and when a day's books close.
//!
//! A settlement day runs from one cut-off to the next in Chongqing time, so the night's last
//! buses and trains land in the day their service began. A day closes `close_after_minutes`
//! after it ends; from then on its books are never changed, and a tap that reaches settlement
//! later is booked to the open day as a late tap that names the day it was tapped. All of it is
//! arithmetic on the tap's gateway time and the settler's clock, so the same tables give every
//! settler and every offline reconcile the same days.

use chrono::{Days, NaiveDate};
use serde::{Deserialize, Serialize};
use tapgate_runtime::clock::local_date;

/// The longest a finished day may stay open: a week.
const MAX_CLOSE_AFTER_MINUTES: u32 = 7 * 24 * 60;

/// Local time of day as "HH:MM", held as minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cutoff(u16);

impl TryFrom<String> for Cutoff {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let parsed = s.split_once(':').and_then(|(h, m)| {
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
        });
        parsed
            .map(Cutoff)
            .ok_or_else(|| format!("cut-off `{s}`: expected HH:MM between 00:00 and 23:59"))
    }
}

impl From<Cutoff> for String {
    fn from(c: Cutoff) -> String {
        format!("{:02}:{:02}", c.0 / 60, c.0 % 60)
    }
}

/// When settlement days begin and when they close (`[day]` in the fare tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementDay {
    /// Chongqing time at which one settlement day ends and the next begins.
    pub cutoff: Cutoff,
    /// How long after its end a day's books stay open for taps still on their way.
    pub close_after_minutes: u32,
}

impl SettlementDay {
    fn cutoff_ms(&self) -> u64 {
        u64::from(self.cutoff.0) * 60_000
    }

    /// The settlement day of something that happened at `ms` (Unix milliseconds).
    pub fn day_of(&self, ms: u64) -> NaiveDate {
        local_date(ms.saturating_sub(self.cutoff_ms()))
    }

    /// The latest day whose books are closed at `now_ms`.
    pub fn closed_through(&self, now_ms: u64) -> NaiveDate {
        let close_after_ms = u64::from(self.close_after_minutes) * 60_000;
        let day = self.day_of(now_ms.saturating_sub(close_after_ms));
        day.pred_opt().unwrap_or(day)
    }

    /// The day a late tap is booked to at `now_ms` when every day through `closed` is closed:
    /// the day in progress, or the first open one should a settler's clock run behind the one
    /// that closed `closed`.
    pub fn open_day(&self, now_ms: u64, closed: NaiveDate) -> NaiveDate {
        let first_open = closed.checked_add_days(Days::new(1)).unwrap_or(closed);
        self.day_of(now_ms).max(first_open)
    }

    pub(crate) fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.close_after_minutes > MAX_CLOSE_AFTER_MINUTES {
            out.push(format!(
                "day.close_after_minutes: {} is more than a week ({MAX_CLOSE_AFTER_MINUTES})",
                self.close_after_minutes
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03 00:00 in Chongqing, as Unix milliseconds.
    const DEC_3_MIDNIGHT: u64 = 1_796_227_200_000;
    const HOUR: u64 = 3_600_000;

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn four_am_two_hours() -> SettlementDay {
        SettlementDay {
            cutoff: Cutoff::try_from("04:00".to_owned()).unwrap(),
            close_after_minutes: 120,
        }
    }

    #[test]
    fn the_night_after_midnight_belongs_to_the_day_before_until_the_cutoff() {
        let day = four_am_two_hours();
        assert_eq!(day.day_of(DEC_3_MIDNIGHT - 1), date("2026-12-02"));
        assert_eq!(
            day.day_of(DEC_3_MIDNIGHT + 4 * HOUR - 1),
            date("2026-12-02")
        );
        assert_eq!(day.day_of(DEC_3_MIDNIGHT + 4 * HOUR), date("2026-12-03"));
    }

    #[test]
    fn a_day_closes_when_its_grace_after_the_cutoff_is_over() {
        let day = four_am_two_hours();
        // 2 December ends at 04:00 on the 3rd and closes at 06:00.
        let closes = DEC_3_MIDNIGHT + 6 * HOUR;
        assert_eq!(day.closed_through(closes - 1), date("2026-12-01"));
        assert_eq!(day.closed_through(closes), date("2026-12-02"));
        assert_eq!(day.open_day(closes, date("2026-12-02")), date("2026-12-03"));
    }

    #[test]
    fn a_late_tap_goes_to_the_first_open_day_when_this_clock_is_behind() {
        let day = four_am_two_hours();
        // Another settler closed the 3rd; this one's clock still says the 3rd.
        let now = DEC_3_MIDNIGHT + 12 * HOUR;
        assert_eq!(day.open_day(now, date("2026-12-03")), date("2026-12-04"));
    }

    #[test]
    fn cutoffs_read_as_hh_mm_only() {
        for bad in ["24:00", "4:00", "04:60", "0400", "04:00:00", ""] {
            assert!(Cutoff::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        let c = Cutoff::try_from("23:59".to_owned()).unwrap();
        assert_eq!(String::from(c), "23:59");
    }
}
