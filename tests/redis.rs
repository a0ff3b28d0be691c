//! End-to-end with a private redis-server per test: the Redis card directory, its change feed
//! across two gateways, and Redis going away and coming back.

mod support;

use std::time::{Duration, Instant};
use support::*;
use tapgate_gateway::card::CardState;
use tapgate_gateway::directory::{Directory, DirectoryError, RedisDirectory, RedisSettings};
use tapgate_protocol::{Concession, Frame, GateDenyList, Issuer, Outcome, Reason, TapKind};
use tapgate_runtime::now_ms;

const CARD: u64 = 6_222_000_000_000_001;

/// Two gateways, each on a directory `directory` makes (their state directories first, to keep
/// them as long as the gateways).
async fn two_gateways(
    directory: impl Fn() -> Directory,
) -> (tempfile::TempDir, tempfile::TempDir, Harness, Harness) {
    let (a_state, b_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Harness::start(directory(), a_state.path()).await;
    let b = Harness::start(directory(), b_state.path()).await;
    (a_state, b_state, a, b)
}

/// Two gateways on `redis` that count every tap on a bus as a boarding.
async fn two_gateways_counting_every_boarding(
    redis: &RedisServer,
) -> (tempfile::TempDir, tempfile::TempDir, Harness, Harness) {
    let (a_state, b_state, a, b) = two_gateways(|| redis.directory()).await;
    for gateway in [&a, &b] {
        gateway.gateway.set_policy(policy_counting_every_boarding());
    }
    (a_state, b_state, a, b)
}

async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_card_report_reaches_a_second_gateway_sharing_the_redis() {
    let redis = RedisServer::start();
    a_lost_card_report_reaches_a_second_gateway(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_card_report_reaches_a_second_gateway_sharing_a_redis_cluster() {
    let cluster = RedisCluster::start();
    a_lost_card_report_reaches_a_second_gateway(&cluster.url()).await;
}

async fn a_lost_card_report_reaches_a_second_gateway(url: &str) {
    let directory = redis_directory(url);
    provision(&directory, CARD).await;
    let (_a_state, _b_state, a, b) = two_gateways(|| redis_directory(url)).await;
    let mut gate_a = a.gate(&YUZHONG_BUS).await;
    let mut gate_b = b.gate(&WANZHOU_BUS).await;
    assert_eq!(
        answer(&mut gate_a, tap(1, CARD, TapKind::Flat))
            .await
            .outcome,
        Outcome::Approve
    );
    assert_eq!(
        answer(&mut gate_b, tap(1, CARD, TapKind::Flat))
            .await
            .outcome,
        Outcome::Approve
    );

    let mut lost = lost_card(CARD);
    lost.expires_on = None;
    directory.put_card(lost).await.unwrap();
    for gateway in [&b, &a] {
        let cache = gateway.gateway.cache().clone();
        wait_until(Duration::from_secs(5), || {
            cache.cached(CARD).map(|c| c.state) == Some(CardState::Lost)
        })
        .await;
    }
    assert_eq!(
        answer(&mut gate_b, tap(2, CARD, TapKind::Flat))
            .await
            .reason,
        Reason::CardLost
    );
    assert_eq!(
        answer(&mut gate_a, tap(2, CARD, TapKind::Flat))
            .await
            .reason,
        Reason::CardLost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_while_the_gateway_runs() {
    let mut redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    assert_eq!(
        gate.tap(tap(1, CARD, TapKind::Flat)).await.unwrap().outcome,
        Outcome::Approve
    );

    redis.stop();
    // Cached cards keep riding; uncached ones are denied as the directory is unreachable.
    assert_eq!(
        gate.tap(tap(2, CARD, TapKind::Flat)).await.unwrap().outcome,
        Outcome::Approve
    );
    let r = gate.tap(tap(3, CARD + 1, TapKind::Flat)).await.unwrap();
    assert_eq!(
        (r.outcome, r.reason),
        (Outcome::Deny, Reason::DirectoryUnavailable)
    );

    // Redis comes back empty (it keeps nothing on disk here); a report made now must reach the
    // gateway through the reconnected change feed, and the empty stream makes it drop its cache.
    redis.restart();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    directory
        .put_card(card(
            CARD,
            CardState::Blocked,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ))
        .await
        .unwrap();
    let cache = h.gateway.cache().clone();
    wait_until(Duration::from_secs(10), || {
        cache
            .cached(CARD)
            .is_none_or(|c| c.state == CardState::Blocked)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sequence = 4;
    loop {
        let r = gate.tap(tap(sequence, CARD, TapKind::Flat)).await.unwrap();
        sequence += 1;
        if r.reason == Reason::CardBlocked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway never saw the block after Redis came back: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = gate
        .tap(tap(sequence, CARD + 1, TapKind::Flat))
        .await
        .unwrap();
    assert_eq!(r.reason, Reason::UnknownCard, "lookups work again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_catches_up_on_changes_made_while_it_was_disconnected() {
    let redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    assert_eq!(
        gate.tap(tap(1, CARD, TapKind::Flat)).await.unwrap().outcome,
        Outcome::Approve
    );
    // Cut every client connection (the gateway's feed among them), then report the card lost.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1);
    // The feed waits 200 ms before reconnecting, so this lands while it is away. The writer's
    // own connection was cut too; its first attempt may fail.
    let lost = lost_card(CARD);
    if directory.put_card(lost).await.is_err() {
        directory.put_card(lost).await.unwrap();
    }
    assert_eq!(
        cache_state(&h),
        Some(CardState::Active),
        "not applied before the feed is back"
    );
    let cache = h.gateway.cache().clone();
    wait_until(Duration::from_secs(10), || {
        cache.cached(CARD).map(|c| c.state) == Some(CardState::Lost)
    })
    .await;
    assert_eq!(
        gate.tap(tap(2, CARD, TapKind::Flat)).await.unwrap().reason,
        Reason::CardLost
    );
}

fn cache_state(h: &Harness) -> Option<CardState> {
    h.gateway.cache().cached(CARD).map(|c| c.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_redis_is_down_serves_once_it_is_back() {
    let mut redis = RedisServer::start();
    redis.stop();
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let err = tapgate_loadgen::client::GateClient::connect(
        &h.endpoint,
        h.addr(),
        &identity(&YUZHONG_BUS),
        1,
        0,
    )
    .await
    .err()
    .expect("no terminal register while Redis is down");
    assert!(err.to_string().contains("internal"), "{err}");

    redis.restart();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut gate = loop {
        match tapgate_loadgen::client::GateClient::connect(
            &h.endpoint,
            h.addr(),
            &identity(&YUZHONG_BUS),
            2,
            0,
        )
        .await
        {
            Ok(gate) => break gate,
            Err(e) => assert!(Instant::now() < deadline, "gateway never recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        gate.tap(tap(1, CARD, TapKind::Flat)).await.unwrap().outcome,
        Outcome::Approve
    );
    // The change feed found its place once Redis was back: reports now reach the cache.
    let cache = h.gateway.cache().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lost = lost_card(CARD);
    loop {
        directory.put_card(lost).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if cache
            .stats
            .changes_applied
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the change feed never came back");
    }
    assert_eq!(
        gate.tap(tap(2, CARD, TapKind::Flat)).await.unwrap().reason,
        Reason::CardLost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_revoked_with_the_cli_is_cut_off_at_every_gateway() {
    let redis = RedisServer::start();
    provision(&redis.directory(), CARD).await;
    let (_a_state, _b_state, a, b) = two_gateways(|| redis.directory()).await;
    // Both gateways have the gate provisioned in memory; one has a session open.
    let mut gate = b.gate(&YUZHONG_BUS).await;
    drop(a.gate(&YUZHONG_BUS).await);
    assert_eq!(
        answer(&mut gate, tap(1, CARD, TapKind::Flat)).await.outcome,
        Outcome::Approve
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["cards", "--redis-url", &redis.url(), "revoke-terminal"])
        .arg(YUZHONG_BUS.terminal_id.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let err = tokio::time::timeout(Duration::from_secs(5), gate.recv())
        .await
        .expect("the open session is closed")
        .unwrap_err();
    assert!(
        matches!(&err, tapgate_loadgen::client::ClientError::Refused(e) if e.code == tapgate_protocol::ErrorCode::UnknownTerminal),
        "{err}"
    );
    // Each gateway applies the revocation from the change feed within moments.
    for gateway in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let refused = loop {
            let attempt = tapgate_loadgen::client::GateClient::connect(
                &gateway.endpoint,
                gateway.addr(),
                &identity(&YUZHONG_BUS),
                7,
                0,
            )
            .await;
            match attempt {
                Err(e) => break e,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(_) => panic!("the revoked gate is still accepted after 5 s"),
            }
        };
        assert!(
            matches!(&refused, tapgate_loadgen::client::ClientError::Refused(e) if e.code == tapgate_protocol::ErrorCode::UnknownTerminal),
            "{refused}"
        );
    }
}

/// Connections Redis has accepted since it started.
fn connections_received(redis: &RedisServer) -> u64 {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = redis::cmd("INFO").arg("stats").query(&mut conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connection count in\n{info}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_keeps_its_redis_connections() {
    let redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    assert_eq!(
        answer(&mut gate, tap(1, CARD, TapKind::Flat)).await.outcome,
        Outcome::Approve
    );
    let before = connections_received(&redis);
    // Ten idle seconds: ten rounds of the change feed's one-second blocking reads.
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The probe itself is one connection.
    let opened = connections_received(&redis) - before - 1;
    assert_eq!(
        opened, 0,
        "the idle gateway opened {opened} new Redis connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_give_exactly_the_counted_rides_a_card_has() {
    let redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    const ELDER: u64 = 6_222_000_000_000_065;
    directory
        .put_card(card(
            ELDER,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::Elder,
            3,
        ))
        .await
        .unwrap();
    let (_a_state, _b_state, a, b) = two_gateways_counting_every_boarding(&redis).await;
    let mut gate_a = a.gate(&YUZHONG_BUS).await;
    let mut gate_b = b.gate(&YUZHONG_BUS).await;
    // Each gateway's cache believes it has three rides to give; together they try ten. The
    // directory's count decides: exactly three answers are free, and they count down.
    let mut free = Vec::new();
    for sequence in 1..=5 {
        for (gate, sequence) in [(&mut gate_a, sequence), (&mut gate_b, sequence + 100)] {
            let r = answer(gate, tap(sequence, ELDER, TapKind::Flat)).await;
            assert_eq!(r.outcome, Outcome::Approve);
            if r.concession == Concession::Elder {
                assert_eq!(r.fare_fen, 0);
                free.push(r.rides_left);
            } else {
                assert_eq!((r.concession, r.rides_left), (Concession::None, 0));
            }
        }
    }
    assert_eq!(free, [2, 1, 0]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let record = directory
            .card(ELDER)
            .await
            .unwrap()
            .expect("still readable");
        if record.rides_left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} rides left",
            record.rides_left
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything the gateways sent has landed and the count stayed at zero.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = directory
        .card(ELDER)
        .await
        .unwrap()
        .expect("still readable");
    assert_eq!(record.rides_left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowance_starts_afresh_each_year_and_a_top_up_reaches_every_gateway() {
    let redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    const LAST_YEAR: u64 = 6_222_000_000_000_066;
    const USED_UP: u64 = 6_222_000_000_000_067;
    let today = tapgate_runtime::clock::local_date(now_ms());
    let this_period = chrono::NaiveDate::from_ymd_opt(chrono::Datelike::year(&today), 1, 1);
    let mut last_year = card(
        LAST_YEAR,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::Elder,
        0,
    );
    last_year.rides_period =
        this_period.and_then(|d| d.checked_sub_months(chrono::Months::new(12)));
    let used_up = tapgate_gateway::card::CardRecord {
        card_id: USED_UP,
        rides_period: this_period,
        ..last_year
    };
    directory.put_cards(&[last_year, used_up]).await.unwrap();
    let (_a_state, _b_state, a, b) = two_gateways_counting_every_boarding(&redis).await;
    let mut gate_a = a.gate(&YUZHONG_BUS).await;
    let mut gate_b = b.gate(&YUZHONG_BUS).await;

    // Last year's count has lapsed: this year's 1,200 start with this ride, in the directory.
    let r = answer(&mut gate_a, tap(1, LAST_YEAR, TapKind::Flat)).await;
    assert_eq!(
        (r.concession, r.fare_fen, r.rides_left),
        (Concession::Elder, 0, 1199)
    );
    let record = directory.card(LAST_YEAR).await.unwrap().unwrap();
    assert_eq!(
        (record.rides_left, record.rides_period),
        (1199, this_period)
    );

    // This year's rides are used up: full fare, at both gateways (each now caches the card).
    for (gate, sequence) in [(&mut gate_a, 2), (&mut gate_b, 1)] {
        let r = answer(gate, tap(sequence, USED_UP, TapKind::Flat)).await;
        assert_eq!(
            (r.concession, r.fare_fen, r.rides_left),
            (Concession::None, 200, 0)
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["cards", "--redis-url", &redis.url(), "top-up"])
        .arg(USED_UP.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("300 rides added, 300 left"),
        "{out:?}"
    );
    // Gateway B learns the new count from the change feed, not from a fetch of its own.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sequence = 2;
    loop {
        let r = answer(&mut gate_b, tap(sequence, USED_UP, TapKind::Flat)).await;
        sequence += 1;
        if r.concession == Concession::Elder {
            assert_eq!((r.fare_fen, r.rides_left), (0, 299));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the top-up did not reach gateway B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A loss report sets the state alone: the count the gateways left stays.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["cards", "--redis-url", &redis.url(), "report-lost"])
        .arg(USED_UP.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let record = directory.card(USED_UP).await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.rides_left, record.rides_period),
        (CardState::Lost, 299, this_period)
    );
    // A card without a counted concession has nothing to top up.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["cards", "--redis-url", &redis.url(), "top-up"])
        .arg(CARD.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no counted allowance"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_card_reports_acknowledged_by_a_replica_survive_a_master_failover_on_every_gateway() {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let writer = replicated_directory(&url);
    let cards: Vec<u64> = (0..160).map(|i| 6_222_000_000_100_000 + i).collect();
    let active = |c: u64| {
        card(
            c,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        )
    };
    // The reports below start from a replicated cluster.
    let actives: Vec<_> = cards.iter().map(|c| active(*c)).collect();
    put_once_replicated(&writer, &actives).await;
    provision(&writer, CARD).await;
    let (_a_state, _b_state, a, b) = two_gateways(|| redis_directory(&url)).await;
    let policy = tapgate_gateway::policy::Policy::embedded_default();
    let place = tapgate_gateway::decide::GatePlace {
        terminal_id: YUZHONG_BUS.terminal_id,
        area: YUZHONG_BUS.area,
        mode: YUZHONG_BUS.mode,
    };
    for gateway in [&a, &b] {
        for c in &cards {
            let decision = gateway
                .gateway
                .cache()
                .authorize(&tap(1, *c, TapKind::Flat), place, &policy, now_ms())
                .await;
            assert_eq!(decision.outcome, Outcome::Approve);
        }
    }

    // Reports go on while the master of one change group dies and its replica takes over. In
    // this cluster's layout that master also holds the deny list, so reports of cards in other
    // groups stand but are told the list is behind; they are written again afterwards, as the
    // error asks.
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = tokio::spawn(report_lost(writer, cards, killed.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::task::block_in_place(|| cluster.kill_master_of("tapgate:{g03}:changes"));
    let LostReports {
        acknowledged,
        list_behind,
        after_kill,
        writer,
    } = reporter.await.unwrap();
    eprintln!("{} reports left the deny list behind", list_behind.len());
    // Written again until both gateways' lists hold every acknowledged report (the list's
    // new master has no replica left, so these writes are never reported replicated).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let listed = |gateway: &Harness| gateway.gateway.deny_list().1 >= acknowledged.len();
    while !(listed(&a) && listed(&b)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the deny list stays behind: {:?} and {:?} for {} reports",
            a.gateway.deny_list(),
            b.gateway.deny_list(),
            acknowledged.len()
        );
        let _ = writer.put_cards(&list_behind).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} of 160 reports acknowledged, {after_kill} of them sent after the kill",
        acknowledged.len()
    );
    // How many reports fall into the window where the whole cluster refuses writes depends on
    // timing; what must hold is that reports went on being acknowledged through the failover.
    assert!(
        after_kill >= 10,
        "{} reports acknowledged, {after_kill} after the kill",
        acknowledged.len()
    );

    // Every acknowledged report is in Redis, and no gateway still holds the card as active:
    // each has it as lost, or dropped its cache (a group's feed found it could not resume)
    // and reads the card from Redis at its next tap.
    let directory = redis_directory(&url);
    for c in &acknowledged {
        let record = directory.card(*c).await.unwrap().expect("card kept");
        assert_eq!(record.state, CardState::Lost, "card {c} in Redis");
    }
    let (cache_a, cache_b) = (a.gateway.cache().clone(), b.gateway.cache().clone());
    wait_until(Duration::from_secs(15), || {
        acknowledged.iter().all(|c| {
            [&cache_a, &cache_b]
                .iter()
                .all(|cache| cache.cached(*c).is_none_or(|r| r.state == CardState::Lost))
        })
    })
    .await;
    // Both gateways hold the same deny list.
    wait_until(Duration::from_secs(15), || {
        a.gateway.deny_list() == b.gateway.deny_list()
    })
    .await;
}

/// Writes `cards` again until a replica holds them: just after a cluster starts, its replicas
/// may still be syncing.
async fn put_once_replicated(writer: &Directory, cards: &[tapgate_gateway::card::CardRecord]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = writer.put_cards(cards).await {
        assert!(Instant::now() < deadline, "replicas never caught up: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a run of lost-card reports through a failover left behind.
struct LostReports {
    acknowledged: Vec<u64>,
    /// Reports that stand but were told the deny list is behind, to be written again.
    list_behind: Vec<tapgate_gateway::card::CardRecord>,
    /// Acknowledged reports sent after `killed` was set.
    after_kill: usize,
    writer: Directory,
}

/// Reports each card lost, 10 ms apart, sorting the answers.
async fn report_lost(
    writer: Directory,
    cards: Vec<u64>,
    killed: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> LostReports {
    let (mut acknowledged, mut list_behind, mut after_kill) = (Vec::new(), Vec::new(), 0);
    for c in cards {
        let report = lost_card(c);
        let late = killed.load(std::sync::atomic::Ordering::SeqCst);
        let written = match writer.put_card(report).await {
            Ok(()) => true,
            Err(DirectoryError::DenyListBehind(_)) => {
                list_behind.push(report);
                true
            }
            Err(_) => false,
        };
        if written {
            acknowledged.push(c);
            after_kill += usize::from(late);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    LostReports {
        acknowledged,
        list_behind,
        after_kill,
        writer,
    }
}

fn lost_card(card_id: u64) -> tapgate_gateway::card::CardRecord {
    card(
        card_id,
        CardState::Lost,
        Issuer::ChongqingSsc,
        Concession::None,
        0,
    )
}

/// A master can die after a gateway read its newest deny-list changes but before its replica
/// held them; the replica that takes over then numbers its next changes with those same
/// versions. Here Redis's list is swapped for one that went another way after version 2 (as
/// such a replica's would), and one change more is made: the gateway loads the whole list
/// again and its gates are sent it, rather than taking the new change as the one after
/// changes Redis no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_list_that_went_another_way_in_a_failover_is_loaded_again_whole() {
    let redis = RedisServer::start();
    let cards: Vec<u64> = (0..7).map(|i| 6_222_000_000_200_000 + i).collect();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    let held: Vec<_> = cards[..4].iter().map(|c| lost_card(*c)).collect();
    directory.put_cards(&held).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let mut gate = h.gate_v2(&YUZHONG_BUS).await;
    let mut list = GateDenyList::default();
    gate.send_frame(&Frame::DenyAck(list.held())).await.unwrap();
    follow_until(&mut gate, &mut list, 4).await;

    // The other way: versions 1 and 2 alike, then two other cards.
    let other = [cards[0], cards[1], cards[4], cards[5]].map(lost_card);
    prefixed_directory(&redis.url(), "other")
        .put_cards(&other)
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    swap_deny_list(&mut admin, "other").await;
    directory.put_card(lost_card(cards[6])).await.unwrap();

    follow_until(&mut gate, &mut list, 5).await;
    let listed: Vec<u64> = cards
        .iter()
        .copied()
        .filter(|c| list.refuses(*c).is_some())
        .collect();
    assert_eq!(
        listed,
        [cards[0], cards[1], cards[4], cards[5], cards[6]],
        "the gate's list is Redis's"
    );
    assert_eq!(h.gateway.deny_list(), (5, 5));

    // Another way again, to the same version, and no change after it: the gateway sees the
    // history differ once its wait for changes ends.
    let third = [cards[0], cards[1], cards[2], cards[3], cards[5]].map(lost_card);
    prefixed_directory(&redis.url(), "third")
        .put_cards(&third)
        .await
        .unwrap();
    swap_deny_list(&mut admin, "third").await;
    follow_while(&mut gate, &mut list, |list| {
        list.refuses(cards[6]).is_some()
    })
    .await;
    assert_eq!(list.version(), 5);
    assert!(third.iter().all(|c| list.refuses(c.card_id).is_some()));
    // Operators see each time the node started over.
    let reloads = &h.gateway.metrics().deny_reloads;
    assert_eq!(reloads.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// The deny list through a real failover on a Redis Cluster: a gate on gateway A is sent a
/// change that the list's master takes with it when it dies before its replica copied it. The
/// replica, now master, numbers the next change with the same version. The gate then connects
/// to gateway B, which only ever follows what Redis holds: B sees the gate's history differ
/// from its own at that version and sends it the whole list, so the gate refuses the card of
/// the new change and no longer the lost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_holding_a_deny_change_a_cluster_failover_lost_is_set_right_by_another_gateway() {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let writer = replicated_directory(&url);
    let cards: Vec<u64> = (0..5).map(|i| 6_222_000_000_400_000 + i).collect();
    let held: Vec<_> = cards[..3].iter().map(|c| lost_card(*c)).collect();
    put_once_replicated(&writer, &held).await;
    provision(&writer, CARD).await;
    let (_a_state, _b_state, a, b) = two_gateways(|| redis_directory(&url)).await;
    let mut gate = a.gate_v2(&YUZHONG_BUS).await;
    let mut list = GateDenyList::default();
    gate.send_frame(&Frame::DenyAck(list.held())).await.unwrap();
    follow_until(&mut gate, &mut list, 3).await;

    // Version 4, card 3: on the list's master only, then sent to the gate.
    const LIST_KEY: &str = "tapgate:{deny}:changes";
    tokio::task::block_in_place(|| cluster.cut_off_replica_of(LIST_KEY));
    redis_directory(&url)
        .put_card(lost_card(cards[3]))
        .await
        .unwrap();
    follow_until(&mut gate, &mut list, 4).await;
    gate.close();
    assert_eq!(list.refuses(cards[3]), Some(Reason::CardLost));

    // The master dies; its replica, without version 4, takes over. Card 4 is the new line's
    // version 4, written again until the list's new master has it.
    tokio::task::block_in_place(|| cluster.kill_master_of(LIST_KEY));
    let b_reloads = &b.gateway.metrics().deny_reloads;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b_reloads.load(std::sync::atomic::Ordering::Relaxed) == 0
        || b.gateway.deny_list() != (4, 4)
    {
        assert!(
            Instant::now() < deadline,
            "gateway B never held the new line: {:?}",
            b.gateway.deny_list()
        );
        let _ = redis_directory(&url).put_card(lost_card(cards[4])).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut gate = b.gate_v2(&YUZHONG_BUS).await;
    gate.send_frame(&Frame::DenyAck(list.held())).await.unwrap();
    let frames = follow_while(&mut gate, &mut list, |list| {
        list.refuses(cards[4]).is_none()
    })
    .await;
    assert!(matches!(frames[1], Frame::DenyList(_)), "{frames:?}");
    assert_eq!(list.refuses(cards[3]), None, "the lost change is gone");
    assert_eq!(list.version(), 4);
    let other_history = &b.gateway.metrics().deny_other_history;
    assert_eq!(other_history.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Puts the deny list kept under `prefix` in place of the gateways' one, as a failover puts a
/// replica's data in place of its master's.
async fn swap_deny_list(admin: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let mut swap = redis::pipe();
    swap.atomic();
    for key in ["version", "history", "cards", "changes"] {
        swap.rename(
            format!("{prefix}:{{deny}}:{key}"),
            format!("tapgate:{{deny}}:{key}"),
        )
        .ignore();
    }
    swap.query_async::<()>(admin).await.unwrap();
}

/// A loss report whose master has lost its replica is answered NotReplicated, to be made
/// again; the card goes on the deny list all the same, so gates riding offline refuse it as
/// every gateway online already does (its change feed carries the state). Retrying used to
/// fail at the card's own wait each time and never reach the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_written_while_its_master_has_no_replica_still_reaches_the_deny_list() {
    let redis = RedisServer::start();
    provision(&redis.directory(), CARD).await;
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    // This Redis has no replica, so every wait for one comes back short.
    let writer = replicated_directory(&redis.url());
    let reported = writer.put_card(lost_card(CARD + 1)).await;
    assert!(
        matches!(reported, Err(DirectoryError::NotReplicated { .. })),
        "{reported:?}"
    );
    let blocked = writer.set_state(CARD, CardState::Blocked).await;
    assert!(
        matches!(blocked, Err(DirectoryError::NotReplicated { .. })),
        "{blocked:?}"
    );
    let gateway = &h.gateway;
    wait_until(Duration::from_secs(5), || gateway.deny_list() == (2, 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_card_record_is_counted_not_hidden() {
    let redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    const DAMAGED: u64 = 6_222_000_000_000_077;
    let key = format!(
        "tapgate:{{g{:02}}}:card:{DAMAGED}",
        tapgate_gateway::directory::change_group(DAMAGED)
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&["state", "active", "issuer", "cq_ssc", "rides", "-6"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let mut gate = h.gate(&YUZHONG_BUS).await;
    let r = answer(&mut gate, tap(1, DAMAGED, TapKind::Flat)).await;
    assert_eq!(r.reason, Reason::DirectoryUnavailable);
    let stats = &h.gateway.cache().stats;
    assert_eq!(
        stats
            .malformed_records
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A readable card on the same gateway is unaffected.
    assert_eq!(
        answer(&mut gate, tap(2, CARD, TapKind::Flat)).await.outcome,
        Outcome::Approve
    );
}

/// A redis-server on a TLS port only, with a password, and the PEM of the CA that signed its
/// certificate.
struct TlsRedis {
    port: u16,
    ca_file: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(password: &str) -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.pem()).unwrap();
        std::fs::write(path("server.pem"), cert.pem()).unwrap();
        std::fs::write(path("server.key"), key.serialize_pem()).unwrap();
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(path("server.pem"))
            .arg("--tls-key-file")
            .arg(path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(path("ca.pem"))
            .args(["--tls-auth-clients", "no", "--requirepass", password])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "TLS redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsRedis {
            port,
            ca_file: path("ca.pem"),
            child,
            _dir: dir,
        }
    }

    fn directory(&self, credentials: &str, ca: bool) -> Result<Directory, String> {
        RedisDirectory::connect(&RedisSettings {
            url: format!("rediss://{credentials}127.0.0.1:{}/", self.port),
            tls_ca_file: ca.then(|| self.ca_file.clone()),
            key_prefix: "tapgate".into(),
            response_timeout: Duration::from_secs(2),
            wait_replicas: 0,
        })
        .map(Directory::Redis)
        .map_err(|e| e.to_string())
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_a_password_is_reached_through_rediss() {
    let redis = TlsRedis::start("s3cret");
    let record = card(
        CARD,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::None,
        0,
    );
    let directory = redis.directory("default:s3cret@", true).unwrap();
    directory.put_card(record).await.unwrap();
    assert_eq!(directory.card(CARD).await.unwrap(), Some(record));

    // Without the password, with a wrong one, and with a certificate no trusted CA signed:
    // each a plain error in one short line.
    for (credentials, trust_ca, says) in [
        ("", true, "NOAUTH"),
        ("default:wrong@", true, "WRONGPASS"),
        ("default:s3cret@", false, ""),
    ] {
        let e = redis
            .directory(credentials, trust_ca)
            .unwrap()
            .card(CARD)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says) && e.len() < 300, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_resent_to_a_second_gateway_gets_the_first_decision_and_is_journaled_there_too() {
    let redis = RedisServer::start();
    let directory = redis.directory();
    provision(&directory, CARD).await;
    let (a_state, b_state, a, b) = two_gateways(|| redis.directory()).await;
    let mut on_a = a.gate(&YUZHONG_BUS).await;
    let taps: Vec<_> = (1..=3).map(|s| tap(s, CARD, TapKind::Flat)).collect();
    let mut first = Vec::new();
    for t in &taps {
        first.push(answer(&mut on_a, *t).await);
    }
    assert!(first.iter().all(|r| r.outcome == Outcome::Approve));
    // The card is reported lost, and the gate moves to B without having heard A's last answer.
    let mut lost = lost_card(CARD);
    lost.expires_on = None;
    directory.put_card(lost).await.unwrap();
    let cache_b = b.gateway.cache().clone();
    wait_until(Duration::from_secs(5), || {
        cache_b
            .cached(CARD)
            .is_none_or(|c| c.state == CardState::Lost)
    })
    .await;
    let mut on_b = b.gate(&YUZHONG_BUS).await;
    assert_eq!(on_b.ack.last_sequence, 3, "B knows what A decided");
    // The resend gets A's answer, byte for byte, not B's view of the card now.
    assert_eq!(answer(&mut on_b, taps[2]).await, first[2]);
    // A new tap is decided by B.
    assert_eq!(
        answer(&mut on_b, tap(4, CARD, TapKind::Flat)).await.reason,
        Reason::CardLost
    );
    // B journaled A's approval as A recorded it, so it is on record whichever journal
    // survives; settlement books the two copies once.
    b.gateway.shutdown().await;
    a.gateway.shutdown().await;
    journaled_alike(a_state.path(), b_state.path(), 3);
    assert_eq!(taps_and_copies(&[a_state.path(), b_state.path()]), (3, 1));
}

/// Two gateways on a Redis Cluster: a gate uploads two offline taps to A, loses its link
/// before it can forget the second, and uploads it again to B. B knows what A recorded: the
/// receipt is `already`, with A's flag and fare; B journals A's record as A wrote it; and both
/// gateways' live settlers on the cluster book each tap once, as reconcile does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_tap_uploaded_again_to_another_gateway_on_a_cluster_is_settled_once() {
    use tapgate_protocol::{DenyAck, Frame, OfflineStatus, OfflineTap};
    let cluster = RedisCluster::start();
    let url = cluster.url();
    provision(&redis_directory(&url), CARD).await;
    let (a_state, b_state, a, b) = two_gateways(|| redis_directory(&url)).await;
    let settling = [
        settle_live_on(&url, "gw-a", &a),
        settle_live_on(&url, "gw-b", &b),
    ];
    let since = now_ms() - 10 * 60_000;
    let uploads: Vec<OfflineTap> = (1..=2)
        .map(|s| OfflineTap {
            tap: tapgate_protocol::Tap {
                gate_time_ms: since + s * 60_000,
                ..tap(s, CARD, TapKind::Flat)
            },
            deny_version: 0,
            deny_history: 0,
            offline_since_ms: since,
        })
        .collect();
    let mut on_a = a.gate_v2(&YUZHONG_BUS).await;
    on_a.send_frame(&Frame::DenyAck(DenyAck::NEW_GATE))
        .await
        .unwrap();
    let mut first = Vec::new();
    for upload in &uploads {
        on_a.send_frame(&Frame::OfflineTap(*upload)).await.unwrap();
        first.push(next_receipt(&mut on_a).await);
    }
    assert!(
        first.iter().all(|r| r.status == OfflineStatus::Recorded),
        "{first:?}"
    );
    on_a.close();

    let mut on_b = b.gate_v2(&YUZHONG_BUS).await;
    assert_eq!(on_b.ack.last_sequence, 2, "B knows what A recorded");
    on_b.send_frame(&Frame::DenyAck(DenyAck::NEW_GATE))
        .await
        .unwrap();
    on_b.send_frame(&Frame::OfflineTap(uploads[1]))
        .await
        .unwrap();
    let again = next_receipt(&mut on_b).await;
    assert_eq!(
        (again.status, again.flag, again.fare_fen),
        (OfflineStatus::Already, first[1].flag, first[1].fare_fen)
    );

    for settlement in &settling {
        assert!(
            settlement
                .wait_settled(Duration::from_secs(30))
                .await
                .unwrap()
        );
    }
    let copies: u64 = settling
        .iter()
        .map(|s| s.settlers.copies.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let store = &settling[0].store;
    let (books, cards) = (
        store.ledger(None, true).await.unwrap(),
        store.card_pseudonyms().await.unwrap(),
    );
    for settlement in settling {
        settlement.shutdown().await;
    }
    b.gateway.shutdown().await;
    a.gateway.shutdown().await;
    assert!(journaled_alike(a_state.path(), b_state.path(), 2).is_offline());
    assert_eq!(taps_and_copies(&[a_state.path(), b_state.path()]), (2, 1));
    assert_eq!(
        (books.taps(), copies),
        (2, 1),
        "booked once, the copy left out"
    );
    let journals = [
        a_state.path().join("journal"),
        b_state.path().join("journal"),
    ];
    let journals: Vec<&std::path::Path> = journals.iter().map(|j| j.as_path()).collect();
    let expected = tapgate_settle::ledger::settle_journals(
        &journals,
        &tapgate_settle::fares::FareTables::embedded_default(),
        &cards,
    )
    .unwrap();
    let reconciled = tapgate_settle::ledger::Reconciliation::new(&expected.ledger, &books);
    assert!(reconciled.is_exact(), "{reconciled:?}");
}

/// A gateway's live settlement (its forwarder and one settler) on the Redis at `url`.
fn settle_live_on(url: &str, node: &str, h: &Harness) -> tapgate_settle::Settlement {
    use tapgate_settle::store::{RedisStore, Store};
    let store =
        Store::Redis(RedisStore::connect(url, None, "tapgate", Duration::from_secs(2)).unwrap());
    tapgate_settle::Settlement::start(
        store,
        &tapgate_settle::SettlementSettings {
            watch_feed: 0,
            ..test_settlement(node, h.state.join("journal"))
        },
        std::sync::Arc::new(tapgate_settle::fares::FareTables::embedded_default()),
        h.gateway.journal().durable(),
    )
}

/// The record of the gate's tap `sequence` in B's journal (under `b`), which A's (under `a`)
/// holds alike: whichever journal survives, the tap is on record. (An offline upload differs
/// only in when it reached each gateway.)
fn journaled_alike(
    a: &std::path::Path,
    b: &std::path::Path,
    sequence: u64,
) -> tapgate_journal::JournalRecord {
    let (in_a, in_b) = (journaled(a), journaled(b));
    let find = |journal: &[tapgate_journal::JournalRecord]| {
        *journal
            .iter()
            .find(|r| r.tap.sequence == sequence)
            .expect("both gateways journaled the tap")
    };
    let (copy, original) = (find(&in_b), find(&in_a));
    assert_eq!(copy.is_offline(), original.is_offline());
    let arrived_alike = |r: tapgate_journal::JournalRecord| tapgate_journal::JournalRecord {
        uploaded_ms: r.uploaded_ms.map(|_| 0),
        ..r
    };
    assert_eq!(arrived_alike(copy), arrived_alike(original));
    copy
}

/// Settles the journals of these gateways' state directories together: the taps booked, and
/// the copies of taps already booked that it left out.
fn taps_and_copies(states: &[&std::path::Path]) -> (u64, u64) {
    let journals: Vec<_> = states.iter().map(|s| s.join("journal")).collect();
    let journals: Vec<&std::path::Path> = journals.iter().map(|j| j.as_path()).collect();
    let settled = tapgate_settle::ledger::settle_journals(
        &journals,
        &tapgate_settle::fares::FareTables::embedded_default(),
        &tapgate_protocol::crypto::CardPseudonymizer::new([7; 16]),
    )
    .unwrap();
    (settled.ledger.taps(), settled.copies)
}

/// Polls `/readyz` until `check` holds for its status line and body.
async fn readyz_until(
    addr: std::net::SocketAddr,
    within: Duration,
    check: impl Fn(&str, &str) -> bool,
) -> (String, String) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = tokio::task::spawn_blocking(move || http_get_any(addr, "/readyz"))
            .await
            .unwrap();
        if check(&status, &body) {
            return (status, body);
        }
        assert!(Instant::now() < deadline, "{status}\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_redis_that_went_away_and_clears_when_it_is_back() {
    let mut redis = RedisServer::start();
    provision(&redis.directory(), CARD).await;
    let state = tempfile::tempdir().unwrap();
    let h = Harness::start(redis.directory(), state.path()).await;
    let (ops, serving) = ops_endpoint(tapgate_gateway::ops::exposition(&h.gateway)).await;
    readyz_until(ops, Duration::from_secs(5), |s, _| s.contains("200")).await;
    redis.stop();
    let (_, body) = readyz_until(ops, Duration::from_secs(10), |s, b| {
        s.contains("503") && b.contains("\"directory\"") && b.contains("change feed")
    })
    .await;
    assert!(body.contains("\"ready\":false"), "{body}");
    let metrics = tokio::task::spawn_blocking(move || http_get(ops, "/metrics"))
        .await
        .unwrap();
    assert!(metrics.contains("tapgate_ready 0\n"), "{metrics}");
    assert!(metrics.contains("tapgate_redis_up 0\n"), "{metrics}");
    // The deny list's feed is shown lost, and does not gate readiness.
    metrics_until(ops, "tapgate_deny_list_feed_up 0\n").await;
    assert!(!body.contains("deny"), "{body}");
    redis.restart();
    readyz_until(ops, Duration::from_secs(10), |s, _| s.contains("200")).await;
    metrics_until(ops, "tapgate_deny_list_feed_up 1\n").await;
    serving.abort();
}

/// Polls `/metrics` until it shows `line`, for up to 10 s.
async fn metrics_until(ops: std::net::SocketAddr, line: &'static str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = tokio::task::spawn_blocking(move || http_get(ops, "/metrics"))
            .await
            .unwrap();
        if metrics.contains(line) {
            return;
        }
        assert!(Instant::now() < deadline, "no `{line}` in {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_when_redis_wants_a_password() {
    let redis = TlsRedis::start("s3cret");
    let state = tempfile::tempdir().unwrap();
    // Reachable over TLS, but no password given.
    let directory = redis.directory("", true).unwrap();
    let h = Harness::start(directory, state.path()).await;
    let (ops, serving) = ops_endpoint(tapgate_gateway::ops::exposition(&h.gateway)).await;
    // The change feeds may say so before the directory's own probe has run: wait for both.
    let (status, body) = readyz_until(ops, Duration::from_secs(10), |s, b| {
        s.contains("503") && b.contains("\"directory\"")
    })
    .await;
    assert!(body.contains("NOAUTH"), "{status}\n{body}");
    serving.abort();
}
