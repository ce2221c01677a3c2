//! Identity from the tapproof control plane. On first start the agent makes its key here, joins
//! with the token (trusting the server through the root pin the token carries) and keeps key,
//! certificate, bundle and its control-plane state in `data_dir`, so a restart needs no token.
//! Then it renews at half-life (with jitter) over mTLS with its current identity, writing the new
//! files and swapping them in; while the server is unreachable it keeps serving on the current
//! certificate and says so in logs and metrics.

use crate::config::ControlConfig;
use crate::state::AgentState;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tapproof_identity::{new_csr, JoinToken, SpiffeId, TrustDomain};
use tapproof_tls::{ControlClientTls, IdentityFiles, ServerTrust};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node.key";
const BUNDLE: &str = "bundle.pem";
const STATE: &str = "control.json";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control.token: {0}")]
    Token(String),
    #[error("control plane at {server} refused the join: {code}: {message}")]
    Refused {
        server: String,
        code: String,
        message: String,
    },
    #[error("control plane at {server} unreachable: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("control.data_dir {path}: {detail}")]
    DataDir { path: PathBuf, detail: String },
}

/// What the agent remembers between starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ControlState {
    server: String,
    node: String,
    id: String,
    issued_at: i64,
    not_after: i64,
    /// Services registered to this node; their identities live in `svc-<name>.pem` / `.key`.
    #[serde(default)]
    services: Vec<String>,
}

#[derive(Deserialize)]
struct IssuedIdentity {
    id: String,
    chain_pem: String,
    not_after: i64,
}

#[derive(Deserialize)]
struct JoinResponse {
    node: String,
    identity: IssuedIdentity,
    bundle: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
}

fn service_files(data_dir: &Path, service: &str) -> (PathBuf, PathBuf) {
    (
        data_dir.join(format!("svc-{service}.pem")),
        data_dir.join(format!("svc-{service}.key")),
    )
}

/// New keys and CSRs for the node (when `node` is given) and each service.
fn service_csrs(
    td: &TrustDomain,
    services: &[String],
) -> Result<Vec<(String, String, String)>, ControlError> {
    let mut out = Vec::new();
    for service in services {
        let id = td
            .service_id(service)
            .map_err(|e| ControlError::Token(format!("service {service:?} from the server: {e}")))?;
        let (csr, key) = new_csr(Some(&id)).map_err(|e| ControlError::Token(e.to_string()))?;
        out.push((id.to_string(), csr, key));
    }
    Ok(out)
}

/// Keeps the service identities the server issued (key 0600 beside each certificate).
fn write_service_identities(
    data_dir: &Path,
    issued: &[IssuedIdentity],
    keys: &[(String, String, String)],
) -> Result<(), ControlError> {
    for i in issued {
        let Some((_, _, key)) = keys.iter().find(|(id, _, _)| id == &i.id) else {
            continue;
        };
        let Some(service) = i.id.rsplit_once("/svc/").map(|(_, s)| s) else {
            continue;
        };
        let (pem, key_path) = service_files(data_dir, service);
        write_file(&key_path, key.as_bytes(), 0o600)?;
        write_file(&pem, i.chain_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct SignResponse {
    identities: Vec<IssuedIdentity>,
    bundle: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
}

pub fn identity_files(data_dir: &Path) -> IdentityFiles {
    IdentityFiles {
        cert: data_dir.join(NODE_CERT),
        key: data_dir.join(NODE_KEY),
        bundle: data_dir.join(BUNDLE),
    }
}

fn server_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::new(td.clone(), "/server").expect("\"/server\" is a valid path")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn data_err(path: &Path, e: impl std::fmt::Display) -> ControlError {
    ControlError::DataDir {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ControlError> {
    tapproof_tls::write_identity_file(path, contents, mode).map_err(|e| data_err(path, e))
}

fn read_state(data_dir: &Path) -> Option<ControlState> {
    serde_json::from_slice(&std::fs::read(data_dir.join(STATE)).ok()?).ok()
}

async fn resolve(server: &str) -> Result<SocketAddr, ControlError> {
    let unreachable = |detail: String| ControlError::Unreachable {
        server: server.to_owned(),
        detail,
    };
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| unreachable("resolves to no address".into()))
}

/// POSTs JSON; returns the status and body.
async fn post(
    server: &str,
    tls: &ControlClientTls,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Bytes), ControlError> {
    request(server, tls, http::Method::POST, path, Some(body), REQUEST_TIMEOUT).await
}

pub async fn request(
    server: &str,
    tls: &ControlClientTls,
    method: http::Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Bytes), ControlError> {
    let unreachable = |detail: String| ControlError::Unreachable {
        server: server.to_owned(),
        detail,
    };
    let addr = resolve(server).await?;
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(format!("connect: {e}")))?;
        let tls_stream = tls
            .connect(tcp, addr)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls_stream))
                .await
                .map_err(|e| unreachable(format!("HTTP/2: {e}")))?;
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(method)
            .uri(format!("https://{server}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("request: {e}")))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(format!("response: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer in {} s", timeout.as_secs())))?
}

fn refusal(server: &str, body: &[u8]) -> ControlError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    ControlError::Refused {
        server: server.to_owned(),
        code: v["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
        message: v["error"]["message"].as_str().unwrap_or("no message").to_owned(),
    }
}

/// Returns the identity files, joining first if the data dir holds no identity yet.
pub async fn bootstrap(cfg: &ControlConfig, td: &TrustDomain) -> Result<IdentityFiles, ControlError> {
    let files = identity_files(&cfg.data_dir);
    if read_state(&cfg.data_dir).is_some() && files.cert.exists() && files.key.exists() {
        info!(data_dir = %cfg.data_dir.display(), "using the identity kept in the data dir (no join needed)");
        return Ok(files);
    }
    let text = match (&cfg.token, &cfg.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| ControlError::Token(format!("cannot read {}: {e}", f.display())))?,
        (None, None) => {
            return Err(ControlError::Token(format!(
            "no identity in {} yet and no token to join with; create one with `tapproof server token create`",
            cfg.data_dir.display()
        )))
        }
    };
    let token = JoinToken::parse(&text).map_err(|e| ControlError::Token(e.to_string()))?;
    let server = cfg.server.clone().unwrap_or_else(|| token.server.clone());
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .map_err(|e| data_err(&cfg.data_dir, e))?;

    let tls = ControlClientTls::new(ServerTrust::Pin(token.root_pin), server_id(td), None)
        .map_err(|e| ControlError::Token(e.to_string()))?;
    let (csr, key) = new_csr(None).map_err(|e| data_err(&cfg.data_dir, e))?;
    let body = serde_json::json!({ "token": text.trim(), "csr": csr })
        .to_string()
        .into_bytes();
    let (status, bytes) = post(&server, &tls, "/v1/join", body).await?;
    if status != 200 {
        return Err(refusal(&server, &bytes));
    }
    let joined: JoinResponse =
        serde_json::from_slice(&bytes).map_err(|e| refusal(&server, e.to_string().as_bytes()))?;
    write_file(&files.key, key.as_bytes(), 0o600)?;
    write_file(&files.cert, joined.identity.chain_pem.as_bytes(), 0o644)?;
    write_file(&files.bundle, joined.bundle.concat().as_bytes(), 0o644)?;
    if !joined.services.is_empty() {
        // The identities of the services registered to this node, over mTLS with the new identity.
        let tls = ControlClientTls::new(
            ServerTrust::Bundle(joined.bundle.clone()),
            server_id(td),
            Some((&joined.identity.chain_pem, &key)),
        )
        .map_err(|e| data_err(&files.cert, e))?;
        let keys = service_csrs(td, &joined.services)?;
        let csrs: Vec<_> = keys
            .iter()
            .map(|(id, csr, _)| serde_json::json!({ "id": id, "csr": csr }))
            .collect();
        let (status, bytes) = post(
            &server,
            &tls,
            "/v1/sign",
            serde_json::json!({ "csrs": csrs }).to_string().into_bytes(),
        )
        .await?;
        if status != 200 {
            return Err(refusal(&server, &bytes));
        }
        let signed: SignResponse =
            serde_json::from_slice(&bytes).map_err(|e| refusal(&server, e.to_string().as_bytes()))?;
        write_service_identities(&cfg.data_dir, &signed.identities, &keys)?;
        info!(services = ?joined.services, "received the identities of the services registered to this node");
    }
    let state = ControlState {
        server,
        node: joined.node,
        id: joined.identity.id,
        issued_at: now(),
        not_after: joined.identity.not_after,
        services: joined.services,
    };
    write_file(
        &cfg.data_dir.join(STATE),
        &serde_json::to_vec_pretty(&state).unwrap_or_default(),
        0o600,
    )?;
    info!(id = %state.id, server = %state.server, "joined the control plane");
    Ok(files)
}

/// When to renew: half-way through the certificate's life, give or take 10% of that half.
fn renew_at(state: &ControlState) -> i64 {
    let half = (state.not_after - state.issued_at).max(2) / 2;
    let jitter = (half / 10).max(1);
    state.issued_at + half + rand::rng().random_range(-jitter..=jitter)
}

/// Renews the node identity for as long as the agent runs.
pub async fn renew_loop(state: Arc<AgentState>, cfg: ControlConfig, stop: CancellationToken) {
    let mut retry = RETRY_MIN;
    loop {
        let Some(current) = read_state(&cfg.data_dir) else {
            warn!(data_dir = %cfg.data_dir.display(), "control state missing; cannot schedule renewal");
            return;
        };
        let wait = Duration::from_secs((renew_at(&current) - now()).max(0) as u64);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match renew(&state, &cfg, current).await {
            Ok(next) => {
                retry = RETRY_MIN;
                state.metrics.renewals.inc();
                state.metrics.control_plane_up.set(1);
                info!(id = %next.id, not_after = next.not_after, "renewed the node certificate; new handshakes use it, open tunnels stay up");
            }
            Err(e) => {
                state.metrics.renewal_failures.inc();
                state.metrics.control_plane_up.set(0);
                let left = state.material.current().seconds_to_expiry();
                warn!(error = %e, expires_in_s = left, retry_in_s = retry.as_secs(),
                      "cannot renew; serving on the current certificate until the control plane answers");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

async fn renew(
    state: &AgentState,
    cfg: &ControlConfig,
    current: ControlState,
) -> Result<ControlState, ControlError> {
    let files = identity_files(&cfg.data_dir);
    let td = &state.config.trust_domain;
    let tls = node_tls(&cfg.data_dir, td)?;
    let id = SpiffeId::parse(&current.id).map_err(|e| data_err(&cfg.data_dir.join(STATE), e))?;
    let (csr, new_key) = new_csr(Some(&id)).map_err(|e| data_err(&cfg.data_dir, e))?;
    let body = serde_json::json!({ "csrs": [{ "id": current.id, "csr": csr }] })
        .to_string()
        .into_bytes();
    let (status, bytes) = post(&current.server, &tls, "/v1/sign", body).await?;
    if status != 200 {
        return Err(refusal(&current.server, &bytes));
    }
    let signed: SignResponse =
        serde_json::from_slice(&bytes).map_err(|e| refusal(&current.server, e.to_string().as_bytes()))?;
    let services = signed.services.clone();
    // Service identities in a second request, for exactly the services the server now lists: a
    // registration removed meanwhile must not block the node's own renewal.
    if !services.is_empty() {
        let keys = service_csrs(td, &services)?;
        let csrs: Vec<_> = keys
            .iter()
            .map(|(id, csr, _)| serde_json::json!({ "id": id, "csr": csr }))
            .collect();
        match post(
            &current.server,
            &tls,
            "/v1/sign",
            serde_json::json!({ "csrs": csrs }).to_string().into_bytes(),
        )
        .await
        {
            Ok((200, bytes)) => match serde_json::from_slice::<SignResponse>(&bytes) {
                Ok(svc) => write_service_identities(&cfg.data_dir, &svc.identities, &keys)?,
                Err(e) => warn!(error = %e, "service identities: unreadable answer"),
            },
            Ok((_, bytes)) => {
                warn!(error = %refusal(&current.server, &bytes), "service identities not renewed")
            }
            Err(e) => warn!(error = %e, "service identities not renewed"),
        }
    }
    let issued = signed
        .identities
        .into_iter()
        .find(|i| i.id == current.id)
        .ok_or_else(|| refusal(&current.server, b"{\"error\":{\"code\":\"missing_identity\",\"message\":\"no certificate for the node in the answer\"}}"))?;
    // Keep the reload loop from reading the key and certificate between the two renames.
    state.renewing.store(true, Ordering::Release);
    let written = (|| {
        write_file(&files.key, new_key.as_bytes(), 0o600)?;
        write_file(&files.cert, issued.chain_pem.as_bytes(), 0o644)?;
        write_file(&files.bundle, signed.bundle.concat().as_bytes(), 0o644)
    })();
    let swapped = written.and_then(|()| {
        state
            .material
            .reload()
            .map(drop)
            .map_err(|e| data_err(&files.cert, e))
    });
    state.renewing.store(false, Ordering::Release);
    swapped?;
    let next = ControlState {
        issued_at: now(),
        not_after: issued.not_after,
        services,
        ..current
    };
    write_file(
        &cfg.data_dir.join(STATE),
        &serde_json::to_vec_pretty(&next).unwrap_or_default(),
        0o600,
    )?;
    Ok(next)
}

#[derive(Deserialize)]
struct StateResponse {
    version: i64,
    revocations: Vec<RevocationEntry>,
    bundle: Vec<String>,
    #[serde(default)]
    directory: Vec<DirectoryEntry>,
    #[serde(default)]
    policy: std::collections::HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct DirectoryEntry {
    service: String,
    id: String,
    tunnel: String,
}

#[derive(Deserialize)]
struct RevocationEntry {
    kind: String,
    value: String,
}

/// The server's address and a client config presenting this node's current identity.
pub(crate) fn node_client(
    cfg: &ControlConfig,
    td: &TrustDomain,
) -> Result<(String, ControlClientTls), ControlError> {
    let current = read_state(&cfg.data_dir).ok_or_else(|| data_err(&cfg.data_dir.join(STATE), "missing"))?;
    Ok((current.server, node_tls(&cfg.data_dir, td)?))
}

/// A client config presenting the identity in `data_dir`, which must be of trust domain `td`.
fn node_tls(data_dir: &Path, td: &TrustDomain) -> Result<ControlClientTls, ControlError> {
    let (tls, _) = ControlClientTls::from_files(&identity_files(data_dir), Some(td))
        .map_err(|e| data_err(data_dir, e))?;
    Ok(tls)
}

/// Sends a coverage report; the server answers 204.
pub(crate) async fn post_coverage(
    cfg: &ControlConfig,
    td: &TrustDomain,
    body: Vec<u8>,
) -> Result<(), ControlError> {
    let (server, tls) = node_client(cfg, td)?;
    let (status, bytes) = post(&server, &tls, "/v1/coverage", body).await?;
    if status != 204 {
        return Err(refusal(&server, &bytes));
    }
    Ok(())
}

/// Follows the control plane's state feed (long-poll) and applies revocations: revoked peers'
/// tunnels are closed and their new handshakes refused.
pub async fn state_loop(state: Arc<AgentState>, cfg: ControlConfig, stop: CancellationToken) {
    let mut since = 0i64;
    let mut retry = RETRY_MIN;
    loop {
        let step = async {
            let (server, tls) = node_client(&cfg, &state.config.trust_domain)?;
            let path = match state.advertise.get() {
                Some(addr) => format!("/v1/state?since={since}&tunnel={addr}"),
                None => format!("/v1/state?since={since}"),
            };
            let (status, bytes) =
                request(&server, &tls, http::Method::GET, &path, None, STATE_TIMEOUT).await?;
            if status != 200 {
                return Err(refusal(&server, &bytes));
            }
            serde_json::from_slice::<StateResponse>(&bytes)
                .map_err(|e| refusal(&server, e.to_string().as_bytes()))
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            o = step => o,
        };
        match outcome {
            Ok(feed) => {
                retry = RETRY_MIN;
                if feed.version != since {
                    let mut revoked = crate::state::Revoked::default();
                    for r in feed.revocations {
                        let set = match r.kind.as_str() {
                            "node" => &mut revoked.nodes,
                            "spiffe_id" => &mut revoked.ids,
                            "serial" => &mut revoked.serials,
                            _ => continue,
                        };
                        set.insert(r.value);
                    }
                    let closed = state.apply_revocations(revoked);
                    let mut directory: std::collections::HashMap<String, Vec<(SocketAddr, SpiffeId)>> =
                        Default::default();
                    for e in feed.directory {
                        match (e.tunnel.parse(), SpiffeId::parse(&e.id)) {
                            (Ok(addr), Ok(id)) => directory.entry(e.service).or_default().push((addr, id)),
                            _ => {
                                warn!(service = %e.service, tunnel = %e.tunnel, "state feed: unusable directory entry")
                            }
                        }
                    }
                    state.set_directory(directory);
                    let mut policy: std::collections::HashMap<String, Vec<crate::policy::AllowPattern>> =
                        Default::default();
                    for (service, patterns) in feed.policy {
                        let parsed: Vec<_> = patterns.iter().filter_map(|p| p.parse().ok()).collect();
                        if parsed.len() != patterns.len() {
                            warn!(service = %service, "state feed: policy has patterns this agent cannot parse; they are ignored");
                        }
                        policy.insert(service, parsed);
                    }
                    state.set_policy(policy);
                    if let Err(e) = install_bundle(&state, &cfg, &feed.bundle) {
                        warn!(error = %e, "cannot install the new trust bundle");
                    }
                    info!(
                        version = feed.version,
                        closed_tunnels = closed,
                        "state feed: revocations applied"
                    );
                    since = feed.version;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, retry_in_s = retry.as_secs(), "state feed unavailable");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Longer than the server's long-poll hold, so an idle feed is not mistaken for a dead server.
const STATE_TIMEOUT: Duration = Duration::from_secs(40);

/// Writes a changed trust bundle (root rollover) and swaps it in for new handshakes.
fn install_bundle(state: &AgentState, cfg: &ControlConfig, bundle: &[String]) -> Result<(), ControlError> {
    let path = identity_files(&cfg.data_dir).bundle;
    let new = bundle.concat();
    if bundle.is_empty() || std::fs::read_to_string(&path).is_ok_and(|old| old == new) {
        return Ok(());
    }
    state.renewing.store(true, Ordering::Release);
    let result = write_file(&path, new.as_bytes(), 0o644)
        .and_then(|()| state.material.reload().map(drop).map_err(|e| data_err(&path, e)));
    state.renewing.store(false, Ordering::Release);
    result?;
    info!(
        roots = bundle.len(),
        "trust bundle changed (root rollover): new handshakes trust the new set"
    );
    Ok(())
}
