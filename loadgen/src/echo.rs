//! The transport baseline: a bare QUIC server with the gateway's transport settings that sends
//! every byte it receives straight back. Driving it with the same generator shows what QUIC,
//! TLS and the generator cost on their own, so tapgate's own cost is always known.

use std::net::SocketAddr;
use tapgate_transport::reader::READ_CHUNK;
use tapgate_transport::{EndpointError, TransportSettings, server_endpoint, tls};

pub struct EchoServer {
    endpoint: quinn::Endpoint,
    certificate: Vec<u8>,
}

impl EchoServer {
    /// Starts with a fresh development certificate kept in memory.
    pub fn start(listen: SocketAddr) -> Result<EchoServer, EndpointError> {
        let (chain, key) = tls::generate_dev()?;
        Self::start_with_certificate(listen, chain, key)
    }

    /// Starts with the certificate of `tls` (a development one is written to its directory).
    pub fn start_with(
        listen: SocketAddr,
        tls_source: &tls::TlsSource,
    ) -> Result<EchoServer, EndpointError> {
        let (chain, key) = tls::load(tls_source)?;
        Self::start_with_certificate(listen, chain, key)
    }

    fn start_with_certificate(
        listen: SocketAddr,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<EchoServer, EndpointError> {
        let certificate = chain[0].to_vec();
        let endpoint = server_endpoint(listen, chain, key, &TransportSettings::default())?;
        tokio::spawn(accept(endpoint.clone()));
        Ok(EchoServer {
            endpoint,
            certificate,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound socket has an address")
    }

    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"done");
    }
}

async fn accept(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            let Ok((mut send, mut recv)) = connection.accept_bi().await else {
                return;
            };
            while let Ok(Some(chunk)) = recv.read_chunk(READ_CHUNK, true).await {
                if send.write_all(&chunk.bytes).await.is_err() {
                    return;
                }
            }
        });
    }
}
