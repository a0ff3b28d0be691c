//! The records of the card directory and the terminal register, as the gateway reads them and
//! the synthetic population writes them.

use chrono::NaiveDate;
use tapgate_protocol::{AreaCode, Concession, Issuer, Mode};

/// Lifecycle state of a card as the issuer's register has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardState {
    Active,
    /// Reported lost (挂失); must stop riding everywhere.
    Lost,
    Cancelled,
    /// Blocked by the operator or the issuer (fraud, unpaid balance).
    Blocked,
}

impl CardState {
    pub const ALL: [CardState; 4] = [
        CardState::Active,
        CardState::Lost,
        CardState::Cancelled,
        CardState::Blocked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CardState::Active => "active",
            CardState::Lost => "lost",
            CardState::Cancelled => "cancelled",
            CardState::Blocked => "blocked",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.label() == label)
    }
}

/// A card's record in the card directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardRecord {
    pub card_id: u64,
    pub state: CardState,
    pub issuer: Issuer,
    pub concession: Concession,
    /// The grade of the holder's concession where the policy prices grades differently (a
    /// disability grade, 1 the most severe); `None` for an ungraded concession.
    pub grade: Option<u8>,
    /// The area whose card office holds the card's account: concession functions are loaded
    /// onto Chongqing cards area by area. `None` for cards issued outside Chongqing.
    pub home_area: Option<AreaCode>,
    /// Counted concession rides left in the allowance period that began on `rides_period`.
    pub rides_left: u32,
    /// The first day of the allowance period `rides_left` counts. `None` for a count that was
    /// never stamped (an import without the column): it is taken as the current period's.
    pub rides_period: Option<NaiveDate>,
    /// The month and day the holder's allowance renews on, for a concession that renews on the
    /// holder's birthday. Only the month and day are kept, never the birth year.
    pub renews_on: Option<MonthDay>,
    /// Last day the card is valid (local date), if it expires.
    pub expires_on: Option<NaiveDate>,
}

/// A day of the year, as `MM-DD`: when a birthday allowance renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MonthDay {
    month: u32,
    day: u32,
}

impl MonthDay {
    /// `None` unless the day exists in some year (29 February does).
    pub fn new(month: u32, day: u32) -> Option<Self> {
        NaiveDate::from_ymd_opt(2024, month, day).map(|_| Self { month, day })
    }

    /// This day in `year`; 29 February falls on 28 February in a common year.
    pub fn in_year(self, year: i32) -> NaiveDate {
        NaiveDate::from_ymd_opt(year, self.month, self.day)
            .or_else(|| NaiveDate::from_ymd_opt(year, self.month, self.day - 1))
            .expect("a valid month and day exists in every year, or the day before it")
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (month, day) = text.split_once('-')?;
        if month.len() != 2 || day.len() != 2 {
            return None;
        }
        Self::new(month.parse().ok()?, day.parse().ok()?)
    }
}

impl std::fmt::Display for MonthDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}-{:02}", self.month, self.day)
    }
}

/// A gate as provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalRecord {
    pub terminal_id: u64,
    pub area: AreaCode,
    pub mode: Mode,
    pub operator: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_days_parse_print_and_fall_back_in_common_years() {
        let leap_day = MonthDay::parse("02-29").unwrap();
        assert_eq!(leap_day.to_string(), "02-29");
        assert_eq!(
            leap_day.in_year(2027),
            NaiveDate::from_ymd_opt(2027, 2, 28).unwrap()
        );
        assert_eq!(
            leap_day.in_year(2028),
            NaiveDate::from_ymd_opt(2028, 2, 29).unwrap()
        );
        for bad in ["2-29", "02-30", "13-01", "0101", "xx-01"] {
            assert_eq!(MonthDay::parse(bad), None, "{bad}");
        }
    }
}
