use bytes::BytesMut;
use proptest::prelude::*;
use tapgate_protocol::*;

fn any_enum<T: Copy + core::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(all)
}

fn any_frame() -> impl Strategy<Value = Frame> {
    let hello = (
        any::<u64>(),
        any::<u8>(),
        any_enum(Mode::ALL),
        any::<u32>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(terminal_id, key_version, mode, area, operator, nonce, t)| {
                Frame::Hello(Hello {
                    terminal_id,
                    key_version,
                    mode,
                    area: AreaCode(area),
                    operator,
                    client_nonce: nonce,
                    gate_time_ms: t,
                })
            },
        );
    let ack = (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(terminal_id, nonce, t, last, w, inflight)| {
            Frame::HelloAck(HelloAck {
                terminal_id,
                client_nonce: nonce,
                server_time_ms: t,
                last_sequence: last,
                resend_window: w,
                max_in_flight: inflight,
            })
        });
    let tap = any_tap().prop_map(Frame::Tap);
    let result = (
        any::<u64>(),
        any_enum(Outcome::ALL),
        any_enum(Reason::ALL),
        any_enum(Concession::ALL),
        any::<u32>(),
        any::<u16>(),
    )
        .prop_map(
            |(sequence, outcome, reason, concession, fare_fen, rides_left)| {
                Frame::TapResult(TapResult {
                    sequence,
                    outcome,
                    reason,
                    concession,
                    fare_fen,
                    rides_left,
                })
            },
        );
    let error = (any_enum(ErrorCode::ALL), any::<u64>())
        .prop_map(|(code, sequence)| Frame::Error(ErrorFrame { code, sequence }));
    prop_oneof![
        hello,
        ack,
        tap,
        result,
        error,
        any_deny_frame(),
        any_offline_frame()
    ]
}

fn any_tap() -> impl Strategy<Value = Tap> {
    (
        1..=u64::MAX,
        any::<u64>(),
        any_enum(Issuer::ALL),
        any_enum(TapKind::ALL),
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
    )
        .prop_map(|(sequence, card_id, issuer, kind, line, stop, t)| Tap {
            sequence,
            card_id,
            issuer,
            kind,
            line,
            stop,
            gate_time_ms: t,
        })
}

/// The offline frames of version 2.
fn any_offline_frame() -> impl Strategy<Value = Frame> {
    let rules = (
        prop::collection::vec(any_enum(Issuer::ALL), 0..4),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(issuers, max_fare_fen, max_offline_s)| {
            Frame::OfflineRules(OfflineRules {
                issuers: IssuerSet::of(&issuers),
                max_fare_fen,
                max_offline_s,
            })
        });
    let upload = (any_tap(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(tap, deny_version, deny_history, offline_since_ms)| {
            Frame::OfflineTap(OfflineTap {
                tap,
                deny_version,
                deny_history,
                offline_since_ms,
            })
        },
    );
    let receipt = (
        any::<u64>(),
        any_enum(OfflineStatus::ALL),
        any_enum(Reason::ALL),
        any::<u32>(),
    )
        .prop_map(|(sequence, status, flag, fare_fen)| {
            Frame::OfflineReceipt(OfflineReceipt {
                sequence,
                status,
                flag,
                fare_fen,
            })
        });
    prop_oneof![rules, upload, receipt]
}

/// The deny-list frames of version 2.
fn any_deny_frame() -> impl Strategy<Value = Frame> {
    let deny_ack = (any::<u64>(), any::<u64>())
        .prop_map(|(version, history)| Frame::DenyAck(DenyAck { version, history }));
    let deny_reason =
        prop::sample::select(&[Reason::CardLost, Reason::CardBlocked, Reason::CardCancelled]);
    let entries = |reasons: BoxedStrategy<Reason>, min: usize| {
        prop::collection::vec(
            (any::<u64>(), reasons).prop_map(|(card_id, reason)| DenyEntry { card_id, reason }),
            min..=MAX_DENY_ENTRIES,
        )
    };
    let changes = (
        1..u64::MAX / 2,
        any::<u64>(),
        entries(
            prop_oneof![deny_reason.clone(), Just(Reason::Approved)].boxed(),
            1,
        ),
    )
        .prop_map(|(first_version, history, entries)| {
            Frame::DenyChanges(DenyChanges {
                first_version,
                history,
                entries,
            })
        });
    let list = (
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        entries(deny_reason.boxed(), 0),
    )
        .prop_map(|(version, history, first, last, entries)| {
            Frame::DenyList(DenyList {
                version,
                history,
                first,
                last,
                entries,
            })
        });
    prop_oneof![deny_ack, changes, list]
}

fn key(seed: u8) -> MacKey {
    MasterKey::new([seed; 16]).diversify(0x1234).mac_key()
}

fn sealed(frame: &Frame, key: &MacKey) -> BytesMut {
    let mut out = BytesMut::new();
    seal(frame, key, &mut out);
    out
}

proptest! {
    #[test]
    fn every_frame_round_trips(frame in any_frame()) {
        let k = key(1);
        let mut wire = sealed(&frame, &k);
        prop_assert_eq!(wire.len(), wire_len(frame.frame_type()) + match &frame {
            Frame::DenyChanges(c) => c.entries.len() * DENY_ENTRY_LEN,
            Frame::DenyList(l) => l.entries.len() * DENY_ENTRY_LEN,
            _ => 0,
        });
        prop_assert!(wire.len() <= MAX_FRAME_LEN);
        let got = take_frame(&mut wire).unwrap().unwrap();
        prop_assert!(wire.is_empty());
        prop_assert_eq!(got.open(&k).unwrap(), frame);
    }

    #[test]
    fn any_single_bit_flip_is_detected(frame in any_frame(), bit in any::<prop::sample::Index>()) {
        let k = key(2);
        let mut wire = sealed(&frame, &k).to_vec();
        let bit = bit.index(wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        // A flip in the header is a decode error; anywhere else the MAC catches it.
        match decode_one(&wire) {
            Err(_) => {}
            Ok(frame) => prop_assert!(frame.open(&k).is_err()),
        }
    }

    #[test]
    fn frames_split_at_any_point_reassemble(frames in prop::collection::vec(any_frame(), 1..6), cut in any::<prop::sample::Index>()) {
        let k = key(3);
        let mut wire = BytesMut::new();
        for f in &frames {
            seal(f, &k, &mut wire);
        }
        let cut = cut.index(wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut got = Vec::new();
        while let Some(f) = take_frame(&mut buf).unwrap() {
            got.push(f.open(&k).unwrap());
        }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(f) = take_frame(&mut buf).unwrap() {
            got.push(f.open(&k).unwrap());
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let k = key(4);
        while let Ok(Some(frame)) = take_frame(&mut buf) {
            let _ = frame.parse_unverified();
            // Random bytes forging a valid tag would mean the MAC check is broken.
            prop_assert_eq!(frame.open(&k).unwrap_err().error_code(), ErrorCode::BadMac);
        }
    }

    #[test]
    fn every_truncation_asks_for_more(frame in any_frame(), cut in any::<prop::sample::Index>()) {
        let wire = sealed(&frame, &key(5));
        let cut = cut.index(wire.len());
        let mut buf = BytesMut::from(&wire[..cut]);
        prop_assert_eq!(take_frame(&mut buf), Ok(None));
        prop_assert!(decode_one(&wire[..cut]).is_err());
    }
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    let mut buf = BytesMut::from(&[0xff, 0xff][..]);
    assert_eq!(
        take_frame(&mut buf),
        Err(DecodeError::TooLarge {
            declared: 0xffff,
            max: MAX_FRAME_LEN - 2
        })
    );
    assert_eq!(
        DecodeError::TooLarge {
            declared: 0,
            max: 0
        }
        .error_code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn wrong_version_unknown_type_and_wrong_length_are_typed() {
    let mut buf = BytesMut::from(&[0, 48, 2][..]);
    assert_eq!(
        take_frame(&mut buf),
        Err(DecodeError::UnsupportedVersion(2))
    );
    let mut buf = BytesMut::from(&[0, 48, 1, 0x7f][..]);
    assert_eq!(
        take_frame(&mut buf),
        Err(DecodeError::UnknownFrameType(0x7f))
    );
    let mut buf = BytesMut::from(&[0, 49, 1, 3][..]);
    assert_eq!(
        take_frame(&mut buf),
        Err(DecodeError::BodyLength {
            frame_type: FrameType::Tap,
            declared: 49,
            expected: 48
        })
    );
    let mut buf = BytesMut::from(&[0, 3][..]);
    assert_eq!(take_frame(&mut buf), Err(DecodeError::TooShort(3)));
}

#[test]
fn out_of_range_fields_are_typed_errors() {
    let k = key(6);
    let tap = Frame::Tap(Tap {
        sequence: 1,
        card_id: 2,
        issuer: Issuer::ChongqingSsc,
        kind: TapKind::Flat,
        line: 3,
        stop: 4,
        gate_time_ms: 5,
    });
    let mut wire = sealed(&tap, &k).to_vec();
    wire[4 + 16] = 0x77; // issuer byte
    let frame = decode_one(&wire).unwrap();
    assert_eq!(
        frame.parse_unverified(),
        Err(DecodeError::InvalidField(InvalidField {
            field: "issuer",
            value: 0x77
        }))
    );
    wire[4..12].copy_from_slice(&[0; 8]); // sequence 0
    assert!(matches!(
        decode_one(&wire).unwrap().parse_unverified(),
        Err(DecodeError::InvalidField(InvalidField {
            field: "sequence",
            ..
        }))
    ));
    // Issuer bit 0 names no issuer.
    let rules = Frame::OfflineRules(OfflineRules {
        issuers: IssuerSet::of(&[Issuer::ChongqingSsc]),
        max_fare_fen: 700,
        max_offline_s: 1800,
    });
    let mut wire = sealed(&rules, &k).to_vec();
    wire[4] |= 1;
    assert_eq!(
        decode_one(&wire).unwrap().parse_unverified(),
        Err(DecodeError::InvalidField(InvalidField {
            field: "issuers",
            value: 0b11
        }))
    );
}

#[test]
fn trailing_bytes_make_decode_one_fail() {
    let k = key(7);
    let mut wire = sealed(
        &Frame::Error(ErrorFrame {
            code: ErrorCode::Replay,
            sequence: 9,
        }),
        &k,
    );
    wire.extend_from_slice(&[0]);
    assert!(decode_one(&wire).is_err());
}

#[test]
fn unkeyed_error_has_zero_tag_and_fails_verification() {
    let mut out = BytesMut::new();
    seal_unkeyed_error(
        ErrorFrame {
            code: ErrorCode::UnknownTerminal,
            sequence: 0,
        },
        &mut out,
    );
    let frame = decode_one(&out).unwrap();
    assert_eq!(frame.tag(), [0; 16]);
    assert_eq!(
        frame.parse_unverified().unwrap(),
        Frame::Error(ErrorFrame {
            code: ErrorCode::UnknownTerminal,
            sequence: 0
        })
    );
    assert_eq!(
        frame.open(&key(8)).unwrap_err().error_code(),
        ErrorCode::BadMac
    );
}
