//! Shared pieces of the end-to-end tests: a private redis-server per test, a gateway on
//! 127.0.0.1 with a development certificate, and gates to talk to it.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapgate_gateway::card::{CardRecord, CardState};
use tapgate_gateway::directory::{
    Directory, EmbeddedDirectory, RedisDirectory, RedisSettings, TerminalRecord,
};
use tapgate_gateway::journal::JournalSettings;
use tapgate_gateway::policy::Policy;
use tapgate_gateway::server::{Gateway, GatewaySettings, Limits, now_ms};
use tapgate_gateway::tls::TlsSource;
use tapgate_loadgen::client::{GateClient, GateIdentity, client_endpoint};
use tapgate_protocol::{AreaCode, Concession, Issuer, KeyRing, MasterKey, Mode, Tap, TapKind};

pub const MASTER_V1: [u8; 16] = [0x11; 16];

pub fn keys() -> KeyRing {
    let mut ring = KeyRing::new();
    ring.insert(1, MasterKey::new(MASTER_V1));
    ring
}

/// A redis-server of this test's own, on a free loopback port, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    persistent: bool,
}

impl RedisServer {
    /// A Redis that keeps nothing across restarts.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// A Redis with an append-only file synced on every write: a restart keeps everything
    /// it acknowledged, as a production Redis with `appendfsync always` would.
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
            persistent,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts again on the same port: with its data when persistent, empty if not.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn directory(&self) -> Directory {
        Directory::Redis(
            RedisDirectory::connect(&RedisSettings {
                url: self.url(),
                key_prefix: "tapgate".into(),
                response_timeout: Duration::from_millis(300),
            })
            .expect("redis directory"),
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The body of `GET path` from a local HTTP endpoint such as an ops endpoint.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn settings(directory: Directory, state_dir: &Path) -> GatewaySettings {
    GatewaySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: TlsSource::Dev {
            dir: state_dir.join("cert"),
        },
        keys: keys(),
        limits: Limits::default(),
        policy: Policy::embedded_default(),
        journal: JournalSettings {
            dir: state_dir.join("journal"),
            segment_bytes: 1 << 20,
            queue_capacity: 4096,
            max_batch: 256,
            min_sync_interval: Duration::from_micros(200),
        },
        directory,
        negative_ttl_ms: 2_000,
        cache_capacity: 100_000,
        log_salt: [7; 16],
    }
}

pub struct Harness {
    pub gateway: Gateway,
    pub endpoint: quinn::Endpoint,
    pub state: PathBuf,
}

impl Harness {
    pub async fn start(directory: Directory, state: &Path) -> Harness {
        Self::start_with(settings(directory, state)).await
    }

    pub async fn start_with(settings: GatewaySettings) -> Harness {
        let state = settings.journal.dir.parent().unwrap().to_owned();
        let gateway = Gateway::start(settings).await.expect("gateway starts");
        let endpoint =
            client_endpoint(gateway.certificate_der(), "127.0.0.1:0".parse().unwrap()).unwrap();
        Harness {
            gateway,
            endpoint,
            state,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }

    pub async fn gate(&self, terminal: &TerminalRecord) -> GateClient {
        GateClient::connect(
            &self.endpoint,
            self.addr(),
            &identity(terminal),
            rand_nonce(),
            now_ms(),
        )
        .await
        .expect("gate connects")
    }
}

pub fn identity(t: &TerminalRecord) -> GateIdentity {
    GateIdentity {
        terminal_id: t.terminal_id,
        key_version: 1,
        key: MasterKey::new(MASTER_V1).diversify(t.terminal_id),
        area: t.area,
        mode: t.mode,
        operator: t.operator,
    }
}

pub fn rand_nonce() -> u64 {
    now_ms().rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15
}

pub const YUZHONG_BUS: TerminalRecord = TerminalRecord {
    terminal_id: 5001,
    area: AreaCode(500103),
    mode: Mode::Bus,
    operator: 1,
};
pub const WANZHOU_BUS: TerminalRecord = TerminalRecord {
    terminal_id: 5002,
    area: AreaCode(500101),
    mode: Mode::Bus,
    operator: 6,
};
pub const CHENGKOU_BUS: TerminalRecord = TerminalRecord {
    terminal_id: 5003,
    area: AreaCode(500229),
    mode: Mode::Bus,
    operator: 6,
};
pub const YUZHONG_METRO: TerminalRecord = TerminalRecord {
    terminal_id: 5004,
    area: AreaCode(500103),
    mode: Mode::Metro,
    operator: 2,
};

pub fn card(
    card_id: u64,
    state: CardState,
    issuer: Issuer,
    concession: Concession,
    rides: u32,
) -> CardRecord {
    CardRecord {
        card_id,
        state,
        issuer,
        concession,
        rides_left: rides,
        expires_on: None,
    }
}

pub fn embedded_with(cards: &[CardRecord]) -> (Arc<EmbeddedDirectory>, Directory) {
    let dir = Arc::new(EmbeddedDirectory::default());
    for c in cards {
        dir.put_card(*c);
    }
    for t in [YUZHONG_BUS, WANZHOU_BUS, CHENGKOU_BUS, YUZHONG_METRO] {
        dir.put_terminal(t);
    }
    (dir.clone(), Directory::Embedded(dir))
}

/// The gateway's answer to one tap; any transport or protocol error fails the test.
pub async fn answer(gate: &mut GateClient, tap: Tap) -> tapgate_protocol::TapResult {
    gate.tap(tap).await.expect("the tap is answered")
}

pub fn tap(sequence: u64, card_id: u64, kind: TapKind) -> Tap {
    Tap {
        sequence,
        card_id,
        issuer: Issuer::ChongqingSsc,
        kind,
        line: 2,
        stop: 15,
        gate_time_ms: now_ms(),
    }
}

/// Writes the test gates and one active Chongqing card into a directory.
pub async fn provision(directory: &Directory, card_id: u64) {
    directory
        .put_terminals(&[YUZHONG_BUS, WANZHOU_BUS, YUZHONG_METRO])
        .await
        .unwrap();
    directory
        .put_card(card(
            card_id,
            CardState::Active,
            Issuer::ChongqingSsc,
            Concession::None,
            0,
        ))
        .await
        .unwrap();
}
