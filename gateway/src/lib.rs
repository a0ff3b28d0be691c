//! The tapgate gateway: QUIC ingress, gate sessions, the authorization core, and the card cache
//! with its directories. The journal and settlement it runs beside are crates of their own.
//!
//! The decision ([`decide`]) and the session's rules ([`session`]) are pure; everything that
//! waits (network, Redis, disk) lives in [`server`], [`directory`] and the journal, at the edges.

#![forbid(unsafe_code)]

pub mod cache;
pub mod card;
pub mod config;
pub mod decide;
pub mod deny;
pub mod directory;
pub mod metrics;
pub mod node;
pub mod offline;
pub mod ops;
pub mod policy;
pub mod server;
pub mod session;
mod shard_map;
mod terminal;
