//! `tapgate watch journal` over a journal written here: a cloned card and a lost card tried
//! again are named, by pseudonym only, and an ordinary rider is not.

mod support;

use std::process::Command;
use tapgate_journal::JournalRecord;
use tapgate_protocol::{Concession, Issuer, Mode, Outcome, Reason, TapKind};

fn denied_lost(gate: u64, sequence: u64, card: u64, at: u64) -> JournalRecord {
    let mut r = metro_entry(gate, sequence, card, at);
    r.result.outcome = Outcome::Deny;
    r.result.reason = Reason::CardLost;
    r
}

fn metro_entry(gate: u64, sequence: u64, card: u64, at: u64) -> JournalRecord {
    support::approved(gate, sequence, card, TapKind::Entry, Mode::Metro, 5, at)
}

const CLONED: u64 = 6_222_000_000_000_777;

/// A journal of a cloned card, an ordinary rider and a lost card tried at two gates.
async fn write_journal(state: &std::path::Path) -> std::path::PathBuf {
    let journal = support::TestJournal::open(state);
    let t0 = 1_795_939_200_000;
    let ordinary = 6_222_000_000_000_888;
    journal
        .append(vec![
            // The clone: two entries at two stations two minutes apart.
            metro_entry(30_001, 1, CLONED, t0),
            metro_entry(30_002, 1, CLONED, t0 + 120_000),
            // An ordinary rider who forgot to tap out enters again in the evening.
            metro_entry(30_001, 2, ordinary, t0),
            metro_entry(30_003, 1, ordinary, t0 + 9 * 3_600_000),
            // A lost card tried at two gates.
            denied_lost(30_004, 1, 6_222_000_000_000_999, t0 + 600_000),
            denied_lost(30_005, 1, 6_222_000_000_000_999, t0 + 900_000),
        ])
        .await;
    let dir = journal.settings.dir.clone();
    journal.close();
    dir
}

#[tokio::test]
async fn a_clone_and_a_lost_card_tried_again_are_named_by_pseudonym_and_a_rider_is_not() {
    let state = tempfile::tempdir().unwrap();
    let journal = write_journal(state.path()).await;
    let redis = support::RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "watch",
            "journal",
            "--json",
            "--record",
            "--redis-url",
            &redis.url(),
        ])
        .arg("--dir")
        .arg(&journal)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let alerts: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rules: Vec<&str> = alerts.iter().filter_map(|a| a["rule"].as_str()).collect();
    assert_eq!(rules, ["clone", "denied_retry"], "{stdout}");
    assert_eq!(alerts[0]["gates"], serde_json::json!([30_001, 30_002]));
    assert_eq!(alerts[1]["gates"], serde_json::json!([30_004, 30_005]));
    assert!(!stdout.contains("6222000000000"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("6 decided taps (4 approved): 2 alerts"),
        "{stderr}"
    );

    // Kept in Redis: listed by rule, and none outside the window asked for.
    let list = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["alerts", "--json", "--redis-url", &redis.url()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(list(&["--since", "1d"]), 2);
    assert_eq!(list(&["--since", "1d", "--rule", "denied_retry"]), 1);
    assert_eq!(list(&["--since", "1d", "--rule", "velocity"]), 0);
    let bad = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["alerts", "--since", "1y", "--redis-url", &redis.url()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("30m, 24h, 7d"));
}

/// With `[actions] block = ["clone"]` the cloned card is blocked in the directory and the
/// action is recorded; without `--record` such rules are refused rather than acted on silently.
#[tokio::test]
async fn a_blocking_rule_blocks_the_card_and_records_it() {
    use tapgate_city::CardState;
    let state = tempfile::tempdir().unwrap();
    let journal = write_journal(state.path()).await;
    let redis = support::RedisServer::start();
    let directory = support::redis_directory(&redis.url());
    let active = support::card(
        CLONED,
        CardState::Active,
        Issuer::ChongqingSsc,
        Concession::None,
        0,
    );
    directory.put_card(active).await.unwrap();
    let rules = state.path().join("rules.toml");
    let text = tapgate_watch::DEFAULT_RULES_TOML.replace("block = []", "block = [\"clone\"]");
    assert_ne!(text, tapgate_watch::DEFAULT_RULES_TOML);
    std::fs::write(&rules, text).unwrap();
    let watch = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(["watch", "journal", "--redis-url", &redis.url(), "--dir"])
            .arg(&journal)
            .arg("--rules")
            .arg(&rules)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = watch(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--record"));
    assert_eq!(
        directory.card(CLONED).await.unwrap().unwrap().state,
        CardState::Active
    );

    let out = watch(&["--record"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        directory.card(CLONED).await.unwrap().unwrap().state,
        CardState::Blocked
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let audit: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("tapgate:watch:actions")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let entry = &audit[0].1[0].1;
    assert!(
        entry.contains("\"outcome\":\"blocked\"") && entry.contains("\"rule\":\"clone\""),
        "{entry}"
    );
    assert!(!entry.contains("6222000000000777"), "{entry}");
}
