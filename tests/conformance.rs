//! `tapgate conformance gateway` against the project's own gateway (every rule passes) and
//! against the bare QUIC echo baseline, which speaks none of the protocol (it must fail);
//! `tapgate conformance gate` against the project's own gate, the load generator (every rule
//! passes), and against the same gate made to misbehave (it must fail).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::free_port;

fn tapgate(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    command.args(args);
    command
}

/// Starts a server process and waits for the certificate it writes.
fn start(mut command: Command, cert: &std::path::Path) -> Child {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cert.exists() {
        assert!(
            Instant::now() < deadline,
            "no certificate at {}",
            cert.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The certificate is written before the socket is bound.
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn conformance(port: u16, cert: &std::path::Path) -> (bool, String) {
    let out = tapgate(&["conformance", "gateway"])
        .args(["--target", &format!("127.0.0.1:{port}")])
        .arg("--cert")
        .arg(cert)
        .args(["--cards", "2000", "--terminals", "20"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_gateway_keeps_every_rule_a_gate_can_observe() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let cert = state.path().join("cert").join("cert.der");
    let mut serve = tapgate(&["serve", "--embedded"]);
    serve
        .args(["--embedded-cards", "2000", "--embedded-terminals", "20"])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--ops-listen",
            "off",
        ])
        .arg("--dev-cert-dir")
        .arg(state.path().join("cert"))
        .arg("--journal-dir")
        .arg(state.path().join("journal"));
    let mut gateway = start(serve, &cert);
    let (ok, text) = conformance(port, &cert);
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    assert!(ok, "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(
        text.lines().filter(|l| l.starts_with("PASS")).count() >= 23,
        "{text}"
    );
    for rule in [
        "PASS  4.7 an offline tap is receipted recorded",
        "PASS  4.6 a gate holding the gateway's version of another history",
    ] {
        assert!(text.contains(rule), "{text}");
    }
}

#[test]
fn a_server_that_only_echoes_fails_conformance() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let cert = state.path().join("cert.der");
    let mut echo = tapgate(&["echo"]);
    echo.args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--dev-cert-dir")
        .arg(state.path());
    let mut server = start(echo, &cert);
    let (ok, text) = conformance(port, &cert);
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("FAIL  7 a bad tag is bad_mac"), "{text}");
}

/// Runs the referee for `gates` gates and `tapgate load` with `load_args` against it for
/// `load_for`; returns the referee's verdict and report.
fn referee_with_load(
    gates: usize,
    load_for: &str,
    timeout: &str,
    referee_args: &[&str],
    load_args: &[&str],
) -> (bool, String) {
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let cert = state.path().join("cert.der");
    let mut referee = tapgate(&["conformance", "gate"]);
    referee
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--dev-cert-dir")
        .arg(state.path())
        .args(["--gates", &gates.to_string(), "--timeout", timeout])
        .args(referee_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let referee = referee.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cert.exists() {
        assert!(
            Instant::now() < deadline,
            "the referee wrote no certificate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let load = tapgate(&["load"])
        .args(["--target", &format!("127.0.0.1:{port}")])
        .arg("--cert")
        .arg(&cert)
        .args(["--connections", &gates.to_string(), "--duration", load_for])
        .args(["--no-gateway-metrics", "--chart"])
        .arg(state.path().join("load.svg"))
        .args(load_args)
        .output()
        .unwrap();
    let out = referee.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        format!("{text}\nload:\n{}", String::from_utf8_lossy(&load.stdout)),
    )
}

#[test]
fn the_load_generator_keeps_every_rule_the_referee_checks_pipelining_and_in_closed_loop() {
    // Open loop with answers held 20 ms: three gates at 200 taps/s each run into
    // max_in_flight 2 and must hold their taps back.
    let (ok, text) = referee_with_load(
        3,
        "8s",
        "20s",
        &["--max-in-flight", "2", "--answer-delay-ms", "20"],
        &["--rate", "600"],
    );
    assert!(ok, "{text}");
    assert!(
        !text.contains("FAIL") && !text.contains("NOT EXERCISED"),
        "{text}"
    );
    assert!(text.contains("at most 2 of 2 outstanding"), "{text}");
    assert!(text.contains("3 of 3 gate(s) completed"), "{text}");

    let (ok, text) = referee_with_load(1, "8s", "20s", &[], &["--closed-loop"]);
    assert!(ok, "{text}");
    assert!(text.contains("16 passed, 0 failed"), "{text}");
}

/// With `--protocol 2` the referee also keeps a deny list, sends the offline rules, and checks
/// what a gate acknowledges and uploads: the load generator's gate, riding offline twice for
/// 2 s (the second time under rules allowing no fare, sent once it has uploaded the first
/// spell's taps in the 2 s between), keeps all 23 rules; the same gate never losing its link
/// leaves the upload rules unexercised, and the run fails.
#[test]
fn a_version_2_gate_that_rides_offline_keeps_every_rule_the_referee_checks() {
    let (ok, text) = referee_with_load(
        1,
        "12s",
        "30s",
        &["--protocol", "2"],
        &[
            "--rate",
            "100",
            "--protocol",
            "2",
            "--offline",
            "1",
            "--offline-for",
            "2s",
            "--offline-spells",
            "2",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("23 passed, 0 failed"), "{text}");
    assert!(text.contains("1 of 1 gate(s) completed"), "{text}");
    // Some whole list came in more than one part.
    let deny = text
        .lines()
        .find(|l| l.starts_with("deny list:"))
        .unwrap_or_else(|| panic!("{text}"));
    let count = |what: &str| -> u64 {
        let before = &deny[..deny.find(what).unwrap_or_else(|| panic!("{deny}"))];
        before.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert!(count(" list parts") > count(" whole lists"), "{deny}");

    let (ok, text) = referee_with_load(1, "8s", "8s", &["--protocol", "2"], &["--protocol", "2"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("NOT EXERCISED  4.7 taps kept offline are uploaded"),
        "{text}"
    );
}

#[test]
fn a_gate_that_sends_bad_tags_and_old_sequences_fails_the_referee() {
    // This gate never completes the script: the referee gives up after its timeout.
    let (ok, text) = referee_with_load(
        1,
        "8s",
        "8s",
        &[],
        &["--rate", "200", "--bad-mac", "0.2", "--replay", "0.2"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL  4.3/5.2 every Tap is well formed and tagged"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  6 a new tap's sequence is above every sequence used before")
            || text.contains("FAIL  6 a resend is the same frame"),
        "{text}"
    );
}
