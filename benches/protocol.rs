//! Codec and MAC costs of the frames on the hot path.

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tapgate_protocol::{
    Frame, Issuer, MasterKey, Tap, TapKind, example, seal, take_frame, wire_len,
};

fn tap() -> Frame {
    Frame::Tap(Tap {
        sequence: 42,
        card_id: 6_222_000_123_456_789,
        issuer: Issuer::ChongqingSsc,
        kind: TapKind::Entry,
        line: 2,
        stop: 15,
        gate_time_ms: 1_795_939_201_500,
    })
}

fn bench(c: &mut Criterion) {
    let master = MasterKey::from_hex(example::MASTER_KEY_HEX).unwrap();
    let key = master.diversify(example::TERMINAL_ID).mac_key();
    let frame = tap();
    let mut wire = BytesMut::new();
    seal(&frame, &key, &mut wire);
    let wire = wire.freeze();

    let mut g = c.benchmark_group("tap_frame");
    g.bench_function("encode_and_seal", |b| {
        let mut out = BytesMut::with_capacity(wire_len(frame.frame_type()) * 1024);
        b.iter(|| {
            if out.capacity() - out.len() < 64 {
                out.clear();
            }
            seal(black_box(&frame), &key, &mut out);
        })
    });
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&wire[..]));
            take_frame(&mut buf)
                .unwrap()
                .unwrap()
                .parse_unverified()
                .unwrap()
        })
    });
    g.bench_function("mac_verify_only", |b| {
        let sealed = take_frame(&mut BytesMut::from(&wire[..])).unwrap().unwrap();
        b.iter(|| black_box(&sealed).verify(&key).unwrap())
    });
    g.bench_function("decode_and_verify", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&wire[..]));
            take_frame(&mut buf).unwrap().unwrap().open(&key).unwrap()
        })
    });
    g.finish();

    c.bench_function("hello/derive_terminal_key", |b| {
        b.iter(|| master.diversify(black_box(example::TERMINAL_ID)).mac_key())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
