//! The tapgate wire protocol: frames, framing, SM4-CMAC authentication, key diversification,
//! replay rules and the shared registries.
//!
//! This crate performs no I/O and never reads a clock: every input, including the current time,
//! is passed in. That keeps it usable under any QUIC stack, in a fuzzer and in gate firmware
//! test harnesses. `PROTOCOL.md` at the repository root is its specification.

#![forbid(unsafe_code)]

pub mod codec;
pub mod crypto;
pub mod deny;
pub mod example;
pub mod frame;
pub mod offline;
pub mod registry;
pub mod replay;

pub use codec::{
    DecodeError, MAX_FRAME_LEN, OpenError, PROTOCOL_VERSION, SealedFrame, decode_one, seal,
    seal_unkeyed_error, take_frame, wire_len,
};
pub use crypto::{BadMac, KeyRing, MacKey, MasterKey, TAG_LEN, Tag, TerminalKey};
pub use deny::{GateDenyList, OutOfStep};
pub use frame::{
    BodyLen, DENY_ENTRY_LEN, DenyAck, DenyChanges, DenyEntry, DenyList, ErrorCode, ErrorFrame,
    Frame, FrameType, Hello, HelloAck, InvalidField, IssuerSet, MAX_DENY_ENTRIES, OfflineReceipt,
    OfflineRules, OfflineStatus, OfflineTap, Outcome, RIDES_LEFT_NOT_APPLICABLE, Reason, Tap,
    TapKind, TapResult, Version,
};
pub use offline::{GateOffline, OfflineRefusal};
pub use registry::{AREAS, Area, AreaCode, AreaKind, Concession, Issuer, IssuerRegion, Mode};
pub use replay::{Admission, SequenceWindow};
