//! The tapgate load generator: simulated gates over real QUIC connections, an open-loop pacer,
//! HdrHistogram reports, and a bare QUIC echo server as the transport baseline.

#![forbid(unsafe_code)]

pub mod client;
pub mod conformance;
pub mod echo;
pub mod fraud;
pub mod link;
mod offline;
pub mod report;
pub mod run;
pub mod workload;
