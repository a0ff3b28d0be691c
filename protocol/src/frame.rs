//! The frames of the gate ↔ gateway protocol as Rust values, and their body layouts.
//!
//! Every body has a fixed size, so a decoder knows after the two-byte length prefix whether a
//! frame can possibly be valid. All integers are big-endian.

use crate::registry::{AreaCode, Concession, Issuer, Mode, wire_enum};
use bytes::{Buf, BufMut};

wire_enum! {
    /// The frame type byte.
    FrameType {
        /// gate → gateway: who the gate is. First frame on every stream.
        Hello = 0x01 => "hello",
        /// gateway → gate: the session is authenticated; where the gate's sequence stands.
        HelloAck = 0x02 => "hello_ack",
        /// gate → gateway: a card was tapped; please authorize.
        Tap = 0x03 => "tap",
        /// gateway → gate: the answer to one Tap.
        TapResult = 0x04 => "tap_result",
        /// gateway → gate: a protocol error; the gateway closes the connection after sending it.
        Error = 0x05 => "error",
    }
}

impl FrameType {
    /// Size of this frame type's body in bytes.
    pub const fn body_len(self) -> usize {
        match self {
            FrameType::Hello => 32,
            FrameType::HelloAck => 36,
            FrameType::Tap => 30,
            FrameType::TapResult => 17,
            FrameType::Error => 10,
        }
    }
}

wire_enum! {
    /// How a card was presented at the gate.
    TapKind {
        /// Flat-fare boarding (bus, ferry, cableway).
        Flat = 0 => "flat",
        /// Entry into a paid area (metro, intercity rail).
        Entry = 1 => "entry",
        /// Exit from a paid area.
        Exit = 2 => "exit",
    }
}

wire_enum! {
    /// The gateway's verdict on a tap.
    Outcome {
        /// Do not open the gate.
        Deny = 0 => "deny",
        /// Open the gate; the tap is recorded and will be charged.
        Approve = 1 => "approve",
        /// The gateway is overloaded and did not decide. Nothing was recorded; the gate may retry
        /// with a new sequence number or apply its offline rules.
        Busy = 2 => "busy",
    }
}

wire_enum! {
    /// Why the gateway decided what it decided; gates show it to the rider.
    Reason {
        Approved = 0 => "approved",
        UnknownCard = 1 => "unknown_card",
        CardLost = 2 => "card_lost",
        CardCancelled = 3 => "card_cancelled",
        CardBlocked = 4 => "card_blocked",
        CardExpired = 5 => "card_expired",
        /// This area does not accept cards of this issuer.
        IssuerNotAccepted = 6 => "issuer_not_accepted",
        /// A second metro entry at the same station inside the pass-back window.
        PassBack = 7 => "pass_back",
        /// The card is not cached and the card directory cannot be reached.
        DirectoryUnavailable = 8 => "directory_unavailable",
        /// Sent with `Outcome::Busy`.
        Overloaded = 9 => "overloaded",
    }
}

wire_enum! {
    /// Codes of the Error frame. After sending one the gateway closes the connection.
    ErrorCode {
        /// The frame's layout is wrong: bad length for its type, or a field out of range.
        MalformedFrame = 1 => "malformed_frame",
        FrameTooLarge = 2 => "frame_too_large",
        UnsupportedVersion = 3 => "unsupported_version",
        UnknownFrameType = 4 => "unknown_frame_type",
        BadMac = 5 => "bad_mac",
        /// A Tap arrived before the Hello.
        HelloRequired = 6 => "hello_required",
        /// A second Hello on an authenticated session.
        DuplicateHello = 7 => "duplicate_hello",
        UnknownTerminal = 8 => "unknown_terminal",
        UnknownKeyVersion = 9 => "unknown_key_version",
        UnknownArea = 10 => "unknown_area",
        /// The sequence number is not above the resend window and is not a resend.
        Replay = 11 => "replay",
        /// A resend of an answered sequence with a different body.
        SequenceConflict = 12 => "sequence_conflict",
        TooManyConnections = 13 => "too_many_connections",
        ShuttingDown = 14 => "shutting_down",
        /// A frame type only the gateway sends arrived from the gate.
        UnexpectedFrame = 15 => "unexpected_frame",
        /// No Hello within the handshake deadline.
        HelloTimeout = 16 => "hello_timeout",
        Internal = 17 => "internal",
        /// The gate sent no frame for the idle timeout while nothing was owed to it.
        IdleTimeout = 18 => "idle_timeout",
    }
}

/// First frame a gate sends on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub terminal_id: u64,
    /// Which master key the terminal key was diversified from.
    pub key_version: u8,
    pub mode: Mode,
    pub area: AreaCode,
    pub operator: u16,
    /// Random per connection; echoed in HelloAck so an old HelloAck cannot be replayed.
    pub client_nonce: u64,
    /// Gate clock, Unix milliseconds UTC.
    pub gate_time_ms: u64,
}

/// The gateway's acceptance of a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    pub terminal_id: u64,
    pub client_nonce: u64,
    /// Gateway clock, Unix milliseconds UTC, so the gate can notice its own drift.
    pub server_time_ms: u64,
    /// Highest tap sequence the gateway has accepted from this terminal; 0 when none.
    pub last_sequence: u64,
    /// How many sequences below `last_sequence` still count as resends.
    pub resend_window: u16,
    /// How many taps the gate may have unanswered at once.
    pub max_in_flight: u16,
}

/// A card tap to authorize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tap {
    /// Strictly increasing over the terminal's life, starting at 1.
    pub sequence: u64,
    pub card_id: u64,
    pub issuer: Issuer,
    pub kind: TapKind,
    pub line: u16,
    pub stop: u16,
    /// Gate clock at the tap, Unix milliseconds UTC.
    pub gate_time_ms: u64,
}

/// `TapResult::rides_left` when the tap used no counted concession.
pub const RIDES_LEFT_NOT_APPLICABLE: u16 = u16::MAX;

/// The gateway's answer to one Tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapResult {
    pub sequence: u64,
    pub outcome: Outcome,
    pub reason: Reason,
    pub concession: Concession,
    /// Estimated fare in fen (0.01 yuan); the settled fare may differ (transfers, caps, exits).
    pub fare_fen: u32,
    /// Concession rides left after this tap, or `RIDES_LEFT_NOT_APPLICABLE`.
    pub rides_left: u16,
}

/// A fatal protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// The sequence of the tap that caused it, or 0.
    pub sequence: u64,
}

/// Any frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Tap(Tap),
    TapResult(TapResult),
    Error(ErrorFrame),
}

/// A field whose value the protocol does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` has invalid value {value}")]
pub struct InvalidField {
    pub field: &'static str,
    pub value: u64,
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck(_) => FrameType::HelloAck,
            Frame::Tap(_) => FrameType::Tap,
            Frame::TapResult(_) => FrameType::TapResult,
            Frame::Error(_) => FrameType::Error,
        }
    }

    /// Writes the body (exactly `frame_type().body_len()` bytes).
    pub(crate) fn put_body(&self, out: &mut impl BufMut) {
        match self {
            Frame::Hello(h) => {
                out.put_u64(h.terminal_id);
                out.put_u8(h.key_version);
                out.put_u8(h.mode.code());
                out.put_u32(h.area.0);
                out.put_u16(h.operator);
                out.put_u64(h.client_nonce);
                out.put_u64(h.gate_time_ms);
            }
            Frame::HelloAck(a) => {
                out.put_u64(a.terminal_id);
                out.put_u64(a.client_nonce);
                out.put_u64(a.server_time_ms);
                out.put_u64(a.last_sequence);
                out.put_u16(a.resend_window);
                out.put_u16(a.max_in_flight);
            }
            Frame::Tap(t) => {
                out.put_u64(t.sequence);
                out.put_u64(t.card_id);
                out.put_u8(t.issuer.code());
                out.put_u8(t.kind.code());
                out.put_u16(t.line);
                out.put_u16(t.stop);
                out.put_u64(t.gate_time_ms);
            }
            Frame::TapResult(r) => {
                out.put_u64(r.sequence);
                out.put_u8(r.outcome.code());
                out.put_u8(r.reason.code());
                out.put_u8(r.concession.code());
                out.put_u32(r.fare_fen);
                out.put_u16(r.rides_left);
            }
            Frame::Error(e) => {
                out.put_u16(e.code.code() as u16);
                out.put_u64(e.sequence);
            }
        }
    }

    /// Parses a body whose length the caller has already checked against `ty.body_len()`.
    pub(crate) fn parse_body(ty: FrameType, mut body: &[u8]) -> Result<Frame, InvalidField> {
        debug_assert_eq!(body.len(), ty.body_len());
        let b = &mut body;
        Ok(match ty {
            FrameType::Hello => Frame::Hello(Hello {
                terminal_id: b.get_u64(),
                key_version: b.get_u8(),
                mode: enum_field("mode", b.get_u8(), Mode::from_code)?,
                area: AreaCode(b.get_u32()),
                operator: b.get_u16(),
                client_nonce: b.get_u64(),
                gate_time_ms: b.get_u64(),
            }),
            FrameType::HelloAck => Frame::HelloAck(HelloAck {
                terminal_id: b.get_u64(),
                client_nonce: b.get_u64(),
                server_time_ms: b.get_u64(),
                last_sequence: b.get_u64(),
                resend_window: b.get_u16(),
                max_in_flight: b.get_u16(),
            }),
            FrameType::Tap => {
                let sequence = b.get_u64();
                if sequence == 0 {
                    return Err(InvalidField {
                        field: "sequence",
                        value: 0,
                    });
                }
                Frame::Tap(Tap {
                    sequence,
                    card_id: b.get_u64(),
                    issuer: enum_field("issuer", b.get_u8(), Issuer::from_code)?,
                    kind: enum_field("tap_kind", b.get_u8(), TapKind::from_code)?,
                    line: b.get_u16(),
                    stop: b.get_u16(),
                    gate_time_ms: b.get_u64(),
                })
            }
            FrameType::TapResult => Frame::TapResult(TapResult {
                sequence: b.get_u64(),
                outcome: enum_field("outcome", b.get_u8(), Outcome::from_code)?,
                reason: enum_field("reason", b.get_u8(), Reason::from_code)?,
                concession: enum_field("concession", b.get_u8(), Concession::from_code)?,
                fare_fen: b.get_u32(),
                rides_left: b.get_u16(),
            }),
            FrameType::Error => {
                let raw = b.get_u16();
                let code = u8::try_from(raw)
                    .ok()
                    .and_then(ErrorCode::from_code)
                    .ok_or(InvalidField {
                        field: "error_code",
                        value: raw.into(),
                    })?;
                Frame::Error(ErrorFrame {
                    code,
                    sequence: b.get_u64(),
                })
            }
        })
    }
}

fn enum_field<T>(
    field: &'static str,
    value: u8,
    from_code: fn(u8) -> Option<T>,
) -> Result<T, InvalidField> {
    from_code(value).ok_or(InvalidField {
        field,
        value: value.into(),
    })
}
