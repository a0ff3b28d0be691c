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
        /// gate → gateway (version 2): the deny-list version the gate holds.
        DenyAck = 0x06 => "deny_ack",
        /// gateway → gate (version 2): the next changes to the deny list, in order.
        DenyChanges = 0x07 => "deny_changes",
        /// gateway → gate (version 2): one part of the whole deny list, replacing the gate's.
        DenyList = 0x08 => "deny_list",
        /// gateway → gate (version 2): the rules the gate decides by while it has no link.
        OfflineRules = 0x09 => "offline_rules",
        /// gate → gateway (version 2): a tap the gate approved while it had no link, uploaded.
        OfflineTap = 0x0A => "offline_tap",
        /// gateway → gate (version 2): the receipt for one OfflineTap.
        OfflineReceipt = 0x0B => "offline_receipt",
    }
}

/// How long a frame type's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Fixed(usize),
    /// A head of this many bytes, then a count byte's worth of [`DENY_ENTRY_LEN`]-byte entries,
    /// at most [`MAX_DENY_ENTRIES`]; the count byte ends the head.
    Entries {
        head: usize,
    },
}

/// Size of one deny-list entry: card id and reason.
pub const DENY_ENTRY_LEN: usize = 9;
/// Deny-list entries in one frame at most, so the frame stays within `MAX_FRAME_LEN`.
pub const MAX_DENY_ENTRIES: usize = 24;

impl FrameType {
    /// Size of this frame type's body in bytes.
    pub const fn body_len(self) -> BodyLen {
        match self {
            FrameType::Hello => BodyLen::Fixed(32),
            FrameType::HelloAck => BodyLen::Fixed(36),
            FrameType::Tap => BodyLen::Fixed(30),
            FrameType::TapResult => BodyLen::Fixed(17),
            FrameType::Error => BodyLen::Fixed(10),
            FrameType::DenyAck => BodyLen::Fixed(16),
            FrameType::DenyChanges => BodyLen::Entries { head: 17 },
            FrameType::DenyList => BodyLen::Entries { head: 18 },
            FrameType::OfflineRules => BodyLen::Fixed(9),
            FrameType::OfflineTap => BodyLen::Fixed(54),
            FrameType::OfflineReceipt => BodyLen::Fixed(14),
        }
    }

    /// The protocol version that introduced this frame type; a connection of an earlier
    /// version treats it as unknown.
    pub const fn since(self) -> Version {
        match self {
            FrameType::DenyAck
            | FrameType::DenyChanges
            | FrameType::DenyList
            | FrameType::OfflineRules
            | FrameType::OfflineTap
            | FrameType::OfflineReceipt => Version::V2,
            _ => Version::V1,
        }
    }
}

/// The protocol versions, negotiated by ALPN (PROTOCOL.md section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V1,
    /// Adds the deny list (frames 0x06 to 0x08) and offline taps (0x09 to 0x0B).
    V2,
}

impl Version {
    pub const NEWEST: Version = Version::V2;

    /// The ALPN protocol id that selects this version.
    pub const fn alpn(self) -> &'static [u8] {
        match self {
            Version::V1 => b"tapgate/1",
            Version::V2 => b"tapgate/2",
        }
    }

    /// The version an ALPN id selects; `None` for ids that are not tapgate's.
    pub fn from_alpn(alpn: &[u8]) -> Option<Version> {
        [Version::V2, Version::V1]
            .into_iter()
            .find(|version| version.alpn() == alpn)
    }

    /// The ALPN ids of this version and every earlier one, newest first: what a gate that
    /// speaks up to `self` offers, and what a gateway offers.
    pub fn alpn_offer(self) -> Vec<Vec<u8>> {
        [Version::V2, Version::V1]
            .into_iter()
            .filter(|version| *version <= self)
            .map(|version| version.alpn().to_vec())
            .collect()
    }

    pub const fn number(self) -> u8 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.number())
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
        /// Only in an OfflineReceipt's flag: the tap's fare estimate was above the offline limit.
        OfflineFareOverLimit = 10 => "offline_fare_over_limit",
        /// Only in an OfflineReceipt's flag: the tap came later after the link was lost than the
        /// offline rules allow.
        OfflineTooLong = 11 => "offline_too_long",
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// One card on the deny list, or off it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DenyEntry {
    pub card_id: u64,
    /// Why the card is refused (`CardLost`, `CardBlocked`, `CardCancelled`), or `Approved`
    /// in a change that takes the card off the list.
    pub reason: Reason,
}

impl DenyEntry {
    /// Whether the entry puts the card on the list (rather than taking it off).
    pub fn denies(&self) -> bool {
        self.reason != Reason::Approved
    }
}

/// The deny list a gate holds: after its Hello, after each change it applied and after a whole
/// list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenyAck {
    pub version: u64,
    /// The history of the list the gate holds, as the gateway last sent it: two lists at the
    /// same version are the same list only when their histories are equal too.
    pub history: u64,
}

impl DenyAck {
    /// What a gate that has never been sent a list holds: the empty list, version 0.
    pub const NEW_GATE: DenyAck = DenyAck {
        version: 0,
        history: 0,
    };
}

/// Consecutive changes to the deny list: entry `i` makes version `first_version + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyChanges {
    pub first_version: u64,
    /// The list's history once the gate applied these.
    pub history: u64,
    pub entries: Vec<DenyEntry>,
}

impl DenyChanges {
    /// The version a gate holds once it applied these.
    pub fn last_version(&self) -> u64 {
        self.first_version + self.entries.len() as u64 - 1
    }
}

/// One part of the whole deny list at `version`. The parts come in order, the first with
/// `first`, the last with `last` (one part may be both); the gate replaces its list with theirs
/// when the last arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyList {
    pub version: u64,
    /// The history of the list at `version`, the same in every part.
    pub history: u64,
    pub first: bool,
    pub last: bool,
    /// Only cards on the list (no `Approved` entries).
    pub entries: Vec<DenyEntry>,
}

/// A set of issuers, one bit per issuer code (bit 1 for code 1, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct IssuerSet(u8);

impl IssuerSet {
    pub const EMPTY: IssuerSet = IssuerSet(0);

    pub fn of(issuers: &[Issuer]) -> IssuerSet {
        IssuerSet(issuers.iter().fold(0, |bits, i| bits | 1 << i.code()))
    }

    pub fn contains(self, issuer: Issuer) -> bool {
        self.0 & 1 << issuer.code() != 0
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    /// The set these bits name; `None` when a bit names no issuer.
    pub fn from_bits(bits: u8) -> Option<IssuerSet> {
        let known = IssuerSet::of(Issuer::ALL).0;
        (bits & !known == 0).then_some(IssuerSet(bits))
    }
}

/// What a gate may approve while it cannot reach a gateway (first-ride risk), as the policy
/// says. A gate holds the last rules it was sent; with none it approves nothing offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineRules {
    /// Cards of these issuers only.
    pub issuers: IssuerSet,
    /// Taps whose fare estimate is at most this many fen.
    pub max_fare_fen: u32,
    /// For at most this long after the gate last heard from a gateway; 0: never offline.
    pub max_offline_s: u32,
}

/// A tap the gate approved offline, uploaded once a link is back. Its sequence is the gate's
/// next, as for an online tap: offline taps and online taps are one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OfflineTap {
    /// The tap as it was made; `gate_time_ms` is when.
    pub tap: Tap,
    /// The deny-list version the gate held when it approved the tap.
    pub deny_version: u64,
    /// That list's history (section 4.6), so the gateway can tell whether it knows the list.
    pub deny_history: u64,
    /// Gate clock when the gate last heard from a gateway, Unix milliseconds UTC.
    pub offline_since_ms: u64,
}

impl OfflineTap {
    /// The list the gate decided by, as its DenyAck would name it.
    pub fn deny_held(&self) -> DenyAck {
        DenyAck {
            version: self.deny_version,
            history: self.deny_history,
        }
    }
}

wire_enum! {
    /// What became of an uploaded offline tap.
    OfflineStatus {
        /// Recorded now: the gate may forget it.
        Recorded = 0 => "recorded",
        /// Recorded before (a resend): the gate may forget it.
        Already = 1 => "already",
        /// Not recorded (the gateway is overloaded or cannot read the card): send it again
        /// later, under the same sequence.
        Busy = 2 => "busy",
    }
}

/// The gateway's receipt for one OfflineTap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineReceipt {
    pub sequence: u64,
    pub status: OfflineStatus,
    /// The rule the tap broke, or `Approved` for none. A flagged tap is recorded and charged
    /// all the same: the rider has ridden.
    pub flag: Reason,
    /// The fare estimate for the tap in fen, as for a TapResult.
    pub fare_fen: u32,
}

/// A fatal protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// The sequence of the tap that caused it, or 0.
    pub sequence: u64,
}

/// Any frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Tap(Tap),
    TapResult(TapResult),
    Error(ErrorFrame),
    DenyAck(DenyAck),
    DenyChanges(DenyChanges),
    DenyList(DenyList),
    OfflineRules(OfflineRules),
    OfflineTap(OfflineTap),
    OfflineReceipt(OfflineReceipt),
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
            Frame::DenyAck(_) => FrameType::DenyAck,
            Frame::DenyChanges(_) => FrameType::DenyChanges,
            Frame::DenyList(_) => FrameType::DenyList,
            Frame::OfflineRules(_) => FrameType::OfflineRules,
            Frame::OfflineTap(_) => FrameType::OfflineTap,
            Frame::OfflineReceipt(_) => FrameType::OfflineReceipt,
        }
    }

    /// Size of the body this frame writes.
    pub fn body_size(&self) -> usize {
        match (self, self.frame_type().body_len()) {
            (_, BodyLen::Fixed(len)) => len,
            (Frame::DenyChanges(c), BodyLen::Entries { head }) => {
                head + c.entries.len() * DENY_ENTRY_LEN
            }
            (Frame::DenyList(l), BodyLen::Entries { head }) => {
                head + l.entries.len() * DENY_ENTRY_LEN
            }
            (_, BodyLen::Entries { head }) => head,
        }
    }

    /// Writes the body (exactly `body_size()` bytes). Entry frames hold at most
    /// [`MAX_DENY_ENTRIES`]; building one with more is a bug of the sender.
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
            Frame::Tap(t) => put_tap(t, out),
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
            Frame::DenyAck(a) => {
                out.put_u64(a.version);
                out.put_u64(a.history);
            }
            Frame::DenyChanges(c) => {
                out.put_u64(c.first_version);
                out.put_u64(c.history);
                put_entries(&c.entries, out);
            }
            Frame::DenyList(l) => {
                out.put_u64(l.version);
                out.put_u64(l.history);
                out.put_u8(u8::from(l.first) | u8::from(l.last) << 1);
                put_entries(&l.entries, out);
            }
            Frame::OfflineRules(r) => {
                out.put_u8(r.issuers.bits());
                out.put_u32(r.max_fare_fen);
                out.put_u32(r.max_offline_s);
            }
            Frame::OfflineTap(o) => {
                put_tap(&o.tap, out);
                out.put_u64(o.deny_version);
                out.put_u64(o.deny_history);
                out.put_u64(o.offline_since_ms);
            }
            Frame::OfflineReceipt(r) => {
                out.put_u64(r.sequence);
                out.put_u8(r.status.code());
                out.put_u8(r.flag.code());
                out.put_u32(r.fare_fen);
            }
        }
    }

    /// Parses a body whose length the caller has already checked against `ty.body_len()`.
    pub(crate) fn parse_body(ty: FrameType, mut body: &[u8]) -> Result<Frame, InvalidField> {
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
            FrameType::Tap => Frame::Tap(parse_tap(b)?),
            FrameType::TapResult => Frame::TapResult(TapResult {
                sequence: b.get_u64(),
                outcome: enum_field("outcome", b.get_u8(), Outcome::from_code)?,
                reason: enum_field("reason", b.get_u8(), Reason::from_code)?,
                concession: enum_field("concession", b.get_u8(), Concession::from_code)?,
                fare_fen: b.get_u32(),
                rides_left: b.get_u16(),
            }),
            FrameType::Error => Frame::Error(parse_error(b)?),
            FrameType::DenyAck => Frame::DenyAck(DenyAck {
                version: b.get_u64(),
                history: b.get_u64(),
            }),
            FrameType::DenyChanges => {
                let first_version = b.get_u64();
                let history = b.get_u64();
                let entries = parse_entries(b, true)?;
                if first_version == 0 || entries.is_empty() {
                    return Err(InvalidField {
                        field: if entries.is_empty() {
                            "count"
                        } else {
                            "first_version"
                        },
                        value: 0,
                    });
                }
                Frame::DenyChanges(DenyChanges {
                    first_version,
                    history,
                    entries,
                })
            }
            FrameType::DenyList => {
                let version = b.get_u64();
                let history = b.get_u64();
                let flags = b.get_u8();
                if flags > 0b11 {
                    return Err(InvalidField {
                        field: "flags",
                        value: flags.into(),
                    });
                }
                Frame::DenyList(DenyList {
                    version,
                    history,
                    first: flags & 1 != 0,
                    last: flags & 2 != 0,
                    entries: parse_entries(b, false)?,
                })
            }
            FrameType::OfflineRules => Frame::OfflineRules(parse_offline_rules(b)?),
            FrameType::OfflineTap => Frame::OfflineTap(OfflineTap {
                tap: parse_tap(b)?,
                deny_version: b.get_u64(),
                deny_history: b.get_u64(),
                offline_since_ms: b.get_u64(),
            }),
            FrameType::OfflineReceipt => Frame::OfflineReceipt(OfflineReceipt {
                sequence: b.get_u64(),
                status: enum_field("status", b.get_u8(), OfflineStatus::from_code)?,
                flag: enum_field("flag", b.get_u8(), Reason::from_code)?,
                fare_fen: b.get_u32(),
            }),
        })
    }
}

fn parse_error(b: &mut &[u8]) -> Result<ErrorFrame, InvalidField> {
    let raw = b.get_u16();
    let code = u8::try_from(raw)
        .ok()
        .and_then(ErrorCode::from_code)
        .ok_or(InvalidField {
            field: "error_code",
            value: raw.into(),
        })?;
    Ok(ErrorFrame {
        code,
        sequence: b.get_u64(),
    })
}

fn parse_offline_rules(b: &mut &[u8]) -> Result<OfflineRules, InvalidField> {
    let bits = b.get_u8();
    Ok(OfflineRules {
        issuers: IssuerSet::from_bits(bits).ok_or(InvalidField {
            field: "issuers",
            value: bits.into(),
        })?,
        max_fare_fen: b.get_u32(),
        max_offline_s: b.get_u32(),
    })
}

fn put_tap(t: &Tap, out: &mut impl BufMut) {
    out.put_u64(t.sequence);
    out.put_u64(t.card_id);
    out.put_u8(t.issuer.code());
    out.put_u8(t.kind.code());
    out.put_u16(t.line);
    out.put_u16(t.stop);
    out.put_u64(t.gate_time_ms);
}

/// The 30 bytes of a Tap, in a Tap or an OfflineTap.
fn parse_tap(b: &mut &[u8]) -> Result<Tap, InvalidField> {
    let sequence = b.get_u64();
    if sequence == 0 {
        return Err(InvalidField {
            field: "sequence",
            value: 0,
        });
    }
    Ok(Tap {
        sequence,
        card_id: b.get_u64(),
        issuer: enum_field("issuer", b.get_u8(), Issuer::from_code)?,
        kind: enum_field("tap_kind", b.get_u8(), TapKind::from_code)?,
        line: b.get_u16(),
        stop: b.get_u16(),
        gate_time_ms: b.get_u64(),
    })
}

fn put_entries(entries: &[DenyEntry], out: &mut impl BufMut) {
    assert!(
        entries.len() <= MAX_DENY_ENTRIES,
        "a deny frame holds at most {MAX_DENY_ENTRIES} entries"
    );
    out.put_u8(entries.len() as u8);
    for entry in entries {
        out.put_u64(entry.card_id);
        out.put_u8(entry.reason.code());
    }
}

/// The count byte and the entries after it; the codec has checked that the body holds exactly
/// as many entries as fit, but not that the count byte agrees.
fn parse_entries(b: &mut &[u8], clearing_allowed: bool) -> Result<Vec<DenyEntry>, InvalidField> {
    let count = b.get_u8();
    if usize::from(count) * DENY_ENTRY_LEN != b.len() {
        return Err(InvalidField {
            field: "count",
            value: count.into(),
        });
    }
    (0..count)
        .map(|_| {
            let card_id = b.get_u64();
            let reason = enum_field("reason", b.get_u8(), Reason::from_code)?;
            let allowed = match reason {
                Reason::CardLost | Reason::CardBlocked | Reason::CardCancelled => true,
                Reason::Approved => clearing_allowed,
                _ => false,
            };
            if !allowed {
                return Err(InvalidField {
                    field: "reason",
                    value: reason.code().into(),
                });
            }
            Ok(DenyEntry { card_id, reason })
        })
        .collect()
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
