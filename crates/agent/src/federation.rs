//! SPIFFE federation: the bundles of the other trust domains named in `[[federation]]`, so that
//! their IDs can be peers (in `server_id` and in allow lists) and local workloads receive them
//! from the Workload API. Each bundle starts from its file; an entry with `endpoint` then keeps
//! it fresh from that SPIFFE bundle endpoint (https_spiffe profile: the endpoint must prove
//! `endpoint_id`, checked against the bundle held for that domain, so each fetched bundle is
//! vouched for by the one before it).
//!
//! A fetch that fails keeps the bundle in force and is retried (with backoff up to the refresh
//! interval); nothing here ever drops a federated domain's roots. Which roots check which peer
//! is tls's `ForeignRoots` rule. Tunnels already open are kept across a bundle change (like a
//! certificate renewal); new handshakes use the new bundle.

use crate::config::{BundleEndpoint, FederationConfig};
use crate::control::ControlClient;
use crate::metrics::{FederationLabels, TrustDomainLabel};
use crate::state::AgentState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapproof_identity::TrustDomain;
use tapproof_tls::{ControlClientTls, ForeignRoots, ServerTrust};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Fetch again after this long when the endpoint gives no refresh hint (SPIRE's default).
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Refresh hints are clamped to this range: a hint of 0 must not make a busy loop, and a day-long
/// one would miss a root rollover.
const MIN_REFRESH: Duration = Duration::from_secs(10);
const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// First retry after a failed fetch; doubles up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(2);
/// A bundle document larger than this is refused (a few roots are a few KiB).
const MAX_DOCUMENT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("federation[{index}] ({trust_domain}): bundle file {path}: {detail}")]
pub struct FederationError {
    pub index: usize,
    pub trust_domain: TrustDomain,
    pub path: std::path::PathBuf,
    pub detail: String,
}

/// The federated bundles in force, and a generation that grows with every change (TLS configs
/// are cached by it).
#[derive(Default)]
pub struct Federation {
    current: RwLock<Arc<ForeignRoots>>,
    generation: AtomicU64,
}

/// Reads every `[[federation]]` entry's bundle file (check-config and the agent's start).
pub fn load_files(entries: &[FederationConfig]) -> Result<ForeignRoots, FederationError> {
    let mut roots = ForeignRoots::default();
    for (index, f) in entries.iter().enumerate() {
        let fail = |detail: String| FederationError {
            index,
            trust_domain: f.trust_domain.clone(),
            path: f.bundle.clone(),
            detail,
        };
        let pem = std::fs::read_to_string(&f.bundle).map_err(|e| fail(e.to_string()))?;
        roots.insert_pem(f.trust_domain.clone(), &pem).map_err(fail)?;
    }
    Ok(roots)
}

impl Federation {
    pub fn new(roots: ForeignRoots) -> Self {
        Self {
            current: RwLock::new(Arc::new(roots)),
            generation: AtomicU64::new(0),
        }
    }

    pub fn current(&self) -> Arc<ForeignRoots> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `roots` in force for `td`; false when they are the ones already in force.
    fn set(&self, td: &TrustDomain, roots: Vec<Vec<u8>>) -> Result<bool, String> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.roots_der(td) == Some(roots.as_slice()) {
            return Ok(false);
        }
        let mut next = (**current).clone();
        next.insert(td.clone(), roots)?;
        *current = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }
}

/// Sets the per-domain gauges for the bundles loaded from files at start.
pub fn record_loaded(state: &AgentState) {
    let current = state.federation.current();
    for td in current.trust_domains() {
        let label = TrustDomainLabel {
            trust_domain: td.to_string(),
        };
        let n = current.roots_der(td).map_or(0, <[_]>::len);
        state.metrics.federation_roots.get_or_create(&label).set(n as i64);
        state
            .metrics
            .federation_updated
            .get_or_create(&label)
            .set(tapproof_identity::when::now());
    }
}

/// One fetch's outcome: the metric's result label and, on success, the refresh hint.
struct Fetched {
    result: &'static str,
    refresh: Option<Duration>,
}

async fn fetch_once(
    state: &AgentState,
    f: &FederationConfig,
    endpoint: &BundleEndpoint,
) -> Result<Fetched, (&'static str, String)> {
    let id = f
        .endpoint_id
        .clone()
        .expect("config checks: endpoint_id comes with endpoint");
    let tls = ControlClientTls::new(
        ServerTrust::Federated((*state.federation.current()).clone()),
        id,
        None,
    )
    .map_err(|e| ("bad_bundle", e.to_string()))?;
    let client = ControlClient::new(endpoint.authority.clone(), tls).with_attempts(1);
    let (status, body) = client
        .get_raw(&endpoint.path)
        .await
        .map_err(|e| ("unreachable", e.to_string()))?;
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(("refused", format!("status {status}: {text}")));
    }
    if body.len() > MAX_DOCUMENT {
        return Err((
            "bad_bundle",
            format!(
                "the document is {} bytes; at most {MAX_DOCUMENT} are accepted",
                body.len()
            ),
        ));
    }
    let bundle = tapproof_identity::bundle::decode(&body).map_err(|e| ("bad_bundle", e.to_string()))?;
    let changed = state
        .federation
        .set(&f.trust_domain, bundle.roots.clone())
        .map_err(|e| ("bad_bundle", e))?;
    let label = TrustDomainLabel {
        trust_domain: f.trust_domain.to_string(),
    };
    state
        .metrics
        .federation_roots
        .get_or_create(&label)
        .set(bundle.roots.len() as i64);
    state
        .metrics
        .federation_updated
        .get_or_create(&label)
        .set(tapproof_identity::when::now());
    if changed {
        info!(trust_domain = %f.trust_domain, roots = bundle.roots.len(), endpoint = %f.endpoint.as_deref().unwrap_or_default(),
              "federated bundle updated from its endpoint; new handshakes use it");
    }
    Ok(Fetched {
        result: if changed { "ok" } else { "unchanged" },
        refresh: bundle.refresh_hint_s.map(Duration::from_secs),
    })
}

/// Keeps one federated domain's bundle fresh from its endpoint until `stop`.
pub async fn refresh_loop(state: Arc<AgentState>, f: FederationConfig, stop: CancellationToken) {
    let Some(endpoint) = f.endpoint.as_deref().and_then(|u| BundleEndpoint::parse(u).ok()) else {
        return;
    };
    let mut retry = FIRST_RETRY;
    let mut interval = DEFAULT_REFRESH;
    loop {
        let wait = match fetch_once(&state, &f, &endpoint).await {
            Ok(fetched) => {
                state
                    .metrics
                    .federation_refreshes
                    .get_or_create(&FederationLabels {
                        trust_domain: f.trust_domain.to_string(),
                        result: fetched.result,
                    })
                    .inc();
                interval = f.refresh_interval.unwrap_or_else(|| {
                    fetched
                        .refresh
                        .unwrap_or(DEFAULT_REFRESH)
                        .clamp(MIN_REFRESH, MAX_REFRESH)
                });
                retry = FIRST_RETRY;
                interval
            }
            Err((result, detail)) => {
                state
                    .metrics
                    .federation_refreshes
                    .get_or_create(&FederationLabels {
                        trust_domain: f.trust_domain.to_string(),
                        result,
                    })
                    .inc();
                warn!(trust_domain = %f.trust_domain, endpoint = %f.endpoint.as_deref().unwrap_or_default(), reason = result, %detail,
                      retry_in_s = retry.as_secs(), "cannot refresh the federated bundle; the one in force stays");
                let wait = retry;
                retry = (retry * 2).min(interval);
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
