//! The tapproof agent, the data plane: outbound listeners take plaintext from local apps and
//! carry each connection as an HTTP/2 CONNECT stream over a pooled mutual-TLS 1.3 tunnel to the
//! peer agent; the inbound tunnel listener verifies the peer's SPIFFE identity, checks policy per
//! stream and forwards to the local service. Never plaintext off the host.

pub mod admin;
pub mod capture;
pub mod config;
pub mod control;
mod copy;
mod coverage;
mod drain;
pub mod endpoint;
pub mod federation;
pub mod gateway;
pub mod handshakes;
mod inbound;
pub mod limits;
pub mod metrics;
mod outbound;
pub mod selftest;
/// Allow patterns live in `tapproof-identity` (the control plane checks them too).
pub mod policy {
    pub use tapproof_identity::pattern::*;
}
mod pool;
mod reload;
pub mod sites;
mod socket;
mod state;
pub mod udp;
pub mod vouch;
pub mod workload;

pub use admin::{BoundAddresses, BoundOutbound};
pub use config::{AgentConfig, ConfigError};
pub use state::AgentState;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tapproof_tls::{IdentityFiles, MaterialError, ReloadingMaterial};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("identity: {0}")]
    Identity(#[from] MaterialError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("{key} = {addr}: cannot listen: {error}")]
    Bind {
        key: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error(transparent)]
    Federation(#[from] federation::FederationError),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("cannot write ready file {path}: {error}")]
    ReadyFile { path: PathBuf, error: std::io::Error },
}

/// The identity files a config uses: its own `[identity]`, or those `[control]` keeps in the data
/// dir (which do not exist before the first join).
pub fn identity_files(config: &AgentConfig) -> IdentityFiles {
    match (&config.identity, &config.control) {
        (Some(id), _) => IdentityFiles {
            cert: id.cert.clone(),
            key: id.key.clone(),
            bundle: id.bundle.clone(),
        },
        (None, Some(control)) => control::identity_files(&control.data_dir),
        (None, None) => unreachable!("config checks guarantee an identity source"),
    }
}

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Written (atomically) with the bound addresses as JSON once every listener is up.
    pub ready_file: Option<PathBuf>,
    /// The open-file limit in force (the binary raises it at start); sizes the fd budget.
    pub fd_limit: Option<u64>,
    /// The config file, re-read on SIGHUP (`reload.rs`); without it SIGHUP re-reads only the
    /// identity files.
    pub config_path: Option<PathBuf>,
}

async fn bind(key: String, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| AgentError::Bind { key, addr, error })
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

/// Loads the identity, binds every listener, serves until `shutdown` resolves, then drains.
pub async fn run(
    config: AgentConfig,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let files = match (&config.identity, &config.control) {
        (Some(id), _) => IdentityFiles {
            cert: id.cert.clone(),
            key: id.key.clone(),
            bundle: id.bundle.clone(),
        },
        (None, Some(control)) => {
            let algorithm = config.tunnel.crypto_profile.key_algorithm();
            control::bootstrap(control, &config.trust_domain, algorithm).await?
        }
        (None, None) => unreachable!("config checks guarantee an identity source"),
    };
    let material = ReloadingMaterial::load(files, config.trust_domain.clone())?;
    let foreign = federation::load_files(&config.federation)?;
    let admin_listener = bind("admin.listen".into(), config.admin.listen).await?;
    let tunnel_listener = if !config.serves_tunnels() {
        None
    } else {
        Some(bind("tunnel.listen".into(), config.tunnel.listen).await?)
    };
    let mut outbound_listeners = Vec::new();
    for (i, o) in config.outbound.iter().enumerate() {
        if let Some(listen) = o.listen {
            outbound_listeners.push((bind(format!("outbound[{i}].listen"), listen).await?, o.clone()));
        }
    }
    // Capture asked for and not possible stops the agent here, before it serves anything. An
    // agent with [control] and no capture of its own waits, dormant, for what the policy asks.
    let capture = if config.uses_capture() {
        Some(capture::Capture::start(&config, material.current().id()).await?)
    } else if config.control.is_some() {
        Some(capture::Capture::dormant())
    } else {
        None
    };
    let mut bound = BoundAddresses {
        admin: local(&admin_listener, config.admin.listen),
        tunnel: tunnel_listener.as_ref().map(|l| local(l, config.tunnel.listen)),
        outbound: Vec::new(),
    };

    if let Some(addr) = bound.tunnel {
        vouch::sockets().listening(addr);
    }
    let state = Arc::new(AgentState::new(config, material, foreign, options.fd_limit));
    // The identity must fit `tunnel.crypto_profile` (`cnsa2` signs with ML-DSA-87 only): a
    // node that could not shake hands refuses to start instead.
    state.server_tls()?;
    federation::record_loaded(&state);
    let advertise = state
        .config
        .tunnel
        .advertise
        .or(bound.tunnel.filter(|a| !a.ip().is_unspecified()));
    if let Some(addr) = advertise {
        let _ = state.advertise.set(addr);
    }
    let stop = CancellationToken::new();
    let streams = TaskTracker::new();
    let material = state.material.current();
    info!(id = %material.id(), serial = %material.svid().serial, expires_in_s = material.seconds_to_expiry(),
          admin = %bound.admin,
          tunnel = %bound.tunnel.map_or_else(|| "none (no [[inbound]])".to_owned(), |t| t.to_string()),
          outbound = %bound.outbound.iter().map(|o| format!("{}={}", o.service, o.listen)).collect::<Vec<_>>().join(", "),
          "agent listening");
    state
        .metrics
        .cert_expiry_seconds
        .set(material.seconds_to_expiry());

    let mut outbounds = reload::Outbounds::new(state.clone(), stop.clone(), streams.clone());
    for (listener, outbound) in outbound_listeners {
        outbounds.start(listener, outbound);
    }
    let mut serving = Vec::new();
    if let Some(capture) = capture {
        let bound = capture.bound();
        if !bound.is_empty() {
            info!(listen = ?bound, "capture listener up");
        }
        serving.extend(capture.serve(state.clone(), stop.clone(), streams.clone()));
    }
    bound.outbound = outbounds.bound();
    let outbounds = Arc::new(tokio::sync::Mutex::new(outbounds));
    let shared_bound = Arc::new(std::sync::RwLock::new(bound.clone()));
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        state.clone(),
        shared_bound.clone(),
        admin_stop.clone(),
    ));
    tokio::spawn(drain::reload_loop(state.clone(), stop.clone()));
    if let (Some(listen), false) = (bound.tunnel, state.config.tunnel.selftest_interval.is_zero()) {
        let target = selftest::target(listen);
        let (state, stop, every) = (state.clone(), stop.clone(), state.config.tunnel.selftest_interval);
        tokio::spawn(async move {
            tokio::select! {
                () = selftest::schedule(state, target, every, every) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    for f in state.config.federation.iter().filter(|f| f.endpoint.is_some()) {
        tokio::spawn(federation::refresh_loop(state.clone(), f.clone(), stop.clone()));
    }
    if let Some(control) = state.config.control.clone() {
        // Up until an exchange says otherwise (it joined or holds an identity from it).
        state.metrics.control_plane_up.set(1);
        tokio::spawn(control::renew_loop(state.clone(), control.clone(), stop.clone()));
        tokio::spawn(coverage::report_loop(
            state.clone(),
            control.clone(),
            stop.clone(),
        ));
        tokio::spawn(control::state_loop(state.clone(), control, stop.clone()));
    }
    if let Some(listener) = tunnel_listener {
        serving.push(tokio::spawn(inbound::serve(
            listener,
            state.clone(),
            stop.clone(),
            streams.clone(),
        )));
    }
    tokio::spawn(
        reload::Reloader {
            state: state.clone(),
            path: options.config_path.clone(),
            outbounds: outbounds.clone(),
            bound: shared_bound,
            tunnel_listener: state.config.serves_tunnels(),
        }
        .on_hangup(stop.clone()),
    );
    let workload = match state.config.workload_api.clone() {
        Some(w) => Some(workload::serve(w, state.clone(), stop.clone())?),
        None => None,
    };
    state.ready.store(true, Ordering::Release);
    if let Some(path) = &options.ready_file {
        write_ready_file(path, &bound).map_err(|error| AgentError::ReadyFile {
            path: path.clone(),
            error,
        })?;
    }

    shutdown.await;
    serving.extend(outbounds.lock().await.take_tasks());
    drain::drain(&state, stop, streams, serving).await;
    admin_stop.cancel();
    let _ = admin.await;
    if let Some(w) = workload {
        let _ = w.await;
    }
    Ok(())
}

fn write_ready_file(path: &std::path::Path, bound: &BoundAddresses) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(bound).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// Entry points for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::state::AgentState;
    use std::sync::Arc;
    use tapproof_identity::SpiffeId;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Drives the tunnel's HTTP/2 server and CONNECT handling with `input` as everything an
    /// authenticated peer `peer_id` sends after the TLS handshake, over an in-memory pipe; returns
    /// once the tunnel and its streams ended (or after two seconds).
    pub async fn tunnel_bytes(state: &Arc<AgentState>, peer_id: SpiffeId, input: Vec<u8>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_agent, mut to_agent) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while matches!(from_agent.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let feed = tokio::spawn(async move {
            let _ = to_agent.write_all(&input).await;
            let _ = to_agent.shutdown().await;
        });
        let session = tapproof_tls::SessionInfo {
            version: "TLSv1.3".into(),
            cipher: String::new(),
            group: String::new(),
            peer_id: Some(peer_id.clone()),
            resumed: false,
            peer_not_after: None,
            peer_serial: None,
            peer_signature: None,
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            crate::inbound::serve_tunnel(server, peer, peer_id, &session, state, &shutdown, &tracker),
        )
        .await;
        tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), tracker.wait()).await;
        feed.abort();
        drain.abort();
    }
}
