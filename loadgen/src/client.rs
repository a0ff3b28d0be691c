//! A gate: a QUIC client speaking the tapgate protocol. The load generator runs thousands of
//! them; the end-to-end tests drive single ones, including misbehaving ones.

use bytes::BytesMut;
use std::net::SocketAddr;
use tapgate_protocol::{
    AreaCode, DecodeError, ErrorFrame, Frame, FrameType, Hello, HelloAck, MacKey, Mode, TapResult,
    TerminalKey, Version, seal,
};
use tapgate_transport::{FrameReader, ReadError};

/// Who a gate is.
#[derive(Debug, Clone)]
pub struct GateIdentity {
    pub terminal_id: u64,
    pub key_version: u8,
    pub key: TerminalKey,
    pub area: AreaCode,
    pub mode: Mode,
    pub operator: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Connection(String),
    #[error("the gateway closed the stream")]
    Closed,
    #[error("the gateway closed the connection with code {code} ({reason})")]
    ClosedByGateway { code: u64, reason: String },
    #[error("gateway refused with {} (sequence {})", .0.code, .0.sequence)]
    Refused(ErrorFrame),
    #[error("gateway frame failed verification")]
    BadMac,
    #[error("gateway sent an undecodable frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("gateway sent an unexpected {0} frame")]
    Unexpected(FrameType),
    #[error("HelloAck echoed the wrong nonce")]
    NonceMismatch,
    #[error("the gate dropped its connection")]
    Dropped,
}

/// A client endpoint that trusts exactly `trusted_der` (the gateway's certificate or its CA).
pub fn client_endpoint(
    trusted_der: &[u8],
    bind: SocketAddr,
) -> Result<quinn::Endpoint, ClientError> {
    tapgate_transport::client_endpoint(trusted_der, bind)
        .map_err(|e| ClientError::Connect(e.to_string()))
}

/// A client endpoint as [`client_endpoint`] whose every round trip takes `added_rtt` longer
/// ([`crate::link::DelayedLink`]); with no added time, the plain one. Call inside a Tokio
/// runtime.
pub fn gate_endpoint(
    trusted_der: &[u8],
    bind: SocketAddr,
    added_rtt: std::time::Duration,
) -> Result<quinn::Endpoint, ClientError> {
    if added_rtt.is_zero() {
        return client_endpoint(trusted_der, bind);
    }
    tapgate_transport::endpoint::client_endpoint_over(trusted_der, bind, |socket| {
        crate::link::DelayedLink::wrap(socket, added_rtt)
    })
    .map_err(|e| ClientError::Connect(e.to_string()))
}

/// The sending half of a gate's stream.
pub struct GateSender {
    send: quinn::SendStream,
    mac: MacKey,
    connection: quinn::Connection,
}

/// The receiving half of a gate's stream.
pub struct GateReceiver {
    frames: FrameReader,
    mac: MacKey,
    connection: quinn::Connection,
}

/// One gate's connection and stream.
pub struct GateClient {
    pub connection: quinn::Connection,
    pub sender: GateSender,
    pub receiver: GateReceiver,
    pub ack: HelloAck,
    pub early_hello: EarlyHello,
    /// Whether the stream was opened before the handshake completed, so what is written first
    /// goes as early data.
    opened_early: bool,
}

fn closed_by_gateway(connection: &quinn::Connection, detail: String) -> ClientError {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => ClientError::ClosedByGateway {
            code: close.error_code.into_inner(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        _ => ClientError::Connection(detail),
    }
}

/// Whether a connection's Hello went out as early data (PROTOCOL.md section 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyHello {
    /// The gate had no ticket that allows early data, or does not send any: a full round trip
    /// before the Hello.
    NotSent,
    /// Sent with the resumption and answered.
    Answered,
    /// Sent, but the gateway did not take the early data (its ticket was gone): said again
    /// once the handshake completed.
    Refused,
}

impl GateClient {
    /// Connects, sends Hello and checks the HelloAck, through the endpoint's TLS configuration.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        identity: &GateIdentity,
        client_nonce: u64,
        now_ms: u64,
    ) -> Result<GateClient, ClientError> {
        Self::connect_with(endpoint, None, gateway, identity, client_nonce, now_ms).await
    }

    /// Connects as [`GateClient::connect`], with the gate's own TLS configuration when given
    /// (its own memory of tickets). A gate holding a ticket that allows early data sends its
    /// Hello with the resumption and has its HelloAck a round trip sooner; if the gateway
    /// refuses the early data, the Hello is sent again once the handshake has completed.
    pub async fn connect_with(
        endpoint: &quinn::Endpoint,
        tls: Option<&quinn::ClientConfig>,
        gateway: SocketAddr,
        identity: &GateIdentity,
        client_nonce: u64,
        now_ms: u64,
    ) -> Result<GateClient, ClientError> {
        let hello = hello(identity, client_nonce, now_ms);
        let (connection, early) = match dial(endpoint, tls, gateway)?.into_0rtt() {
            Ok((connection, accepted)) => {
                let mut client = Self::on_connection(connection.clone(), identity).await?;
                // A handshake that completed before the stream opened leaves nothing early.
                let opened_early = client.opened_early;
                match client.say_hello(&hello, client_nonce).await {
                    Ok(()) => {
                        client.early_hello = if opened_early {
                            EarlyHello::Answered
                        } else {
                            EarlyHello::NotSent
                        };
                        return Ok(client);
                    }
                    Err(e) => {
                        // Early data that was not taken fails only once the handshake has
                        // ended, and so does a connection the gateway closed.
                        let taken = accepted.await;
                        if connection.close_reason().is_some() {
                            return Err(closed_by_gateway(&connection, e.to_string()));
                        }
                        // Taken, and answered with something a gate must not act on: a second
                        // Hello would meet the same end.
                        if taken {
                            client.abandon();
                            return Err(e);
                        }
                        (connection, EarlyHello::Refused)
                    }
                }
            }
            Err(connecting) => (
                connecting
                    .await
                    .map_err(|e| ClientError::Connect(e.to_string()))?,
                EarlyHello::NotSent,
            ),
        };
        let mut client = Self::on_connection(connection, identity).await?;
        if let Err(e) = client.say_hello(&hello, client_nonce).await {
            client.abandon();
            return Err(e);
        }
        client.early_hello = early;
        Ok(client)
    }

    /// The protocol version the handshake agreed on (PROTOCOL.md section 1).
    pub fn version(&self) -> Version {
        tapgate_transport::tls::negotiated_version(&self.connection)
    }

    /// Sends the Hello and reads its answer.
    async fn say_hello(&mut self, hello: &Frame, client_nonce: u64) -> Result<(), ClientError> {
        self.send_frame(hello).await?;
        self.expect_ack(client_nonce).await
    }

    /// Closes a connection whose Hello was not answered as it must be (PROTOCOL.md section
    /// 5.2). Closed before the stream is dropped: a dropped stream is finished, and a gateway
    /// that saw the finish first would take it for a clean end.
    fn abandon(self) {
        self.connection.close(0u32.into(), b"");
    }

    /// Reads the answer to the Hello and keeps it.
    async fn expect_ack(&mut self, client_nonce: u64) -> Result<(), ClientError> {
        match self.recv().await? {
            Frame::HelloAck(ack) if ack.client_nonce == client_nonce => {
                self.ack = ack;
                Ok(())
            }
            Frame::HelloAck(_) => Err(ClientError::NonceMismatch),
            other => Err(ClientError::Unexpected(other.frame_type())),
        }
    }

    /// Connects and opens the stream without saying Hello (for testing the gateway's refusals,
    /// and for talking to the echo baseline).
    pub async fn open(
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        identity: &GateIdentity,
    ) -> Result<GateClient, ClientError> {
        let connection = dial(endpoint, None, gateway)?
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Self::on_connection(connection, identity).await
    }

    /// Opens the gate's stream on a connection (a resumed one may still be handshaking).
    async fn on_connection(
        connection: quinn::Connection,
        identity: &GateIdentity,
    ) -> Result<GateClient, ClientError> {
        let (send, recv) = connection.open_bi().await.map_err(|e| match e {
            quinn::ConnectionError::ApplicationClosed(close) => ClientError::ClosedByGateway {
                code: close.error_code.into_inner(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            other => ClientError::Connection(other.to_string()),
        })?;
        let mac = identity.key.mac_key();
        let opened_early = recv.is_0rtt();
        Ok(GateClient {
            sender: GateSender {
                send,
                mac: mac.clone(),
                connection: connection.clone(),
            },
            receiver: GateReceiver {
                frames: FrameReader::new(recv),
                mac,
                connection: connection.clone(),
            },
            connection,
            ack: HelloAck {
                terminal_id: identity.terminal_id,
                client_nonce: 0,
                server_time_ms: 0,
                last_sequence: 0,
                resend_window: 0,
                max_in_flight: 0,
            },
            early_hello: EarlyHello::NotSent,
            opened_early,
        })
    }
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.sender.send_frame(frame).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.sender.send_raw(bytes).await
    }

    pub fn sealed(&self, frame: &Frame) -> BytesMut {
        self.sender.sealed(frame)
    }

    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        self.receiver.recv().await
    }

    pub async fn recv_result(&mut self) -> Result<TapResult, ClientError> {
        match self.recv().await? {
            Frame::TapResult(r) => Ok(r),
            other => Err(ClientError::Unexpected(other.frame_type())),
        }
    }

    /// Sends one tap and waits for its answer.
    pub async fn tap(&mut self, tap: tapgate_protocol::Tap) -> Result<TapResult, ClientError> {
        self.send_frame(&Frame::Tap(tap)).await?;
        self.recv_result().await
    }

    pub fn close(&self) {
        self.connection.close(0u32.into(), b"done");
    }
}

/// Starts a handshake with the gateway, through `tls` or the endpoint's configuration.
fn dial(
    endpoint: &quinn::Endpoint,
    tls: Option<&quinn::ClientConfig>,
    gateway: SocketAddr,
) -> Result<quinn::Connecting, ClientError> {
    match tls {
        Some(tls) => endpoint.connect_with(tls.clone(), gateway, "localhost"),
        None => endpoint.connect(gateway, "localhost"),
    }
    .map_err(|e| ClientError::Connect(e.to_string()))
}

/// The Hello a gate with this identity sends.
pub fn hello(identity: &GateIdentity, client_nonce: u64, now_ms: u64) -> Frame {
    Frame::Hello(Hello {
        terminal_id: identity.terminal_id,
        key_version: identity.key_version,
        mode: identity.mode,
        area: identity.area,
        operator: identity.operator,
        client_nonce,
        gate_time_ms: now_ms,
    })
}

impl GateSender {
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let out = self.sealed(frame);
        self.send_raw(&out).await
    }

    /// Sends bytes as they are: for resends of an exact frame and for malformed input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        match self.send.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(e) => Err(closed_by_gateway(&self.connection, e.to_string())),
        }
    }

    /// Seals a frame without sending it, so the same bytes can be sent again.
    pub fn sealed(&self, frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        seal(frame, &self.mac, &mut out);
        out
    }

    /// Ends the gate's side of the stream (no more taps); answers still arrive.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

impl GateReceiver {
    /// The next frame from the gateway as it came, tag unchecked: for checking how the gateway
    /// tagged it (an Error is tagged once the gateway knows the gate's key).
    pub async fn recv_sealed(&mut self) -> Result<tapgate_protocol::SealedFrame, ClientError> {
        match self.frames.next().await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(ClientError::Closed),
            Err(ReadError::Decode(e)) => Err(ClientError::Decode(e)),
            Err(ReadError::Stream(e)) => Err(closed_by_gateway(&self.connection, e.to_string())),
        }
    }

    /// The next frame from the gateway. Error frames come back as `ClientError::Refused`,
    /// authenticated or not (an unkeyed Error means "refused" and nothing more).
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        let frame = self.recv_sealed().await?;
        if frame.frame_type() == FrameType::Error
            && let Ok(Frame::Error(error)) = frame.parse_unverified()
        {
            return Err(ClientError::Refused(error));
        }
        frame.open(&self.mac).map_err(|e| match e {
            tapgate_protocol::OpenError::BadMac(_) => ClientError::BadMac,
            tapgate_protocol::OpenError::Decode(d) => ClientError::Decode(d),
        })
    }
}
