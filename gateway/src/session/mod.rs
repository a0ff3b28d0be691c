//! The gate session's rules without I/O, in the style of quinn-proto: the server feeds them
//! what happened (a frame read, an answer recorded, a deadline passed, shutdown, revocation)
//! and does what they return (look a terminal up, decide a tap, write bytes, close with a
//! code). Every rule is unit-tested here without a runtime or a socket; `server` holds only
//! the quinn, Redis and journal I/O around them.

mod hello;
mod taps;

#[cfg(test)]
pub(crate) mod fixtures;

pub use hello::{Provisioning, Refusal, admit, claimed_identity, hello_ack};
pub use taps::{FirstCopy, HeadWait, Recorded, Recording, TapSession, Transmit, Work, busy};
