//! A synthetic but realistic population of cards and gates, the same for a given seed on every
//! machine: the demo, the load generator and `tapgate cards generate` all draw from it.

use crate::records::{CardRecord, CardState, TerminalRecord};
use chrono::NaiveDate;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tapgate_protocol::{AREAS, AreaCode, Concession, Issuer, Mode};

/// Card ids are `FIRST_CARD_ID + n`.
pub const FIRST_CARD_ID: u64 = 6_222_000_000_000_000;
/// Terminal ids are `FIRST_TERMINAL_ID + n`.
pub const FIRST_TERMINAL_ID: u64 = 100_000_000;

/// The main city (主城区): the nine central districts and the two functional zones there. Its
/// buses are the city bus group's; the outer areas have their own operators.
pub const MAIN_CITY_AREAS: [u32; 11] = [
    500103, 500104, 500105, 500106, 500107, 500108, 500109, 500112, 500113, 509001, 509002,
];

/// Areas with Chongqing rail transit stations: the main city, and 璧山, 江津 and 铜梁, which rail
/// lines reach beyond it.
pub const METRO_AREAS: [u32; 14] = [
    500103, 500104, 500105, 500106, 500107, 500108, 500109, 500112, 500113, 509001, 509002, 500120,
    500116, 500151,
];

/// Areas with passenger ferries in the simulation: along the Yangtze and the Jialing. An
/// illustration of where ferries run, not a register of ferry lines.
pub const FERRY_AREAS: [u32; 12] = [
    500103, 500105, 500108, 500101, 500102, 500115, 500116, 500230, 500233, 500235, 500236, 500237,
];

/// The river and mountain cableways and their operators: the Yangtze River Cableway in 渝中
/// and the Jinyun Mountain cableway in 北碚.
pub const CABLEWAYS: [(u32, u16); 2] = [(500103, 4), (500109, 5)];

/// Areas with stations of the Sichuan–Chongqing rail lines (Chengdu–Chongqing high-speed, the
/// Suining–Chongqing line): 沙坪坝, 渝北, 璧山, 永川, 大足, 荣昌, 合川, 铜梁 and 潼南.
pub const INTERCITY_AREAS: [u32; 9] = [
    500106, 500112, 500120, 500118, 500111, 500153, 500117, 500151, 500152,
];

/// Shares of the card population, each a fraction of 1.
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationSpec {
    pub seed: u64,
    pub cards: u64,
    pub terminals: u64,
    pub elder: f64,
    pub sichuan: f64,
    pub t_union: f64,
    pub lost: f64,
    pub cancelled: f64,
    pub blocked: f64,
    /// Holders with a disability concession, of grades 1 to 4 in equal shares.
    pub disabled: f64,
    /// Cards whose validity ended (on 2025-12-31), so a gate can be tested against one.
    pub expired: f64,
}

impl Default for PopulationSpec {
    fn default() -> Self {
        Self {
            seed: 2026,
            cards: 100_000,
            terminals: 2_000,
            elder: 0.12,
            sichuan: 0.05,
            t_union: 0.03,
            lost: 0.01,
            cancelled: 0.005,
            blocked: 0.002,
            disabled: 0.02,
            expired: 0.005,
        }
    }
}

impl PopulationSpec {
    fn rng(&self, stream: u64, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(stream);
        rng.set_word_pos(u128::from(index) * 16);
        rng
    }

    /// Card number `index` (0-based).
    pub fn card(&self, index: u64) -> CardRecord {
        let mut rng = self.rng(1, index);
        let roll: f64 = rng.random();
        let issuer = if roll < self.sichuan {
            Issuer::SichuanTianfuTong
        } else if roll < self.sichuan + self.t_union {
            Issuer::TUnion
        } else if roll < 0.85 {
            Issuer::ChongqingSsc
        } else {
            Issuer::ChongqingCityCard
        };
        let roll: f64 = rng.random();
        let state = if roll < self.lost {
            CardState::Lost
        } else if roll < self.lost + self.cancelled {
            CardState::Cancelled
        } else if roll < self.lost + self.cancelled + self.blocked {
            CardState::Blocked
        } else {
            CardState::Active
        };
        let elder = rng.random::<f64>() < self.elder;
        let valid_until = NaiveDate::from_ymd_opt(2028 + rng.random_range(0..10), 12, 31);
        // A stream of its own, so adding expired cards left every other field as it was.
        let expired = self.rng(3, index).random::<f64>() < self.expired;
        let expires_on = if expired {
            NaiveDate::from_ymd_opt(2025, 12, 31)
        } else {
            valid_until
        };
        let rides_left = if elder { rng.random_range(0..=1200) } else { 0 };
        // Streams of their own as well, for the same reason.
        let chongqing = matches!(issuer, Issuer::ChongqingSsc | Issuer::ChongqingCityCard);
        let home_area =
            chongqing.then(|| AREAS[self.rng(4, index).random_range(0..AREAS.len())].code);
        let mut graded = self.rng(5, index);
        let disabled = !elder && graded.random::<f64>() < self.disabled;
        CardRecord {
            card_id: FIRST_CARD_ID + index,
            state,
            issuer,
            concession: if elder {
                Concession::Elder
            } else if disabled {
                Concession::Disabled
            } else {
                Concession::None
            },
            grade: disabled.then(|| graded.random_range(1..=4)),
            home_area,
            rides_left,
            rides_period: None,
            renews_on: None,
            expires_on,
        }
    }

    /// Gate number `index` (0-based). Metro gates sit in the metro areas; the other modes are
    /// spread over all 41 areas.
    pub fn terminal(&self, index: u64) -> TerminalRecord {
        let mut rng = self.rng(2, index);
        let roll: f64 = rng.random();
        // Rail carries about half of Chongqing's trips; buses most of the rest.
        let mode = if roll < 0.46 {
            Mode::Metro
        } else if roll < 0.90 {
            Mode::Bus
        } else if roll < 0.94 {
            Mode::Ferry
        } else if roll < 0.96 {
            Mode::Cableway
        } else {
            Mode::IntercityRail
        };
        let mut pick = |areas: &[u32]| AreaCode(areas[rng.random_range(0..areas.len())]);
        let (area, operator) = match mode {
            Mode::Bus => {
                let area = AREAS[rng.random_range(0..AREAS.len())].code;
                (
                    area,
                    if MAIN_CITY_AREAS.contains(&area.0) {
                        1
                    } else {
                        6
                    },
                )
            }
            Mode::Metro => (pick(&METRO_AREAS), 2),
            Mode::Ferry => (pick(&FERRY_AREAS), 3),
            Mode::Cableway => {
                let (area, operator) = CABLEWAYS[rng.random_range(0..CABLEWAYS.len())];
                (AreaCode(area), operator)
            }
            Mode::IntercityRail => (pick(&INTERCITY_AREAS), 7),
        };
        TerminalRecord {
            terminal_id: FIRST_TERMINAL_ID + index,
            area,
            mode,
            operator,
        }
    }

    pub fn cards(&self) -> impl Iterator<Item = CardRecord> + '_ {
        (0..self.cards).map(|i| self.card(i))
    }

    pub fn terminals(&self) -> impl Iterator<Item = TerminalRecord> + '_ {
        (0..self.terminals).map(|i| self.terminal(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_population_and_shares_are_roughly_kept() {
        let spec = PopulationSpec {
            cards: 20_000,
            ..PopulationSpec::default()
        };
        assert_eq!(spec.card(123), spec.card(123));
        assert_ne!(
            spec.card(123),
            PopulationSpec {
                seed: 1,
                ..spec.clone()
            }
            .card(123)
        );
        let elder = spec
            .cards()
            .filter(|c| c.concession == Concession::Elder)
            .count() as f64;
        assert!(
            (elder / 20_000.0 - 0.12).abs() < 0.01,
            "elder share {elder}"
        );
        let lost = spec.cards().filter(|c| c.state == CardState::Lost).count() as f64;
        assert!((lost / 20_000.0 - 0.01).abs() < 0.004, "lost share {lost}");
        // Every state a gate must handle is there to test against, expired included.
        let today = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        let expired = spec
            .cards()
            .filter(|c| c.expires_on.is_some_and(|d| d < today))
            .count();
        assert!((60..=140).contains(&expired), "expired {expired}");
        for state in [
            CardState::Active,
            CardState::Lost,
            CardState::Cancelled,
            CardState::Blocked,
        ] {
            assert!(spec.cards().any(|c| c.state == state), "{state:?}");
        }
    }

    #[test]
    fn every_mode_runs_only_where_it_exists() {
        let spec = PopulationSpec::default();
        for t in spec.terminals() {
            assert!(t.area.area().is_some());
            let allowed: &[u32] = match t.mode {
                Mode::Metro => &METRO_AREAS,
                Mode::Ferry => &FERRY_AREAS,
                Mode::IntercityRail => &INTERCITY_AREAS,
                Mode::Cableway => &[CABLEWAYS[0].0, CABLEWAYS[1].0],
                Mode::Bus => continue,
            };
            assert!(allowed.contains(&t.area.0), "{t:?}");
        }
        for list in [
            &METRO_AREAS[..],
            &FERRY_AREAS,
            &INTERCITY_AREAS,
            &MAIN_CITY_AREAS,
        ] {
            assert!(list.iter().all(|code| AreaCode(*code).area().is_some()));
        }
        // Rail reaches beyond the main city.
        for outer in [500120, 500116, 500151] {
            assert!(
                spec.terminals()
                    .any(|t| t.mode == Mode::Metro && t.area.0 == outer)
            );
        }
    }
}
