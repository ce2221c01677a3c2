//! Raw TLS and HTTP/2 clients that play a peer agent, or a hostile or broken stand-in for one, so
//! tests can check how the tunnel listener answers each case.

use crate::pki::IdentityPaths;
use http::{Method, Request};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tapproof_identity::{SpiffeId, TrustDomain};
use tapproof_tls::rustls::crypto::CryptoProvider;
use tapproof_tls::rustls::pki_types::pem::PemObject;
use tapproof_tls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tapproof_tls::rustls::{self, ClientConfig, SupportedProtocolVersion};
use tapproof_tls::{ClientTls, CryptoPolicy, IdentityFiles, Material};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client config presenting `identity` (or no certificate), speaking only `versions`.
pub fn raw_config(
    identity: Option<&IdentityPaths>,
    versions: &[&'static SupportedProtocolVersion],
    kx: CryptoPolicy,
) -> Arc<ClientConfig> {
    let provider = if versions
        .iter()
        .any(|v| v.version == rustls::ProtocolVersion::TLSv1_2)
    {
        // tapproof's provider has TLS 1.3 suites only; a TLS 1.2 client needs the stock ones.
        rustls::crypto::aws_lc_rs::default_provider()
    } else {
        (*tapproof_tls::crypto_provider(kx)).clone()
    };
    build(identity, versions, provider)
}

/// A TLS 1.3 client config presenting `identity` that offers only `groups` for key exchange.
pub fn raw_config_with_groups(
    identity: Option<&IdentityPaths>,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<ClientConfig> {
    let mut provider = (*tapproof_tls::crypto_provider(CryptoPolicy::PreferPostQuantum)).clone();
    provider.kx_groups = groups;
    build(identity, &[&rustls::version::TLS13], provider)
}

fn build(
    identity: Option<&IdentityPaths>,
    versions: &[&'static SupportedProtocolVersion],
    provider: CryptoProvider,
) -> Arc<ClientConfig> {
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(tapproof_tls::selftest::AnyServer::new(provider)));
    let mut config = match identity {
        Some(id) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(&id.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Handshakes, sends the HTTP/2 preface and waits for the server's first bytes. `Ok` when the
/// server kept talking, `Err` with what happened when it refused.
pub fn attempt(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<(), String> {
    runtime().block_on(async move {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(0)) => Err("closed".into()),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Err(_) => Err("no answer in 5 s".into()),
        }
    })
}

/// A plaintext client on the tunnel port: sends an HTTP request, reports what came back.
pub fn plaintext_attempt(addr: SocketAddr) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n");
    let mut back = Vec::new();
    let _ = tcp.read_to_end(&mut back);
    back
}

/// A completed TLS 1.3 handshake as `identity` (the server is not judged).
async fn handshake(addr: SocketAddr, identity: &IdentityPaths) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = raw_config(
        Some(identity),
        &[&rustls::version::TLS13],
        CryptoPolicy::PreferPostQuantum,
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap()
}

/// Completes a good handshake as `identity`, then sends bytes that are not HTTP/2. Returns
/// whether the server closed the connection.
pub fn garbage_after_handshake(addr: SocketAddr, identity: &IdentityPaths) -> bool {
    runtime().block_on(async move {
        let mut tls = handshake(addr, identity).await;
        let _ = tls.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64)).await;
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue, // a GOAWAY frame may come first
                Err(_) => return false,
            }
        }
    })
}

/// The leaf certificate the server presents to a good client.
pub fn server_leaf(addr: SocketAddr, identity: &IdentityPaths) -> Vec<u8> {
    runtime().block_on(async move {
        let tls = handshake(addr, identity).await;
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    })
}

/// Opens a real tunnel as `identity` (expecting the server to be `server_id`) and sends one
/// CONNECT for `service`; returns the HTTP status the peer agent answered.
pub fn connect_status(
    addr: SocketAddr,
    identity: &IdentityPaths,
    td: &TrustDomain,
    server_id: &SpiffeId,
    service: &str,
) -> u16 {
    let files = IdentityFiles {
        cert: identity.cert.clone(),
        key: identity.key.clone(),
        bundle: identity.bundle.clone(),
    };
    let material = Material::load(&files, td).unwrap();
    let tls = ClientTls::new(&material, server_id.clone(), CryptoPolicy::PreferPostQuantum).unwrap();
    let service = service.to_owned();
    runtime().block_on(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = tapproof_tls::connect(&tls, tcp, addr).await.unwrap();
        let (mut sender, conn) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(service)
            .body(())
            .unwrap();
        let (response, _send) = sender.send_request(req, false).unwrap();
        response.await.unwrap().status().as_u16()
    })
}
