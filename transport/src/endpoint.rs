//! QUIC endpoints with the protocol's transport settings (PROTOCOL.md section 1), for the
//! gateway, the echo baseline, the conformance referee and the gates.

use crate::tls;
use quinn::Runtime as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tapgate_protocol::Version;

/// What a server endpoint announces and how big its socket buffers are.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// Announced as `max_idle_timeout`.
    pub idle_timeout: Duration,
    /// QUIC keep-alive, so a NAT on the way keeps the path open.
    pub keep_alive: Duration,
    /// Requested size of the UDP socket's receive and send buffers.
    pub udp_buffer_bytes: usize,
    /// TLS sessions remembered for resumption (one per gate that may reconnect).
    pub session_tickets: usize,
    /// Where resumed handshakes are counted.
    pub tickets_redeemed: Arc<AtomicU64>,
    /// The newest protocol version offered by ALPN; a gateway offers every version it speaks,
    /// the conformance referee the one the gate under test claims.
    pub newest_version: Version,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(15),
            udp_buffer_bytes: 8 << 20,
            session_tickets: 4_096,
            tickets_redeemed: Arc::default(),
            newest_version: Version::NEWEST,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// UDP buffer of a client endpoint: thousands of simulated gates share one socket.
const CLIENT_UDP_BUFFER: usize = 8 << 20;

/// A client endpoint that trusts exactly `trusted_der` (the gateway's certificate or its CA).
/// Its connections speak protocol version 1, resume TLS sessions and may send their Hello
/// early; a gate that wants tickets of its own or version 2 connects with a configuration from
/// [`tls::GateTls`].
pub fn client_endpoint(
    trusted_der: &[u8],
    bind: SocketAddr,
) -> Result<quinn::Endpoint, EndpointError> {
    client_endpoint_over(trusted_der, bind, |socket| {
        quinn::TokioRuntime.wrap_udp_socket(socket)
    })
}

/// A client endpoint as [`client_endpoint`], whose socket `wrap` makes from the bound one (a
/// tool can wrap it in one that changes how datagrams travel). Call inside a Tokio runtime.
pub fn client_endpoint_over(
    trusted_der: &[u8],
    bind: SocketAddr,
    wrap: impl FnOnce(std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>>,
) -> Result<quinn::Endpoint, EndpointError> {
    let tls = tls::GateTls::new(
        trusted_der,
        tls::Resumption::EarlyHello,
        tapgate_protocol::Version::V1,
    )?
    .for_one_gate()?;
    let failed = |source| EndpointError::Socket { addr: bind, source };
    // Give the shared socket the gateway's large buffers, or bursts of answers are dropped by
    // the kernel and QUIC's loss recovery shows up as latency.
    let socket = wrap(bind_udp(bind, CLIENT_UDP_BUFFER)?).map_err(failed)?;
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(failed)?;
    endpoint.set_default_client_config(tls);
    Ok(endpoint)
}

/// A QUIC server endpoint with the protocol's TLS and transport settings on a large-buffer
/// UDP socket.
pub fn server_endpoint(
    listen: SocketAddr,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, EndpointError> {
    let tickets =
        tls::SessionTickets::new(settings.session_tickets, settings.tickets_redeemed.clone());
    let mut server_config = quinn::ServerConfig::with_crypto(tls::server_crypto(
        chain,
        key,
        tickets,
        settings.newest_version,
    )?);
    server_config.transport_config(Arc::new(transport_config(settings)));
    let socket = bind_udp(listen, settings.udp_buffer_bytes)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Socket {
        addr: listen,
        source,
    })
}

/// The QUIC transport of a gateway: one bidirectional stream per connection, no unidirectional
/// ones, keep-alive and idle timeout for gates that sit idle between taps.
pub fn transport_config(settings: &TransportSettings) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(settings.keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(settings.idle_timeout)
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000))),
        ));
    transport
}

/// A UDP socket with large buffers (the kernel may grant less; what it granted is logged).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| EndpointError::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    // Ask for large buffers so bursts of taps are not dropped by the kernel; it may grant less.
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::warn!(error = %e, "could not set UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::warn!(error = %e, "could not set UDP send buffer");
    }
    socket.bind(&addr.into()).map_err(err)?;
    let granted_recv = usable_buffer(socket.recv_buffer_size().unwrap_or(0));
    let granted_send = usable_buffer(socket.send_buffer_size().unwrap_or(0));
    // Said once per process: the embedded demo binds a gateway and a generator socket, and the
    // advice is the same for both.
    static SHORTFALL_REPORTED: AtomicBool = AtomicBool::new(false);
    if granted_recv < buffer || granted_send < buffer {
        if !SHORTFALL_REPORTED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                requested = buffer,
                granted_recv,
                granted_send,
                "kernel granted smaller UDP buffers; raise net.core.rmem_max / wmem_max"
            );
        }
    } else {
        tracing::info!(granted_recv, granted_send, "UDP socket buffers");
    }
    Ok(socket.into())
}

/// The part of a socket buffer, as the kernel reports it, that is for datagrams. Linux reports
/// twice the size it granted, the other half being its own bookkeeping, so a request capped at
/// `net.core.rmem_max` would otherwise look granted in full.
fn usable_buffer(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// Finishes our side of a stream and waits until the peer has acknowledged everything on it:
/// closing the connection sooner could discard the last frames. The ack comes within one ack
/// delay (tens of milliseconds); the peer closing first, or a second, ends the wait too.
pub async fn finish_when_acknowledged(
    send: &mut quinn::SendStream,
    connection: &quinn::Connection,
) {
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::select! {
            _ = send.stopped() => {}
            _ = connection.closed() => {}
        }
    })
    .await;
}
