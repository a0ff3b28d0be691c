//! Framing: the length prefix, header and tag around a frame body, incremental splitting of a
//! byte stream into frames, and sealing (encoding plus MAC).
//!
//! ```text
//! +--------+---------+------+----------------+-----------+
//! | len    | version | type | body           | tag       |
//! | u16 BE | u8 = 1  | u8   | body_len(type) | 16 bytes  |
//! +--------+---------+------+----------------+-----------+
//! len counts every byte after itself. The tag is the SM4-CMAC of every byte before it.
//! ```

use crate::crypto::{BadMac, MacKey, TAG_LEN, Tag};
use crate::frame::{
    BodyLen, DENY_ENTRY_LEN, ErrorCode, ErrorFrame, Frame, FrameType, InvalidField,
    MAX_DENY_ENTRIES,
};
use bytes::{BufMut, Bytes, BytesMut};

/// The version byte of the frame layout. Both protocol versions (which ALPN negotiates, see
/// [`crate::Version`]) use this layout: version 2 adds frame types, it changes none.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 2;
/// Version and type bytes.
pub const HEADER_LEN: usize = 2;
/// No frame, prefix included, may be longer than this. A declared length above it is refused
/// before any of the frame is buffered.
pub const MAX_FRAME_LEN: usize = 256;

/// Total size on the wire of a frame of type `ty`, prefix and tag included; for a type whose
/// body holds entries, of one with none.
pub const fn wire_len(ty: FrameType) -> usize {
    let body = match ty.body_len() {
        BodyLen::Fixed(len) => len,
        BodyLen::Entries { head } => head,
    };
    LEN_PREFIX + HEADER_LEN + body + TAG_LEN
}

/// Why bytes could not be read as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("declared frame length {declared} exceeds the maximum of {max} bytes")]
    TooLarge { declared: usize, max: usize },
    #[error("declared frame length {0} is shorter than the smallest frame")]
    TooShort(usize),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    #[error("{frame_type} frame declared {declared} bytes after the prefix, expected {expected}")]
    BodyLength {
        frame_type: FrameType,
        declared: usize,
        expected: usize,
    },
    #[error(
        "{frame_type} frame declared {declared} bytes after the prefix: not a whole number of entries, or more than {MAX_DENY_ENTRIES}"
    )]
    EntryLength {
        frame_type: FrameType,
        declared: usize,
    },
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// The peer finished its stream with this many bytes of an unfinished frame.
    #[error("the stream ended {0} bytes into a frame")]
    Truncated(usize),
}

impl DecodeError {
    /// The Error frame code the gateway answers this with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrameType,
            DecodeError::TooShort(_)
            | DecodeError::Truncated(_)
            | DecodeError::BodyLength { .. }
            | DecodeError::EntryLength { .. }
            | DecodeError::InvalidField(_) => ErrorCode::MalformedFrame,
        }
    }
}

/// Why a sealed frame could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    BadMac(#[from] BadMac),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl OpenError {
    pub fn error_code(&self) -> ErrorCode {
        match self {
            OpenError::BadMac(_) => ErrorCode::BadMac,
            OpenError::Decode(e) => e.error_code(),
        }
    }
}

/// One complete frame as it came off the wire, structurally checked (length, version, type) but
/// not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFrame {
    frame_type: FrameType,
    bytes: Bytes,
}

impl SealedFrame {
    pub fn frame_type(&self) -> FrameType {
        self.frame_type
    }

    /// The bytes the tag covers.
    pub fn mac_input(&self) -> &[u8] {
        &self.bytes[..self.bytes.len() - TAG_LEN]
    }

    pub fn tag(&self) -> Tag {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&self.bytes[self.bytes.len() - TAG_LEN..]);
        tag
    }

    fn body(&self) -> &[u8] {
        &self.bytes[LEN_PREFIX + HEADER_LEN..self.bytes.len() - TAG_LEN]
    }

    /// Parses the body without checking the tag. Only for learning who claims to have sent a
    /// Hello, so that the right key can be derived; trust nothing else from it.
    pub fn parse_unverified(&self) -> Result<Frame, DecodeError> {
        Ok(Frame::parse_body(self.frame_type, self.body())?)
    }

    pub fn verify(&self, key: &MacKey) -> Result<(), BadMac> {
        key.verify(self.mac_input(), &self.bytes[self.bytes.len() - TAG_LEN..])
    }

    /// Who a Hello claims to come from — its terminal id and key version (the first 9 bytes of
    /// its body) — read without parsing the rest, which is checked only after the tag: the
    /// only thing taken from a frame before its tag verifies is what selects the key.
    pub fn hello_identity(&self) -> Option<(u64, u8)> {
        if self.frame_type != FrameType::Hello {
            return None;
        }
        let body = self.body();
        let terminal: [u8; 8] = body.get(..8)?.try_into().ok()?;
        Some((u64::from_be_bytes(terminal), *body.get(8)?))
    }

    /// The sequence number a Tap, TapResult, OfflineTap or OfflineReceipt frame carries (the
    /// first 8 bytes of its body), read without parsing the rest; `None` for other frames.
    /// Trust it only once the tag has verified: then an Error about a body that does not parse
    /// can name the tap it is about.
    pub fn sequence(&self) -> Option<u64> {
        match self.frame_type {
            FrameType::Tap
            | FrameType::TapResult
            | FrameType::OfflineTap
            | FrameType::OfflineReceipt => {
                let bytes: [u8; 8] = self.body().get(..8)?.try_into().ok()?;
                Some(u64::from_be_bytes(bytes))
            }
            _ => None,
        }
    }

    /// Verifies the tag, then parses the body.
    pub fn open(&self, key: &MacKey) -> Result<Frame, OpenError> {
        self.verify(key)?;
        Ok(self.parse_unverified()?)
    }
}

/// Splits the next frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (read more and call again). Errors are
/// reported as early as the bytes allow: an oversized length, a wrong version or an unknown type
/// is refused without waiting for the rest of the frame. After an error the stream is unusable.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<SealedFrame>, DecodeError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let declared = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if LEN_PREFIX + declared > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge {
            declared,
            max: MAX_FRAME_LEN - LEN_PREFIX,
        });
    }
    if declared < HEADER_LEN + TAG_LEN {
        return Err(DecodeError::TooShort(declared));
    }
    let Some(&version) = buf.get(LEN_PREFIX) else {
        return Ok(None);
    };
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let Some(&type_byte) = buf.get(LEN_PREFIX + 1) else {
        return Ok(None);
    };
    let frame_type =
        FrameType::from_code(type_byte).ok_or(DecodeError::UnknownFrameType(type_byte))?;
    check_body_len(frame_type, declared)?;
    if buf.len() < LEN_PREFIX + declared {
        return Ok(None);
    }
    let bytes = buf.split_to(LEN_PREFIX + declared).freeze();
    Ok(Some(SealedFrame { frame_type, bytes }))
}

/// Whether `declared` bytes after the prefix can hold a frame of this type.
fn check_body_len(frame_type: FrameType, declared: usize) -> Result<(), DecodeError> {
    let body = declared - HEADER_LEN - TAG_LEN;
    match frame_type.body_len() {
        BodyLen::Fixed(len) if body != len => Err(DecodeError::BodyLength {
            frame_type,
            declared,
            expected: len + HEADER_LEN + TAG_LEN,
        }),
        BodyLen::Fixed(_) => Ok(()),
        BodyLen::Entries { head } => {
            let entries = body.checked_sub(head);
            match entries {
                Some(bytes)
                    if bytes % DENY_ENTRY_LEN == 0
                        && bytes / DENY_ENTRY_LEN <= MAX_DENY_ENTRIES =>
                {
                    Ok(())
                }
                _ => Err(DecodeError::EntryLength {
                    frame_type,
                    declared,
                }),
            }
        }
    }
}

/// Reads exactly one frame from `input`, which must hold nothing else. For tools and tests;
/// streams use [`take_frame`].
pub fn decode_one(input: &[u8]) -> Result<SealedFrame, DecodeError> {
    let mut buf = BytesMut::from(input);
    match take_frame(&mut buf)? {
        Some(frame) if buf.is_empty() => Ok(frame),
        Some(frame) => Err(DecodeError::BodyLength {
            frame_type: frame.frame_type,
            declared: input.len() - LEN_PREFIX,
            expected: frame.bytes.len() - LEN_PREFIX,
        }),
        None => Err(DecodeError::TooShort(
            input.len().saturating_sub(LEN_PREFIX),
        )),
    }
}

/// Appends `frame`, authenticated under `key`, to `out`.
pub fn seal(frame: &Frame, key: &MacKey, out: &mut BytesMut) {
    let start = put_unsealed(frame, out);
    let tag = key.tag(&out[start..]);
    out.put_slice(&tag);
}

/// Appends an Error frame with an all-zero tag. The gateway sends this only when it has no key
/// for the peer (unknown terminal or key version, or a Hello it could not parse), so the gate
/// cannot authenticate it and must treat it as a refusal of the connection, nothing more.
pub fn seal_unkeyed_error(error: ErrorFrame, out: &mut BytesMut) {
    put_unsealed(&Frame::Error(error), out);
    out.put_slice(&[0u8; TAG_LEN]);
}

/// Writes prefix, header and body; returns where the frame starts in `out`.
fn put_unsealed(frame: &Frame, out: &mut BytesMut) -> usize {
    let ty = frame.frame_type();
    let total = LEN_PREFIX + HEADER_LEN + frame.body_size() + TAG_LEN;
    out.reserve(total);
    let start = out.len();
    out.put_u16((total - LEN_PREFIX) as u16);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(ty.code());
    frame.put_body(out);
    debug_assert_eq!(out.len() - start, total - TAG_LEN);
    start
}
