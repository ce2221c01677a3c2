//! The SPIFFE Workload API (X.509 part) on a Unix socket: the spec's gRPC service
//! `SpiffeWorkloadAPI`, methods `FetchX509SVID` and `FetchX509Bundles` (both server streams: the
//! current answer at once, then a new one whenever it changes, checked every second). The JWT
//! methods answer UNIMPLEMENTED. Every request must carry the metadata `workload.spiffe.io: true`
//! (the spec's guard against server-side request forgery); the caller is the user the kernel
//! reports for the socket (SO_PEERCRED), mapped to identities by `[[workload_api.caller]]`.
//!
//! The identities handed out are the ones this agent already holds: the node's (from
//! `[identity]` or the control plane) and, with `[control]`, those of the services registered
//! to this node (`svc-<name>` in the data dir). Keys never leave the host: they go to a local
//! process the config names, over a socket only local processes can reach.

use crate::config::WorkloadApiConfig;
use crate::metrics::WorkloadLabels;
use crate::state::AgentState;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tapproof_tls::{ExportedSvid, Material};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

mod authority;

/// How often an open stream checks whether its answer changed.
const WATCH_EVERY: Duration = Duration::from_secs(1);
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The messages of the spec's `workload.proto` (package-less) that the X.509 methods use, with
/// its field numbers.
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<X509Svid>,
        #[prost(bytes = "vec", repeated, tag = "2")]
        pub crl: Vec<Vec<u8>>,
        #[prost(map = "string, bytes", tag = "3")]
        pub federated_bundles: HashMap<String, Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509Svid {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        /// The chain, leaf first, concatenated DER.
        #[prost(bytes = "vec", tag = "2")]
        pub x509_svid: Vec<u8>,
        /// PKCS#8 DER.
        #[prost(bytes = "vec", tag = "3")]
        pub x509_svid_key: Vec<u8>,
        /// The trust domain's roots, concatenated DER.
        #[prost(bytes = "vec", tag = "4")]
        pub bundle: Vec<u8>,
        #[prost(string, tag = "5")]
        pub hint: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesResponse {
        #[prost(bytes = "vec", repeated, tag = "1")]
        pub crl: Vec<Vec<u8>>,
        #[prost(map = "string, bytes", tag = "2")]
        pub bundles: HashMap<String, Vec<u8>>,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload_api.socket = {path}: {error}")]
    Bind { path: PathBuf, error: std::io::Error },
    #[error("workload_api.socket = {path}: a file that is not a socket is in the way; remove it or choose another path")]
    NotSocket { path: PathBuf },
}

/// What one caller may have.
#[derive(Debug, Default, PartialEq, Eq)]
struct Grant {
    node: bool,
    services: Vec<String>,
}

impl Grant {
    /// Nothing at all: such a caller is told "no identity issued".
    fn is_empty(&self) -> bool {
        !self.node && self.services.is_empty()
    }
}

/// The identities `uid` gets under `config` (none when no caller entry names it).
fn grant(config: &WorkloadApiConfig, uid: u32) -> Grant {
    if config.caller.is_empty() {
        let own = nix::unistd::geteuid().as_raw();
        return Grant {
            node: uid == 0 || uid == own,
            services: Vec::new(),
        };
    }
    let mut g = Grant::default();
    for c in &config.caller {
        let matches = match (&c.uid, &c.user) {
            (Some(u), _) => *u == uid,
            (None, Some(name)) => {
                matches!(nix::unistd::User::from_name(name), Ok(Some(u)) if u.uid.as_raw() == uid)
            }
            (None, None) => false,
        };
        if matches {
            g.node |= c.node;
            for s in &c.services {
                if !g.services.contains(s) {
                    g.services.push(s.clone());
                }
            }
        }
    }
    g
}

fn svid_message(svid: ExportedSvid, hint: &str) -> proto::X509Svid {
    proto::X509Svid {
        spiffe_id: svid.id.to_string(),
        x509_svid: svid.chain_der,
        x509_svid_key: svid.key_pkcs8_der,
        bundle: svid.bundle_der,
        hint: hint.to_owned(),
    }
}

/// Service identities as last read, by certificate path. The data dir writes every change as a
/// new generation directory, so a path's files never change; an entry is still re-read after
/// `SVID_RECHECK` (an identity that expires unrenewed stops being handed out) and the cache is
/// emptied when it grows past `SVID_CACHE_MAX` paths (old generations).
#[derive(Clone, Default)]
struct SvidCache(Arc<std::sync::Mutex<HashMap<PathBuf, CachedSvid>>>);

/// When it was read, and what was found (None: missing or refused).
type CachedSvid = (std::time::Instant, Option<ExportedSvid>);

const SVID_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);
const SVID_CACHE_MAX: usize = 256;

/// A service identity from the data dir, checked like the node's; `None` (logged once per read)
/// when it is missing or does not pass. Open streams ask every second; the files are read at most
/// every `SVID_RECHECK` per generation.
fn service_svid(
    data_dir: &Path,
    state: &AgentState,
    cache: &SvidCache,
    service: &str,
) -> Option<ExportedSvid> {
    let files = crate::control::service_identity_files(data_dir, service)?;
    let mut cached = cache.0.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((read_at, svid)) = cached.get(&files.cert) {
        if read_at.elapsed() < SVID_RECHECK {
            return svid.clone();
        }
    }
    if cached.len() >= SVID_CACHE_MAX {
        cached.clear();
    }
    let svid = read_service_svid(&files, state, service);
    cached.insert(files.cert.clone(), (std::time::Instant::now(), svid.clone()));
    svid
}

fn read_service_svid(
    files: &tapproof_tls::IdentityFiles,
    state: &AgentState,
    service: &str,
) -> Option<ExportedSvid> {
    if !files.cert.exists() {
        debug!(
            service,
            "workload api: no identity for this service on this node (is it registered to it?)"
        );
        return None;
    }
    match Material::load(files, &state.config.trust_domain).map(|m| m.exported()) {
        Ok(Ok(svid)) => Some(svid),
        Ok(Err(e)) => {
            warn!(service, error = %e, "workload api: service identity not handed out");
            None
        }
        Err(e) => {
            warn!(service, error = %e, "workload api: service identity not handed out");
            None
        }
    }
}

/// The X509SVIDResponse for `grant`: the node's identity first (the default SVID) when granted,
/// then each granted service's that this node holds.
fn x509_response(
    state: &AgentState,
    cache: &SvidCache,
    grant: &Grant,
) -> Result<proto::X509SvidResponse, Status> {
    let mut svids = Vec::new();
    if grant.node {
        match state.material.current().exported() {
            Ok(svid) => svids.push(svid_message(svid, "node")),
            Err(e) => warn!(error = %e, "workload api: node identity not handed out"),
        }
    }
    if let Some(control) = &state.config.control {
        for service in &grant.services {
            if let Some(svid) = service_svid(&control.data_dir, state, cache, service) {
                svids.push(svid_message(svid, service));
            }
        }
    }
    if svids.is_empty() {
        return Err(Status::permission_denied("no identity issued"));
    }
    Ok(proto::X509SvidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: federated_bundles(state),
    })
}

/// The federated trust domains' roots (`[[federation]]`), keyed by `spiffe://<td>`, each
/// concatenated DER as the spec has it.
fn federated_bundles(state: &AgentState) -> HashMap<String, Vec<u8>> {
    let foreign = state.federation.current();
    foreign
        .trust_domains()
        .map(|td| {
            let der = foreign.roots_der(td).unwrap_or_default().concat();
            (format!("spiffe://{td}"), der)
        })
        .collect()
}

/// The X509BundlesResponse: this trust domain's roots and the federated ones, each keyed by the
/// trust domain's SPIFFE ID (`spiffe://<td>`).
fn bundles_response(state: &AgentState) -> Result<proto::X509BundlesResponse, Status> {
    let svid = state
        .material
        .current()
        .exported()
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut bundles = federated_bundles(state);
    bundles.insert(format!("spiffe://{}", state.config.trust_domain), svid.bundle_der);
    Ok(proto::X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

#[derive(Clone)]
struct Api {
    state: Arc<AgentState>,
    config: Arc<WorkloadApiConfig>,
    stop: CancellationToken,
    svids: SvidCache,
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl Api {
    /// The caller's grant, after the spec's checks (security header, caller identity).
    fn admit<T>(&self, method: &'static str, request: &Request<T>) -> Result<Grant, Status> {
        let count = |result: &'static str| {
            self.state
                .metrics
                .workload_api
                .get_or_create(&WorkloadLabels { method, result })
                .inc();
        };
        if request
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            count("no_security_header");
            return Err(Status::invalid_argument("security header missing from request"));
        }
        let caller = request.extensions().get::<Caller>();
        let Some(uid) = caller.and_then(|c| c.uid) else {
            count("no_peer_credentials");
            return Err(Status::permission_denied(
                "the caller's credentials could not be read",
            ));
        };
        let g = grant(&self.config, uid);
        debug!(method, uid, pid = ?caller.and_then(|c| c.pid), node = g.node, services = ?g.services, "workload api call");
        count(if g.is_empty() { "no_identity" } else { "ok" });
        Ok(g)
    }

    /// A stream that sends `next()` at once and again whenever its value changes, until the
    /// client goes away or the agent stops. An error ends the stream with that status.
    fn watch<M, F>(&self, next: F) -> Result<ReceiverStream<Result<M, Status>>, Status>
    where
        M: PartialEq + Clone + Send + 'static,
        F: Fn() -> Result<M, Status> + Send + 'static,
    {
        let first = next()?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                }
                match next() {
                    Ok(m) if m == last => {}
                    Ok(m) => {
                        last = m.clone();
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

struct FetchX509Svid(Api);
struct FetchX509Bundles(Api);

type Answer<M> =
    Pin<Box<dyn Future<Output = Result<Response<ReceiverStream<Result<M, Status>>>, Status>> + Send>>;

impl tonic::server::ServerStreamingService<proto::X509SvidRequest> for FetchX509Svid {
    type Response = proto::X509SvidResponse;
    type ResponseStream = ReceiverStream<Result<proto::X509SvidResponse, Status>>;
    type Future = Answer<proto::X509SvidResponse>;

    fn call(&mut self, request: Request<proto::X509SvidRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            let grant = api.admit("fetch_x509_svid", &request)?;
            let (state, cache) = (api.state.clone(), api.svids.clone());
            api.watch(move || x509_response(&state, &cache, &grant))
                .map(Response::new)
        })
    }
}

impl tonic::server::ServerStreamingService<proto::X509BundlesRequest> for FetchX509Bundles {
    type Response = proto::X509BundlesResponse;
    type ResponseStream = ReceiverStream<Result<proto::X509BundlesResponse, Status>>;
    type Future = Answer<proto::X509BundlesResponse>;

    fn call(&mut self, request: Request<proto::X509BundlesRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            // Bundles are public, but the spec asks the same of every call, and a caller given
            // no identity has no use for them either.
            let grant = api.admit("fetch_x509_bundles", &request)?;
            if grant.is_empty() {
                return Err(Status::permission_denied("no identity issued"));
            }
            let state = api.state.clone();
            api.watch(move || bundles_response(&state)).map(Response::new)
        })
    }
}

impl tonic::server::NamedService for Api {
    const NAME: &'static str = "SpiffeWorkloadAPI";
}

impl<B> tonic::codegen::Service<http::Request<B>> for Api
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let api = self.clone();
        match request.uri().path() {
            "/SpiffeWorkloadAPI/FetchX509SVID" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchX509Svid(api), request).await)
            }),
            "/SpiffeWorkloadAPI/FetchX509Bundles" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchX509Bundles(api), request).await)
            }),
            // FetchJWTSVID, FetchJWTBundles, ValidateJWTSVID and anything else.
            _ => Box::pin(async move {
                Ok(
                    Status::unimplemented("this agent serves the X.509 methods of the Workload API only")
                        .into_http(),
                )
            }),
        }
    }
}

/// Binds the socket (replacing a stale one, mode 0666) and serves until `stop`.
pub fn serve(
    config: WorkloadApiConfig,
    state: Arc<AgentState>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, WorkloadError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let path = config.socket.clone();
    let bind_err = |error| WorkloadError::Bind {
        path: path.clone(),
        error,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(WorkloadError::NotSocket { path });
        }
        std::fs::remove_file(&path).map_err(bind_err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    info!(socket = %path.display(), callers = config.caller.len(), "workload api listening");
    let incoming = accept_loop(listener, stop.clone());
    let api = Api {
        state,
        config: Arc::new(config),
        stop: stop.clone(),
        svids: SvidCache::default(),
    };
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(api)
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "workload api stopped");
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// Who is on the other end of a connection, as the kernel says (SO_PEERCRED).
#[derive(Debug, Clone)]
struct Caller {
    uid: Option<u32>,
    pid: Option<i32>,
}

/// A Workload API connection as the gRPC server sees it: the server's end of a pipe whose other
/// end `authority::client_to_server` feeds from the socket.
struct Conn {
    io: DuplexStream,
    caller: Caller,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts connections, reads each caller's credentials, and hands the gRPC server a pipe
/// through the `:authority` fix (`authority.rs`).
fn accept_loop(listener: UnixListener, stop: CancellationToken) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "workload api: accept failed");
                        tokio::time::sleep(tapproof_tls::admission::ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let cred = stream.peer_cred().ok();
            let caller = Caller {
                uid: cred.map(|c| c.uid()),
                pid: cred.and_then(|c| c.pid()),
            };
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(relay(stream, ours));
            if tx.send(Ok(Conn { io: theirs, caller })).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Socket to server through the rewrite, server to socket as is. Each direction ends on its own
/// (an end in one closes the next hop's write side, so the other follows).
async fn relay(stream: UnixStream, pipe: DuplexStream) {
    let (from_client, mut to_client) = stream.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(pipe);
    let up = async move {
        if let Err(e) = authority::client_to_server(from_client, &mut to_server).await {
            debug!(error = %e, "workload api: connection closed");
        }
        // The server sees the end (dropping one half of the split pipe would not tell it).
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_server).await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkloadCaller;

    fn caller(uid: u32, node: bool, services: &[&str]) -> WorkloadCaller {
        WorkloadCaller {
            uid: Some(uid),
            user: None,
            node,
            services: services.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn callers_get_what_their_entries_name_and_nobody_else_anything() {
        let config = WorkloadApiConfig {
            socket: "/run/x.sock".into(),
            caller: vec![
                caller(1000, false, &["db"]),
                caller(1000, true, &["db", "web"]),
                caller(1001, false, &["web"]),
            ],
        };
        assert_eq!(
            grant(&config, 1000),
            Grant {
                node: true,
                services: vec!["db".into(), "web".into()]
            }
        );
        assert_eq!(
            grant(&config, 1001),
            Grant {
                node: false,
                services: vec!["web".into()]
            }
        );
        assert_eq!(
            grant(&config, 0),
            Grant::default(),
            "root is not special once callers are listed"
        );
        assert_eq!(grant(&config, 4242), Grant::default());
    }

    #[test]
    fn without_callers_only_root_and_the_agents_user_get_the_node_identity() {
        let config = WorkloadApiConfig {
            socket: "/run/x.sock".into(),
            caller: Vec::new(),
        };
        let own = nix::unistd::geteuid().as_raw();
        assert!(grant(&config, 0).node);
        assert!(grant(&config, own).node);
        let other = if own == 4242 { 4243 } else { 4242 };
        assert_eq!(grant(&config, other), Grant::default());
    }

    #[test]
    fn a_caller_named_by_user_matches_that_users_uid() {
        let config = WorkloadApiConfig {
            socket: "/run/x.sock".into(),
            caller: vec![WorkloadCaller {
                uid: None,
                user: Some("root".into()),
                node: true,
                services: Vec::new(),
            }],
        };
        assert!(grant(&config, 0).node);
        assert!(!grant(&config, 1).node);
    }
}
