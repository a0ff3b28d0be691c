//! The tapgate gateway: QUIC ingress, gate sessions, the authorization core, the card cache and
//! its directories, and the durable tap journal.
//!
//! The decision ([`decide`]) is pure; everything that waits (network, Redis, disk) lives in
//! [`server`], [`directory`] and [`journal`], at the edges.

pub mod cache;
pub mod card;
pub mod config;
pub mod decide;
pub mod directory;
pub mod fares;
pub mod health;
mod ids;
pub mod journal;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod policy;
pub mod redis_target;
pub mod server;
pub mod session;
pub mod settle;
