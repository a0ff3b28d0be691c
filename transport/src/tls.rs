//! TLS material for the QUIC endpoint: certificates from files, or a self-signed development
//! certificate written where clients can find and trust it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tapgate_protocol::Version;

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files: a certificate chain and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// A self-signed certificate for localhost, kept as `cert.der` and `key.der` in `dir`
    /// (created on first use, reused afterwards so clients that trusted it keep working).
    Dev { dir: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what} found")]
    Missing { path: PathBuf, what: &'static str },
    #[error("generating the development certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// File name of the development certificate inside its directory.
pub const DEV_CERT_FILE: &str = "cert.der";
const DEV_KEY_FILE: &str = "key.der";

/// Loads or creates the certificate chain and key.
pub fn load(
    source: &TlsSource,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match source {
        TlsSource::Files { cert, key } => {
            let io = |path: &Path| {
                let path = path.to_owned();
                move |source| TlsError::Io { path, source }
            };
            let cert_pem = std::fs::read(cert).map_err(io(cert))?;
            let key_pem = std::fs::read(key).map_err(io(key))?;
            let chain = rustls_pemfile_certs(&cert_pem);
            if chain.is_empty() {
                return Err(TlsError::Missing {
                    path: cert.clone(),
                    what: "PEM certificate",
                });
            }
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                TlsError::Missing {
                    path: key.clone(),
                    what: "PEM private key",
                }
            })?;
            Ok((chain, key))
        }
        TlsSource::Dev { dir } => dev_certificate(dir),
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

fn dev_certificate(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let io = |path: PathBuf| move |source| TlsError::Io { path, source };
    let cert_path = dir.join(DEV_CERT_FILE);
    let key_path = dir.join(DEV_KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read(&cert_path).map_err(io(cert_path.clone()))?;
        let key = std::fs::read(&key_path).map_err(io(key_path.clone()))?;
        return Ok((
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io(dir.to_owned()))?;
    let (chain, key) = generate_dev()?;
    std::fs::write(&key_path, key.secret_der()).map_err(io(key_path.clone()))?;
    std::fs::write(&cert_path, &chain[0]).map_err(io(cert_path.clone()))?;
    Ok((chain, key))
}

/// A fresh self-signed certificate for localhost, 127.0.0.1 and ::1, kept in memory.
pub fn generate_dev() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let generated = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = generated.cert.der().to_vec();
    let key = generated.signing_key.serialize_der();
    Ok((
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    ))
}

/// The server's memory of the TLS sessions it can resume: one single-use ticket per entry, the
/// oldest forgotten first once `capacity` is reached. Tickets are kept here, not sealed into
/// the ticket itself, because only a ticket the server can take away on first use makes early
/// data safe to accept: the same early flight replayed finds its ticket gone and falls back to
/// a full handshake (PROTOCOL.md section 1.2).
pub struct SessionTickets {
    sessions: Arc<rustls::server::ServerSessionMemoryCache>,
    redeemed: Arc<AtomicU64>,
}

impl std::fmt::Debug for SessionTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTickets")
            .field("redeemed", &self.redeemed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SessionTickets {
    /// Remembers up to `capacity` sessions and counts each ticket redeemed in `redeemed`.
    pub fn new(capacity: usize, redeemed: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            sessions: rustls::server::ServerSessionMemoryCache::new(capacity.max(1)),
            redeemed,
        })
    }
}

impl rustls::server::StoresServerSessions for SessionTickets {
    fn put(&self, id: Vec<u8>, session: Vec<u8>) -> bool {
        self.sessions.put(id, session)
    }

    fn get(&self, id: &[u8]) -> Option<Vec<u8>> {
        self.sessions.get(id)
    }

    fn take(&self, id: &[u8]) -> Option<Vec<u8>> {
        let session = self.sessions.take(id);
        if session.is_some() {
            self.redeemed.fetch_add(1, Ordering::Relaxed);
        }
        session
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The QUIC server crypto: TLS 1.3 only, ALPN `tapgate/2` or `tapgate/1` (the newest the gate
/// offers, up to `newest`), ring as the provider. It resumes
/// sessions from `tickets` and accepts early data on a resumed connection; what the early
/// data may do is the application's to limit (the gateway acts on nothing but the Hello until
/// the handshake completes).
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    tickets: Arc<SessionTickets>,
    newest: Version,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // rustls picks the first of these that the gate offers, so a gate offering both gets 2.
    tls.alpn_protocols = newest.alpn_offer();
    tls.session_storage = tickets;
    // A gate holds one connection at a time, so one ticket is what its next reconnect needs;
    // a second would only take a place in the server's memory.
    tls.send_tls13_tickets = 1;
    // QUIC allows no other value when early data is on (RFC 9001, section 4.6.1).
    tls.max_early_data_size = u32::MAX;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The protocol version a connection's handshake agreed on by ALPN (PROTOCOL.md section 1),
/// read the same way by the gateway and by gates; version 1 when the handshake named none
/// tapgate knows.
pub fn negotiated_version(connection: &quinn::Connection) -> Version {
    connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .and_then(|alpn| Version::from_alpn(&alpn))
        .unwrap_or(Version::V1)
}

/// How a gate reconnects after a drop (PROTOCOL.md section 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// A full handshake every time: the certificate is sent and verified again.
    Full,
    /// Resumes the TLS session from the gateway's ticket, and says Hello once the handshake has
    /// completed.
    Ticket,
    /// Resumes from the ticket and sends the Hello as early data with the resumption, so its
    /// HelloAck comes back a round trip sooner.
    EarlyHello,
}

/// Gateways a gate keeps tickets for (rustls keeps a few tickets for each): its own, and the
/// nodes it failed over to.
const GATEWAYS_REMEMBERED: usize = 4;

/// What every gate's TLS has in common; each gate gets its own copy with its own memory of
/// tickets, as a real gate has (see [`GateTls::for_one_gate`]).
#[derive(Clone)]
pub struct GateTls {
    base: Arc<rustls::ClientConfig>,
    resumption: Resumption,
}

impl GateTls {
    /// TLS 1.3 only, offering the ALPN ids of `version` and the versions before it, trusting
    /// exactly `trusted_der` (the gateway's certificate or its CA).
    pub fn new(
        trusted_der: &[u8],
        resumption: Resumption,
        version: Version,
    ) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(trusted_der.to_vec()))
            .map_err(|e| TlsError::Config(format!("trusted certificate: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = version.alpn_offer();
        tls.enable_early_data = resumption == Resumption::EarlyHello;
        Ok(Self {
            base: Arc::new(tls),
            resumption,
        })
    }

    /// The QUIC client configuration of one gate: its own memory of tickets, so what one gate
    /// resumes says nothing about another.
    pub fn for_one_gate(&self) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = (*self.base).clone();
        tls.resumption = match self.resumption {
            Resumption::Full => rustls::client::Resumption::disabled(),
            Resumption::Ticket | Resumption::EarlyHello => {
                rustls::client::Resumption::in_memory_sessions(GATEWAYS_REMEMBERED)
            }
        };
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_development_certificate_is_written_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let source = TlsSource::Dev {
            dir: dir.path().join("cert"),
        };
        let (first, _) = load(&source).unwrap();
        let (again, _) = load(&source).unwrap();
        assert_eq!(first, again);
        assert_eq!(
            std::fs::read(dir.path().join("cert").join(DEV_CERT_FILE)).unwrap(),
            first[0].to_vec()
        );
        // What a gate trusts is what the server presents.
        GateTls::new(&first[0], Resumption::EarlyHello, Version::V1)
            .and_then(|tls| tls.for_one_gate())
            .unwrap();
        let tickets = SessionTickets::new(16, Arc::default());
        server_crypto(first, load(&source).unwrap().1, tickets, Version::NEWEST).unwrap();
    }

    #[test]
    fn a_missing_certificate_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("nope.pem");
        let err = load(&TlsSource::Files {
            cert: cert.clone(),
            key: dir.path().join("key.pem"),
        })
        .unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}
