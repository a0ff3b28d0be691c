//! The transport both ends of the gate protocol share: TLS material, QUIC endpoints with the
//! protocol's transport settings (one bidirectional stream, keep-alive, idle timeout) on
//! large-buffer UDP sockets, and the one reader that turns a stream into frames. It knows
//! nothing of taps, cards or journals, so the load generator and the conformance tools can use
//! it without linking the gateway.

#![forbid(unsafe_code)]

pub mod endpoint;
pub mod reader;
pub mod tls;

pub use endpoint::{
    EndpointError, TransportSettings, bind_udp, client_endpoint, finish_when_acknowledged,
    server_endpoint, transport_config,
};
pub use reader::{FrameReader, ReadError};

// Gates and the gateway share one clock and one retry schedule with the settlers.
pub use tapgate_runtime::{clock, now_ms, retry};
