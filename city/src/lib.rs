//! The cards and gates of the city: the records the card directory and the terminal register
//! hold, and a synthetic population of them generated from a seed, which the embedded gateway
//! serves, the load generator taps and the tests provision.

#![forbid(unsafe_code)]

pub mod places;
pub mod population;
pub mod records;

pub use records::{CardRecord, CardState, MonthDay, TerminalRecord};
