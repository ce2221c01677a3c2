//! Identity from the tapproof control plane. On first start the agent makes its key here, joins
//! with the token (trusting the server through the root pin the token carries) and keeps key,
//! certificate, bundle and its control-plane state in `data_dir` (`files.rs`), so a restart needs
//! no token. Then it renews at half-life (with jitter) over mTLS with its current identity,
//! writing the new files and swapping them in; while the server is unreachable it keeps serving
//! on the current certificate and says so in logs and metrics. `feed.rs` follows the state feed;
//! `client.rs` is the one control-plane client, which the CLI's remote admin commands use too.

pub mod client;
mod feed;
mod files;

pub use client::{ClientError, ControlClient};
pub use feed::{read_feed, state_loop, FeedView};
pub use files::identity_files;
pub(crate) use files::service_identity_files;

use crate::config::ControlConfig;
use crate::state::AgentState;
use files::{data_err, read_state, state_path, ControlState, Staged};
use rand::Rng;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tapproof_api::{ErrorCode, JoinRequest, SignItem, SignRequest};
use tapproof_identity::{new_csr, new_csr_with, JoinToken, SpiffeId, TrustDomain};
use tapproof_tls::{ControlClientTls, IdentityFiles, ServerTrust};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The longest the renewal loop sleeps before it looks at the wall clock again.
const WALL_CLOCK_SLICE_S: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control.token: {0}")]
    Token(String),
    #[error("control plane at {server} refused the request: {code}: {message}")]
    Refused {
        server: String,
        code: ErrorCode,
        message: String,
    },
    #[error("control plane at {server} unreachable: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("control.data_dir {path}: {detail}")]
    DataDir { path: PathBuf, detail: String },
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

impl From<ClientError> for ControlError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused {
                server,
                code,
                message,
                ..
            } => Self::Refused {
                server,
                code,
                message,
            },
            ClientError::Unreachable { server, detail } => Self::Unreachable { server, detail },
            ClientError::BadAnswer { server, detail } => Self::Unreachable { server, detail },
        }
    }
}

/// New keys and CSRs for each service: (id, CSR, key).
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

/// One signing request for the service identities in `keys` (id, CSR, key).
fn sign_request(keys: &[(String, String, String)]) -> SignRequest {
    SignRequest {
        csrs: keys
            .iter()
            .map(|(id, csr, _)| SignItem {
                id: id.clone(),
                csr: csr.clone(),
            })
            .collect(),
    }
}

fn server_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::new(td.clone(), "/server").expect("\"/server\" is a valid path")
}

use tapproof_identity::when::now;

/// Returns the identity files, joining first if the data dir holds no identity yet.
/// The first join's retry delays: from `JOIN_RETRY_MIN`, doubling, at most `JOIN_RETRY_MAX`
/// (with jitter, so a fleet started together does not retry in lockstep).
const JOIN_RETRY_MIN: Duration = Duration::from_secs(1);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(60);

/// Whether a failed join may succeed later without anyone changing anything: the server was
/// unreachable, or answered that it cannot serve now (store down, rate limit). A refused token
/// never becomes good: that ends the agent at once, with the code.
fn join_may_succeed_later(e: &ControlError) -> bool {
    match e {
        ControlError::Unreachable { .. } => true,
        ControlError::Refused { code, .. } => code.status() >= 500 || *code == ErrorCode::RateLimited,
        _ => false,
    }
}

/// Joins, retrying with backoff for as long as the server is unreachable or busy (a host booted
/// before its control plane, a control plane restarting). The agent serves nothing meanwhile.
async fn join_with_retry(
    client: &ControlClient,
    request: &JoinRequest,
) -> Result<tapproof_api::JoinResponse, ControlError> {
    let mut delay = JOIN_RETRY_MIN;
    let mut attempt = 1u32;
    loop {
        match client.join(request).await.map_err(ControlError::from) {
            Ok(joined) => return Ok(joined),
            Err(e) if join_may_succeed_later(&e) => {
                let wait = delay.mul_f64(rand::rng().random_range(0.5..1.0));
                warn!(error = %e, attempt, retry_in_s = wait.as_secs_f64().ceil() as u64,
                      "cannot join yet; retrying (the token is not used until a join succeeds)");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(JOIN_RETRY_MAX);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The node's key is of `algorithm` (`CryptoProfile::key_algorithm` of `tunnel.crypto_profile`).
pub async fn bootstrap(
    cfg: &ControlConfig,
    td: &TrustDomain,
    algorithm: tapproof_identity::KeyAlgorithm,
) -> Result<IdentityFiles, ControlError> {
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
    let (csr, key) = new_csr_with(None, algorithm).map_err(|e| data_err(&cfg.data_dir, e))?;
    let request = JoinRequest {
        token: text.trim().to_owned(),
        csr,
        node: Some(
            cfg.node
                .clone()
                .unwrap_or_else(|| tapproof_audit::hostname().to_ascii_lowercase()),
        ),
    };
    let joined = join_with_retry(&ControlClient::new(server.clone(), tls), &request).await?;
    // Key, certificate, bundle, service identities and state become visible as one set.
    let mut set = Staged::begin(&cfg.data_dir)?;
    set.write_identity(&joined.identity.chain_pem, &key)?;
    set.write_bundle(&joined.bundle)?;
    if !joined.services.is_empty() {
        // The identities of the services registered to this node, over mTLS with the new identity.
        let tls = ControlClientTls::new(
            ServerTrust::Bundle(joined.bundle.clone()),
            server_id(td),
            Some((&joined.identity.chain_pem, &key)),
        )
        .map_err(|e| data_err(&files.cert, e))?;
        let keys = service_csrs(td, &joined.services)?;
        let signed = ControlClient::new(server.clone(), tls)
            .sign(&sign_request(&keys))
            .await?;
        set.write_service_identities(&signed.identities, &keys)?;
        info!(services = %joined.services.join(", "), "received the identities of the services registered to this node");
    }
    let state = ControlState {
        server,
        node: joined.node,
        id: joined.identity.id,
        issued_at: now(),
        not_after: joined.identity.not_after,
        lifetime_s: lifetime_checking_clock(&joined.identity.chain_pem),
        services: joined.services,
    };
    set.write_state(&state)?;
    set.commit()?;
    info!(id = %state.id, server = %state.server, "joined the control plane");
    Ok(files)
}

/// A clock this far from the control plane's is said loudly at every certificate received.
const CLOCK_SKEW_WARN_S: i64 = 30;

/// The lifetime the server gave a certificate, from the server's own clock: its not_before is
/// the server's time of issue less `BACKDATE`. Logs when this host's clock is off from the
/// server's: renewals are scheduled by the certificate's expiry read on this host's clock, and
/// peers' certificates are checked with it too.
fn lifetime_checking_clock(chain_pem: &str) -> i64 {
    let Some(info) = tapproof_identity::ca::first_der(chain_pem)
        .ok()
        .and_then(|der| tapproof_identity::inspect_svid(&der).ok())
    else {
        return 0;
    };
    let issued_by_server = info.not_before + tapproof_identity::ca::BACKDATE.whole_seconds();
    let skew = now() - issued_by_server;
    if skew.abs() > CLOCK_SKEW_WARN_S {
        warn!(
            skew_s = skew,
            "this host's clock is {} s {} the control plane's: certificates look {} here (fix NTP; \
               renewals are spaced by the monotonic clock meanwhile)",
            skew.abs(),
            if skew > 0 { "ahead of" } else { "behind" },
            if skew > 0 { "older" } else { "newer" }
        );
    }
    info.not_after - issued_by_server
}

/// When to renew (this host's wall clock): half-way through the certificate's life, counted back
/// from its expiry, give or take 10% of that half. A state without the lifetime uses the time it
/// was received as the start.
fn renew_at(state: &ControlState) -> i64 {
    let lifetime = if state.lifetime_s > 0 {
        state.lifetime_s
    } else {
        state.not_after - state.issued_at
    };
    let half = lifetime.max(2) / 2;
    let jitter = (half / 10).max(1);
    state.not_after - half + rand::rng().random_range(-jitter..=jitter)
}

/// The least time between two renewals, on the monotonic clock: a tenth of the lifetime (at
/// least 1 s). A clock ahead by more than half a lifetime puts every renewal point in the past;
/// this keeps such a host at ten renewals a lifetime instead of one a second.
fn renewal_spacing(state: &ControlState) -> Duration {
    let lifetime = if state.lifetime_s > 0 {
        state.lifetime_s
    } else {
        state.not_after - state.issued_at
    };
    Duration::from_secs((lifetime / 10).max(1) as u64)
}

/// Renews the node identity for as long as the agent runs.
pub async fn renew_loop(state: Arc<AgentState>, cfg: ControlConfig, stop: CancellationToken) {
    let mut retry = RETRY_MIN;
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        let Some(current) = read_state(&cfg.data_dir) else {
            warn!(data_dir = %cfg.data_dir.display(), "control state missing; cannot schedule renewal");
            return;
        };
        if let Some(last) = last_renewal {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(last + renewal_spacing(&current)) => {}
            }
        }
        // Certificates expire by the wall clock, timers run on the monotonic one: sleep in slices
        // and look at the wall clock again, so a clock that jumps (or a suspended VM that wakes)
        // renews at once instead of sleeping past the expiry.
        let due = renew_at(&current);
        while now() < due {
            let slice = Duration::from_secs((due - now()).clamp(1, WALL_CLOCK_SLICE_S) as u64);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(slice) => {}
            }
        }
        match renew(&state, &cfg, current).await {
            Ok(next) => {
                retry = RETRY_MIN;
                last_renewal = Some(tokio::time::Instant::now());
                state.metrics.renewals.inc();
                info!(id = %next.id, not_after = next.not_after, "renewed the node certificate; new handshakes use it, open tunnels stay up");
            }
            Err(e) => {
                state.metrics.renewal_failures.inc();
                let left = state.material.current().seconds_to_expiry();
                let sleep = retry_delay(retry, left);
                if left > 0 {
                    warn!(error = %e, expires_in_s = left, retry_in_s = sleep.as_secs(),
                          "cannot renew; serving on the current certificate until it expires (the outage budget) or the control plane answers");
                } else {
                    // Peers refuse an expired certificate; the control plane still renews it
                    // (within its recovery window), so this node recovers when it answers.
                    tracing::error!(error = %e, expired_s_ago = -left, retry_in_s = sleep.as_secs(),
                          "certificate expired and cannot renew: peers refuse this node until the control plane answers");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(sleep) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// How long to wait before the next renewal attempt: the backoff, never more than a quarter of
/// the validity left (so retries get denser as expiry nears, instead of sleeping past it), with
/// jitter (half to all of it) so agents cut off together do not return together.
fn retry_delay(backoff: Duration, left_s: i64) -> Duration {
    let cap = if left_s > 0 {
        Duration::from_secs((left_s as u64 / 4).max(1))
    } else {
        RETRY_MAX
    };
    let d = backoff.min(cap).max(Duration::from_millis(500));
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

async fn renew(
    state: &AgentState,
    cfg: &ControlConfig,
    current: ControlState,
) -> Result<ControlState, ControlError> {
    let files = identity_files(&cfg.data_dir);
    let td = &state.config.trust_domain;
    let client = ControlClient::new(current.server.clone(), node_tls(&cfg.data_dir, td)?)
        .observed(state.metrics.control_plane_observer());
    let id = SpiffeId::parse(&current.id).map_err(|e| data_err(&state_path(&cfg.data_dir), e))?;
    let algorithm = state.config.tunnel.crypto_profile.key_algorithm();
    let (csr, new_key) = new_csr_with(Some(&id), algorithm).map_err(|e| data_err(&cfg.data_dir, e))?;
    let signed = client
        .sign(&SignRequest {
            csrs: vec![SignItem {
                id: current.id.clone(),
                csr,
            }],
        })
        .await?;
    let services = signed.services.clone();
    let issued = signed
        .identities
        .into_iter()
        .find(|i| i.id == current.id)
        .ok_or_else(|| ControlError::Unreachable {
            server: current.server.clone(),
            detail: "the signing answer holds no certificate for the node".into(),
        })?;
    let mut set = Staged::begin(&cfg.data_dir)?;
    // Service identities in a second request, for exactly the services the server now lists: a
    // registration removed meanwhile must not block the node's own renewal.
    if !services.is_empty() {
        let keys = service_csrs(td, &services)?;
        match client.sign(&sign_request(&keys)).await {
            Ok(svc) => set.write_service_identities(&svc.identities, &keys)?,
            Err(e) => warn!(error = %e, "service identities not renewed"),
        }
    }
    let next = ControlState {
        issued_at: now(),
        not_after: issued.not_after,
        lifetime_s: lifetime_checking_clock(&issued.chain_pem),
        services,
        ..current
    };
    set.write_identity(&issued.chain_pem, &new_key)?;
    set.write_bundle(&signed.bundle)?;
    set.write_state(&next)?;
    // Keep the reload loop from reading the certificate of one set and the key of the other.
    state.renewing.store(true, Ordering::Release);
    let swapped = set.commit().and_then(|()| {
        state
            .material
            .reload()
            .map(drop)
            .map_err(|e| data_err(&files.cert, e))
    });
    state.renewing.store(false, Ordering::Release);
    swapped?;
    Ok(next)
}

/// A client of the control plane presenting this node's current identity, whose every exchange
/// sets `tapproof_control_plane_up`.
pub(crate) fn node_client(state: &AgentState, cfg: &ControlConfig) -> Result<ControlClient, ControlError> {
    let current = read_state(&cfg.data_dir).ok_or_else(|| data_err(&state_path(&cfg.data_dir), "missing"))?;
    let td = &state.config.trust_domain;
    Ok(ControlClient::new(current.server, node_tls(&cfg.data_dir, td)?)
        .observed(state.metrics.control_plane_observer()))
}

/// Records `event` in the control plane's audit log with the node identity in `cfg.data_dir`
/// (the CLI's way to audit what it did on this node, with no agent running).
pub async fn record_event(
    cfg: &ControlConfig,
    td: &TrustDomain,
    event: &tapproof_api::NodeEvent,
) -> Result<(), ControlError> {
    let current = read_state(&cfg.data_dir).ok_or_else(|| data_err(&state_path(&cfg.data_dir), "missing"))?;
    Ok(ControlClient::new(current.server, node_tls(&cfg.data_dir, td)?)
        .event(event)
        .await?)
}

/// A client config presenting the identity in `data_dir`, which must be of trust domain `td`.
fn node_tls(data_dir: &Path, td: &TrustDomain) -> Result<ControlClientTls, ControlError> {
    let (tls, _) = ControlClientTls::from_files(&identity_files(data_dir), Some(td))
        .map_err(|e| data_err(data_dir, e))?;
    Ok(tls)
}

/// Sends a coverage report.
pub(crate) async fn post_coverage(
    state: &AgentState,
    cfg: &ControlConfig,
    body: Vec<u8>,
) -> Result<(), ControlError> {
    Ok(node_client(state, cfg)?.coverage(body).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(issued_at: i64, not_after: i64, lifetime_s: i64) -> ControlState {
        ControlState {
            server: "s:1".into(),
            node: "n".into(),
            id: "spiffe://example.org/node/n".into(),
            issued_at,
            not_after,
            lifetime_s,
            services: vec![],
        }
    }

    #[test]
    fn renewal_is_at_half_life_counted_back_from_expiry() {
        for _ in 0..100 {
            // In step with the server: half-way, +-10% of the half.
            let t = renew_at(&state(1_000, 4_600, 3_600));
            assert!((1_000 + 1_620..=1_000 + 1_980).contains(&t), "{t}");
            // A state file from before lifetime_s was kept: from the time it was received.
            let t = renew_at(&state(1_000, 4_600, 0));
            assert!((2_620..=2_980).contains(&t), "{t}");
            // Received while this host's clock was 10 min ahead: the renewal point is by the
            // expiry, so a clock set back later renews in time, not 10 min late.
            let t = renew_at(&state(1_000 + 600, 4_600, 3_600));
            assert!(t <= 2_980, "{t}");
        }
        // Ahead by more than a lifetime: renewal points are all past; spacing bounds the rate.
        assert_eq!(renewal_spacing(&state(10_000, 1_060, 60)), Duration::from_secs(6));
        assert_eq!(renewal_spacing(&state(0, 3_600, 3_600)), Duration::from_secs(360));
        assert_eq!(renewal_spacing(&state(0, 5, 5)), Duration::from_secs(1));
    }

    #[test]
    fn retries_never_sleep_past_the_validity_left() {
        for left in [1i64, 4, 14, 60, 600, 100_000] {
            for backoff in [RETRY_MIN, Duration::from_secs(16), RETRY_MAX] {
                let d = retry_delay(backoff, left);
                assert!(d <= backoff, "{d:?} > backoff {backoff:?}");
                assert!(
                    d.as_secs_f64() <= (left as f64 / 4.0).max(1.0),
                    "left {left}: slept {d:?}"
                );
                assert!(d >= Duration::from_millis(250));
            }
        }
        // The case of the report: 16 s of backoff with 14 s left.
        assert!(retry_delay(Duration::from_secs(16), 14) <= Duration::from_secs(3));
        // After expiry it keeps trying, at most every RETRY_MAX.
        assert!(retry_delay(Duration::from_secs(600), -5) <= RETRY_MAX);
    }
}
