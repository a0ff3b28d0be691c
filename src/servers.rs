//! Servers a bench starts as processes of its own on loopback: the echo and the gateway
//! (`tapgate serve`, embedded or on Redis), and private redis-servers (one, or a six-node
//! Redis Cluster) holding a population. Each is stopped, and its files removed, when dropped.

use crate::scrape::{self, OpsClient};
use anyhow::Context as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::config::DEV_MASTER_KEY_HEX;

/// Which server a run measures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Server {
    Echo,
    /// The embedded gateway, with this configuration file when one is given.
    Embedded(Option<PathBuf>),
    /// `gateways` gateways on the Redis (or Redis Cluster) at `url`, with this order window
    /// and this UDP socket buffer when they are given.
    Redis {
        url: String,
        gateways: usize,
        order_window_ms: Option<u64>,
        udp_buffer_bytes: Option<usize>,
    },
}

impl Server {
    /// How many processes serve the gates.
    pub(crate) fn processes(&self) -> usize {
        match self {
            Server::Redis { gateways, .. } => *gateways,
            Server::Echo | Server::Embedded(_) => 1,
        }
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Server::Echo => "echo",
            Server::Embedded(_) => "embedded gateway",
            Server::Redis { gateways: 1, .. } => "Redis gateway",
            Server::Redis { .. } => "Redis gateways",
        })
    }
}

/// A server started for one run, stopped (and its files removed) when dropped.
pub(crate) struct Started {
    child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) cert: Vec<u8>,
    /// The gateway's ops endpoint, `http://HOST:PORT`, and a client to read it.
    pub(crate) ops: Option<(OpsClient, String)>,
    /// The server's working directory: the gateway's journal, and its ledger once an embedded
    /// gateway has stopped. Taken by [`Started::stop`] to be reconciled.
    dir: Option<tempfile::TempDir>,
}

/// How long an embedded gateway may take to stop: it waits up to 60 s for its settlers before
/// it writes its ledger.
const ORDERLY_STOP: Duration = Duration::from_secs(90);

impl Started {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT, for the server's orderly stop; true once it has exited within `within`.
    fn interrupt(&mut self, within: Duration) -> bool {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops the server in order and hands back its working directory.
    pub(crate) fn stop(mut self) -> anyhow::Result<tempfile::TempDir> {
        anyhow::ensure!(
            self.interrupt(ORDERLY_STOP),
            "the gateway did not stop within {} s",
            ORDERLY_STOP.as_secs()
        );
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "the gateway stopped with {status}");
        self.dir.take().context("the server's directory")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.interrupt(Duration::from_secs(10)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback port nothing listens on now.
fn free_port(udp: bool) -> anyhow::Result<u16> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    };
    Ok(port)
}

/// Writes a Redis gateway's configuration into its working directory `dir`.
fn redis_gateway_config(
    dir: &Path,
    url: &str,
    order_window_ms: Option<u64>,
    udp_buffer_bytes: Option<usize>,
) -> anyhow::Result<PathBuf> {
    // Each start ships a new journal, so it forwards under a node name of its own.
    let config = dir.join("tapgate.toml");
    let node = dir.file_name().map_or_else(
        || "bench".to_owned(),
        |name| name.to_string_lossy().into_owned(),
    );
    let order_window = order_window_ms
        .map(|ms| format!("order_window_ms = {ms}\n"))
        .unwrap_or_default();
    let server = udp_buffer_bytes
        .map(|bytes| format!("[server]\nudp_buffer_bytes = {bytes}\n\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "{server}[directory]\nkind = \"redis\"\nredis_url = \"{url}\"\n\n\
             [keys]\n\"1\" = \"{DEV_MASTER_KEY_HEX}\"\n\n\
             [settlement]\nnode = \"{node}\"\n{order_window}"
        ),
    )?;
    Ok(config)
}

pub(crate) async fn start(
    server: &Server,
    bin: &Path,
    population: &PopulationSpec,
) -> anyhow::Result<Started> {
    let dir = tempfile::Builder::new()
        .prefix("tapgate-bench-")
        .tempdir()?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port(true)?).parse()?;
    let cert_dir = dir.path().join("cert");
    let mut command = Command::new(bin);
    let mut ops_base = None;
    match server {
        Server::Echo => {
            command.arg("echo");
        }
        Server::Embedded(_) | Server::Redis { .. } => {
            let ops = format!("127.0.0.1:{}", free_port(false)?);
            command
                .arg("serve")
                .arg("--journal-dir")
                .arg(dir.path().join("journal"))
                .args(["--ops-listen", &ops, "--log", "warn"]);
            if let Server::Redis {
                url,
                order_window_ms,
                udp_buffer_bytes,
                ..
            } = server
            {
                let config =
                    redis_gateway_config(dir.path(), url, *order_window_ms, *udp_buffer_bytes)?;
                command.arg("--config").arg(config);
            } else {
                if let Server::Embedded(Some(config)) = server {
                    command.arg("--config").arg(config);
                }
                command
                    .args(["--embedded", "--embedded-terminals"])
                    .arg(population.terminals.to_string())
                    .arg("--embedded-cards")
                    .arg(population.cards.to_string());
            }
            ops_base = Some(format!("http://{ops}"));
        }
    }
    command
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--dev-cert-dir")
        .arg(&cert_dir)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    // Drained for the server's whole life, so its prints never block it; the echo's first line
    // comes once it listens.
    let (printed, first_line) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in BufReader::new(stdout).lines() {
            let _ = printed.send(());
        }
    });
    let mut started = Started {
        child,
        addr,
        cert: Vec::new(),
        ops: ops_base.map(|base| (scrape::ops_client(), base)),
        dir: Some(dir),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = started.child.try_wait()? {
            anyhow::bail!("the {server} exited at start: {status}");
        }
        if Instant::now() > deadline {
            anyhow::bail!("the {server} was not ready within 120 s");
        }
        let ready = match &started.ops {
            Some((client, base)) => scrape::get(client, &format!("{base}/readyz"))
                .await
                .is_ok_and(|(status, _)| status == 200),
            None => first_line.try_recv().is_ok(),
        };
        if ready {
            let cert_file = cert_dir.join(tapgate_transport::tls::DEV_CERT_FILE);
            started.cert = std::fs::read(&cert_file)
                .with_context(|| format!("reading {}", cert_file.display()))?;
            return Ok(started);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis servers of a bench's own on free loopback ports, holding the population; stopped
/// when dropped.
pub(crate) struct PrivateRedis {
    children: Vec<Child>,
    pub(crate) url: String,
    dir: tempfile::TempDir,
}

/// Cluster nodes of the cluster setup: three masters and a replica of each.
const CLUSTER_NODES: usize = 6;

impl PrivateRedis {
    /// One redis-server.
    pub(crate) fn start(bin: &Path, population: &PopulationSpec) -> anyhow::Result<PrivateRedis> {
        let mut redis = PrivateRedis::empty()?;
        let port = free_port(false)?;
        let dir = redis.dir.path().to_owned();
        redis.spawn(port, &dir, &[])?;
        redis.url = format!("redis://127.0.0.1:{port}/");
        redis.load(bin, population)?;
        Ok(redis)
    }

    /// A Redis Cluster of six redis-servers, created with `redis-cli --cluster create`.
    pub(crate) fn start_cluster(
        bin: &Path,
        population: &PopulationSpec,
    ) -> anyhow::Result<PrivateRedis> {
        let mut redis = PrivateRedis::empty()?;
        let mut ports = Vec::with_capacity(CLUSTER_NODES);
        while ports.len() < CLUSTER_NODES {
            // A node's cluster bus listens 10000 above its port.
            let port = free_port(false)?;
            if port <= 55_000
                && !ports.contains(&port)
                && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                ports.push(port);
            }
        }
        for &port in &ports {
            let node_dir = redis.dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            redis.spawn(
                port,
                &node_dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ],
            )?;
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create (it comes with redis-server)")?;
        anyhow::ensure!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ports.iter().all(|port| cluster_serves_every_slot(*port)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the private Redis Cluster did not serve every slot within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        redis.url = format!("redis+cluster://{}/", nodes.join(","));
        redis.load(bin, population)?;
        Ok(redis)
    }

    fn empty() -> anyhow::Result<PrivateRedis> {
        Ok(PrivateRedis {
            children: Vec::new(),
            url: String::new(),
            dir: tempfile::Builder::new()
                .prefix("tapgate-bench-redis-")
                .tempdir()?,
        })
    }

    /// Starts a redis-server on `port` and waits until it listens.
    fn spawn(&mut self, port: u16, dir: &Path, extra: &[&str]) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting redis-server for the Redis setups (install it, or pass --setups embedded)",
            )?;
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not listen on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Writes the population's cards and gates with `tapgate cards generate`.
    fn load(&self, bin: &Path, population: &PopulationSpec) -> anyhow::Result<()> {
        let loaded = Command::new(bin)
            .args(["cards", "--redis-url", &self.url, "generate"])
            .args(["--cards", &population.cards.to_string()])
            .args(["--terminals", &population.terminals.to_string()])
            .args(["--seed", &population.seed.to_string()])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(
            loaded.success(),
            "loading the population into Redis: {loaded}"
        );
        Ok(())
    }
}

/// True when the cluster node on `port` says every slot is served.
fn cluster_serves_every_slot(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| {
            let info = String::from_utf8_lossy(&out.stdout);
            info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
        })
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
