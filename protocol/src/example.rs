//! The worked example of PROTOCOL.md, computed by the code itself. `tapgate vectors` prints it
//! and a test checks that the specification shows exactly these bytes.

use crate::codec::seal;
use crate::crypto::{MasterKey, TAG_LEN};
use crate::frame::{Frame, Hello, Outcome, Reason, Tap, TapKind, TapResult};
use crate::registry::{AreaCode, Concession, Issuer, Mode};
use bytes::BytesMut;

/// The master key of the example (the GB/T 32907 test key), key version 1.
pub const MASTER_KEY_HEX: &str = "0123456789abcdeffedcba9876543210";
/// A metro gate in Yuzhong (渝中) numbered after its area code.
pub const TERMINAL_ID: u64 = 5_001_030_001;

/// The example's frames, in the order they cross the wire.
pub fn frames() -> [Frame; 3] {
    [
        Frame::Hello(Hello {
            terminal_id: TERMINAL_ID,
            key_version: 1,
            mode: Mode::Metro,
            area: AreaCode(500103),
            operator: 2,
            client_nonce: 0x0102_0304_0506_0708,
            // 2026-11-29T08:00:00Z
            gate_time_ms: 1_795_939_200_000,
        }),
        Frame::Tap(Tap {
            sequence: 1,
            card_id: 6_222_000_123_456_789,
            issuer: Issuer::ChongqingSsc,
            kind: TapKind::Entry,
            line: 2,
            stop: 15,
            gate_time_ms: 1_795_939_201_500,
        }),
        Frame::TapResult(TapResult {
            sequence: 1,
            outcome: Outcome::Approve,
            reason: Reason::Approved,
            concession: Concession::Elder,
            fare_fen: 0,
            rides_left: 1_199,
        }),
    ]
}

/// `name: value` lines, the values in lowercase hex where they are bytes.
pub fn lines() -> Vec<(String, String)> {
    let master = MasterKey::from_hex(MASTER_KEY_HEX).expect("the example key is valid hex");
    let terminal_key = master.diversify(TERMINAL_ID);
    let mac = terminal_key.mac_key();
    let mut tid_block = TERMINAL_ID.to_be_bytes().to_vec();
    tid_block.extend(TERMINAL_ID.to_be_bytes().map(|b| !b));
    let mut out = vec![
        ("master_key_v1".to_owned(), MASTER_KEY_HEX.to_owned()),
        ("terminal_id".to_owned(), TERMINAL_ID.to_string()),
        ("diversification_block".to_owned(), hex(&tid_block)),
        ("terminal_key".to_owned(), hex(terminal_key.as_bytes())),
    ];
    for frame in frames() {
        let mut wire = BytesMut::new();
        seal(&frame, &mac, &mut wire);
        let name = frame.frame_type().label();
        let (mac_input, tag) = wire.split_at(wire.len() - TAG_LEN);
        out.push((format!("{name}_mac_input"), hex(mac_input)));
        out.push((format!("{name}_tag"), hex(tag)));
        out.push((format!("{name}_frame"), hex(&wire)));
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
