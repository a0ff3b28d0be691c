//! What finding a metro trip's distance costs the settlers: searching the station table's
//! shortest way through the network for each trip, looking it up in the distances computed once
//! per table (what settlement does), and the per-stop estimate the table replaces.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tapgate_settle::stations::{Network, network_km};

fn bench(c: &mut Criterion) {
    let tables = tapgate_settle::fares::FareTables::embedded_default();
    let lines = &tables.metro.lines;
    let mut g = c.benchmark_group("metro_distance");
    // 朝天门 (line 1) to 鱼洞 (line 2): a change of line, the longest search in the table.
    g.bench_function("station_table_across_lines", |b| {
        b.iter(|| network_km(black_box(lines), black_box((1, 1)), black_box((2, 25))))
    });
    g.bench_function("station_table_one_line", |b| {
        b.iter(|| network_km(black_box(lines), black_box((2, 9)), black_box((2, 12))))
    });
    g.bench_function("build_network_once_per_table", |b| {
        b.iter(|| Network::of(black_box(lines)))
    });
    let network = Network::of(lines);
    g.bench_function("precomputed_network", |b| {
        b.iter(|| network.km(black_box((1, 1)), black_box((2, 25))))
    });
    g.bench_function("per_stop_estimate", |b| {
        b.iter(|| {
            let (a, z): (u16, u16) = black_box((1, 25));
            f64::from(a.abs_diff(z)) * tables.metro.km_per_stop + tables.metro.line_change_km
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
