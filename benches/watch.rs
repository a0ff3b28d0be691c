//! How many decided taps the card-use watcher keeps up with on one core: a day's mix of
//! 100,000 cards at 2,000 gates in 41 areas, fed in time order.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tapgate_protocol::crypto::CardPseudonymizer;
use tapgate_protocol::registry::AREAS;
use tapgate_protocol::{Concession, Mode, Reason, TapKind};
use tapgate_watch::{Observed, Rules, Watcher};

const TAPS: u64 = 100_000;

/// A deterministic stream: cards and gates spread by a multiplicative hash, one tap every 5 ms.
fn taps() -> Vec<Observed> {
    (0..TAPS)
        .map(|i| {
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let gate = 100_000_000 + (h >> 20) % 2_000;
            let metro = gate % 5 == 0;
            Observed {
                card: 6_222_000_000_000_000 + (h >> 8) % 100_000,
                gate,
                area: AREAS[(gate % 41) as usize].code.0,
                mode: if metro { Mode::Metro } else { Mode::Bus },
                kind: match (metro, i % 2) {
                    (false, _) => TapKind::Flat,
                    (true, 0) => TapKind::Entry,
                    (true, _) => TapKind::Exit,
                },
                concession: if h % 10 == 0 {
                    Concession::Elder
                } else {
                    Concession::None
                },
                approved: h % 40 != 0,
                reason: if h % 40 != 0 {
                    Reason::Approved
                } else {
                    Reason::CardLost
                },
                at_ms: 1_795_939_200_000 + i * 5,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let stream = taps();
    let mut g = c.benchmark_group("watch");
    g.throughput(Throughput::Elements(TAPS));
    g.sample_size(10);
    g.bench_function("observe_100k_taps", |b| {
        b.iter(|| {
            let mut w = Watcher::new(Rules::embedded_default(), CardPseudonymizer::new([1; 16]));
            let mut alerts = 0usize;
            for t in &stream {
                alerts += w.observe(black_box(t)).len();
            }
            alerts
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
