//! State shared by the agent's tasks: configuration, identity material with the TLS configs built
//! from it, metrics, and the table of open tunnels that `/v1/status` shows.

use crate::config::AgentConfig;
use crate::metrics::{Metrics, Side, SideLabel};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tapproof_identity::{RevocationSet, SpiffeId};
use tapproof_tls::{ClientTls, MaterialError, ReloadingMaterial, ServerTls, SessionInfo};

pub struct AgentState {
    /// The config the agent started with. `[[inbound]]`, `[[outbound]]` and `[audit]` may change
    /// on reload: read them through `applied()` (and the outbound pools), never from here.
    pub config: AgentConfig,
    /// The config in force: the start config with a reload's `[[inbound]]`, `[[outbound]]` and
    /// `[audit]` (`reload.rs`).
    applied: std::sync::RwLock<Arc<AgentConfig>>,
    pub material: ReloadingMaterial,
    /// The other trust domains' bundles (`[[federation]]`).
    pub federation: crate::federation::Federation,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    /// Set while renewal rewrites the identity files, so the reload loop does not read a half-written set.
    pub renewing: AtomicBool,
    /// Keyed by (material generation, federation generation).
    server_tls: Mutex<Option<((u64, u64), ServerTls)>>,
    tunnels: Mutex<BTreeMap<u64, Arc<TunnelStats>>>,
    next_tunnel: AtomicU64,
    revoked: std::sync::RwLock<RevocationSet>,
    /// Service -> nodes fronting it (tunnel address, node identity), from the state feed.
    directory: std::sync::RwLock<std::collections::HashMap<String, Vec<(SocketAddr, SpiffeId)>>>,
    /// Where peers reach our tunnel listener (announced to the control plane).
    pub advertise: std::sync::OnceLock<SocketAddr>,
    /// Service -> patterns allowed by the control plane's policy (in addition to the config's).
    policy: std::sync::RwLock<std::collections::HashMap<String, Vec<crate::policy::AllowPattern>>>,
    /// The most recent refused streams, for the coverage report's dashboard view.
    denials: Mutex<std::collections::VecDeque<tapproof_audit::Denial>>,
    /// Connections, tunnels and streams counted against the `[tunnel]` limits and the fd budget.
    pub limits: crate::limits::Limits,
    /// Refused handshakes are logged at most once per 10 s (the rest at debug).
    pub refused_log: tapproof_tls::admission::LogThrottle,
    /// The latest self-test round (`selftest.rs`).
    pub selftest: Mutex<Option<crate::selftest::Round>>,
    /// Forward addresses given as host names, resolved at most every 30 s.
    pub forwards: crate::endpoint::ForwardCache,
    /// What the control plane says about capture (directory addresses, the policy's modes);
    /// `None` until the first state-feed document was applied.
    capture_inputs: std::sync::RwLock<Option<Arc<crate::capture::Inputs>>>,
    /// Woken when the capture plan's inputs change (feed, reload): `capture.rs` looks again.
    pub capture_changed: tokio::sync::Notify,
    /// A site gateway's traffic per remote site (`sites.rs`).
    pub sites: crate::sites::Ledger,
    /// Woken by a reload: the state feed's long-poll starts again at once, announcing the
    /// addresses of the services in force (`control/feed.rs`).
    pub announce_changed: tokio::sync::Notify,
    /// Every tunnel handshake's record, until the control plane stored it (`handshakes.rs`).
    pub handshakes: crate::handshakes::HandshakeLog,
}

/// One TLS connection between two agents and what it has carried.
#[derive(Debug, Serialize)]
pub struct TunnelStats {
    pub id: u64,
    pub side: &'static str,
    pub peer_addr: SocketAddr,
    pub peer_id: String,
    pub tls_version: String,
    pub cipher: String,
    pub key_exchange: String,
    pub resumed: bool,
    pub opened_unix: u64,
    pub streams_total: AtomicU64,
    pub streams_open: AtomicU64,
    pub bytes_app_to_tunnel: AtomicU64,
    pub bytes_tunnel_to_app: AtomicU64,
    #[serde(skip)]
    pub peer_serial: String,
    /// Cancelled to close the tunnel at once (its peer was revoked).
    #[serde(skip)]
    pub close: tokio_util::sync::CancellationToken,
}

/// Removes a tunnel from the table (and the open gauge) when the connection's task ends.
pub struct TunnelGuard {
    state: Arc<AgentState>,
    pub stats: Arc<TunnelStats>,
    side: Side,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.state.tunnels_table().remove(&self.stats.id);
        self.state
            .metrics
            .tunnels_open
            .get_or_create(&SideLabel { side: self.side })
            .dec();
    }
}

impl AgentState {
    pub fn record_denial(&self, peer: &SpiffeId, service: &str, reason: &str) {
        let mut d = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() == tapproof_audit::MAX_UPLOAD_DENIALS {
            d.pop_front();
        }
        d.push_back(tapproof_audit::Denial {
            at: tapproof_audit::now(),
            peer: peer.to_string(),
            // Peers choose names of unknown services: keep what an operator needs, not 16 KiB.
            service: service.chars().take(128).collect(),
            reason: reason.to_owned(),
        });
    }

    pub fn recent_denials(&self) -> Vec<tapproof_audit::Denial> {
        self.denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// `foreign`: the federated bundles as loaded from their files (`federation::load_files`).
    pub fn new(
        config: AgentConfig,
        material: ReloadingMaterial,
        foreign: tapproof_tls::ForeignRoots,
        fd_limit: Option<u64>,
    ) -> Self {
        let metrics = Metrics::new(config.control.is_some());
        let handshakes = match &config.control {
            Some(control) => crate::handshakes::HandshakeLog::open(&control.data_dir).unwrap_or_else(|e| {
                tracing::warn!(error = %e, dir = %control.data_dir.display(), "handshake records: cannot open the file in the data dir; keeping them in memory only");
                crate::handshakes::HandshakeLog::in_memory()
            }),
            None => crate::handshakes::HandshakeLog::in_memory(),
        };
        Self {
            handshakes,
            limits: crate::limits::Limits::new(&config.tunnel, fd_limit),
            applied: std::sync::RwLock::new(Arc::new(config.clone())),
            refused_log: tapproof_tls::admission::LogThrottle::new(std::time::Duration::from_secs(10)),
            selftest: Mutex::new(None),
            forwards: Default::default(),
            config,
            material,
            federation: crate::federation::Federation::new(foreign),
            metrics,
            ready: AtomicBool::new(false),
            renewing: AtomicBool::new(false),
            server_tls: Mutex::new(None),
            tunnels: Mutex::new(BTreeMap::new()),
            next_tunnel: AtomicU64::new(1),
            revoked: std::sync::RwLock::new(RevocationSet::default()),
            directory: Default::default(),
            advertise: std::sync::OnceLock::new(),
            policy: Default::default(),
            denials: Default::default(),
            capture_inputs: Default::default(),
            capture_changed: tokio::sync::Notify::new(),
            sites: Default::default(),
            announce_changed: tokio::sync::Notify::new(),
        }
    }

    /// A tunnel handshake succeeded: counted, timed and recorded.
    pub fn handshake_succeeded(
        &self,
        side: Side,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        session: &tapproof_tls::SessionInfo,
        took: std::time::Duration,
    ) {
        self.metrics.handshake_done(side, took);
        self.record_handshake(side, local, remote, Some(session), None);
    }

    /// A tunnel handshake was refused (`reason`: the `handshake_failures_total` label): counted
    /// and recorded, with the session when TLS itself completed (revoked, not an SVID).
    pub fn handshake_refused(
        &self,
        side: Side,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        reason: &'static str,
        session: Option<&tapproof_tls::SessionInfo>,
    ) {
        self.metrics.handshake_failed(side, reason);
        self.record_handshake(side, local, remote, session, Some(reason));
    }

    fn record_handshake(
        &self,
        side: Side,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        session: Option<&tapproof_tls::SessionInfo>,
        refused: Option<&'static str>,
    ) {
        let material = self.material.current();
        let ours = material.svid();
        self.handshakes.record(tapproof_audit::HandshakeRecord {
            side: side.as_str().to_owned(),
            local: local.map(|a| a.to_string()).unwrap_or_default(),
            remote: remote.to_string(),
            local_id: ours.id.to_string(),
            local_serial: ours.serial.clone(),
            peer_id: session.and_then(|s| s.peer_id.as_ref()).map(ToString::to_string),
            peer_serial: session.and_then(|s| s.peer_serial.clone()),
            tls_version: session.map(|s| s.version.clone()),
            cipher: session.map(|s| s.cipher.clone()),
            group: session.map(|s| s.group.clone()),
            signature_scheme: session.and_then(|s| s.peer_signature).map(str::to_owned),
            resumed: session.is_some_and(|s| s.resumed),
            outcome: if refused.is_some() { "refused" } else { "ok" }.to_owned(),
            reason: refused.map(str::to_owned),
            ..Default::default()
        });
    }

    /// The mark on the agent's own connections when capture is on (`capture.rs`), else none.
    pub fn capture_mark(&self) -> Option<u32> {
        self.config.uses_capture().then_some(self.config.capture.mark)
    }

    /// The control plane's capture inputs; `None` before the first feed document.
    pub fn capture_inputs(&self) -> Option<Arc<crate::capture::Inputs>> {
        self.capture_inputs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// New capture inputs from the feed: the capture loop looks again when they changed (and
    /// always after the first document).
    pub fn set_capture_inputs(&self, inputs: crate::capture::Inputs) {
        let mut held = self.capture_inputs.write().unwrap_or_else(|p| p.into_inner());
        if held.as_deref() != Some(&inputs) {
            *held = Some(Arc::new(inputs));
            self.capture_changed.notify_one();
        }
    }

    /// The config in force now (see `applied`).
    pub fn applied(&self) -> Arc<AgentConfig> {
        self.applied.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A reload's config takes over: new streams and reports see it.
    pub(crate) fn set_applied(&self, config: AgentConfig) {
        *self.applied.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        self.capture_changed.notify_one();
        self.announce_changed.notify_one();
    }

    /// The inbound TLS config for the current material and federated bundles, rebuilt after
    /// either changes.
    pub fn server_tls(&self) -> Result<ServerTls, MaterialError> {
        let generation = (self.material.generation(), self.federation.generation());
        let mut cached = self.server_tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, tls)) = cached.as_ref() {
            if *g == generation {
                return Ok(tls.clone());
            }
        }
        let tls = ServerTls::federated(
            &self.material.current(),
            &self.federation.current(),
            self.config.tunnel.crypto_policy(),
        )?;
        *cached = Some((generation, tls.clone()));
        Ok(tls)
    }

    /// An outbound TLS config expecting `peer`, for the current material.
    pub fn client_tls(&self, peer: &SpiffeId) -> Result<(u64, ClientTls), MaterialError> {
        let generation = self.material.generation();
        let tls = ClientTls::federated(
            &self.material.current(),
            &self.federation.current(),
            peer.clone(),
            self.config.tunnel.crypto_policy(),
        )?;
        Ok((generation, tls))
    }

    fn tunnels_table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<TunnelStats>>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open_tunnel(
        self: &Arc<Self>,
        side: Side,
        peer_addr: SocketAddr,
        session: &SessionInfo,
    ) -> TunnelGuard {
        let id = self.next_tunnel.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(TunnelStats {
            id,
            side: side.as_str(),
            peer_addr,
            peer_id: session
                .peer_id
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            tls_version: session.version.clone(),
            cipher: session.cipher.clone(),
            key_exchange: session.group.clone(),
            resumed: session.resumed,
            opened_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            streams_total: AtomicU64::new(0),
            streams_open: AtomicU64::new(0),
            bytes_app_to_tunnel: AtomicU64::new(0),
            bytes_tunnel_to_app: AtomicU64::new(0),
            peer_serial: session.peer_serial.clone().unwrap_or_default(),
            close: tokio_util::sync::CancellationToken::new(),
        });
        self.tunnels_table().insert(id, stats.clone());
        self.metrics.tunnels.get_or_create(&SideLabel { side }).inc();
        self.metrics.tunnels_open.get_or_create(&SideLabel { side }).inc();
        TunnelGuard {
            state: self.clone(),
            stats,
            side,
        }
    }

    /// Whether the control plane revoked this peer (by node, SPIFFE ID or serial): the one rule,
    /// `RevocationSet::covers`. A session without a peer ID is treated as revoked (our verifiers
    /// never accept one, so this only closes a door).
    pub fn is_revoked(&self, session: &SessionInfo) -> bool {
        let Some(id) = session.peer_id.as_ref() else {
            return true;
        };
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .covers(id, session.peer_serial.as_deref())
            .is_some()
    }

    /// Installs a new revocation list and closes every open tunnel it covers; returns how many.
    pub fn apply_revocations(&self, revoked: RevocationSet) -> usize {
        let mut closed = 0;
        for t in self.tunnels() {
            let covered = match SpiffeId::parse(&t.peer_id) {
                Ok(id) => revoked.covers(&id, Some(&t.peer_serial)),
                Err(_) => None,
            };
            if let Some(why) = covered {
                if !t.close.is_cancelled() {
                    tracing::warn!(peer_id = %t.peer_id, tunnel = t.id, side = t.side, revoked = %why, "closing the tunnel of a revoked peer");
                    t.close.cancel();
                    closed += 1;
                }
            }
        }
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked;
        closed
    }

    pub fn policy_allows(&self, service: &str, peer: &SpiffeId) -> bool {
        let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
        policy
            .get(service)
            .is_some_and(|patterns| crate::policy::allowed(patterns, peer))
    }

    pub fn set_policy(&self, policy: std::collections::HashMap<String, Vec<crate::policy::AllowPattern>>) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    pub fn directory_for(&self, service: &str) -> Vec<(SocketAddr, SpiffeId)> {
        self.directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    pub fn set_directory(&self, directory: std::collections::HashMap<String, Vec<(SocketAddr, SpiffeId)>>) {
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = directory;
    }

    pub fn tunnels(&self) -> Vec<Arc<TunnelStats>> {
        self.tunnels_table().values().cloned().collect()
    }
}
