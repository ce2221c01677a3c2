//! The sockets this agent vouches for: its TLS connections (tunnels both ways, control plane)
//! and its tunnel listener. The coverage audit counts a link as *through tapproof* only when the
//! running agent lists that exact socket here (`GET /v1/sockets` on the admin listener, or in
//! process for the agent's own reports), never because of a process name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tapproof_audit::{AgentSockets, VouchedConnection, VouchedKind, VouchedSession};

/// This process's registry: one process is one agent, and the audit binds the list to its PID.
pub fn sockets() -> &'static Arc<Sockets> {
    static SOCKETS: std::sync::OnceLock<Arc<Sockets>> = std::sync::OnceLock::new();
    SOCKETS.get_or_init(Default::default)
}

#[derive(Debug, Default)]
pub struct Sockets {
    next: AtomicU64,
    live: Mutex<HashMap<u64, VouchedConnection>>,
    listeners: Mutex<Vec<SocketAddr>>,
    /// The capture rules as last read back (`capture.rs`), for the audit.
    capture: Mutex<Option<tapproof_audit::CaptureState>>,
}

/// Keeps a connection listed while it lives.
#[must_use = "the connection is listed only while the guard lives"]
pub struct SocketGuard {
    sockets: Arc<Sockets>,
    key: u64,
}

impl SocketGuard {
    /// Adds what the handshake settled to the listed connection.
    pub fn describe(&self, session: &tapproof_tls::SessionInfo, service: Option<&str>) {
        if let Some(c) = self.sockets.table().get_mut(&self.key) {
            c.session = Some(VouchedSession {
                peer_id: session
                    .peer_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                tls_version: session.version.clone(),
                cipher: session.cipher.clone(),
                group: session.group.clone(),
                service: service.map(str::to_owned),
            });
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.sockets.table().remove(&self.key);
    }
}

impl Sockets {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VouchedConnection>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists a TLS connection (only TLS ever flows on it) until the guard drops. `None` when the
    /// socket's addresses cannot be read (then it is simply not vouched for).
    pub fn register(self: &Arc<Self>, tcp: &tokio::net::TcpStream, kind: VouchedKind) -> Option<SocketGuard> {
        let (local, remote) = (tcp.local_addr().ok()?, tcp.peer_addr().ok()?);
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.table().insert(
            key,
            VouchedConnection {
                local: tapproof_audit::canonical(local),
                remote: tapproof_audit::canonical(remote),
                kind,
                session: None,
            },
        );
        Some(SocketGuard {
            sockets: self.clone(),
            key,
        })
    }

    /// Lists a listener that speaks only TLS (the tunnel listener).
    pub fn listening(&self, addr: SocketAddr) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tapproof_audit::canonical(addr));
    }

    /// The capture rules and counters the audit reports with these sockets.
    pub fn set_capture(&self, state: tapproof_audit::CaptureState) {
        *self.capture.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// No capture rules to report (a dormant agent whose policy asks nothing of it).
    pub fn clear_capture(&self) {
        *self.capture.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// What this process vouches for now.
    pub fn snapshot(&self) -> AgentSockets {
        let mut connections: Vec<_> = self.table().values().cloned().collect();
        connections.sort_by_key(|c| (c.local, c.remote));
        AgentSockets {
            pid: std::process::id(),
            connections,
            listeners: self.listeners.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            capture: self.capture.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// Asks the agent whose admin listener is `admin` which sockets it vouches for (the audit's
/// `tapproof audit` path; the agent's own reports read [`sockets`] directly).
pub async fn ask(admin: SocketAddr, timeout: std::time::Duration) -> Result<AgentSockets, String> {
    use http_body_util::{BodyExt, Empty};
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(conn);
        let request = http::Request::get("/v1/sockets")
            .header(http::header::HOST, admin.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if response.status() != http::StatusCode::OK {
            return Err(format!(
                "answered {} (an agent older than the socket list, or not an agent)",
                response.status()
            ));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not a socket list: {e}"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer in {} ms", timeout.as_millis()))?
}
