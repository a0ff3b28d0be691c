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
use tapgate_gateway::node::{Node, NodeParts};
use tapgate_gateway::policy::Policy;
use tapgate_gateway::server::{Gateway, GatewaySettings, Limits};
use tapgate_journal::JournalSettings;
use tapgate_loadgen::client::{GateClient, GateIdentity, client_endpoint};
use tapgate_protocol::{
    AreaCode, Concession, Frame, GateDenyList, Issuer, KeyRing, MasterKey, Mode, Tap, TapKind,
};
use tapgate_runtime::now_ms;
use tapgate_transport::tls::TlsSource;

pub(crate) const MASTER_V1: [u8; 16] = [0x11; 16];

pub(crate) fn keys() -> KeyRing {
    let mut ring = KeyRing::new();
    ring.insert(1, MasterKey::new(MASTER_V1));
    ring
}

/// A redis-server of this test's own, on a free loopback port, stopped when dropped.
pub(crate) struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    persistent: bool,
}

impl RedisServer {
    /// A Redis that keeps nothing across restarts.
    pub(crate) fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// A Redis with an append-only file synced on every write: a restart keeps everything
    /// it acknowledged, as a production Redis with `appendfsync always` would.
    pub(crate) fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir for redis"),
            child: None,
            persistent,
        };
        // A port picked free can be taken by another test's server before ours binds it;
        // then ours exits and we try another.
        for _ in 0..5 {
            if server.try_spawn() {
                return server;
            }
            server.port = free_port();
        }
        panic!("redis-server did not start on five free ports");
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server did not start again on port {} (taken by another process?)",
            self.port
        );
    }

    /// Starts redis-server on our port; false when it exits (the port is taken).
    fn try_spawn(&mut self) -> bool {
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
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ours answers with our process id, not another test's server on the same port.
        while serving_pid(self.port) != Some(pid) {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts again on the same port: with its data when persistent, empty if not.
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub(crate) fn directory(&self) -> Directory {
        Directory::Redis(
            RedisDirectory::connect(&RedisSettings {
                url: self.url(),
                tls_ca_file: None,
                key_prefix: "tapgate".into(),
                response_timeout: Duration::from_millis(300),
                wait_replicas: 0,
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

/// A Redis Cluster of this test's own: six redis-server processes on free loopback ports,
/// three masters each with one replica, every write appended to disk and synced. Stopped when
/// dropped.
pub(crate) struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: tempfile::TempDir,
    /// A replica stopped by `cut_off_replica_of`, resumed once its master is killed.
    stopped_replica: Option<u16>,
    /// One cluster at a time per test binary: six servers, a gateway and its load already fill
    /// two cores, and a starved node misses heartbeats and fails over when nobody asked it to.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct ClusterNode {
    port: u16,
    child: Option<Child>,
}

/// How long a cluster node may be silent before its replica takes over: long enough that a node
/// briefly starved of CPU by the rest of the suite is not failed over.
const CLUSTER_NODE_TIMEOUT_MS: u64 = 3000;

impl RedisCluster {
    pub(crate) fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
            stopped_replica: None,
            // A test that failed while holding it poisons it; the next may still run.
            _one_at_a_time: ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner()),
        };
        let mut attempts = 0;
        while cluster.nodes.len() < 6 {
            let port = cluster.free_node_port();
            cluster.nodes.push(ClusterNode { port, child: None });
            // A port picked free can be taken by another test's server before ours binds it;
            // then ours exits and this node tries another.
            if !cluster.try_spawn(cluster.nodes.len() - 1) {
                cluster.nodes.pop();
                attempts += 1;
                assert!(
                    attempts < 10,
                    "cluster nodes keep finding their ports taken"
                );
            }
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (it comes with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ready(Duration::from_secs(30));
        cluster
    }

    /// A free port whose cluster bus port (+10000) is free too.
    fn free_node_port(&self) -> u16 {
        loop {
            let port = free_port();
            if port <= 55_000
                && self.nodes.iter().all(|n| n.port != port)
                && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                return port;
            }
        }
    }

    /// Starts node `i`; false when it exits (its port is taken).
    fn try_spawn(&mut self, i: usize) -> bool {
        let port = self.nodes[i].port;
        let node_dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&node_dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args([
                "--cluster-node-timeout",
                &CLUSTER_NODE_TIMEOUT_MS.to_string(),
            ])
            // A replica takes over however long ago it last heard from its master.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let pid = child.id();
        self.nodes[i].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ours answers with our process id, not another test's server on the same port.
        while serving_pid(port) != Some(pid) {
            let exited = self.nodes[i]
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.nodes[i].child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "cluster node {port} did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub(crate) fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}/", seeds.join(","))
    }

    /// Waits until every running node sees all 16384 slots served and every running replica
    /// is in sync with its master.
    pub(crate) fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let serving = node_query(n.port, &["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                });
                // A replica counts once it has copied its master (a failover before that
                // would lose everything).
                let replicating = node_query(n.port, &["INFO", "replication"]).is_some_and(|r| {
                    r.contains("role:master") || r.contains("master_link_status:up")
                });
                serving && replicating
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port of the master that serves `key`'s slot now; `None` while none does (during a
    /// failover).
    pub(crate) fn master_of(&self, key: &str) -> Option<u16> {
        let any = self.nodes.iter().find(|n| n.child.is_some()).unwrap().port;
        let slot: u16 = node_query(any, &["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .unwrap();
        let nodes = node_query(any, &["CLUSTER", "NODES"]).unwrap();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let addr = fields[1].split('@').next().unwrap();
                return addr.rsplit_once(':').unwrap().1.parse().ok();
            }
        }
        None
    }

    /// Stops the replica of the master serving `key` and closes its link, so what is written to
    /// that master from now on reaches no replica: `kill_master_of` then loses it, as a master
    /// that dies before its replica copied its newest writes does. Keep the cut short (well
    /// under the node timeout), or the cluster fails the replica.
    pub(crate) fn cut_off_replica_of(&mut self, key: &str) {
        let master = self.master_of(key).expect("a master serves the key");
        // The master's own word on its replica: the cluster's node table can take a while to
        // show a node that was made a replica.
        let info = node_query(master, &["INFO", "replication"]).unwrap();
        let replica: u16 = info
            .lines()
            .find_map(|l| l.strip_prefix("slave0:"))
            .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("port=")))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("{master} has no replica:\n{info}"));
        self.signal(replica, "STOP");
        self.stopped_replica = Some(replica);
        node_query(master, &["CLIENT", "KILL", "TYPE", "replica"]).expect("the link closed");
    }

    /// SIGKILLs the master serving `key` and waits until its replica has taken over.
    pub(crate) fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self.master_of(key).expect("a master serves the key");
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        let mut child = node.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        if let Some(replica) = self.stopped_replica.take() {
            self.signal(replica, "CONT");
        }
        // The survivors notice after the node timeout; a replica is then elected.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.master_of(key).is_none_or(|p| p == port) {
            assert!(
                Instant::now() < deadline,
                "no replica took over from {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ready(Duration::from_secs(30));
        port
    }
}

impl RedisCluster {
    /// Sends the node on `port` a signal (`STOP`, `CONT`).
    fn signal(&self, port: u16, signal: &str) {
        let node = self.nodes.iter().find(|n| n.port == port).unwrap();
        let pid = node.child.as_ref().unwrap().id().to_string();
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status();
        assert!(sent.unwrap().success(), "kill -{signal} {pid}");
    }

    /// Kills every node and starts them again on their ports, with their data: the cluster
    /// comes back from its append-only files and configuration.
    pub(crate) fn restart_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for i in 0..self.nodes.len() {
            assert!(
                self.try_spawn(i),
                "cluster node {} did not start again",
                self.nodes[i].port
            );
        }
        self.wait_ready(Duration::from_secs(30));
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The process id of the Redis answering on a port.
fn serving_pid(port: u16) -> Option<u32> {
    node_query(port, &["INFO", "server"])?
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// One command to one node, as text; `None` when the node does not answer.
fn node_query(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

/// A card directory on a single Redis or a cluster.
pub(crate) fn redis_directory(url: &str) -> Directory {
    prefixed_directory(url, "tapgate")
}

/// A card directory whose writes wait for one replica, at most 600 ms (three quarters of its
/// response timeout): a slot left without a replica after a failover costs every later write
/// that wait.
pub(crate) fn replicated_directory(url: &str) -> Directory {
    Directory::Redis(
        RedisDirectory::connect(&RedisSettings {
            url: url.to_owned(),
            tls_ca_file: None,
            key_prefix: "tapgate".into(),
            response_timeout: Duration::from_millis(800),
            wait_replicas: 1,
        })
        .expect("redis directory"),
    )
}

/// A card directory under keys of its own, beside the gateways' `tapgate` ones.
pub(crate) fn prefixed_directory(url: &str, key_prefix: &str) -> Directory {
    Directory::Redis(
        RedisDirectory::connect(&RedisSettings {
            url: url.to_owned(),
            tls_ca_file: None,
            key_prefix: key_prefix.into(),
            response_timeout: Duration::from_millis(1000),
            wait_replicas: 0,
        })
        .expect("redis directory"),
    )
}

/// The body of `GET path` from a local HTTP endpoint such as an ops endpoint.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http_get_any(addr, path);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    body
}

/// The status line and body of `GET path`, whatever the status.
pub(crate) fn http_get_any(addr: SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Serves a gateway's ops endpoint on a free loopback port until the handle is aborted.
pub(crate) async fn ops_endpoint(
    counters: tapgate_runtime::ops::Exposition,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(tapgate_runtime::ops::serve(listener, counters)),
    )
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn settings(directory: Directory, state_dir: &Path) -> GatewaySettings {
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

pub(crate) struct Harness {
    pub gateway: Gateway,
    pub endpoint: quinn::Endpoint,
    pub state: PathBuf,
}

impl Harness {
    pub(crate) async fn start(directory: Directory, state: &Path) -> Harness {
        Self::start_with(settings(directory, state)).await
    }

    /// A gateway alone, started through the composition root as `serve` starts one.
    pub(crate) async fn start_with(settings: GatewaySettings) -> Harness {
        let state = settings.journal.dir.parent().unwrap().to_owned();
        let Node { gateway, .. } = Node::assemble(NodeParts {
            gateway: settings,
            settlement: None,
            ledger_file: state.join("ledger.json"),
        })
        .await
        .expect("gateway starts");
        let endpoint =
            client_endpoint(gateway.certificate_der(), "127.0.0.1:0".parse().unwrap()).unwrap();
        Harness {
            gateway,
            endpoint,
            state,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }

    pub(crate) async fn gate(&self, terminal: &TerminalRecord) -> GateClient {
        self.gate_with(terminal, None).await
    }

    /// A gate connecting with its own TLS configuration, or the endpoint's.
    async fn gate_with(
        &self,
        terminal: &TerminalRecord,
        tls: Option<&quinn::ClientConfig>,
    ) -> GateClient {
        GateClient::connect_with(
            &self.endpoint,
            tls,
            self.addr(),
            &identity(terminal),
            rand_nonce(),
            now_ms(),
        )
        .await
        .expect("gate connects")
    }
}

impl Harness {
    /// A gate that offers protocol version 2 (and 1).
    pub(crate) async fn gate_v2(&self, terminal: &TerminalRecord) -> GateClient {
        let tls = tapgate_transport::tls::GateTls::new(
            self.gateway.certificate_der(),
            tapgate_transport::tls::Resumption::Full,
            tapgate_protocol::Version::V2,
        )
        .and_then(|tls| tls.for_one_gate())
        .unwrap();
        self.gate_with(terminal, Some(&tls)).await
    }
}

pub(crate) fn identity(t: &TerminalRecord) -> GateIdentity {
    GateIdentity {
        terminal_id: t.terminal_id,
        key_version: 1,
        key: MasterKey::new(MASTER_V1).diversify(t.terminal_id),
        area: t.area,
        mode: t.mode,
        operator: t.operator,
    }
}

pub(crate) fn rand_nonce() -> u64 {
    now_ms().rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15
}

pub(crate) const YUZHONG_BUS: TerminalRecord = TerminalRecord {
    terminal_id: 5001,
    area: AreaCode(500103),
    mode: Mode::Bus,
    operator: 1,
};
pub(crate) const WANZHOU_BUS: TerminalRecord = TerminalRecord {
    terminal_id: 5002,
    area: AreaCode(500101),
    mode: Mode::Bus,
    operator: 6,
};
pub(crate) const CHENGKOU_BUS: TerminalRecord = TerminalRecord {
    terminal_id: 5003,
    area: AreaCode(500229),
    mode: Mode::Bus,
    operator: 6,
};
pub(crate) const YUZHONG_METRO: TerminalRecord = TerminalRecord {
    terminal_id: 5004,
    area: AreaCode(500103),
    mode: Mode::Metro,
    operator: 2,
};

pub(crate) fn card(
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
        grade: None,
        // The shipped policy's example first area to carry concessions on the social security
        // card, so an elder card here has its concession.
        home_area: Some(AreaCode(500103)),
        rides_left: rides,
        rides_period: None,
        renews_on: None,
        expires_on: None,
    }
}

/// The shipped policy with no double-tap window, for tests that tap one card at one bus again
/// and again to count rides rather than to repeat a boarding.
pub(crate) fn policy_counting_every_boarding() -> tapgate_gateway::policy::Policy {
    let mut policy = tapgate_gateway::policy::Policy::embedded_default();
    policy.bus_double_tap_window_ms = 0;
    policy
}

pub(crate) fn embedded_with(cards: &[CardRecord]) -> (Arc<EmbeddedDirectory>, Directory) {
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
pub(crate) async fn answer(gate: &mut GateClient, tap: Tap) -> tapgate_protocol::TapResult {
    gate.tap(tap).await.expect("the tap is answered")
}

/// Every record in the journal of the gateway whose state directory is `state`.
pub(crate) fn journaled(state: &Path) -> Vec<tapgate_journal::JournalRecord> {
    let mut records = Vec::new();
    for segment in tapgate_journal::list_segments(&state.join("journal")).unwrap() {
        tapgate_journal::read_segment(&segment, |r| records.push(r)).unwrap();
    }
    records
}

/// The next OfflineReceipt, past any deny-list frame and the offline rules.
pub(crate) async fn next_receipt(gate: &mut GateClient) -> tapgate_protocol::OfflineReceipt {
    use tapgate_protocol::Frame;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), gate.recv())
            .await
            .expect("a receipt arrives")
            .unwrap();
        match frame {
            Frame::OfflineReceipt(receipt) => return receipt,
            Frame::DenyChanges(_) | Frame::DenyList(_) | Frame::OfflineRules(_) => {}
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
}

pub(crate) fn tap(sequence: u64, card_id: u64, kind: TapKind) -> Tap {
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
pub(crate) async fn provision(directory: &Directory, card_id: u64) {
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

/// An approved tap as a gateway journals it.
pub(crate) fn approved(
    terminal_id: u64,
    sequence: u64,
    card: u64,
    kind: tapgate_protocol::TapKind,
    mode: tapgate_protocol::Mode,
    stop: u16,
    at: u64,
) -> tapgate_journal::JournalRecord {
    use tapgate_protocol::{
        Concession, Issuer, Outcome, RIDES_LEFT_NOT_APPLICABLE, Reason, TapResult,
    };
    let mut record = tapgate_journal::JournalRecord {
        terminal_id,
        tag: [0; 16],
        tap: tap(sequence, card, kind),
        server_time_ms: at,
        area: 500103,
        mode,
        operator: if mode == tapgate_protocol::Mode::Metro {
            2
        } else {
            1
        },
        result: TapResult {
            sequence,
            outcome: Outcome::Approve,
            reason: Reason::Approved,
            concession: Concession::None,
            fare_fen: 0,
            rides_left: RIDES_LEFT_NOT_APPLICABLE,
        },
        pay_percent: 100,
        repeat_boarding: false,
        uploaded_ms: None,
    };
    record.tap.issuer = Issuer::ChongqingSsc;
    record.tap.stop = stop;
    record.tap.gate_time_ms = at;
    record
}

/// A journal of the test's own, written record by record.
pub(crate) struct TestJournal {
    pub(crate) settings: tapgate_journal::JournalSettings,
    pub(crate) journal: tapgate_journal::Journal,
    writer: tapgate_journal::JournalWriter,
}

impl TestJournal {
    pub(crate) fn open(dir: &Path) -> TestJournal {
        let settings = tapgate_journal::JournalSettings {
            dir: dir.join("journal"),
            segment_bytes: 1 << 20,
            queue_capacity: 64,
            max_batch: 64,
            min_sync_interval: Duration::ZERO,
        };
        let (journal, writer) = tapgate_journal::Journal::open(&settings, |_| {}).unwrap();
        TestJournal {
            settings,
            journal,
            writer,
        }
    }

    pub(crate) async fn append(&self, records: Vec<tapgate_journal::JournalRecord>) {
        for r in records {
            self.journal
                .append_durable(r)
                .unwrap()
                .await
                .unwrap()
                .unwrap();
        }
    }

    pub(crate) fn close(self) {
        drop(self.journal);
        self.writer.join();
    }
}

/// Every `tapgate_…` metric name a text mentions.
pub(crate) fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("tapgate_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The page at `/` as headless Chromium leaves it after a few seconds of its own updates.
pub(crate) fn rendered_page(ops: std::net::SocketAddr, profile: &std::path::Path) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{ops}/"))
        .output()
        .expect("chromium must be installed (scripts/test installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number the page shows in the element with this id.
pub(crate) fn shown(page: &str, id: &str) -> u64 {
    let at = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in\n{page}"));
    let text = &page[at..];
    let value = &text[text.find('>').unwrap() + 1..text.find('<').unwrap()];
    value
        .parse()
        .unwrap_or_else(|_| panic!("#{id} shows `{value}`"))
}

/// Reads deny-list frames into `list` until it holds `version`, acknowledging as a gate does;
/// the frames read, the offline rules among them.
pub(crate) async fn follow_until(
    gate: &mut GateClient,
    list: &mut GateDenyList,
    version: u64,
) -> Vec<Frame> {
    follow_while(gate, list, |list| list.version() != version).await
}

/// Reads deny-list frames into `list` while `lacking` says it lacks what it should hold,
/// acknowledging as a gate does; the frames read, the offline rules among them.
pub(crate) async fn follow_while(
    gate: &mut GateClient,
    list: &mut GateDenyList,
    lacking: impl Fn(&GateDenyList) -> bool,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    while lacking(list) {
        let frame = tokio::time::timeout(Duration::from_secs(5), gate.recv())
            .await
            .expect("the deny list arrives")
            .unwrap();
        if matches!(frame, Frame::OfflineRules(_)) {
            frames.push(frame);
            continue;
        }
        let ack = list
            .apply(&frame)
            .unwrap_or_else(|| panic!("expected a deny-list frame, got {frame:?}"))
            .unwrap();
        if let Some(ack) = ack {
            gate.send_frame(&Frame::DenyAck(ack)).await.unwrap();
        }
        frames.push(frame);
    }
    frames
}

/// Settlement partitions of the tests that settle on Redis.
pub(crate) const PARTITIONS: u16 = 4;

/// Settlement settings for a test gateway `node` shipping the journal in `journal_dir`:
/// [`PARTITIONS`], one settler, a short lease, the shipped watch feed and order window.
pub(crate) fn test_settlement(
    node: &str,
    journal_dir: PathBuf,
) -> tapgate_settle::SettlementSettings {
    tapgate_settle::SettlementSettings {
        node: node.into(),
        journal_dir,
        partitions: PARTITIONS,
        settlers: 1,
        batch: 64,
        max_backlog: 100_000,
        lease_ttl: Duration::from_millis(1000),
        watch_feed: tapgate_settle::forwarder::WATCH_FEED,
        order_window: Duration::from_millis(tapgate_gateway::config::DEFAULT_ORDER_WINDOW_MS),
    }
}
