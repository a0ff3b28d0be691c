//! `tapgate conformance gateway` against the project's own gateway (every rule passes) and
//! against the bare QUIC echo baseline, which speaks none of the protocol (it must fail).

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
        text.lines().filter(|l| l.starts_with("PASS")).count() >= 15,
        "{text}"
    );
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
