//! SIGHUP (`systemctl reload tapproof-agent`): re-read the config file and the identity files,
//! and apply what can change without dropping a tunnel. Never stops the agent.
//!
//! - `[[outbound]]`: listeners are added and removed (a removed one stops accepting; its open
//!   streams finish), and an existing one (same `listen`) takes its new service, peers and
//!   identity for new connections (`Pool::update`).
//! - `[[inbound]]`: services, forwards and allow lists apply to new streams. The tunnel listener
//!   itself exists only if the agent started with an inbound service.
//! - `[audit]`: the next coverage report uses it.
//! - `trust_domain`, `[identity]`, `[control]`, `[admin]`, `[tunnel]`, `[workload_api]` and
//!   `[[federation]]` need a restart: a change
//!   there is named in the log and left unapplied.
//!
//! A config file that does not load is refused as a whole: the running config stays, and the log
//! says why.

use crate::admin::{BoundAddresses, BoundOutbound};
use crate::config::{AgentConfig, OutboundConfig};
use crate::pool::Pool;
use crate::state::AgentState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Sections that only a restart applies.
const FIXED: &[(&str, &str)] = &[
    ("trust_domain", "trust_domain"),
    ("identity", "[identity]"),
    ("control", "[control]"),
    ("admin", "[admin]"),
    ("tunnel", "[tunnel]"),
    ("workload_api", "[workload_api]"),
    ("federation", "[[federation]]"),
    ("gateway", "[gateway]"),
    ("remote", "[[remote]]"),
];

/// What a reload may change of capture, given the config the agent started with: `[capture]`
/// and the capture outbounds take effect (the capture task looks again: `set_applied` wakes it),
/// except where start-time work is needed (the kernel check, the capture listener, its port and
/// mark) or a captured address is this host's. Returns the capture outbounds in force and sets
/// `applied.capture`.
fn capture_changes(
    started: &AgentConfig,
    new: &AgentConfig,
    applied: &mut AgentConfig,
    problems: &mut Vec<String>,
) -> Vec<crate::config::OutboundConfig> {
    if !started.uses_capture() {
        if new.uses_capture() {
            problems.push("capture turned on ([capture] or a capture outbound) in an agent that started without it: it starts at the next restart (the kernel check and the capture listener run at start)".into());
        }
        applied.capture = started.capture.clone();
        return Vec::new();
    }
    applied.capture = new.capture.clone();
    if (new.capture.port, new.capture.mark) != (started.capture.port, started.capture.mark) {
        problems.push("capture.port or capture.mark changed: takes effect at the next restart".into());
        applied.capture.port = started.capture.port;
        applied.capture.mark = started.capture.mark;
    }
    let host = crate::capture::Host::this();
    let mut kept = Vec::new();
    for o in new.outbound.iter().filter(|o| o.capture.is_some()) {
        match o.capture.and_then(|addr| Some((addr, host.unfit(addr)?))) {
            Some((addr, unfit)) => problems.push(format!(
                "a capture outbound names {addr}: not captured, {}",
                unfit.reason()
            )),
            None => kept.push(o.clone()),
        }
    }
    kept
}

/// One outbound listener being served.
struct Running {
    /// The configured address (the key a reload matches on).
    listen: SocketAddr,
    bound: SocketAddr,
    pool: Arc<Pool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The outbound listeners in force, in config order.
pub(crate) struct Outbounds {
    running: Vec<Running>,
    state: Arc<AgentState>,
    /// The agent's stop: every listener's token is a child of it.
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Outbounds {
    pub(crate) fn new(state: Arc<AgentState>, stop: CancellationToken, tracker: TaskTracker) -> Self {
        Self {
            running: Vec::new(),
            state,
            stop,
            tracker,
        }
    }

    /// Serves `outbound` (one with `listen`) on `listener` (already bound).
    pub(crate) fn start(&mut self, listener: TcpListener, outbound: OutboundConfig) {
        crate::socket::nodelay_inherited(&listener);
        let listen = outbound
            .listen
            .expect("only outbounds with listen have listeners");
        let bound = listener.local_addr().unwrap_or(listen);
        let pool = Arc::new(Pool::new(outbound, self.state.clone()));
        let stop = self.stop.child_token();
        let task = tokio::spawn(crate::outbound::serve(
            listener,
            pool.clone(),
            self.state.clone(),
            stop.clone(),
            self.tracker.clone(),
        ));
        self.running.push(Running {
            listen,
            bound,
            pool,
            stop,
            task,
        });
    }

    pub(crate) fn bound(&self) -> Vec<BoundOutbound> {
        self.running
            .iter()
            .map(|r| BoundOutbound {
                service: r.pool.outbound().service.clone(),
                listen: r.bound,
            })
            .collect()
    }

    /// The listeners' tasks, for the drain (which cancels them through the agent's stop).
    pub(crate) fn take_tasks(&mut self) -> Vec<JoinHandle<()>> {
        self.running.drain(..).map(|r| r.task).collect()
    }

    /// Makes the listeners those of `wanted`; returns the configs now served and adds what could
    /// not be applied to `problems`.
    async fn apply(
        &mut self,
        wanted: &[OutboundConfig],
        problems: &mut Vec<String>,
    ) -> (Vec<OutboundConfig>, Changes) {
        let mut old = std::mem::take(&mut self.running);
        let mut served = Vec::new();
        let mut changes = Changes::default();
        for (i, o) in wanted.iter().enumerate() {
            // Capture outbounds have no listener; they stay as the agent started (`on_hangup`).
            let Some(listen) = o.listen else { continue };
            if let Some(pos) = old.iter().position(|r| r.listen == listen) {
                let r = old.remove(pos);
                let before = r.pool.outbound();
                if before.service != o.service || before.peers != o.peers || before.server_id != o.server_id {
                    changes.changed += 1;
                    info!(listen = %r.bound, service = %o.service, "reload: outbound changed; new connections use it, open streams finish where they are");
                }
                r.pool.update(o.clone());
                self.running.push(r);
                served.push(o.clone());
                continue;
            }
            match TcpListener::bind(listen).await {
                Ok(listener) => {
                    self.start(listener, o.clone());
                    changes.added += 1;
                    info!(%listen, service = %o.service, "reload: outbound listener added");
                    served.push(o.clone());
                }
                Err(e) => problems.push(format!(
                    "outbound[{i}].listen = {listen}: cannot listen: {e}; not added"
                )),
            }
        }
        for r in old {
            r.stop.cancel();
            changes.removed += 1;
            info!(listen = %r.bound, service = %r.pool.outbound().service, "reload: outbound listener removed; its open streams finish");
        }
        (served, changes)
    }
}

#[derive(Debug, Default)]
struct Changes {
    added: usize,
    removed: usize,
    changed: usize,
}

/// Everything a reload touches.
pub(crate) struct Reloader {
    pub(crate) state: Arc<AgentState>,
    /// The config file; none for an agent given its config in memory (then only the identity
    /// files are re-read).
    pub(crate) path: Option<PathBuf>,
    pub(crate) outbounds: Arc<tokio::sync::Mutex<Outbounds>>,
    pub(crate) bound: Arc<RwLock<BoundAddresses>>,
    /// Whether the tunnel listener runs (it serves the inbound services).
    pub(crate) tunnel_listener: bool,
}

impl Reloader {
    /// Reloads on every SIGHUP until `stop`.
    pub(crate) async fn on_hangup(self, stop: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot handle SIGHUP; reload by restarting");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            self.reload().await;
        }
    }

    /// One reload: the identity files, then the config file.
    pub(crate) async fn reload(&self) {
        let state = &self.state;
        let mut identity_error = String::new();
        crate::drain::reload_identity(state, &mut identity_error);
        let Some(path) = &self.path else {
            info!("SIGHUP: identity files re-read (no config file to re-read)");
            return;
        };
        let new = match AgentConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                state.metrics.config_reloaded("refused");
                warn!(error = %e, "SIGHUP: config not reloaded, the running config stays");
                return;
            }
        };
        let mut problems = Vec::new();
        for (key, name) in FIXED {
            if state.config.source.get(*key) != new.source.get(*key) {
                problems.push(format!("{name} changed: takes effect at the next restart"));
            }
        }
        let mut applied = (*state.applied()).clone();
        if self.tunnel_listener || new.inbound.is_empty() {
            applied.inbound = new.inbound.clone();
        } else {
            problems.push("[[inbound]] added to an agent that started without one: the tunnel listener starts at the next restart".into());
        }
        let (mut served, changes) = self
            .outbounds
            .lock()
            .await
            .apply(&new.outbound, &mut problems)
            .await;
        served.extend(capture_changes(&state.config, &new, &mut applied, &mut problems));
        applied.outbound = served;
        applied.audit = new.audit.clone();
        applied.source = new.source.clone();
        let outbound = self.outbounds.lock().await.bound();
        self.bound.write().unwrap_or_else(|p| p.into_inner()).outbound = outbound;
        let services: Vec<&str> = applied.inbound.iter().map(|i| i.service.as_str()).collect();
        let (inbound, outbounds) = (services.join(", "), applied.outbound.len());
        state.set_applied(applied);
        if problems.is_empty() {
            state.metrics.config_reloaded("applied");
            info!(config = %path.display(), inbound = %inbound, outbound_listeners = outbounds,
                  added = changes.added, removed = changes.removed, changed = changes.changed,
                  "SIGHUP: config reloaded; open tunnels and streams kept");
        } else {
            state.metrics.config_reloaded("partial");
            for p in &problems {
                warn!(config = %path.display(), "SIGHUP: not applied: {p}");
            }
            info!(config = %path.display(), inbound = %inbound, outbound_listeners = outbounds,
                  added = changes.added, removed = changes.removed, changed = changes.changed,
                  not_applied = problems.len(), "SIGHUP: config reloaded in part; open tunnels and streams kept");
        }
    }
}
