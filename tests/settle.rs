//! End-to-end: taps through a real gateway, settled with the fare engine twice — through the
//! pipeline (forwarder, partition streams, settler, ledgers in a private Redis) and offline
//! from the journal — with the same books.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::*;
use tapgate_gateway::card::CardState;
use tapgate_gateway::directory::TerminalRecord;
use tapgate_protocol::{AreaCode, Concession, Issuer, IssuerRegion, Mode, Outcome, Tap, TapKind};
use tapgate_settle::fares::FareTables;
use tapgate_settle::ledger::{Ledger, settle_journals};
use tapgate_settle::store::{RedisStore, Store};
use tapgate_settle::{Settlement, SettlementSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_days_taps_settle_into_fares_transfers_and_clearing() {
    let state = tempfile::tempdir().unwrap();
    let active = |id, issuer| card(id, CardState::Active, issuer, Concession::None, 0);
    let (embedded, directory) = embedded_with(&[
        active(1, Issuer::ChongqingSsc),
        active(2, Issuer::SichuanTianfuTong),
        card(
            3,
            CardState::Lost,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
        card(
            4,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::Elder,
            10,
        ),
        active(5, Issuer::ChongqingSsc),
        active(6, Issuer::TUnion),
        active(7, Issuer::ChongqingSsc),
        active(8, Issuer::ChongqingSsc),
    ]);
    // Chongqing West on the Chengdu–Chongqing intercity line, run by the national railway.
    let intercity_gate = TerminalRecord {
        terminal_id: 5005,
        area: AreaCode(500106),
        mode: Mode::IntercityRail,
        operator: 7,
    };
    embedded.put_terminal(intercity_gate);
    let redis = RedisServer::start();
    let h = Harness::start(directory, state.path()).await;
    let store = Store::Redis(
        RedisStore::connect(&redis.url(), None, "tapgate", Duration::from_secs(2)).unwrap(),
    );
    let settlement = settle_live(&store, "gw-fares", state.path(), &h);
    ride_the_day(&h, intercity_gate).await;
    h.gateway.shutdown().await;
    let (through_pipeline, cards) = settled_books(settlement, &store).await;

    let settled = settle_journals(
        &[&state.path().join("journal")],
        &FareTables::embedded_default(),
        &cards,
    )
    .unwrap();
    assert_eq!(through_pipeline, settled.ledger);
    check_the_books(&settled.ledger, &cards);
    check_a_statement(&settled.ledger, state.path());
}

/// The bus operator's statement for the day, through the command, from a ledger file.
fn check_a_statement(ledger: &Ledger, dir: &std::path::Path) {
    let file = dir.join("ledger.json");
    std::fs::write(&file, ledger.to_json().to_string()).unwrap();
    let day = ledger.days.keys().next().unwrap().to_string();
    let statement = |operator: &str, format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["settle", "statement", "--ledger"])
            .arg(&file)
            .args(["--operator", operator, "--date", &day, "--format", format])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out,
        )
    };
    let (ok, csv, out) = statement("1", "csv");
    assert!(ok, "{out:?}");
    let books = &ledger.days.values().next().unwrap();
    let bus_fares: u64 = books
        .cells
        .iter()
        .filter(|((_, operator, _), _)| *operator == 1)
        .map(|(_, t)| t.fen)
        .sum();
    let total = csv.lines().find(|l| l.starts_with("day_total,")).unwrap();
    assert!(total.ends_with(&format!(",{bus_fares}")), "{csv}");
    assert!(csv.contains(",sc_tianfutong,,1,200\n"), "{csv}");
    assert!(
        csv.lines()
            .any(|l| l.starts_with("concession_forgone,") && l.contains(",elder,1,200")),
        "{csv}"
    );
    // The bus's own line: its gate is the vehicle.
    let vehicle = format!("\nvehicle,{day},{day},1,,,,{},", YUZHONG_BUS.terminal_id);
    assert!(csv.contains(&vehicle), "{csv}");
    let (ok, json, _) = statement("1", "json");
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["total"]["fen"], bus_fares);
    let (ok, _, out) = statement("99", "csv");
    assert!(!ok && String::from_utf8_lossy(&out.stderr).contains("no operator 99"));
}

/// One rider per fare rule, in the order of a day.
async fn ride_the_day(h: &Harness, intercity_gate: TerminalRecord) {
    let mut bus = h.gate(&YUZHONG_BUS).await;
    let mut metro = h.gate(&YUZHONG_METRO).await;
    let at = |sequence, card_id, kind, line, stop| Tap {
        line,
        stop,
        ..tap(sequence, card_id, kind)
    };
    // Card 1: bus, then metro 10 stops within the hour (transfer discount).
    assert_eq!(
        answer(&mut bus, at(1, 1, TapKind::Flat, 12, 3))
            .await
            .outcome,
        Outcome::Approve
    );
    assert_eq!(
        answer(&mut metro, at(1, 1, TapKind::Entry, 2, 10))
            .await
            .outcome,
        Outcome::Approve
    );
    assert_eq!(
        answer(&mut metro, at(2, 1, TapKind::Exit, 2, 20))
            .await
            .outcome,
        Outcome::Approve
    );
    // Card 2 (Sichuan): one bus ride, owed by the Sichuan issuer to a Chongqing operator.
    let sichuan_tap = Tap {
        issuer: Issuer::SichuanTianfuTong,
        ..at(2, 2, TapKind::Flat, 12, 4)
    };
    assert_eq!(
        answer(&mut bus, sichuan_tap).await.outcome,
        Outcome::Approve
    );
    // Card 3 is lost: denied, and never charged.
    assert_eq!(
        answer(&mut bus, at(3, 3, TapKind::Flat, 12, 5))
            .await
            .outcome,
        Outcome::Deny
    );
    // Card 4 (elder): a free ride counted against the allowance.
    assert_eq!(
        answer(&mut bus, at(4, 4, TapKind::Flat, 12, 6))
            .await
            .outcome,
        Outcome::Approve
    );
    // Card 5: an entry whose exit never comes, then a whole trip; the next entry reveals the
    // missing exit, charged the maximum.
    for (sequence, kind, stop) in [
        (3, TapKind::Entry, 1),
        (4, TapKind::Entry, 5),
        (5, TapKind::Exit, 6),
    ] {
        assert_eq!(
            answer(&mut metro, at(sequence, 5, kind, 2, stop))
                .await
                .outcome,
            Outcome::Approve
        );
    }
    // Card 6 (T-Union): an exit with no entry, charged the maximum, owed to Chongqing.
    let t_union_exit = Tap {
        issuer: Issuer::TUnion,
        ..at(6, 6, TapKind::Exit, 2, 9)
    };
    assert_eq!(
        answer(&mut metro, t_union_exit).await.outcome,
        Outcome::Approve
    );
    // Card 7: ten taps on the same bus within moments, from a rider unsure the first took:
    // all approved, charged once.
    for i in 0..10 {
        assert_eq!(
            answer(&mut bus, at(5 + i, 7, TapKind::Flat, 12, 7))
                .await
                .outcome,
            Outcome::Approve
        );
    }
    // Card 8: an intercity trip of four stops (4 × 25 km × 0.30 yuan, an example tariff),
    // owed by the card's issuer to the railway.
    let mut intercity = h.gate(&intercity_gate).await;
    for (sequence, kind, stop) in [(1, TapKind::Entry, 1), (2, TapKind::Exit, 5)] {
        assert_eq!(
            answer(&mut intercity, at(sequence, 8, kind, 1, stop))
                .await
                .outcome,
            Outcome::Approve
        );
    }
}

/// The day's books: each rule's fare, the concessions, and the clearing between regions.
fn check_the_books(ledger: &Ledger, cards: &tapgate_protocol::crypto::CardPseudonymizer) {
    assert_eq!(ledger.taps(), 21);
    assert_eq!(ledger.days.len(), 1);
    let day = ledger.days.values().next().unwrap();
    let card = |id| day.cards[&cards.book_key(id)];
    assert_eq!((card(4).rides, card(4).fen), (1, 0), "elder ride is free");
    // Missing exit at the maximum (7 yuan) plus a 1-stop trip (2 yuan).
    assert_eq!((card(5).rides, card(5).fen), (2, 900));
    assert_eq!((card(6).rides, card(6).fen), (1, 700), "exit without entry");
    assert_eq!(
        (card(7).rides, card(7).fen),
        (1, 200),
        "a repeated boarding is not charged"
    );
    assert_eq!(
        (card(8).rides, card(8).fen),
        (1, 3000),
        "intercity by distance"
    );
    // The railway is in no issuer region: the card's issuer owes it directly.
    assert_eq!(day.payables[&(Issuer::ChongqingSsc, 7)].fen, 3000);
    assert_eq!(
        day.clearing[&(IssuerRegion::National, IssuerRegion::Chongqing)].fen,
        700
    );
    // 10 stops × 1.6 km = 16 km → 4 yuan, less the 2-yuan transfer discount.
    assert_eq!(card(1).fen, 200 + 200);
    assert_eq!(
        day.clearing[&(IssuerRegion::Sichuan, IssuerRegion::Chongqing)].fen,
        200
    );
    assert_eq!(day.clearing.len(), 2);
    // Every ride is payable by its card's issuer to its operator; the elder ride's fare
    // forgone is the bus operator's subsidy claim, and the transfer
    // discount is booked to the metro trip that got it.
    let payable: u64 = day.payables.values().map(|t| t.fen).sum();
    assert_eq!(payable, day.total().fen);
    assert_eq!(
        day.payables[&(Issuer::SichuanTianfuTong, YUZHONG_BUS.operator)].fen,
        200
    );
    let elder: Vec<_> = day
        .concessions
        .iter()
        .filter(|((concession, ..), _)| *concession == Concession::Elder)
        .map(|(_, t)| (t.rides, t.fen))
        .collect();
    assert_eq!(elder, [(1, 200)]);
    let discounts: u64 = day.transfers.values().map(|t| t.fen).sum();
    assert_eq!(discounts, 200);
}

/// A gate that rode offline uploads, three days later, a tap whose settlement day has long
/// closed: the live settler books it once, to the open day as a late tap naming the day it was
/// ridden, beside the gate's online tap of today; reconciling the journal books the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_tap_uploaded_after_its_day_closed_is_settled_once_as_a_late_tap() {
    use tapgate_protocol::{DenyAck, Frame, OfflineStatus, OfflineTap};
    let state = tempfile::tempdir().unwrap();
    let active = card(
        1,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::None,
        0,
    );
    let (_embedded, directory) = embedded_with(&[active]);
    let redis = RedisServer::start();
    let h = Harness::start(directory, state.path()).await;
    let store = Store::Redis(
        RedisStore::connect(&redis.url(), None, "tapgate", Duration::from_secs(2)).unwrap(),
    );
    let settlement = settle_live(&store, "gw-late", state.path(), &h);
    let mut gate = h.gate_v2(&YUZHONG_BUS).await;
    gate.send_frame(&Frame::DenyAck(DenyAck::NEW_GATE))
        .await
        .unwrap();
    let ridden = tapgate_runtime::now_ms() - 3 * 24 * 3_600_000;
    let upload = OfflineTap {
        tap: Tap {
            gate_time_ms: ridden,
            ..tap(1, 1, TapKind::Flat)
        },
        deny_version: 0,
        deny_history: 0,
        offline_since_ms: ridden - 60_000,
    };
    gate.send_frame(&Frame::OfflineTap(upload)).await.unwrap();
    let receipt = next_receipt(&mut gate).await;
    assert_eq!(receipt.status, OfflineStatus::Recorded);
    let online = answer(&mut gate, tap(2, 1, TapKind::Flat)).await;
    assert_eq!(online.outcome, Outcome::Approve);
    h.gateway.shutdown().await;
    let (through_pipeline, cards) = settled_books(settlement, &store).await;

    let day = FareTables::embedded_default().day;
    let (ridden_on, today) = (day.day_of(ridden), day.day_of(tapgate_runtime::now_ms()));
    assert_eq!(through_pipeline.taps(), 2);
    assert_eq!(through_pipeline.late_taps(), 1);
    let (&(booked, tapped), late) = through_pipeline.late.iter().next().unwrap();
    assert_eq!((tapped, booked, late.taps), (ridden_on, today, 1));
    assert!(
        !through_pipeline.days.contains_key(&ridden_on),
        "a closed day stays closed"
    );
    let settled = settle_journals(
        &[&state.path().join("journal")],
        &FareTables::embedded_default(),
        &cards,
    )
    .unwrap();
    assert_eq!(through_pipeline.by_tap_day(), settled.ledger.by_tap_day());
}

/// Live settlement of the gateway's journal under `state` into `store`: two partitions, one
/// settler.
fn settle_live(store: &Store, node: &str, state: &std::path::Path, h: &Harness) -> Settlement {
    Settlement::start(
        store.clone(),
        &SettlementSettings {
            node: node.into(),
            journal_dir: state.join("journal"),
            partitions: 2,
            settlers: 1,
            batch: 16,
            max_backlog: 1000,
            lease_ttl: Duration::from_secs(1),
            watch_feed: 0,
            order_window: Duration::from_millis(tapgate_gateway::config::DEFAULT_ORDER_WINDOW_MS),
        },
        Arc::new(FareTables::embedded_default()),
        h.gateway.journal().durable(),
    )
}

/// Once the gateway has stopped: the books the live settlers wrote when they caught up, and the
/// store's card pseudonyms to settle the journal with alike.
async fn settled_books(
    settlement: Settlement,
    store: &Store,
) -> (Ledger, tapgate_protocol::crypto::CardPseudonymizer) {
    assert!(
        settlement
            .wait_settled(Duration::from_secs(20))
            .await
            .unwrap()
    );
    let ledger = store.ledger(None, true).await.unwrap();
    let cards = store.card_pseudonyms().await.unwrap();
    settlement.shutdown().await;
    (ledger, cards)
}
