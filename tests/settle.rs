//! End-to-end: taps through a real gateway, then its journal settled with the fare engine.

mod support;

use support::*;
use tapgate_gateway::card::CardState;
use tapgate_gateway::fares::FareTables;
use tapgate_gateway::settle::ledger::settle_journals;
use tapgate_protocol::{Concession, Issuer, IssuerRegion, Mode, Outcome, Tap, TapKind};

async fn outcome(gate: &mut tapgate_loadgen::client::GateClient, tap: Tap) -> Outcome {
    gate.tap(tap).await.unwrap().outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_days_taps_settle_into_fares_transfers_and_clearing() {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&[
        card(
            1,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
        card(
            2,
            CardState::Active,
            Issuer::SichuanTianfuTong,
            Concession::None,
            0,
        ),
        card(
            3,
            CardState::Lost,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
    ]);
    let h = Harness::start(directory, state.path()).await;
    let mut bus = h.gate(&YUZHONG_BUS).await;
    let mut metro = h.gate(&YUZHONG_METRO).await;
    let at = |sequence, card_id, kind, line, stop| Tap {
        line,
        stop,
        ..tap(sequence, card_id, kind)
    };
    // Card 1: bus, then metro 10 stops within the hour (transfer discount).
    assert_eq!(
        outcome(&mut bus, at(1, 1, TapKind::Flat, 12, 3)).await,
        Outcome::Approve
    );
    assert_eq!(
        outcome(&mut metro, at(1, 1, TapKind::Entry, 2, 10)).await,
        Outcome::Approve
    );
    assert_eq!(
        outcome(&mut metro, at(2, 1, TapKind::Exit, 2, 20)).await,
        Outcome::Approve
    );
    // Card 2 (Sichuan): one bus ride, owed by the Sichuan issuer to a Chongqing operator.
    let sichuan_tap = Tap {
        issuer: Issuer::SichuanTianfuTong,
        ..at(2, 2, TapKind::Flat, 12, 4)
    };
    assert_eq!(outcome(&mut bus, sichuan_tap).await, Outcome::Approve);
    // Card 3 is lost: denied, and never charged.
    assert_eq!(
        outcome(&mut bus, at(3, 3, TapKind::Flat, 12, 5)).await,
        Outcome::Deny
    );
    h.gateway.shutdown().await;

    let settled = settle_journals(
        &[&state.path().join("journal")],
        &FareTables::embedded_default(),
    )
    .unwrap();
    let ledger = &settled.ledger;
    assert_eq!(ledger.taps(), 4);
    assert_eq!(ledger.days.len(), 1);
    let day = ledger.days.values().next().unwrap();
    let bus_total = day.cells[&(500103, 1, Mode::Bus)];
    assert_eq!((bus_total.rides, bus_total.fen), (2, 400));
    let metro_total = day.cells[&(500103, 2, Mode::Metro)];
    // 10 stops × 1.6 km = 16 km → 4 yuan, less the 2-yuan transfer discount.
    assert_eq!((metro_total.rides, metro_total.fen), (1, 200));
    assert_eq!(ledger.total().fen, 600);
    assert_eq!(
        day.clearing[&(IssuerRegion::Sichuan, IssuerRegion::Chongqing)].fen,
        200
    );
    assert_eq!(day.clearing.len(), 1);
}
