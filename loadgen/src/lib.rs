//! The tapgate load generator: simulated gates over real QUIC connections.

pub mod client;
