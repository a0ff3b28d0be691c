//! The worked example of PROTOCOL.md, computed by the code itself. `tapgate vectors` prints it
//! and a test checks that the specification shows exactly these bytes.

use crate::MacKey;
use crate::codec::seal;
use crate::crypto::{MasterKey, TAG_LEN};
use crate::frame::{
    DenyAck, DenyChanges, DenyEntry, DenyList, ErrorCode, ErrorFrame, Frame, Hello, HelloAck,
    IssuerSet, OfflineReceipt, OfflineRules, OfflineStatus, OfflineTap, Outcome, Reason, Tap,
    TapKind, TapResult,
};
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

/// The histories of the example's list at versions 3 and 4, as a gateway on Redis would send
/// them: opaque to the gate, which echoes them.
const HISTORY_3: u64 = 0x3b9e_41d0_7c52_a8f6;
const HISTORY_4: u64 = 0xc17a_0e5d_92f4_b368;

/// The deny-list example of PROTOCOL.md (protocol version 2), in the order the frames cross
/// the wire: a new gate says it holds nothing, gets the whole list (two cards, version 3) in
/// one part, acknowledges it, then gets a card reported lost (version 4) and acknowledges that.
pub fn deny_frames() -> [Frame; 5] {
    let lost = DenyEntry {
        card_id: 6_222_000_123_456_789,
        reason: Reason::CardLost,
    };
    [
        Frame::DenyAck(DenyAck::NEW_GATE),
        Frame::DenyList(DenyList {
            version: 3,
            history: HISTORY_3,
            first: true,
            last: true,
            entries: vec![
                DenyEntry {
                    card_id: 6_222_000_100_000_001,
                    reason: Reason::CardBlocked,
                },
                DenyEntry {
                    card_id: 6_222_000_100_000_002,
                    reason: Reason::CardCancelled,
                },
            ],
        }),
        Frame::DenyAck(DenyAck {
            version: 3,
            history: HISTORY_3,
        }),
        Frame::DenyChanges(DenyChanges {
            first_version: 4,
            history: HISTORY_4,
            entries: vec![lost],
        }),
        Frame::DenyAck(DenyAck {
            version: 4,
            history: HISTORY_4,
        }),
    ]
}

/// `name: value` lines of the deny-list example, each frame sealed under the example's
/// terminal key.
pub fn deny_lines() -> Vec<(String, String)> {
    sealed_lines(deny_frames())
}

/// The offline example of PROTOCOL.md (protocol version 2): the rules the shipped policy sends,
/// then the same gate, its link lost at 08:05 UTC, uploads the elder card's metro entry it
/// approved offline at 08:10 holding deny-list version 4, and the gateway's receipt: recorded,
/// nothing broken, free.
pub fn offline_frames() -> [Frame; 3] {
    let entry_at = 1_795_939_800_000;
    [
        Frame::OfflineRules(OfflineRules {
            issuers: IssuerSet::of(&[Issuer::ChongqingSsc, Issuer::ChongqingCityCard]),
            max_fare_fen: 700,
            max_offline_s: 1_800,
        }),
        Frame::OfflineTap(OfflineTap {
            tap: Tap {
                sequence: 2,
                card_id: 6_222_000_123_456_789,
                issuer: Issuer::ChongqingSsc,
                kind: TapKind::Entry,
                line: 2,
                stop: 15,
                gate_time_ms: entry_at,
            },
            deny_version: 4,
            deny_history: HISTORY_4,
            offline_since_ms: entry_at - 5 * 60_000,
        }),
        Frame::OfflineReceipt(OfflineReceipt {
            sequence: 2,
            status: OfflineStatus::Recorded,
            flag: Reason::Approved,
            fare_fen: 0,
        }),
    ]
}

/// `name: value` lines of the offline example.
pub fn offline_lines() -> Vec<(String, String)> {
    sealed_lines(offline_frames())
}

/// `name_frame: hex` for each frame sealed under the example's terminal key; DenyAcks, of which
/// an example has several, are numbered.
fn sealed_lines(frames: impl IntoIterator<Item = Frame>) -> Vec<(String, String)> {
    let mac = MasterKey::from_hex(MASTER_KEY_HEX)
        .expect("the example key is valid hex")
        .diversify(TERMINAL_ID)
        .mac_key();
    let mut acks = 0;
    frames
        .into_iter()
        .map(|frame| {
            let mut wire = BytesMut::new();
            seal(&frame, &mac, &mut wire);
            let name = match frame {
                Frame::DenyAck(_) => {
                    acks += 1;
                    format!("deny_ack_{acks}_frame")
                }
                other => format!("{}_frame", other.frame_type().label()),
            };
            (name, hex(&wire))
        })
        .collect()
}

/// One test vector for implementers: a frame as it crosses the wire, under the example's
/// terminal key.
#[derive(Debug, Clone)]
pub struct Vector {
    pub name: String,
    /// `gate→gateway` or `gateway→gate`.
    pub direction: &'static str,
    pub note: String,
    pub frame: Frame,
    /// The bytes on the wire, length prefix to tag.
    pub wire: Vec<u8>,
    /// The bytes the tag covers.
    pub mac_input: Vec<u8>,
}

/// A vector for every frame type in both directions: the Hello and its HelloAck, the Tap,
/// its approval and the same answer to a resend of the same bytes, a denial for every reason,
/// Busy, and an Error for every code (tagged, as once the key is known; one without a key, as
/// a gateway refusing an unknown terminal sends it).
pub fn vectors() -> Vec<Vector> {
    let master = MasterKey::from_hex(MASTER_KEY_HEX).expect("the example key is valid hex");
    let mut vectors = VectorSet {
        mac: master.diversify(TERMINAL_ID).mac_key(),
        out: Vec::new(),
    };
    session_vectors(&mut vectors);
    answer_vectors(&mut vectors);
    error_vectors(&mut vectors);
    let notes = [
        "version 2: a new gate holds no list yet",
        "version 2: the whole list at version 3 in one part (first and last)",
        "version 2: the gate holds version 3",
        "version 2: a card reported lost, version 4",
        "version 2: the gate holds version 4",
    ];
    let mut acks = 0;
    for (frame, note) in deny_frames().into_iter().zip(notes) {
        let (name, direction) = match frame {
            Frame::DenyAck(_) => {
                acks += 1;
                (format!("deny_ack_{acks}"), UP)
            }
            ref other => (other.frame_type().label().to_owned(), DOWN),
        };
        vectors.push(name, direction, note, frame, true);
    }
    let notes = [
        (DOWN, "version 2: the offline rules of the shipped policy"),
        (
            UP,
            "version 2: an elder's metro entry approved offline, uploaded",
        ),
        (DOWN, "version 2: recorded, no rule broken, free"),
    ];
    for (frame, (direction, note)) in offline_frames().into_iter().zip(notes) {
        let name = frame.frame_type().label().to_owned();
        vectors.push(name, direction, note, frame, true);
    }
    vectors.out
}

const UP: &str = "gate→gateway";
const DOWN: &str = "gateway→gate";

/// Vectors under construction, sealed with the example terminal's key.
struct VectorSet {
    mac: MacKey,
    out: Vec<Vector>,
}

impl VectorSet {
    /// Seals `frame`; an untagged one carries the all-zero tag of a keyless Error.
    fn push(
        &mut self,
        name: String,
        direction: &'static str,
        note: &str,
        frame: Frame,
        tagged: bool,
    ) {
        let mut wire = BytesMut::new();
        seal(&frame, &self.mac, &mut wire);
        if !tagged {
            let len = wire.len();
            wire[len - TAG_LEN..].fill(0);
        }
        let mac_input = wire[..wire.len() - TAG_LEN].to_vec();
        self.out.push(Vector {
            name,
            direction,
            note: note.to_owned(),
            frame,
            wire: wire.to_vec(),
            mac_input,
        });
    }
}

/// The Hello and its HelloAck, the Tap, its approval, and a resend with its repeated answer.
fn session_vectors(vectors: &mut VectorSet) {
    let [hello, tap, approval] = frames();
    vectors.push(
        "hello".into(),
        UP,
        "the first frame of every connection",
        hello,
        true,
    );
    vectors.push(
        "hello_ack".into(),
        DOWN,
        "the answer to the Hello: nothing accepted yet, the default window and in-flight bound",
        Frame::HelloAck(HelloAck {
            terminal_id: TERMINAL_ID,
            client_nonce: 0x0102_0304_0506_0708,
            server_time_ms: 1_795_939_200_020,
            last_sequence: 0,
            resend_window: 32,
            max_in_flight: 32,
        }),
        true,
    );
    vectors.push(
        "tap".into(),
        UP,
        "an elder card entering the metro",
        tap.clone(),
        true,
    );
    vectors.push(
        "tap_result_approve".into(),
        DOWN,
        "the approval (free: elder concession, 1,199 counted rides left)",
        approval.clone(),
        true,
    );
    vectors.push(
        "tap_resend".into(),
        UP,
        "a resend is the same bytes as the first copy",
        tap,
        true,
    );
    vectors.push(
        "tap_result_resend".into(),
        DOWN,
        "the answer to a resend repeats the first answer byte for byte",
        approval,
        true,
    );
}

/// A denial for every reason, and Busy.
fn answer_vectors(vectors: &mut VectorSet) {
    for reason in Reason::ALL
        .iter()
        .filter(|r| !matches!(r, Reason::Approved | Reason::Overloaded))
    {
        vectors.push(
            format!("tap_result_deny_{}", reason.label()),
            DOWN,
            "a denial: no concession, no fare, rides left not applicable",
            Frame::TapResult(TapResult {
                sequence: 1,
                outcome: Outcome::Deny,
                reason: *reason,
                concession: Concession::None,
                fare_fen: 0,
                rides_left: crate::frame::RIDES_LEFT_NOT_APPLICABLE,
            }),
            true,
        );
    }
    vectors.push(
        "tap_result_busy".into(),
        DOWN,
        "Busy: nothing was recorded; send the same tap again later",
        Frame::TapResult(TapResult {
            sequence: 1,
            outcome: Outcome::Busy,
            reason: Reason::Overloaded,
            concession: Concession::None,
            fare_fen: 0,
            rides_left: crate::frame::RIDES_LEFT_NOT_APPLICABLE,
        }),
        true,
    );
}

/// An Error for every code, tagged, and one without a key.
fn error_vectors(vectors: &mut VectorSet) {
    for code in ErrorCode::ALL {
        let about_a_tap = matches!(
            code,
            ErrorCode::Replay | ErrorCode::SequenceConflict | ErrorCode::MalformedFrame
        );
        vectors.push(
            format!("error_{}", code.label()),
            DOWN,
            "an Error, tagged because the gateway knows the gate's key; the connection closes after it",
            Frame::Error(ErrorFrame {
                code: *code,
                sequence: u64::from(about_a_tap),
            }),
            true,
        );
    }
    vectors.push(
        "error_unknown_terminal_untagged".into(),
        DOWN,
        "an Error sent before the gateway has a key for the gate: the tag is all zeros (section 5.2)",
        Frame::Error(ErrorFrame {
            code: ErrorCode::UnknownTerminal,
            sequence: 0,
        }),
        false,
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
