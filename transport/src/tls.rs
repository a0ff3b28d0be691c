//! TLS material for the QUIC endpoint: certificates from files, or a self-signed development
//! certificate written where clients can find and trust it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tapgate_protocol::ALPN;

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

/// The QUIC server crypto: TLS 1.3 only, ALPN `tapgate/1`, ring as the provider.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The QUIC client crypto of a gate: TLS 1.3 only, ALPN `tapgate/1`, trusting exactly
/// `trusted_der` (the gateway's certificate or its CA).
pub fn client_crypto(
    trusted_der: &[u8],
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsError> {
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(quic))
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
        client_crypto(&first[0]).unwrap();
        server_crypto(first, load(&source).unwrap().1).unwrap();
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
