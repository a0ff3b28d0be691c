//! End-to-end: a real QUIC gateway on 127.0.0.1 with the embedded card directory.

mod support;

use chrono::NaiveDate;
use std::time::Duration;
use support::*;
use tapgate_gateway::card::CardState;
use tapgate_gateway::policy::{AreaSet, Policy, RolloutStep};
use tapgate_loadgen::client::{ClientError, EarlyHello, GateClient, gate_endpoint, hello};
use tapgate_protocol::{
    Concession, DenyAck, ErrorCode, Frame, GateDenyList, Issuer, OfflineReceipt, OfflineStatus,
    OfflineTap, Outcome, RIDES_LEFT_NOT_APPLICABLE, Reason, Tap, TapKind, Version,
};
use tapgate_runtime::now_ms;

const ACTIVE: u64 = 1;
const LOST: u64 = 2;
const CANCELLED: u64 = 3;
const BLOCKED: u64 = 4;
const ELDER: u64 = 5;
const SICHUAN: u64 = 6;
const EXPIRED: u64 = 7;
/// An elder card whose home area, 万州, has not taken on concessions yet.
const ELDER_WANZHOU: u64 = 8;
const UNKNOWN: u64 = 99;

fn population() -> Vec<tapgate_gateway::card::CardRecord> {
    let mut expired = card(
        EXPIRED,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::None,
        0,
    );
    expired.expires_on = NaiveDate::from_ymd_opt(2020, 1, 1);
    let mut elder_wanzhou = card(
        ELDER_WANZHOU,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::Elder,
        1200,
    );
    elder_wanzhou.home_area = Some(WANZHOU_BUS.area);
    vec![
        card(
            ACTIVE,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
        card(
            LOST,
            CardState::Lost,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
        card(
            CANCELLED,
            CardState::Cancelled,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
        card(
            BLOCKED,
            CardState::Blocked,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ),
        card(
            ELDER,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::Elder,
            1200,
        ),
        card(
            SICHUAN,
            CardState::Active,
            Issuer::SichuanTianfuTong,
            Concession::None,
            0,
        ),
        expired,
        elder_wanzhou,
    ]
}

fn assert_refused(err: &ClientError, code: ErrorCode) {
    assert!(
        matches!(err, ClientError::Refused(e) if e.code == code),
        "expected {code}, got {err}"
    );
}

async fn harness() -> (Harness, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    (Harness::start(directory, state.path()).await, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_card_is_approved_and_every_deny_reason_reaches_the_gate() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let r = gate.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!(
        (r.sequence, r.outcome, r.reason, r.fare_fen),
        (1, Outcome::Approve, Reason::Approved, 200)
    );
    let cases = [
        (LOST, Reason::CardLost),
        (CANCELLED, Reason::CardCancelled),
        (BLOCKED, Reason::CardBlocked),
        (EXPIRED, Reason::CardExpired),
        (UNKNOWN, Reason::UnknownCard),
    ];
    for (i, (card_id, reason)) in cases.into_iter().enumerate() {
        let r = gate
            .tap(tap(2 + i as u64, card_id, TapKind::Flat))
            .await
            .unwrap();
        assert_eq!(
            (r.outcome, r.reason),
            (Outcome::Deny, reason),
            "card {card_id}"
        );
    }
    let mut remote = h.gate(&CHENGKOU_BUS).await;
    let r = remote.tap(tap(1, SICHUAN, TapKind::Flat)).await.unwrap();
    assert_eq!(r.reason, Reason::IssuerNotAccepted);
    let mut metro = h.gate(&YUZHONG_METRO).await;
    assert_eq!(
        answer(&mut metro, tap(1, ACTIVE, TapKind::Entry))
            .await
            .outcome,
        Outcome::Approve
    );
    assert_eq!(
        answer(&mut metro, tap(2, ACTIVE, TapKind::Entry))
            .await
            .reason,
        Reason::PassBack
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elder_concession_follows_the_cards_home_area_and_holds_at_every_gate() {
    let (h, _state) = harness().await;
    // Home area 渝中 carries the concession: free at a 渝中 gate and at a 万州 gate alike.
    let mut yuzhong = h.gate(&YUZHONG_BUS).await;
    let r = yuzhong.tap(tap(1, ELDER, TapKind::Flat)).await.unwrap();
    assert_eq!(
        (r.concession, r.fare_fen, r.rides_left),
        (Concession::Elder, 0, 1199)
    );
    let mut wanzhou = h.gate(&WANZHOU_BUS).await;
    let r = wanzhou.tap(tap(1, ELDER, TapKind::Flat)).await.unwrap();
    assert_eq!(
        (r.concession, r.fare_fen, r.rides_left),
        (Concession::Elder, 0, 1198)
    );
    // Home area 万州 does not carry it yet: full fare, in 渝中 too.
    let r = yuzhong
        .tap(tap(2, ELDER_WANZHOU, TapKind::Flat))
        .await
        .unwrap();
    assert_eq!(
        (r.concession, r.fare_fen, r.rides_left),
        (Concession::None, 200, RIDES_LEFT_NOT_APPLICABLE)
    );

    // Bring 万州's loading forward to a past date: the same card is now free (at the other
    // bus: a second tap on this one would repeat the boarding).
    let mut policy = Policy::embedded_default();
    policy.rollout.push(RolloutStep {
        concessions: vec![Concession::Elder],
        issuers: vec![Issuer::ChongqingSsc],
        home_areas: AreaSet::Some(vec![WANZHOU_BUS.area]),
        from: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
    });
    h.gateway.set_policy(policy);
    let r = wanzhou
        .tap(tap(2, ELDER_WANZHOU, TapKind::Flat))
        .await
        .unwrap();
    assert_eq!(
        (r.concession, r.fare_fen, r.rides_left),
        (Concession::Elder, 0, 1199)
    );
}

/// A version-2 gate follows the deny list: the whole list after its first DenyAck, then each
/// change as the directory makes it, on the stream its taps use; after a reconnect it goes on
/// from the version it holds. A version-1 gate on the same gateway sees none of it, and a
/// DenyAck from it is a frame its version does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_gate_follows_the_deny_list_and_a_version_1_gate_sees_none_of_it() {
    let (h, _state) = harness().await;
    let mut gate = h.gate_v2(&YUZHONG_BUS).await;
    assert_eq!(gate.version(), Version::V2);
    let mut list = GateDenyList::default();
    gate.send_frame(&Frame::DenyAck(list.held())).await.unwrap();
    // The population's lost, cancelled and blocked cards are versions 1 to 3.
    // The offline rules come first, once per connection.
    let frames = follow_until(&mut gate, &mut list, 3).await;
    assert_eq!(
        frames[0],
        Frame::OfflineRules(Policy::embedded_default().offline)
    );
    assert!(matches!(frames[1], Frame::DenyList(_)), "{frames:?}");
    assert_eq!(list.refuses(LOST), Some(Reason::CardLost));
    assert_eq!(list.refuses(CANCELLED), Some(Reason::CardCancelled));
    assert_eq!(list.refuses(BLOCKED), Some(Reason::CardBlocked));
    assert_eq!(list.len(), 3);

    h.gateway
        .directory()
        .set_state(ACTIVE, CardState::Lost)
        .await
        .unwrap();
    let frames = follow_until(&mut gate, &mut list, 4).await;
    assert!(matches!(&frames[..], [Frame::DenyChanges(c)] if c.first_version == 4));
    assert_eq!(list.refuses(ACTIVE), Some(Reason::CardLost));
    let answer = gate.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!(answer.reason, Reason::CardLost);
    wait_until(|| h.gateway.deny_list_acknowledged_below(4) == 0).await;

    // Back after a drop, holding version 4: the changes since, not the whole list.
    gate.close();
    let mut gate = h.gate_v2(&YUZHONG_BUS).await;
    h.gateway
        .directory()
        .set_state(ACTIVE, CardState::Active)
        .await
        .unwrap();
    gate.send_frame(&Frame::DenyAck(list.held())).await.unwrap();
    // The rules again (each connection gets them), then only the change since.
    let frames = follow_until(&mut gate, &mut list, 5).await;
    assert!(
        matches!(&frames[..], [Frame::OfflineRules(_), Frame::DenyChanges(c)] if c.first_version == 5),
        "{frames:?}"
    );
    assert_eq!(list.refuses(ACTIVE), None);
    let m = h.gateway.metrics();
    assert_eq!(m.deny_resyncs.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A gate holding version 5 of another history (a directory that lost changes it had been
    // sent, then numbered others alike) is sent the whole list, not taken as current.
    gate.close();
    let mut moved = h.gate_v2(&YUZHONG_BUS).await;
    let other_history = DenyAck {
        history: !list.held().history,
        ..list.held()
    };
    moved
        .send_frame(&Frame::DenyAck(other_history))
        .await
        .unwrap();
    let mut resent = GateDenyList::default();
    let frames = follow_until(&mut moved, &mut resent, 5).await;
    assert!(matches!(frames[1], Frame::DenyList(_)), "{frames:?}");
    assert_eq!(resent.held(), list.held());
    assert_eq!(
        m.deny_other_history
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(m.deny_resyncs.load(std::sync::atomic::Ordering::Relaxed), 2);
    moved.close();

    let mut old = h.gate(&WANZHOU_BUS).await;
    assert_eq!(old.version(), Version::V1);
    let answer = old.tap(tap(1, ELDER, TapKind::Flat)).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Approve);
    old.send_frame(&Frame::DenyAck(DenyAck::NEW_GATE))
        .await
        .unwrap();
    assert_refused(&old.recv().await.unwrap_err(), ErrorCode::UnknownFrameType);
}

/// A version-2 gate that rode offline uploads its taps once its link is back: each is recorded
/// once, as an approval, with the gate's time of the tap; a resend is `already`; the ones that
/// broke an offline rule are flagged, a card listed after the gate's version is not, nor one
/// decided by a list of another history (which the gateway cannot judge, and counts); and the
/// gate's next online tap goes on from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_taps_are_recorded_once_at_their_gate_time_and_broken_rules_are_flagged() {
    let (h, state) = harness().await;
    let mut gate = h.gate_v2(&YUZHONG_BUS).await;
    let mut list = GateDenyList::default();
    gate.send_frame(&Frame::DenyAck(list.held())).await.unwrap();
    follow_until(&mut gate, &mut list, 3).await;
    // Version 4, after the version the gate held while offline.
    h.gateway
        .directory()
        .set_state(ELDER, CardState::Lost)
        .await
        .unwrap();
    let since = now_ms() - 60 * 60_000;
    let held = list.held();
    let upload = |sequence, card_id, issuer, minutes_offline: u64| OfflineTap {
        tap: Tap {
            issuer,
            gate_time_ms: since + minutes_offline * 60_000,
            ..tap(sequence, card_id, TapKind::Flat)
        },
        deny_version: held.version,
        deny_history: held.history,
        offline_since_ms: since,
    };
    let of_a_lost_line = OfflineTap {
        deny_history: !held.history,
        ..upload(6, LOST, Issuer::ChongqingSsc, 9)
    };
    let ssc = Issuer::ChongqingSsc;
    let uploads = [
        (upload(1, ACTIVE, ssc, 5), Reason::Approved),
        (upload(2, LOST, ssc, 6), Reason::CardLost),
        (
            upload(3, SICHUAN, Issuer::SichuanTianfuTong, 7),
            Reason::IssuerNotAccepted,
        ),
        (upload(4, ACTIVE, ssc, 45), Reason::OfflineTooLong),
        (upload(5, ELDER, ssc, 8), Reason::Approved),
        (of_a_lost_line, Reason::Approved),
    ];
    for (offline, _) in &uploads {
        gate.send_frame(&Frame::OfflineTap(*offline)).await.unwrap();
    }
    for (offline, flag) in &uploads {
        let receipt = next_receipt(&mut gate).await;
        assert_eq!(
            receipt,
            OfflineReceipt {
                sequence: offline.tap.sequence,
                status: OfflineStatus::Recorded,
                flag: *flag,
                // The bus fare: the elder card is charged in full, as a card the gateway
                // would have refused.
                fare_fen: 200,
            }
        );
    }
    gate.send_frame(&Frame::OfflineTap(uploads[0].0))
        .await
        .unwrap();
    let again = next_receipt(&mut gate).await;
    assert_eq!(
        (again.status, again.flag, again.fare_fen),
        (OfflineStatus::Already, Reason::Approved, 200)
    );
    let online = gate.tap(tap(7, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!(online.outcome, Outcome::Approve);
    // A policy whose offline rules differ reaches the connected gate at once.
    let mut policy = Policy::embedded_default();
    policy.offline.max_offline_s = 600;
    h.gateway.set_policy(policy.clone());
    let sent = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), gate.recv())
            .await
            .expect("the new rules arrive")
            .unwrap();
        match frame {
            Frame::OfflineRules(rules) => break rules,
            Frame::DenyChanges(_) | Frame::DenyList(_) => {}
            other => panic!("expected the new rules, got {other:?}"),
        }
    };
    assert_eq!(sent, policy.offline);
    let m = h.gateway.metrics();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((count(&m.offline_taps), count(&m.offline_flagged)), (6, 3));
    assert_eq!(count(&m.offline_other_history), 1);

    gate.close();
    h.gateway.shutdown().await;
    let records = journaled(state.path());
    for (offline, flag) in &uploads {
        recorded_once_as_uploaded(&records, &offline.tap, *flag);
    }
    assert!(
        records
            .iter()
            .any(|r| r.tap.sequence == 7 && !r.is_offline())
    );
}

/// The journal holds `tap` once: approved at its gate time, flagged `flag`, with when its
/// upload reached the gateway (no earlier than the tap).
fn recorded_once_as_uploaded(records: &[tapgate_journal::JournalRecord], tap: &Tap, flag: Reason) {
    let recorded: Vec<_> = records
        .iter()
        .filter(|r| r.tap.sequence == tap.sequence)
        .collect();
    assert_eq!(recorded.len(), 1, "tap {} recorded once", tap.sequence);
    let r = recorded[0];
    assert!(
        r.uploaded_ms.is_some_and(|at| at >= r.server_time_ms),
        "{r:?}"
    );
    assert_eq!(
        (r.result.outcome, r.result.reason, r.server_time_ms),
        (Outcome::Approve, flag, tap.gate_time_ms)
    );
}

/// Polls `done` every 10 ms for up to 5 s.
async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not done within 5 s");
}

/// A gate whose address changes under its connection, as a bus's does between cell towers,
/// keeps its connection and its session: no new handshake, every tap answered once, in order,
/// and the gateway counts the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_moves_to_another_address_keeps_its_connection_and_session() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    for s in 1..=3 {
        let answer = gate.tap(tap(s, ACTIVE, TapKind::Flat)).await.unwrap();
        assert_eq!((answer.sequence, answer.outcome), (s, Outcome::Approve));
    }
    let before = h.endpoint.local_addr().unwrap();
    h.endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_ne!(h.endpoint.local_addr().unwrap(), before);
    for s in 4..=6 {
        let answer = gate.tap(tap(s, ACTIVE, TapKind::Flat)).await.unwrap();
        assert_eq!((answer.sequence, answer.outcome), (s, Outcome::Approve));
    }
    let m = h.gateway.metrics().snapshot();
    assert_eq!(m.migrations, 1);
    assert_eq!((m.connections_total, m.sessions_authenticated), (1, 1));
    assert_eq!(m.approved, 6);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
}

/// A gate that reconnects resumes its TLS session from the gateway's ticket and sends its
/// Hello as early data: the HelloAck comes with the handshake, the taps after it are decided
/// once the handshake has completed, and the gateway counts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_reconnects_resumes_its_session_and_says_hello_early() {
    let (h, _state) = harness().await;
    // Over a link with round trips as long as a cellular one's, the early Hello arrives well
    // before the handshake completes, as it would in the field.
    let endpoint = gate_endpoint(
        h.gateway.certificate_der(),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_millis(20),
    )
    .unwrap();
    let yuzhong = identity(&YUZHONG_BUS);
    let connect = || GateClient::connect(&endpoint, h.addr(), &yuzhong, rand_nonce(), now_ms());
    let mut gate = connect().await.unwrap();
    assert_eq!(gate.early_hello, EarlyHello::NotSent, "no ticket yet");
    let first = tap(1, ACTIVE, TapKind::Flat);
    let answer = gate.tap(first).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Approve);
    gate.close();

    let mut again = connect().await.unwrap();
    assert_eq!(again.early_hello, EarlyHello::Answered);
    assert_eq!(again.ack.last_sequence, 1);
    let answer = again.tap(tap(2, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!((answer.sequence, answer.outcome), (2, Outcome::Approve));
    // A resend from before the drop is answered from the window, as on any connection.
    let resent = again.tap(first).await.unwrap();
    assert_eq!((resent.sequence, resent.outcome), (1, Outcome::Approve));

    let m = h.gateway.metrics().snapshot();
    assert_eq!((m.tls_resumptions, m.early_hellos), (1, 1));
    assert_eq!((m.connections_total, m.sessions_authenticated), (2, 2));
    // Approvals answered, the resend's among them; two taps recorded.
    assert_eq!((m.approved, m.resends), (3, 1));
    let recorded = h
        .gateway
        .journal()
        .stats
        .records
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(recorded, 2);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
}

/// A gate's link that holds what the gate sends until released, then carries it, and carries
/// nothing once the gateway has answered: what the gateway sees of a replayed early flight,
/// whose sender cannot finish the handshake. Held until released, the first flight is sure to
/// carry the early data whatever the scheduler does.
#[derive(Debug)]
struct FirstFlightOnly {
    socket: std::sync::Arc<dyn quinn::AsyncUdpSocket>,
    held: std::sync::Mutex<Option<Vec<HeldDatagram>>>,
    answered: std::sync::atomic::AtomicBool,
}

/// Where a held datagram goes, its bytes, and its segment size.
type HeldDatagram = (std::net::SocketAddr, Vec<u8>, Option<usize>);

impl FirstFlightOnly {
    fn release(&self) {
        let held = self.held.lock().unwrap().take().unwrap_or_default();
        for (destination, contents, segment_size) in held {
            let _ = self.socket.try_send(&quinn::udp::Transmit {
                destination,
                ecn: None,
                contents: &contents,
                segment_size,
                src_ip: None,
            });
        }
    }
}

impl quinn::AsyncUdpSocket for FirstFlightOnly {
    fn create_io_poller(self: std::sync::Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.socket.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        if self.answered.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(held) = self.held.lock().unwrap().as_mut() {
            held.push((
                transmit.destination,
                transmit.contents.to_vec(),
                transmit.segment_size,
            ));
            return Ok(());
        }
        self.socket.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let received = self.socket.poll_recv(cx, bufs, meta);
        if matches!(received, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.answered
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        received
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.socket.local_addr()
    }
}

/// An early flight carrying a Hello and a Tap whose handshake never completes, as a replayed
/// one never does: the gateway answers the Hello, decides nothing, and closes the connection at
/// the Hello timeout. The tap, sent again by the real gate, is then decided as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_in_early_data_is_not_decided_before_the_handshake_completes() {
    use quinn::Runtime as _;
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let mut settings = settings(directory, state.path());
    settings.limits.hello_timeout = Duration::from_millis(500);
    let h = Harness::start_with(settings).await;
    let tls = tapgate_transport::tls::GateTls::new(
        h.gateway.certificate_der(),
        tapgate_transport::tls::Resumption::EarlyHello,
        tapgate_protocol::Version::V1,
    )
    .and_then(|tls| tls.for_one_gate())
    .unwrap();
    let gate = identity(&YUZHONG_BUS);
    let connect = || {
        GateClient::connect_with(
            &h.endpoint,
            Some(&tls),
            h.addr(),
            &gate,
            rand_nonce(),
            now_ms(),
        )
    };
    let mut first = connect().await.unwrap();
    let answer = first.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Approve);
    first.close();

    // The same gate's ticket, over a link that carries its first flight only.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let link = std::sync::Arc::new(FirstFlightOnly {
        socket: quinn::TokioRuntime.wrap_udp_socket(socket).unwrap(),
        held: Some(Vec::new()).into(),
        answered: false.into(),
    });
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        link.clone(),
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let (connection, _) = endpoint
        .connect_with(tls.clone(), h.addr(), "localhost")
        .unwrap()
        .into_0rtt()
        .expect("the gate holds a ticket allowing early data");
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    let key = gate.key.mac_key();
    let mut flight = bytes::BytesMut::new();
    tapgate_protocol::seal(&hello(&gate, rand_nonce(), now_ms()), &key, &mut flight);
    tapgate_protocol::seal(
        &Frame::Tap(tap(2, ACTIVE, TapKind::Flat)),
        &key,
        &mut flight,
    );
    send.write_all(&flight).await.unwrap();
    // Long enough for the connection to have packed the stream into its first flight.
    tokio::time::sleep(Duration::from_millis(200)).await;
    link.release();
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let m = h.gateway.metrics().snapshot();
    assert_eq!((m.tls_resumptions, m.early_hellos), (1, 1));
    assert_eq!(m.approved, 1, "the early tap was not decided");
    assert_eq!(m.errors, vec![(ErrorCode::HelloTimeout, 1)]);
    assert_eq!(m.connections_active, 0, "closed at the Hello timeout");
    // The real gate sends the tap again: it is new to the gateway, not a resend.
    let mut again = connect().await.unwrap();
    assert_eq!(again.ack.last_sequence, 1);
    let answer = again.tap(tap(2, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!((answer.sequence, answer.outcome), (2, Outcome::Approve));
    assert_eq!(h.gateway.metrics().snapshot().resends, 0);
}

/// A gateway that no longer holds the gate's ticket (here, one restarted) does not take the
/// early data: the handshake falls back to a full one, the gate says Hello again once it has
/// completed, and goes on where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_hello_the_gateway_cannot_take_is_said_again_after_the_handshake() {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let Harness { gateway: first, .. } =
        Harness::start_with(settings(directory.clone(), state.path())).await;
    let addr = first.local_addr();
    // Round trips long enough that the Hello surely goes before the handshake completes.
    let endpoint = gate_endpoint(
        first.certificate_der(),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_millis(20),
    )
    .unwrap();
    let yuzhong = identity(&YUZHONG_BUS);
    let connect = || GateClient::connect(&endpoint, addr, &yuzhong, rand_nonce(), now_ms());
    let mut gate = connect().await.unwrap();
    let answer = gate.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Approve);
    gate.close();
    first.shutdown().await;

    let mut restarted = settings(directory, state.path());
    restarted.listen = addr;
    let second = Harness::start_with(restarted).await;
    let mut gate = connect().await.unwrap();
    assert_eq!(gate.early_hello, EarlyHello::Refused);
    assert_eq!(gate.ack.last_sequence, 1, "the journal kept the window");
    let answer = gate.tap(tap(2, ACTIVE, TapKind::Flat)).await.unwrap();
    assert_eq!((answer.sequence, answer.outcome), (2, Outcome::Approve));
    let m = second.gateway.metrics().snapshot();
    assert_eq!((m.tls_resumptions, m.early_hellos), (0, 0));
    assert!(m.errors.is_empty(), "{:?}", m.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_gets_the_first_answer_and_is_recorded_once() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let frame = gate.sealed(&Frame::Tap(tap(1, ELDER, TapKind::Flat)));
    gate.send_raw(&frame).await.unwrap();
    let first = gate.recv_result().await.unwrap();
    gate.send_raw(&frame).await.unwrap();
    let again = gate.recv_result().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        first.rides_left, 1199,
        "the resend did not use a second ride"
    );
    // A new connection of the same terminal is told where its sequence stands and resends too.
    gate.close();
    let mut reconnected = h.gate(&YUZHONG_BUS).await;
    assert_eq!(reconnected.ack.last_sequence, 1);
    reconnected.send_raw(&frame).await.unwrap();
    assert_eq!(reconnected.recv_result().await.unwrap(), first);
    assert_eq!(h.gateway.metrics().snapshot().approved, 3);
    assert_eq!(
        h.gateway
            .journal()
            .stats
            .records
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_conflicts_are_refused() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    for s in 1..=40 {
        gate.tap(tap(s, ACTIVE, TapKind::Flat)).await.unwrap();
    }
    // Sequence 5 is below the 32-wide resend window.
    let err = gate.tap(tap(5, ACTIVE, TapKind::Flat)).await.unwrap_err();
    assert_refused(&err, ErrorCode::Replay);
    assert!(matches!(err, ClientError::Refused(e) if e.sequence == 5));

    let mut gate = h.gate(&YUZHONG_BUS).await;
    let err = gate.tap(tap(40, LOST, TapKind::Flat)).await.unwrap_err();
    assert_refused(&err, ErrorCode::SequenceConflict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mac_and_malformed_frames_get_error_frames() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let mut frame = gate.sealed(&Frame::Tap(tap(1, ACTIVE, TapKind::Flat)));
    let last = frame.len() - 1;
    frame[last] ^= 1;
    gate.send_raw(&frame).await.unwrap();
    let err = gate.recv().await.unwrap_err();
    assert_refused(&err, ErrorCode::BadMac);

    let mut gate = h.gate(&YUZHONG_BUS).await;
    gate.send_raw(&[0xff, 0xff, 1, 3]).await.unwrap();
    let err = gate.recv().await.unwrap_err();
    assert_refused(&err, ErrorCode::FrameTooLarge);

    let mut gate = h.gate(&YUZHONG_BUS).await;
    gate.send_raw(&[0, 48, 1, 0x42]).await.unwrap();
    let err = gate.recv().await.unwrap_err();
    assert_refused(&err, ErrorCode::UnknownFrameType);

    // A tap with an issuer byte no registry has: malformed, detected after the MAC checks out.
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let good = gate.sealed(&Frame::Tap(tap(2, ACTIVE, TapKind::Flat)));
    let mut body = good[..good.len() - 16].to_vec();
    body[4 + 16] = 0x77;
    let key = identity(&YUZHONG_BUS).key.mac_key();
    let tag = key.tag(&body);
    body.extend_from_slice(&tag);
    gate.send_raw(&body).await.unwrap();
    let err = gate.recv().await.unwrap_err();
    assert_refused(&err, ErrorCode::MalformedFrame);
    // The tag checked out, so the Error names the tap it is about (section 4.5).
    assert!(
        matches!(&err, ClientError::Refused(e) if e.sequence == 2),
        "{err}"
    );
    assert!(h.gateway.metrics().snapshot().errors.len() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_no_registered_operator_is_malformed_and_an_unknown_area_is_named() {
    let (h, _state) = harness().await;
    for operator in [0, 8] {
        let mut id = identity(&YUZHONG_BUS);
        id.operator = operator;
        let refused = GateClient::connect(
            &h.endpoint,
            h.addr(),
            &id,
            rand_nonce(),
            tapgate_runtime::now_ms(),
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("operator {operator} was accepted"));
        assert_refused(&refused, ErrorCode::MalformedFrame);
    }
    // The registered operator of the gate is accepted.
    h.gate(&YUZHONG_BUS).await;
    // An area outside the 41 is the one enumerated field with an Error of its own.
    let mut id = identity(&YUZHONG_BUS);
    id.area = tapgate_protocol::AreaCode(999_999);
    let refused = GateClient::connect(
        &h.endpoint,
        h.addr(),
        &id,
        rand_nonce(),
        tapgate_runtime::now_ms(),
    )
    .await
    .err()
    .expect("area 999999 was accepted");
    assert_refused(&refused, ErrorCode::UnknownArea);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_finishes_its_stream_gets_every_answer_then_a_clean_close() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let taps: Vec<_> = (1..=3)
        .map(|s| gate.sealed(&Frame::Tap(tap(s, ACTIVE, TapKind::Flat))))
        .collect();
    gate.send_raw(&taps.concat()).await.unwrap();
    gate.sender.finish();
    for sequence in 1..=3 {
        let r = gate.recv_result().await.unwrap();
        assert_eq!((r.sequence, r.outcome), (sequence, Outcome::Approve));
    }
    match gate.connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), 0);
            assert_eq!(&close.reason[..], b"done");
        }
        other => panic!("closed by {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gate_is_disconnected_after_the_idle_timeout_despite_keep_alives() {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let mut settings = settings(directory, state.path());
    settings.limits.idle_timeout = Duration::from_secs(1);
    // Keep-alives far more often than the idle timeout: the QUIC connection never idles.
    settings.limits.keep_alive = Duration::from_millis(200);
    let h = Harness::start_with(settings).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    // Taps keep it open past the timeout.
    let mut last_sent = std::time::Instant::now();
    for sequence in 1..=3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        last_sent = std::time::Instant::now();
        let r = gate
            .tap(tap(sequence, ACTIVE, TapKind::Flat))
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Approve);
    }
    // Then silence, counted from the last frame the gate sent (its answer may have taken a
    // while on a busy machine: an approval waits for the journal's sync).
    let started = last_sent;
    let err = tokio::time::timeout(Duration::from_secs(5), gate.recv())
        .await
        .expect("disconnected within 5 s")
        .unwrap_err();
    assert_refused(&err, ErrorCode::IdleTimeout);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_is_checked_for_its_tag_before_its_fields() {
    let (h, _state) = harness().await;
    let id = identity(&YUZHONG_BUS);
    let key = id.key.mac_key();
    for (mode, good_tag, expected) in [
        (6u8, false, ErrorCode::BadMac),
        (0, false, ErrorCode::BadMac),
        (6, true, ErrorCode::MalformedFrame),
        (0, true, ErrorCode::MalformedFrame),
    ] {
        let mut gate = GateClient::open(&h.endpoint, h.addr(), &id).await.unwrap();
        let hello_frame = hello(&id, rand_nonce(), tapgate_runtime::now_ms());
        let sealed = gate.sealed(&hello_frame);
        // Body starts after the 2-byte length and 2-byte header; the mode is at body offset 9.
        let mut bytes = sealed[..sealed.len() - 16].to_vec();
        bytes[4 + 9] = mode;
        let tag = if good_tag {
            key.tag(&bytes)
        } else {
            [0x5a; 16]
        };
        bytes.extend_from_slice(&tag);
        gate.send_raw(&bytes).await.unwrap();
        let answer = gate.receiver.recv_sealed().await.unwrap();
        let Ok(Frame::Error(error)) = answer.parse_unverified() else {
            panic!("mode {mode}: not an Error");
        };
        assert_eq!(error.code, expected, "mode {mode}, good tag {good_tag}");
        // Once the key is known, the Error is tagged with it.
        assert!(answer.verify(&key).is_ok(), "mode {mode}: Error not tagged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_another_mode_or_operator_is_not_that_gate() {
    let (h, _state) = harness().await;
    let mut other_mode = identity(&YUZHONG_BUS);
    other_mode.mode = tapgate_protocol::Mode::Metro;
    let mut other_operator = identity(&YUZHONG_BUS);
    other_operator.operator = 6;
    for id in [other_mode, other_operator] {
        let refused = GateClient::connect(
            &h.endpoint,
            h.addr(),
            &id,
            rand_nonce(),
            tapgate_runtime::now_ms(),
        )
        .await
        .err()
        .expect("a Hello unlike the provisioning was accepted");
        assert_refused(&refused, ErrorCode::UnknownTerminal);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_only_frame_before_the_hello_is_unexpected() {
    let (h, _state) = harness().await;
    let id = identity(&YUZHONG_BUS);
    let mut gate = GateClient::open(&h.endpoint, h.addr(), &id).await.unwrap();
    let frame = tapgate_protocol::ErrorFrame {
        code: ErrorCode::Internal,
        sequence: 0,
    };
    gate.send_frame(&Frame::Error(frame)).await.unwrap();
    let err = gate.recv().await.unwrap_err();
    assert_refused(&err, ErrorCode::UnexpectedFrame);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_of_one_gate_share_its_window() {
    let (h, _state) = harness().await;
    let mut first = h.gate(&YUZHONG_BUS).await;
    let mut second = h.gate(&YUZHONG_BUS).await;
    let t = tap(1, ACTIVE, TapKind::Flat);
    let answer = first.tap(t).await.unwrap();
    // The same frame on the other connection is a resend: the first answer, recorded once.
    let frame = first.sealed(&Frame::Tap(t));
    second.send_raw(&frame).await.unwrap();
    assert_eq!(second.recv_result().await.unwrap(), answer);
    assert_eq!(second.ack.last_sequence, 0, "Hello came before the tap");
    assert_eq!(
        h.gateway
            .journal()
            .stats
            .records
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_closes_promptly_after_an_error() {
    let (h, _state) = harness().await;
    for _ in 0..3 {
        let mut gate = h.gate(&YUZHONG_BUS).await;
        // A Hello where a Tap belongs: duplicate_hello, then the close.
        gate.send_frame(&hello(
            &identity(&YUZHONG_BUS),
            rand_nonce(),
            tapgate_runtime::now_ms(),
        ))
        .await
        .unwrap();
        let err = gate.recv().await.unwrap_err();
        assert_refused(&err, ErrorCode::DuplicateHello);
        let after_error = std::time::Instant::now();
        gate.connection.closed().await;
        let took = after_error.elapsed();
        // It waited a fixed second before; now it waits for the gate's acknowledgement.
        assert!(
            took < Duration::from_millis(500),
            "closed {took:?} after the Error"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_max_in_flight_pipelined_taps_are_served() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let announced = u64::from(gate.ack.max_in_flight);
    // Bursts of exactly the announced number, in one write: most of the time all of a burst is
    // unanswered at once (the journal syncs after the gateway has read it all), and then none
    // may be answered Busy.
    for burst in 0..3 {
        let frames: Vec<_> = (1..=announced)
            .map(|s| {
                gate.sealed(&Frame::Tap(tap(
                    burst * announced + s,
                    ACTIVE,
                    TapKind::Flat,
                )))
            })
            .collect();
        gate.send_raw(&frames.concat()).await.unwrap();
        for _ in 1..=announced {
            let r = gate.recv_result().await.unwrap();
            assert_eq!(
                r.outcome,
                Outcome::Approve,
                "{r:?} of a burst of {announced}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_terminals_wrong_keys_and_taps_before_hello_are_refused() {
    let (h, _state) = harness().await;
    let mut stranger = YUZHONG_BUS;
    stranger.terminal_id = 777;
    let err = GateClient::connect(&h.endpoint, h.addr(), &identity(&stranger), 1, 0)
        .await
        .err()
        .unwrap();
    assert_refused(&err, ErrorCode::UnknownTerminal);

    let mut wrong_version = identity(&YUZHONG_BUS);
    wrong_version.key_version = 9;
    let err = GateClient::connect(&h.endpoint, h.addr(), &wrong_version, 1, 0)
        .await
        .err()
        .unwrap();
    assert_refused(&err, ErrorCode::UnknownKeyVersion);

    let mut wrong_key = identity(&YUZHONG_BUS);
    wrong_key.key = tapgate_protocol::MasterKey::new([0x22; 16]).diversify(YUZHONG_BUS.terminal_id);
    let err = GateClient::connect(&h.endpoint, h.addr(), &wrong_key, 1, 0)
        .await
        .err()
        .unwrap();
    assert_refused(&err, ErrorCode::BadMac);

    let mut early = GateClient::open(&h.endpoint, h.addr(), &identity(&YUZHONG_BUS))
        .await
        .unwrap();
    let err = early.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap_err();
    assert_refused(&err, ErrorCode::HelloRequired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_taps_are_all_answered_with_their_sequences() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    for s in 1..=20 {
        gate.send_frame(&Frame::Tap(tap(s, ACTIVE, TapKind::Flat)))
            .await
            .unwrap();
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 1..=20 {
        let r = gate.recv_result().await.unwrap();
        assert_ne!(r.outcome, Outcome::Deny);
        seen.push(r.sequence);
    }
    seen.sort();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_replays_its_journal_and_answers_resends_from_it() {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let h = Harness::start(directory.clone(), state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let frame = gate.sealed(&Frame::Tap(tap(7, ELDER, TapKind::Flat)));
    gate.send_raw(&frame).await.unwrap();
    let first = gate.recv_result().await.unwrap();
    assert_eq!(first.outcome, Outcome::Approve);
    h.gateway.shutdown().await;

    let h = Harness::start(directory, state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    assert_eq!(gate.ack.last_sequence, 7);
    gate.send_raw(&frame).await.unwrap();
    assert_eq!(gate.recv_result().await.unwrap(), first);
    assert_eq!(
        h.gateway
            .journal()
            .stats
            .records
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing recorded twice"
    );
    let err = gate.tap(tap(3, ACTIVE, TapKind::Flat)).await.unwrap_err();
    assert_refused(&err, ErrorCode::Replay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_taps_then_says_shutting_down() {
    let (h, _state) = harness().await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    assert_eq!(
        gate.tap(tap(1, ACTIVE, TapKind::Flat))
            .await
            .unwrap()
            .outcome,
        Outcome::Approve
    );
    let stopping = tokio::spawn(h.gateway.shutdown());
    let err = gate.recv().await.unwrap_err();
    assert_refused(&err, ErrorCode::ShuttingDown);
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_busy_and_busy_taps_change_nothing() {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let mut settings = settings(directory, state.path());
    settings.limits.max_in_flight = 2;
    let h = Harness::start_with(settings).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let frames: Vec<_> = (1..=50)
        .map(|s| gate.sealed(&Frame::Tap(tap(s, ACTIVE, TapKind::Flat))))
        .collect();
    for frame in &frames {
        gate.send_raw(frame).await.unwrap();
    }
    let mut busy = Vec::new();
    for _ in 1..=50 {
        let r = gate.recv_result().await.unwrap();
        match r.outcome {
            Outcome::Approve => {}
            Outcome::Busy => {
                assert_eq!(r.reason, Reason::Overloaded);
                busy.push(r.sequence);
            }
            Outcome::Deny => panic!("unexpected denial {r:?}"),
        }
    }
    assert!(
        !busy.is_empty(),
        "two in flight cannot absorb fifty pipelined taps"
    );
    let journaled = h
        .gateway
        .journal()
        .stats
        .records
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        journaled,
        50 - busy.len() as u64,
        "busy taps are not recorded"
    );
    // Busy is final for its sequence: resending the same frame gets Busy again.
    let last_busy = *busy.last().unwrap();
    gate.send_raw(&frames[last_busy as usize - 1])
        .await
        .unwrap();
    let again = gate.recv_result().await.unwrap();
    assert_eq!((again.sequence, again.outcome), (last_busy, Outcome::Busy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_with_too_many_connections() {
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let mut settings = settings(directory, state.path());
    settings.limits.max_connections = 1;
    let h = Harness::start_with(settings).await;
    let mut first = h.gate(&YUZHONG_BUS).await;
    let second = GateClient::connect(&h.endpoint, h.addr(), &identity(&WANZHOU_BUS), 2, 0).await;
    let err = second.err().expect("second connection refused");
    assert!(
        matches!(&err, ClientError::ClosedByGateway { code: 13, reason } if reason == "too_many_connections"),
        "{err}"
    );
    assert_eq!(
        answer(&mut first, tap(1, ACTIVE, TapKind::Flat))
            .await
            .outcome,
        Outcome::Approve
    );
}

/// Past half the connection limit, a connection attempt must first prove it receives at its
/// address (QUIC Retry) before it counts against the limit: an attempt that cannot answer the
/// Retry, as one from a forged address cannot, takes no gate's place. Gates that can answer it
/// connect as usual, one round trip later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_half_the_limit_a_connection_proves_its_address_before_it_counts() {
    use quinn::Runtime as _;
    let state = tempfile::tempdir().unwrap();
    let (_, directory) = embedded_with(&population());
    let mut settings = settings(directory, state.path());
    settings.limits.max_connections = 4;
    let h = Harness::start_with(settings).await;
    let _first = h.gate(&YUZHONG_BUS).await;
    let _second = h.gate(&WANZHOU_BUS).await;

    // A sender that hears nothing back: its first packet goes out, nothing after it.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let deaf = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        std::sync::Arc::new(FirstFlightOnly {
            socket: quinn::TokioRuntime.wrap_udp_socket(socket).unwrap(),
            held: None.into(),
            answered: false.into(),
        }),
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let tls = tapgate_transport::tls::GateTls::new(
        h.gateway.certificate_der(),
        tapgate_transport::tls::Resumption::Full,
        tapgate_protocol::Version::V1,
    )
    .and_then(|tls| tls.for_one_gate())
    .unwrap();
    let _attempt = deaf.connect_with(tls, h.addr(), "localhost").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = h.gateway.metrics().snapshot();
    assert_eq!(
        m.connections_active, 2,
        "the unproven attempt holds no place"
    );
    assert_eq!(m.retries, 1);

    // A gate that answers the Retry connects, and counts.
    let mut third = h.gate(&CHENGKOU_BUS).await;
    assert_eq!(
        third
            .tap(tap(1, ACTIVE, TapKind::Flat))
            .await
            .unwrap()
            .outcome,
        Outcome::Approve
    );
    let m = h.gateway.metrics().snapshot();
    assert_eq!((m.retries, m.connections_active), (2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_endpoint_serves_counters_and_health() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, _state) = harness().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ops = tokio::spawn(tapgate_runtime::ops::serve(
        listener,
        tapgate_gateway::ops::exposition(&h.gateway),
    ));
    let mut gate = h.gate(&YUZHONG_BUS).await;
    gate.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap();
    gate.tap(tap(2, LOST, TapKind::Flat)).await.unwrap();
    // The journal writes in order, so once this approval is answered the denial before it is
    // on disk too.
    gate.tap(tap(3, ACTIVE, TapKind::Flat)).await.unwrap();
    let get = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    };
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains("tapgate_answers_total{outcome=\"approve\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tapgate_decisions_total{reason=\"card_lost\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tapgate_journal_records_total 3\n"),
        "{metrics}"
    );
    assert!(get("/healthz").await.ends_with("\r\n\r\nok\n"));
    let ready = get("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("\"ready\":true"), "{ready}");
    assert!(metrics.contains("tapgate_ready 1\n"), "{metrics}");
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    ops.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_gate_is_disconnected_and_refused_until_provisioned_again() {
    let state = tempfile::tempdir().unwrap();
    let (embedded, directory) = embedded_with(&population());
    let h = Harness::start(directory, state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let mut other = h.gate(&WANZHOU_BUS).await;
    assert_eq!(
        answer(&mut gate, tap(1, ACTIVE, TapKind::Flat))
            .await
            .outcome,
        Outcome::Approve
    );

    embedded.revoke_terminal(YUZHONG_BUS.terminal_id);
    let err = tokio::time::timeout(Duration::from_secs(5), gate.recv())
        .await
        .expect("the revoked gate's session is closed")
        .unwrap_err();
    assert_refused(&err, ErrorCode::UnknownTerminal);
    let err = GateClient::connect(&h.endpoint, h.addr(), &identity(&YUZHONG_BUS), 2, 0)
        .await
        .err()
        .unwrap();
    assert_refused(&err, ErrorCode::UnknownTerminal);
    // The other gates ride on.
    assert_eq!(
        answer(&mut other, tap(1, ACTIVE, TapKind::Flat))
            .await
            .outcome,
        Outcome::Approve
    );

    embedded.put_terminal(YUZHONG_BUS);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut gate = loop {
        match GateClient::connect(&h.endpoint, h.addr(), &identity(&YUZHONG_BUS), 3, 0).await {
            Ok(gate) => break gate,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_refused(&e, ErrorCode::UnknownTerminal);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("a provisioned gate is refused: {e}"),
        }
    };
    assert_eq!(
        answer(&mut gate, tap(2, ACTIVE, TapKind::Flat))
            .await
            .outcome,
        Outcome::Approve
    );
}

#[test]
fn nonsense_configuration_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let fares = dir.path().join("fares.toml");
    std::fs::write(
        &fares,
        tapgate_settle::fares::DEFAULT_FARES_TOML.replace("min = 1000", "min = 99000"),
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        tapgate_gateway::policy::DEFAULT_POLICY_TOML.replace("metro_max = 700", "metro_max = 100"),
    )
    .unwrap();
    let config = dir.path().join("tapgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmax_in_flight = 0\n[directory]\nkind = \"embedded\"\n\
             [journal]\ndir = \"{}\"\n[policy]\nfile = \"{}\"\n[settlement]\nfares = \"{}\"\n",
            dir.path().join("journal").display(),
            policy.display(),
            fares.display()
        ),
    )
    .unwrap();
    let run = |command: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args([command, "--config", config.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "off"])
            .output()
            .unwrap()
    };
    for command in ["check-config", "serve"] {
        let out = run(command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {stderr}");
        for named in [
            "server.max_in_flight: 0 is less than 1",
            "fares.metro_min: 200 is more than metro_max 100",
            "intercity: min 99000 is more than max 15400",
        ] {
            assert!(stderr.contains(named), "{command}: {stderr}");
        }
        assert!(!stderr.contains("gateway listening"), "{stderr}");
    }
    assert!(!dir.path().join("journal").exists(), "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_stalled_clients_do_not_keep_the_probes_from_being_answered() {
    use tokio::io::AsyncWriteExt;
    let (h, _state) = harness().await;
    let (ops, serving) = ops_endpoint(tapgate_gateway::ops::exposition(&h.gateway)).await;
    // Each sends half a request head and then nothing.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(ops).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for path in ["/readyz", "/healthz", "/metrics"] {
        let started = std::time::Instant::now();
        let (status, _) = tokio::task::spawn_blocking(move || http_get_any(ops, path))
            .await
            .unwrap();
        let took = started.elapsed();
        eprintln!("{path} with 50 stalled clients: {took:?}");
        assert!(status.contains("200"), "{path}: {status}");
        // Generous for a loaded two-core machine; the old endpoint took five seconds here.
        assert!(took < Duration::from_millis(500), "{path} took {took:?}");
    }
    drop(stalled);
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool() {
    let (h, state) = harness().await;
    let settlement = tapgate_settle::Settlement::start(
        tapgate_settle::store::Store::Memory(Default::default()),
        &tapgate_settle::SettlementSettings {
            node: "gw".into(),
            journal_dir: state.path().join("journal"),
            partitions: 2,
            settlers: 1,
            batch: 64,
            max_backlog: 1000,
            lease_ttl: Duration::from_secs(1),
            watch_feed: 0,
            order_window: Duration::ZERO,
        },
        std::sync::Arc::new(tapgate_settle::fares::FareTables::embedded_default()),
        h.gateway.journal().durable(),
    );
    let counters = tapgate_gateway::ops::exposition(&h.gateway)
        .with(tapgate_settle::ops::SettlementCounters::of(&settlement));
    let (ops, serving) = ops_endpoint(counters).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    for sequence in 1..=5 {
        gate.tap(tap(sequence, ACTIVE, TapKind::Flat))
            .await
            .unwrap();
    }
    let metrics = tokio::task::spawn_blocking(move || http_get(ops, "/metrics"))
        .await
        .unwrap();
    for line in [
        "tapgate_answer_latency_seconds_count 5",
        "tapgate_mode_answers_total{mode=\"bus\",outcome=\"approve\"} 5",
        "tapgate_area_answers_total{area=\"500103\",outcome=\"approve\"} 5",
        "# TYPE tapgate_journal_sync_seconds histogram",
        "# TYPE tapgate_settlement_lag_seconds histogram",
        "tapgate_gates_connected{mode=\"bus\"} 1",
        "tapgate_operator_answers_total{operator=\"1\",outcome=\"approve\"} 5",
        "tapgate_build_info{version=",
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/test installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The shipped alert rules load, and they and the Grafana dashboard name only metrics this
    // scrape has (the two that need a Redis directory aside, and the watcher's, which
    // tests/watch.rs checks against a watcher's scrape).
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dashboard = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/grafana-dashboard.json");
    let dashboard_text = std::fs::read_to_string(dashboard).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard_text).expect("dashboard is JSON");
    let redis_only = [
        "tapgate_redis_up",
        "tapgate_change_feeds_behind",
        "tapgate_deny_list_feed_up",
    ];
    for text in [std::fs::read_to_string(rules).unwrap(), dashboard_text] {
        for name in metric_names(&text) {
            assert!(
                redis_only.contains(&name.as_str())
                    || name.starts_with("tapgate_watch_")
                    || metrics.lines().any(|l| l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}{{"))),
                "`{name}` is not in the scrape"
            );
        }
    }
    serving.abort();
    h.gateway.shutdown().await;
    settlement.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_shows_live_figures_that_agree_with_the_metrics() {
    let (h, _state) = harness().await;
    let (ops, serving) = ops_endpoint(tapgate_gateway::ops::exposition(&h.gateway)).await;
    // A version-2 gate holding the population's list (versions 1 to 3), beside a tapping one.
    let mut following = h.gate_v2(&YUZHONG_METRO).await;
    let mut list = GateDenyList::default();
    following
        .send_frame(&Frame::DenyAck(list.held()))
        .await
        .unwrap();
    follow_until(&mut following, &mut list, 3).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let tapping = tokio::spawn(async move {
        for sequence in 1.. {
            if gate
                .tap(tap(sequence, ACTIVE, TapKind::Flat))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let profile = tempfile::tempdir().unwrap();
    let approved_now = || async move {
        let metrics = tokio::task::spawn_blocking(move || http_get(ops, "/metrics"))
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tapgate_answers_total{outcome=\"approve\"} "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut seen = Vec::new();
    for _ in 0..2 {
        let before = approved_now().await;
        let dir = profile.path().to_owned();
        let page = tokio::task::spawn_blocking(move || rendered_page(ops, &dir))
            .await
            .unwrap();
        let after = approved_now().await;
        let approved = shown(&page, "approved-total");
        // What the page showed was read from /metrics between the two scrapes around it.
        assert!(
            (before..=after).contains(&approved),
            "page {approved}, metrics {before}..{after}"
        );
        assert!(page.contains(">ready<"), "{page}");
        assert_eq!(shown(&page, "gates"), 2);
        assert_eq!(shown(&page, "deny-version"), 3);
        assert_eq!(shown(&page, "deny-gates"), 1);
        assert_eq!(shown(&page, "offline-taps"), 0);
        seen.push(approved);
    }
    assert!(seen[1] > seen[0], "the page's figures moved: {seen:?}");
    tapping.abort();
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_reads_live_nodes_and_names_one_that_is_down() {
    let (h, _state) = harness().await;
    let (ops, serving) = ops_endpoint(tapgate_gateway::ops::exposition(&h.gateway)).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    gate.tap(tap(1, ACTIVE, TapKind::Flat)).await.unwrap();
    let down = format!("http://127.0.0.1:{}", free_port());
    let live = format!("http://{ops}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["top", "--once", &live, &down])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("http://{ops}: ready")), "{text}");
    assert!(text.contains(": unreachable"), "{text}");
    assert!(
        text.lines().next().unwrap().starts_with("node\ttaps/s"),
        "{text}"
    );
    serving.abort();
}

#[test]
fn the_vendor_vectors_cover_every_frame_type_code_and_a_resend() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["vectors", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = tapgate_protocol::MasterKey::from_hex(doc["keys"]["master_key_v1"].as_str().unwrap())
        .unwrap()
        .diversify(tapgate_protocol::example::TERMINAL_ID)
        .mac_key();
    let vectors = doc["vectors"].as_array().unwrap();
    let frame_of = |name: &str| {
        vectors
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no vector {name}"))["frame"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut types = std::collections::BTreeSet::new();
    for v in vectors {
        let wire = hex::decode(v["frame"].as_str().unwrap()).unwrap();
        let frame = tapgate_protocol::decode_one(&wire).unwrap();
        types.insert(frame.frame_type().label());
        let untagged = v["name"] == "error_unknown_terminal_untagged";
        assert_eq!(frame.verify(&key).is_ok(), !untagged, "{}", v["name"]);
    }
    assert_eq!(
        types.len(),
        tapgate_protocol::FrameType::ALL.len(),
        "{types:?}"
    );
    for code in ErrorCode::ALL {
        frame_of(&format!("error_{}", code.label()));
    }
    for reason in Reason::ALL {
        if !matches!(reason, Reason::Approved | Reason::Overloaded) {
            frame_of(&format!("tap_result_deny_{}", reason.label()));
        }
    }
    assert_eq!(frame_of("tap_resend"), frame_of("tap"));
    assert_eq!(
        frame_of("tap_result_resend"),
        frame_of("tap_result_approve")
    );
}
