//! Which Redis tapgate talks to — one server or a Redis Cluster — and connections that behave the
//! same way on both.
//!
//! The target is a URL:
//!
//! | URL | target |
//! |-----|--------|
//! | `redis://[USER:PASSWORD@]HOST:PORT[/DB]` | one server |
//! | `rediss://[USER:PASSWORD@]HOST:PORT[/DB]` | one server over TLS |
//! | `redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT,…[/]` | a Redis Cluster, from these seed nodes |
//! | `rediss+cluster://…` | a Redis Cluster over TLS |
//!
//! A cluster is reached through the redis crate's own cluster client, which follows slot
//! redirections and topology changes; tapgate adds no routing of its own. Every multi-key
//! command and script tapgate sends keeps its keys in one hash slot (see the key schemas in
//! the gateway's card directory and in the settlement store), so the same commands work on both.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, TlsCertificates, Value};
use std::path::Path;
use std::time::Duration;

crate::log_position! {
    /// A Redis stream entry id, `ms-seq`, ordered numerically.
    EntryId { ms, seq },
    separator: '-',
    what: "stream entry id",
    second_may_be_absent: true
}

/// Takes a lease held in one key if it is free, or renews it for `token` if `token` holds it;
/// true when `token` holds it afterwards. A lease lets one process of many do a piece of work
/// (a settlement partition, the live watcher); the scripts that do that work check the key
/// again, so a holder that lost its lease while paused changes nothing.
pub async fn take_lease(
    connection: &mut RedisConnection,
    key: &str,
    token: &str,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    static TAKE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
        )
    });
    let held: u8 = TAKE
        .key(key)
        .arg(token)
        .arg(ttl.as_millis() as u64)
        .invoke_async(connection)
        .await?;
    Ok(held == 1)
}

/// Gives up a lease `token` holds, so another process takes it at once rather than when it
/// expires; a lease someone else holds is left alone.
pub async fn release_lease(
    connection: &mut RedisConnection,
    key: &str,
    token: &str,
) -> redis::RedisResult<()> {
    static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
",
        )
    });
    let _: u8 = RELEASE.key(key).arg(token).invoke_async(connection).await?;
    Ok(())
}

/// Longest text of a Redis error tapgate prints: a redirection or script error can carry
/// kilobytes (a whole pipeline), which would drown a log line.
const ERROR_TEXT_MAX: usize = 240;

// Made once per process and shared behind an Arc: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisTarget {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(_) => f.write_str("RedisTarget::Single"),
            RedisTarget::Cluster(_) => f.write_str("RedisTarget::Cluster"),
        }
    }
}

impl RedisTarget {
    /// Reads a target URL (table above). With TLS (`rediss`), the server's certificate must chain
    /// to `tls_root` (a PEM file of CA certificates) when given, else to the system's roots. The
    /// error says what is wrong, never echoing a password.
    pub fn parse(url: &str, tls_root: Option<&Path>) -> Result<RedisTarget, String> {
        let url = url.trim();
        let certificates = tls_root
            .map(|path| {
                std::fs::read(path)
                    .map(|pem| TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    })
                    .map_err(|e| format!("Redis TLS root certificates {}: {e}", path.display()))
            })
            .transpose()?;
        for (scheme, node_scheme) in [
            ("redis+cluster://", "redis"),
            ("rediss+cluster://", "rediss"),
        ] {
            if let Some(rest) = url.strip_prefix(scheme) {
                return cluster_client(rest, node_scheme, certificates).map(RedisTarget::Cluster);
            }
        }
        let bad = |e: redis::RedisError| {
            format!("bad Redis URL `{}`: {}", redacted(url), bounded_error(&e))
        };
        match certificates {
            Some(certificates) if url.starts_with("rediss://") => {
                redis::Client::build_with_tls(url, certificates).map_err(bad)
            }
            Some(_) => Err(format!(
                "Redis TLS root certificates are given, but `{}` is not a TLS URL (rediss://)",
                redacted(url)
            )),
            None => redis::Client::open(url).map_err(bad),
        }
        .map(RedisTarget::Single)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// The connection shared by every short command of a process: it does not wait for Redis
    /// at creation, commands fail after `timeout` while Redis is away, and it reconnects in the
    /// background.
    pub fn shared_connection(&self, timeout: Duration) -> redis::RedisResult<RedisConnection> {
        Ok(match self {
            RedisTarget::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                RedisConnection::Single(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?)
            }
            RedisTarget::Cluster(client) => RedisConnection::Cluster(
                client.get_pending_async_connection_with_config(
                    ClusterConfig::new()
                        .set_connection_timeout(timeout)
                        .set_response_timeout(timeout),
                ),
            ),
        })
    }

    /// A connection of its own for one blocking reader (XREAD BLOCK, XREADGROUP BLOCK), which
    /// would hold up every command multiplexed behind it on a shared connection. Its responses
    /// may take up to `longest_block` plus a margin before they count as lost.
    pub async fn blocking_connection(
        &self,
        longest_block: Duration,
    ) -> redis::RedisResult<RedisConnection> {
        let response_timeout = longest_block + BLOCKING_MARGIN;
        Ok(match self {
            RedisTarget::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout));
                RedisConnection::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            RedisTarget::Cluster(client) => RedisConnection::Cluster(
                client
                    .get_async_connection_with_config(
                        ClusterConfig::new()
                            .set_connection_timeout(CONNECT_TIMEOUT)
                            .set_response_timeout(response_timeout),
                    )
                    .await?,
            ),
        })
    }
}

/// How much longer than its BLOCK time a blocking read may take before it counts as lost.
const BLOCKING_MARGIN: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `USER:PASSWORD@HOST:PORT,HOST:PORT/` as a cluster client over `node_scheme` nodes.
fn cluster_client(
    rest: &str,
    node_scheme: &str,
    certificates: Option<TlsCertificates>,
) -> Result<ClusterClient, String> {
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    let hosts = hosts.trim_end_matches('/');
    if hosts.contains('/') {
        return Err(format!(
            "Redis Cluster URL `{scheme}…{}`: a cluster has only database 0; write no path",
            hosts,
            scheme = if node_scheme == "rediss" {
                "rediss+cluster://"
            } else {
                "redis+cluster://"
            },
        ));
    }
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|host| match credentials {
            Some(c) => format!("{node_scheme}://{c}@{host}/"),
            None => format!("{node_scheme}://{host}/"),
        })
        .collect();
    if nodes.is_empty() {
        return Err(
            "Redis Cluster URL names no seed node (redis+cluster://HOST:PORT,HOST:PORT/)".into(),
        );
    }
    for node in &nodes {
        redis::Client::open(node.as_str()).map_err(|e| {
            format!(
                "bad Redis Cluster seed node `{}`: {}",
                redacted(node),
                bounded_error(&e)
            )
        })?;
    }
    let mut builder = ClusterClient::builder(nodes).retries(2);
    if let Some(certificates) = certificates {
        if node_scheme != "rediss" {
            return Err(
                "Redis TLS root certificates are given, but the cluster URL is not a TLS one (rediss+cluster://)"
                    .into(),
            );
        }
        builder = builder.certs(certificates);
    }
    builder
        .build()
        .map_err(|e| format!("Redis Cluster client: {}", bounded_error(&e)))
}

/// A URL with any password replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, hosts)) => {
            let user = credentials.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{hosts}")
        }
        None => url.to_owned(),
    }
}

/// A Redis error as one readable line of bounded length. Authentication failures say so
/// plainly, whatever the transport made of them.
pub fn bounded_error(e: &redis::RedisError) -> String {
    let line = e.to_string();
    if e.code() == Some("NOAUTH") || line.contains("NOAUTH") {
        return "NOAUTH: Redis requires a password; give one in the URL (redis://USER:PASSWORD@HOST:PORT/)".into();
    }
    if matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)
    ) {
        return "MOVED: this Redis is one node of a Redis Cluster; name the cluster as redis+cluster://HOST:PORT,HOST:PORT/".into();
    }
    if e.code() == Some("WRONGPASS")
        || line.contains("WRONGPASS")
        || e.kind() == redis::ErrorKind::AuthenticationFailed
    {
        return "WRONGPASS: Redis refused this user name and password".into();
    }
    bounded_line(&line)
}

/// Text as one line of at most `ERROR_TEXT_MAX` bytes, saying how much was cut.
pub fn bounded_line(text: &str) -> String {
    let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > ERROR_TEXT_MAX {
        let cut = (0..=ERROR_TEXT_MAX)
            .rev()
            .find(|&i| line.is_char_boundary(i))
            .unwrap_or(0);
        let more = line.len() - cut;
        line.truncate(cut);
        line.push_str(&format!(" … ({more} more bytes)"));
    }
    line
}

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key when it
/// has none (the Redis Cluster specification's algorithm; the redis crate does not export its
/// own).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(bytes) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

impl RedisConnection {
    /// Redis WAIT for the writes this connection made to the node that holds `key`: how many
    /// replicas hold them, waiting at most `timeout_ms` for `replicas`. A cluster client would
    /// otherwise ask every master and report the fewest, so a master that lost its replica in
    /// a failover would fail the writes that every other master replicated.
    pub async fn wait_for_replicas_of(
        &mut self,
        key: &str,
        replicas: u16,
        timeout_ms: u64,
    ) -> redis::RedisResult<u16> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms);
        match self {
            RedisConnection::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(key_slot(key), SlotAddr::Master);
                let value = c
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
            other => wait.query_async(other).await,
        }
    }
}

/// A connection to a single Redis or to a cluster. Commands and scripts are sent the same way on
/// both; the cluster client routes each to the node that owns its slot.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Plain(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Plain(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Plain(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod slot_tests {
    use super::key_slot;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // The specification's examples: the hash tag alone counts.
        assert_eq!(key_slot("123456789"), 0x31C3);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("tapgate:{deny}:version"), 9251);
        assert_eq!(key_slot("tapgate:{g03}:changes"), 7518);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_cluster_urls_are_told_apart() {
        assert!(
            !RedisTarget::parse("redis://127.0.0.1:6379/", None)
                .unwrap()
                .is_cluster()
        );
        assert!(
            !RedisTarget::parse("rediss://127.0.0.1:6380/", None)
                .unwrap()
                .is_cluster()
        );
        let cluster =
            RedisTarget::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/", None).unwrap();
        assert!(cluster.is_cluster());
        assert!(
            RedisTarget::parse("rediss+cluster://app:secret@127.0.0.1:7000/", None)
                .unwrap()
                .is_cluster()
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        let e = RedisTarget::parse("redis+cluster:///", None).unwrap_err();
        assert!(e.contains("no seed node"), "{e}");
        let e = RedisTarget::parse("redis+cluster://127.0.0.1:7000/3", None).unwrap_err();
        assert!(e.contains("database 0"), "{e}");
        let e = RedisTarget::parse("http://app:secret@127.0.0.1/", None).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(
            redacted("redis://app:secret@h:1/"),
            "redis://app:***@h:1/".to_owned()
        );
    }

    #[test]
    fn a_cluster_node_named_as_a_single_redis_says_what_to_write() {
        let moved = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::Moved),
            "Moved",
            "15950 127.0.0.1:7203".to_owned(),
        ));
        assert!(bounded_error(&moved).contains("redis+cluster://"));
    }

    #[test]
    fn long_errors_are_cut_to_one_bounded_line() {
        let long = redis::RedisError::from((
            redis::ErrorKind::Io,
            "transaction aborted",
            format!("Moved\n{}", "x ".repeat(40_000)),
        ));
        let line = bounded_error(&long);
        assert!(line.len() < ERROR_TEXT_MAX + 40, "{}", line.len());
        assert!(!line.contains('\n'));
        assert!(line.ends_with("more bytes)"), "{line}");
    }
}
