//! `tapproof server run`: TLS 1.3 accept loop (hyper serves HTTP/2 and HTTP/1.1 on it), with the
//! client's SPIFFE ID attached to each connection's requests, and the server's own identity
//! (`spiffe://<td>/server`) issued from the active CA at start and refreshed at half-life. On the
//! shutdown future (SIGTERM) it drains: stops accepting, answers waiting long-polls, lets
//! in-flight requests finish (up to 10 s), then returns.

use crate::app::{AppState, Peer};
use crate::kek::Kek;
use crate::routes::router;
use crate::{open_store, Ca, ServerError};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapproof_identity::TrustDomain;
use tapproof_tls::ControlServerTls;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// The server's own certificate lifetime; refreshed at half of it.
const SERVER_CERT_LIFETIME: time::Duration = time::Duration::hours(24);

pub const MIN_LEAF_TTL: Duration = Duration::from_secs(30);

/// How long a stopping server waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RunOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub store: Option<String>,
    pub kek_file: Option<PathBuf>,
    pub leaf_ttl: Duration,
    /// The admin listener (plain HTTP: `/metrics`, `/healthz`, `/readyz`); none when `None`.
    pub admin_listen: Option<SocketAddr>,
    /// Written with `{"listen": "<addr>", "admin": "<addr>"}` once the listeners are bound.
    pub ready_file: Option<PathBuf>,
    /// Roll the root over automatically.
    pub rollover: Option<crate::rollover::Schedule>,
    /// Connection caps, timeouts and rate limits.
    pub limits: crate::limits::Limits,
    /// How long handshake records are kept (pruned hourly).
    pub handshake_retention: Duration,
    /// How often the control plane probes every agent (`probes.rs`); the first round one
    /// interval after start. None: never on a schedule.
    pub probe_interval: Option<Duration>,
}

/// Handshake records are kept this long unless `--handshake-retention` says otherwise: PCI DSS
/// 10.5.1 asks a year of audit history; a bit more covers a yearly audit's window.
pub const DEFAULT_HANDSHAKE_RETENTION: Duration = Duration::from_secs(400 * 24 * 3600);

fn server_tls(ca: &Ca, expired_grace: Duration) -> Result<ControlServerTls, ServerError> {
    let id = tapproof_identity::SpiffeId::new(ca.trust_domain.clone(), "/server")
        .map_err(|e| ServerError::Ca(e.to_string()))?;
    let issued = ca
        .signer
        .issue_with_new_key(&id, SERVER_CERT_LIFETIME)
        .map_err(|e| ServerError::Ca(e.to_string()))?;
    // The root rides along so an agent holding only the token's pin can find and check it.
    let chain = format!("{}{}", issued.chain_pem, ca.signer_root_pem);
    ControlServerTls::new(
        &chain,
        &issued.key_pem,
        &ca.bundle,
        &ca.trust_domain,
        expired_grace,
    )
    .map_err(|e| ServerError::Ca(e.to_string()))
}

pub async fn run(options: RunOptions, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    // Short lifetimes exist for tests of rotation; below this, renewal traffic dominates.
    if options.leaf_ttl < MIN_LEAF_TTL {
        return Err(ServerError::Invalid(format!(
            "--leaf-ttl must be at least {}s",
            MIN_LEAF_TTL.as_secs()
        )));
    }
    let (meta, store) = open_store(&options.data_dir, options.store.as_deref()).await?;
    let td = TrustDomain::new(&meta.trust_domain).map_err(|e| ServerError::Invalid(e.to_string()))?;
    let kek_file = options
        .kek_file
        .clone()
        .unwrap_or_else(|| crate::default_kek_file(&options.data_dir));
    let kek = Arc::new(Kek::load(&kek_file)?);
    let ca = Arc::new(Ca::load(&*store, &kek, &td).await?);
    let limits = options.limits.clone();
    let grace = limits.expired_renewal_window;
    let tls = Arc::new(RwLock::new(server_tls(&ca, grace)?));
    let (version_tx, version_rx) = tokio::sync::watch::channel(crate::rollover::feed_version(&*store).await?);
    let rate = crate::limits::RateLimits::new(&limits);
    let state = Arc::new(AppState {
        version: version_rx,
        feed_cache: tokio::sync::Mutex::new(None),
        revoked: RwLock::new(Arc::new(crate::app::load_revocations(&*store).await?)),
        draining: tokio_util::sync::CancellationToken::new(),
        store: store.clone(),
        ca: RwLock::new(ca),
        leaf_ttl: options.leaf_ttl,
        metrics: crate::metrics::ServerMetrics::new(&rate.refusals),
        rate,
        limits: limits.clone(),
        acks: Default::default(),
    });
    let admission = crate::limits::Admission::new(limits.max_connections, limits.max_connections_per_source);
    let refused_log = Arc::new(crate::limits::LogThrottle::new(Duration::from_secs(10)));
    let app = router(state.clone());

    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|e| ServerError::Bind {
            addr: options.listen,
            detail: e.to_string(),
        })?;
    let bound = listener.local_addr().unwrap_or(options.listen);
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let mut admin_bound = None;
    let admin = match options.admin_listen {
        Some(addr) => {
            let admin = TcpListener::bind(addr).await.map_err(|e| ServerError::Bind {
                addr,
                detail: e.to_string(),
            })?;
            admin_bound = Some(admin.local_addr().unwrap_or(addr));
            Some(tokio::spawn(crate::ops::serve(
                admin,
                state.clone(),
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    let prober = tokio::spawn(crate::metrics::probe_loop(state.clone()));
    let pruner = tokio::spawn(prune_loop(store.clone(), options.handshake_retention));
    let prober_of_agents = options.probe_interval.map(|every| {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = crate::probes::round(&*state.store, &state.ca(), "server").await {
                    tracing::warn!(error = %e, "control-plane probe round failed");
                }
            }
        })
    });
    info!(listen = %bound, admin = %admin_bound.map_or_else(|| "off".to_owned(), |a| a.to_string()), trust_domain = %td, store = store.backend(), leaf_ttl_s = options.leaf_ttl.as_secs(), "control plane serving");
    if let Some(path) = &options.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({
                "listen": bound.to_string(),
                "admin": admin_bound.map(|a| a.to_string()),
            })
            .to_string(),
        )
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ServerError::DataDir {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    }

    let refresher = {
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            let half = Duration::from_secs((SERVER_CERT_LIFETIME.whole_seconds() / 2) as u64);
            loop {
                tokio::time::sleep(half).await;
                let ca = state.ca.read().unwrap_or_else(|p| p.into_inner()).clone();
                match server_tls(&ca, grace) {
                    Ok(new) => *tls.write().unwrap_or_else(|p| p.into_inner()) = new,
                    Err(e) => warn!(error = %e, "cannot refresh the server certificate"),
                }
            }
        })
    };

    // Changes made by other processes (the CLI, other replicas) reach the feed through this
    // watcher: PostgreSQL wakes it with NOTIFY; on SQLite it looks once a second.
    let mut changes = store.listen_changes().await?;
    // The store going away under the server (the SQLite file removed or replaced) stops it: every
    // later write would be lost, and a supervisor's restart then fails with the reason.
    let (fatal_tx, mut fatal) = tokio::sync::mpsc::channel::<ServerError>(1);
    let watcher = {
        let (store, state, tls, kek) = (store.clone(), state.clone(), tls.clone(), kek.clone());
        let td = td.clone();
        tokio::spawn(async move {
            loop {
                changes.next().await;
                if let Err(e) = store.check_alive() {
                    tracing::error!(error = %e, "control plane: the store is gone; stopping");
                    let _ = fatal_tx.send(ServerError::from(e)).await;
                    return;
                }
                let v = match crate::rollover::feed_version(&*store).await {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(error = %e, "cannot read the store for changes");
                        continue;
                    }
                };
                if v == *version_tx.borrow() {
                    continue;
                }
                // Revocations first: from here on, handshakes and calls of revoked identities fail.
                if let Err(e) = state.refresh_revocations().await {
                    warn!(error = %e, "cannot reload the revocation list");
                }
                // A CA change (rollover step) means a new signer or bundle: reload both, and
                // re-issue the server's own certificate from the signer now active.
                match Ca::load(&*store, &kek, &td).await {
                    Ok(ca) => {
                        let ca = Arc::new(ca);
                        match server_tls(&ca, grace) {
                            Ok(new) => *tls.write().unwrap_or_else(|p| p.into_inner()) = new,
                            Err(e) => warn!(error = %e, "cannot re-issue the server certificate"),
                        }
                        info!(
                            bundle_roots = ca.bundle.len(),
                            "CA or revocations changed; state feed version {v}"
                        );
                        *state.ca.write().unwrap_or_else(|p| p.into_inner()) = ca;
                    }
                    Err(e) => warn!(error = %e, "cannot reload the CA"),
                }
                state.metrics.change_noticed(v);
                version_tx.send_replace(v);
            }
        })
    };

    let scheduler = options.rollover.map(|schedule| {
        let (store, kek, td) = (store.clone(), kek.clone(), td.clone());
        tokio::spawn(async move {
            let every = (schedule.propagation / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                tokio::time::sleep(every).await;
                match crate::rollover::scheduled_step(&*store, &kek, &td, &schedule).await {
                    Ok(Some(done)) => info!(step = %done, "scheduled root rollover"),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "scheduled root rollover step failed"),
                }
            }
        })
    });

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stopped_by = None;
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            Some(e) = fatal.recv() => {
                stopped_by = Some(e);
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if let Some(more) = refused_log.tick() {
                        warn!(error = %e, suppressed = more, "control plane: accept failed, backing off (one line per 10 s)");
                    }
                    tokio::time::sleep(tapproof_tls::admission::ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let admitted = match admission.admit(addr.ip()) {
            Ok(a) => a,
            Err(full) => {
                let (counter, what) = match full {
                    crate::limits::Full::Total => {
                        (&state.rate.refusals.connections_total, "the connection cap")
                    }
                    crate::limits::Full::PerKey => (
                        &state.rate.refusals.connections_per_source,
                        "the per-source connection cap",
                    ),
                };
                counter.inc();
                if let Some(more) = refused_log.tick() {
                    warn!(peer = %addr, open = admission.open(), suppressed = more, "control plane: connection refused: {what} is reached");
                }
                drop(tcp);
                continue;
            }
        };
        let tls = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (app, state, refused_log) = (app.clone(), state.clone(), refused_log.clone());
        let conn_watch = graceful.watcher();
        tokio::spawn(async move {
            let _admitted = admitted;
            let accepted = tokio::time::timeout(state.limits.handshake_timeout, tls.accept(tcp)).await;
            let (stream, session) = match accepted {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    let reason = tapproof_tls::failure_reason(&e);
                    tracing::debug!(peer = %addr, reason, error = %tapproof_tls::failure_text(&e), "control plane: handshake refused");
                    if let Some(more) = refused_log.tick() {
                        warn!(peer = %addr, reason, error = %tapproof_tls::failure_text(&e), suppressed = more, "control plane: handshake refused (one line per 10 s; the rest at debug)");
                    }
                    return;
                }
                Err(_) => {
                    state.rate.refusals.handshake_timeouts.inc();
                    tracing::debug!(peer = %addr, reason = "timeout", "control plane: handshake refused");
                    if let Some(more) = refused_log.tick() {
                        warn!(peer = %addr, reason = "timeout", suppressed = more, "control plane: handshake refused (one line per 10 s; the rest at debug)");
                    }
                    return;
                }
            };
            let peer = Peer {
                id: session.peer_id,
                serial: session.peer_serial,
                not_after: session.peer_not_after,
                addr,
            };
            // A certificate revoked by serial gets no HTTP at all (resumed sessions included).
            // Identities revoked by node or SPIFFE ID are answered by the API, with their code.
            if let Some(id) = &peer.id {
                let dead = crate::auth::revoked(&state, id, peer.serial.as_deref())
                    .filter(|why| why.by == tapproof_identity::RevokedBy::Serial);
                if let Some(why) = dead {
                    warn!(peer = %addr, peer_id = %id, revoked = %why, "control plane: handshake of a revoked identity refused");
                    crate::app::audit(
                        &*state.store,
                        id.to_string(),
                        "handshake.refused",
                        serde_json::json!({ "reason": crate::auth::revoked_code(why.by), "peer": addr.to_string(), "serial": peer.serial }),
                    )
                    .await;
                    return;
                }
            }
            // A connection that sends no request within the header timeout is closed (one that
            // never sends the HTTP/2 preface would otherwise hold its place for ever).
            let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = asked.clone();
            let app = app
                .layer(axum::Extension(peer))
                .layer(axum::middleware::map_request(
                    move |req: axum::extract::Request| {
                        seen.store(true, std::sync::atomic::Ordering::Relaxed);
                        std::future::ready(req)
                    },
                ));
            let service = TowerToHyperService::new(app);
            let mut builder = Builder::new(TokioExecutor::new());
            // Unfinished headers and idle new connections are closed; header lists are bounded
            // (an agent's requests carry a few hundred bytes of headers).
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(state.limits.header_read_timeout)
                .max_buf_size(64 * 1024);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_header_list_size(16 * 1024)
                .max_concurrent_streams(64)
                .max_pending_accept_reset_streams(Some(16))
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let served = conn_watch.watch(conn);
            tokio::pin!(served);
            let idle = async {
                tokio::time::sleep(state.limits.header_read_timeout).await;
                if asked.load(std::sync::atomic::Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                result = &mut served => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %addr, error = %e, "control plane: connection ended with error");
                    }
                }
                () = idle => {
                    tracing::debug!(peer = %addr, "control plane: no request within the header timeout; closed");
                }
            }
        });
    }
    // Drain: no new connections; long-polls answer now with the current state; connections get
    // GOAWAY (HTTP/2) or close after their response (HTTP/1.1); in-flight requests finish.
    drop(listener);
    info!(connections = graceful.count(), "control plane draining");
    state.draining.cancel();
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            timeout_s = DRAIN_TIMEOUT.as_secs(),
            "control plane: connections still open after the drain timeout; closing them"
        );
    }
    refresher.abort();
    watcher.abort();
    prober.abort();
    pruner.abort();
    if let Some(p) = prober_of_agents {
        p.abort();
    }
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    if let Some(s) = scheduler {
        s.abort();
    }
    if let Some(e) = stopped_by {
        return Err(e);
    }
    info!("control plane stopped");
    Ok(())
}

/// Removes handshake records older than `retention`, at start and every hour (each replica does
/// it; the deletes are idempotent).
async fn prune_loop(store: Arc<dyn tapproof_store::Store>, retention: Duration) {
    loop {
        let before = (crate::now() - retention.as_secs() as i64).saturating_mul(1000);
        match store.handshakes_prune(before).await {
            Ok(0) => {}
            Ok(n) => info!(
                removed = n,
                retention_s = retention.as_secs(),
                "handshake records past retention removed"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot prune handshake records"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
