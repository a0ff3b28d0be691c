//! One provisioned metro gate and its key, for the session's unit tests.

use bytes::BytesMut;
use tapgate_protocol::{
    Concession, Frame, Issuer, KeyRing, MacKey, MasterKey, Outcome, RIDES_LEFT_NOT_APPLICABLE,
    Reason, SealedFrame, Tap, TapKind, TapResult, seal,
};

pub(super) const TERMINAL: u64 = 100_000_001;

pub(super) fn keys() -> KeyRing {
    let mut ring = KeyRing::new();
    ring.insert(
        1,
        MasterKey::from_hex("00112233445566778899aabbccddeeff").unwrap(),
    );
    ring
}

pub(super) fn mac() -> MacKey {
    keys().terminal_key(1, TERMINAL).unwrap().mac_key()
}

pub(super) fn sealed(frame: &Frame) -> SealedFrame {
    let mut out = BytesMut::new();
    seal(frame, &mac(), &mut out);
    tapgate_protocol::decode_one(&out).unwrap()
}

/// Tap `sequence` of one card; `stop` changes its body without changing its sequence.
pub(super) fn tap(sequence: u64, stop: u16) -> SealedFrame {
    sealed(&Frame::Tap(Tap {
        sequence,
        card_id: 6_222_000_000_000_001,
        issuer: Issuer::ChongqingSsc,
        kind: TapKind::Entry,
        line: 1,
        stop,
        gate_time_ms: 0,
    }))
}

pub(crate) fn approval(sequence: u64) -> TapResult {
    TapResult {
        sequence,
        outcome: Outcome::Approve,
        reason: Reason::Approved,
        concession: Concession::None,
        fare_fen: 200,
        rides_left: RIDES_LEFT_NOT_APPLICABLE,
    }
}
