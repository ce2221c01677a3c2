//! The one control-plane client: typed requests and answers of `tapproof_api`, mTLS (or the join
//! token's root pin), a timeout per call, and retries with exponential backoff when the server
//! cannot be reached. The agent (join, renewal, state feed, coverage reports) and every remote
//! admin command (`tapproof server ... --server ADDR --admin-dir DIR`, the dashboard proxy) use it.
//!
//! Retries: a request that never reached the server (resolve, connect, TLS) is retried for any
//! method; one that may have reached it is retried only when it is a GET. Refusals (an error
//! document) are never retried.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tapproof_api::{
    paths, AuditEntry, AuditQuery, Changed, ErrorBody, ErrorCode, Handshake, HandshakeQuery, JoinRequest,
    JoinResponse, NodeView, Policy, Registration, RegistrationChange, Revocation, RevocationPropagation,
    RevokeRequest, SignRequest, SignResponse, StateResponse,
};
use tapproof_tls::ControlClientTls;
use tokio::net::TcpStream;

/// How long one call may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longer than the server's long-poll hold, so an idle feed is not mistaken for a dead server.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(tapproof_api::LONG_POLL_SECS + 15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane at {server} refused ({status}): {code}: {message}")]
    Refused {
        server: String,
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("control plane at {server} unreachable: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("control plane at {server} answered with something that is not the API's document: {detail}")]
    BadAnswer { server: String, detail: String },
}

impl ClientError {
    /// The refusal's code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Whether a failed attempt may be tried again: `sent` says the request may have reached the
/// server.
#[derive(Debug)]
struct Failure {
    error: ClientError,
    sent: bool,
}

/// Told of every attempt: the request path (no query), how long it took, and whether the server
/// answered (any answer, a refusal too) or could not be reached. The agent sets
/// `tapproof_control_plane_up` and the request-duration histogram from it.
pub type Observer = std::sync::Arc<dyn Fn(&str, Duration, bool) + Send + Sync>;

/// A client for one server address, presenting one identity (or none, for the join).
#[derive(Clone)]
pub struct ControlClient {
    server: String,
    tls: ControlClientTls,
    timeout: Duration,
    attempts: u32,
    observer: Option<Observer>,
}

impl ControlClient {
    /// `server` is `HOST:PORT`; `tls` decides how the server is trusted and which identity we
    /// present. Three attempts, 15 s each, by default.
    pub fn new(server: impl Into<String>, tls: ControlClientTls) -> Self {
        Self {
            server: server.into(),
            tls,
            timeout: DEFAULT_TIMEOUT,
            attempts: 3,
            observer: None,
        }
    }

    /// Each attempt's deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Tells `observer` of every attempt (see [`Observer`]).
    pub fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// How many attempts a call gets (at least one).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub async fn join(&self, request: &JoinRequest) -> Result<JoinResponse, ClientError> {
        self.json(http::Method::POST, paths::JOIN, Some(encode(request)))
            .await
    }

    pub async fn sign(&self, request: &SignRequest) -> Result<SignResponse, ClientError> {
        self.json(http::Method::POST, paths::SIGN, Some(encode(request)))
            .await
    }

    /// The state feed: answers when the server's version is newer than `since` (at once without
    /// one), or after the long-poll hold. `tunnel` announces where our tunnel listener is reached.
    pub async fn state(
        &self,
        since: Option<i64>,
        tunnel: Option<SocketAddr>,
        addresses: Option<&tapproof_api::Announced>,
    ) -> Result<StateResponse, ClientError> {
        let mut query = Vec::new();
        if let Some(since) = since {
            query.push(format!("since={since}"));
        }
        if let Some(addr) = tunnel {
            query.push(format!("tunnel={}", query_escape(&addr.to_string())));
        }
        if let Some(a) = addresses {
            query.push(format!("addresses={}", query_escape(&a.to_query())));
        }
        let path = format!("{}?{}", paths::STATE, query.join("&"));
        let feed = Self {
            timeout: self.timeout.max(STATE_TIMEOUT),
            ..self.clone()
        };
        feed.json(http::Method::GET, &path, None).await
    }

    /// Sends a coverage upload (already JSON); the server answers 204.
    pub async fn coverage(&self, upload: Vec<u8>) -> Result<(), ClientError> {
        let (status, bytes) = self
            .call(http::Method::POST, paths::COVERAGE, Some(upload))
            .await?;
        match status {
            204 => Ok(()),
            _ => Err(self.refusal(status, &bytes)),
        }
    }

    /// Records what an operator did on this node in the control plane's audit log (204).
    pub async fn event(&self, event: &tapproof_api::NodeEvent) -> Result<(), ClientError> {
        let (status, bytes) = self
            .call(http::Method::POST, paths::EVENTS, Some(encode(event)))
            .await?;
        match status {
            204 => Ok(()),
            _ => Err(self.refusal(status, &bytes)),
        }
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.json(http::Method::GET, paths::NODES, None).await
    }

    pub async fn registrations(&self) -> Result<Vec<Registration>, ClientError> {
        self.json(http::Method::GET, paths::REGISTRATIONS, None).await
    }

    pub async fn register(&self, change: &RegistrationChange) -> Result<Changed, ClientError> {
        self.json(http::Method::POST, paths::REGISTRATIONS, Some(encode(change)))
            .await
    }

    pub async fn revocations(&self) -> Result<Vec<Revocation>, ClientError> {
        self.json(http::Method::GET, paths::REVOCATIONS, None).await
    }

    pub async fn revocation_propagation(&self) -> Result<Vec<RevocationPropagation>, ClientError> {
        self.json(http::Method::GET, paths::REVOCATION_PROPAGATION, None)
            .await
    }

    pub async fn revoke(&self, request: &RevokeRequest) -> Result<Revocation, ClientError> {
        self.json(http::Method::POST, paths::REVOCATIONS, Some(encode(request)))
            .await
    }

    pub async fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, ClientError> {
        let path = format!("{}?after={}&limit={}", paths::AUDIT_LOG, query.after, query.limit);
        self.json(http::Method::GET, &path, None).await
    }

    pub async fn handshakes(&self, query: &HandshakeQuery) -> Result<Vec<Handshake>, ClientError> {
        let path = format!(
            "{}?from_ms={}&to_ms={}&limit={}",
            paths::HANDSHAKES,
            query.from_ms,
            query.to_ms,
            query.limit
        );
        self.json(http::Method::GET, &path, None).await
    }

    pub async fn policy(&self) -> Result<Policy, ClientError> {
        self.json(http::Method::GET, paths::POLICY, None).await
    }

    /// Replaces the policy with `document` (TOML or JSON, checked by the server).
    pub async fn set_policy(&self, document: String) -> Result<Policy, ClientError> {
        self.json(http::Method::POST, paths::POLICY, Some(document.into_bytes()))
            .await
    }

    /// A GET whose answer is passed on as it came (the dashboard proxy): status and body.
    pub async fn get_raw(&self, path: &str) -> Result<(u16, Bytes), ClientError> {
        self.call(http::Method::GET, path, None).await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.call(method, path, body).await?;
        if status != 200 {
            return Err(self.refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer {
            server: self.server.clone(),
            detail: format!("{path}: {e}"),
        })
    }

    fn refusal(&self, status: u16, bytes: &[u8]) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(body) => ClientError::Refused {
                server: self.server.clone(),
                status,
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => ClientError::BadAnswer {
                server: self.server.clone(),
                detail: format!(
                    "status {status} without an error document: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            },
        }
    }

    /// One call with retries: the status and the body.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            let result = self.attempt(method.clone(), path, body.clone()).await;
            if let Some(observe) = &self.observer {
                let route = path.split('?').next().unwrap_or(path);
                observe(route, started.elapsed(), result.is_ok());
            }
            match result {
                Ok(answer) => return Ok(answer),
                Err(f) => {
                    let retry = !f.sent || method == http::Method::GET;
                    if !retry || attempt >= self.attempts {
                        return Err(f.error);
                    }
                    tracing::debug!(error = %f.error, attempt, "control plane call failed; retrying");
                    let jitter = rand::rng().random_range(0.8..1.2);
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), Failure> {
        let unreachable = |detail: String, sent: bool| Failure {
            error: ClientError::Unreachable {
                server: self.server.clone(),
                detail,
            },
            sent,
        };
        let exchange = async {
            let addr = tokio::net::lookup_host(&self.server)
                .await
                .map_err(|e| unreachable(format!("cannot resolve: {e}"), false))?
                .next()
                .ok_or_else(|| unreachable("resolves to no address".into(), false))?;
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(format!("connect: {e}"), false))?;
            // Only TLS crosses this socket: the coverage audit may count it as tapproof's.
            let _vouched = crate::vouch::sockets().register(&tcp, tapproof_audit::VouchedKind::Control);
            let tls = self
                .tls
                .connect(tcp, addr)
                .await
                .map_err(|e| unreachable(format!("TLS: {e}"), false))?;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| unreachable(format!("HTTP/2: {e}"), false))?;
            tokio::spawn(conn);
            let request = http::Request::builder()
                .method(method)
                .uri(format!("https://{}{path}", self.server))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| unreachable(e.to_string(), false))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(format!("request: {e}"), true))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(format!("response: {e}"), true))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer in {} s", self.timeout.as_secs()), true))?
    }
}

/// A request document as JSON bytes (these types always serialise).
fn encode<T: Serialize>(request: &T) -> Vec<u8> {
    serde_json::to_vec(request).unwrap_or_default()
}

/// Percent-encodes what is not unreserved in a query value (RFC 3986): addresses carry `[`, `]`,
/// `=` and `,`.
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
