//! Storage for the tapproof control plane: one [`Store`] trait with two backends, SQLite (a file
//! in the server's data dir, WAL; the embedded default) and PostgreSQL (shared by several server
//! replicas). Schema changes are versioned migrations under `migrations/<backend>/`. Only this
//! crate knows SQL.
//!
//! Concurrency rules every backend keeps: a join token is consumed at most once (the consuming
//! UPDATE is conditional on `used_at IS NULL`), certificate serials are unique (primary key), and
//! audit-log appends are serialised (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped
//! advisory lock) so the hash chain never forks.

mod audit;
mod backend;
mod error;
mod model;
mod postgres;
mod sqlite;

pub use audit::{chain_hash, verify_chain, AuditProblem, GENESIS_HASH};
pub use error::{StoreError, TokenRejection};
pub use model::*;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use std::sync::Arc;

/// The newest schema version this build knows (the number of the last migration).
pub const SCHEMA_VERSION: i64 = 9;

pub type Result<T> = std::result::Result<T, StoreError>;

/// Wakes when something agents must learn of may have changed (revocations, CAs, registrations),
/// whichever process changed it.
#[async_trait::async_trait]
pub trait ChangeListener: Send {
    /// Resolves on the next change notice. Backends without notices (SQLite) resolve after a
    /// short sleep, so the caller re-reads; callers treat a wake-up as "look", not as "changed".
    async fn next(&mut self);
}

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Which backend, for logs and `/v1/status`.
    fn backend(&self) -> &'static str;

    /// Whether the store is still the one opened: a SQLite file removed or replaced under the
    /// running server would take every later write into an unlinked file. `Err` names it.
    fn check_alive(&self) -> Result<()> {
        Ok(())
    }

    /// A listener for changes made by any process sharing this store.
    async fn listen_changes(&self) -> Result<Box<dyn ChangeListener>>;
    /// Records a change agents must learn of (bumping `change_version`) and tells every listener
    /// (every replica) to look again; call after changing revocations, CAs, registrations or the
    /// directory.
    async fn notify_change(&self) -> Result<()>;
    /// The state feed's version: grows with every `notify_change`.
    async fn change_version(&self) -> Result<i64>;
    /// Records where a node's tunnel listener is reached; true when it changed.
    async fn node_set_tunnel(&self, name: &str, tunnel_addr: &str) -> Result<bool>;

    async fn ca_insert(&self, ca: NewCa) -> Result<i64>;
    async fn ca_list(&self) -> Result<Vec<CaRecord>>;
    async fn ca_set_state(&self, id: i64, state: CaState) -> Result<()>;

    async fn token_insert(&self, token: NewToken) -> Result<()>;
    /// Checks the secret, expiry and use without consuming the token (so a request that fails a
    /// later check leaves it usable).
    async fn token_check(&self, id: &str, secret_hash: &[u8; 32], now: i64) -> Result<JoinToken>;
    /// Checks the secret and expiry and marks the token used, atomically: of two concurrent
    /// callers (even on two replicas) exactly one succeeds. A wrong secret does not consume it.
    async fn token_consume(&self, id: &str, secret_hash: &[u8; 32], now: i64) -> Result<JoinToken>;

    async fn node_upsert(&self, name: &str, spiffe_id: &str, now: i64) -> Result<Node>;
    async fn node_get(&self, name: &str) -> Result<Option<Node>>;
    async fn node_list(&self) -> Result<Vec<Node>>;
    async fn node_seen(&self, name: &str, now: i64) -> Result<()>;

    /// Returns false when the registration already existed.
    async fn registration_add(&self, node: &str, service: &str) -> Result<bool>;
    /// Returns false when there was nothing to remove.
    async fn registration_remove(&self, node: &str, service: &str) -> Result<bool>;
    async fn registrations(&self) -> Result<Vec<Registration>>;
    /// Sets where clients reach each of `node`'s registered services (`addresses`: service ->
    /// `ADDR:PORT`s; a registered service not named gets none; a named one not registered is
    /// ignored). True when any registration changed.
    async fn registration_set_addresses(
        &self,
        node: &str,
        addresses: &std::collections::BTreeMap<String, Vec<String>>,
    ) -> Result<bool>;

    /// Fails with `StoreError::Duplicate` for a serial already recorded.
    async fn cert_record(&self, cert: IssuedCert) -> Result<()>;
    async fn cert_list(&self, node: &str) -> Result<Vec<IssuedCert>>;
    /// How many certificates issued at or before `issued_by` are still valid at `now` (root
    /// rollover may retire the old root only when this is zero).
    async fn cert_count_live(&self, issued_by: i64, now: i64) -> Result<i64>;

    /// Idempotent: revoking the same thing twice keeps the first record.
    async fn revoke(&self, kind: RevocationKind, value: &str, reason: &str, now: i64) -> Result<Revocation>;
    async fn revocations(&self) -> Result<Vec<Revocation>>;
    /// Marks revocations with id <= `up_to_id` that no feed document carried yet as first carried
    /// by the document of `version` (a revocation keeps its first version).
    async fn revocations_stamp(&self, version: i64, up_to_id: i64) -> Result<()>;
    /// Records that `node` applied every revocation carried by a document of version <= `since`
    /// (first time only; idempotent across replicas). Returns the revocations newly acknowledged.
    async fn revocation_ack(&self, node: &str, since: i64, now: i64) -> Result<Vec<i64>>;
    /// Every acknowledgement, by revocation then time.
    async fn revocation_acks(&self) -> Result<Vec<RevocationAck>>;

    /// The policy document (JSON: service -> allowed SPIFFE ID patterns), if one was set.
    async fn policy_get(&self) -> Result<Option<String>>;
    async fn policy_set(&self, document: &str, now: i64) -> Result<()>;

    /// Appends one row to the hash-chained audit log and returns it.
    async fn audit_append(&self, entry: NewAudit, now: i64) -> Result<AuditEntry>;
    /// Rows with `seq > after`, oldest first, at most `limit`.
    async fn audit_list(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>>;
    /// The newest `limit` rows, newest first.
    async fn audit_tail(&self, limit: i64) -> Result<Vec<AuditEntry>>;

    /// Keeps handshake records (a record already stored, by node, `at_ms` and `seq`, is kept as
    /// it was); returns how many were new.
    async fn handshakes_add(&self, rows: &[HandshakeRow], now: i64) -> Result<u64>;
    /// Records with `from_ms <= at_ms < to_ms`, oldest first, at most `limit`.
    async fn handshakes_list(&self, from_ms: i64, to_ms: i64, limit: i64) -> Result<Vec<HandshakeRow>>;
    /// Removes records older than `before_ms` (retention); returns how many.
    async fn handshakes_prune(&self, before_ms: i64) -> Result<u64>;

    /// Keeps one agent's coverage report (history is kept; the dashboard charts it).
    async fn coverage_add(&self, report: NewCoverage) -> Result<()>;
    /// The newest report of each node.
    async fn coverage_latest(&self) -> Result<Vec<CoverageRecord>>;
    /// Every report since `since` (Unix seconds), oldest first, without the report bodies.
    async fn coverage_history(&self, since: i64) -> Result<Vec<CoveragePoint>>;
}

/// Opens the store a `--store` value names: `sqlite:PATH` / a plain path (SQLite, created if
/// missing), or `postgres://...` / `postgresql://...`. Runs pending migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url).await?))
    } else {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(path)).await?))
    }
}

/// Opens a store that must exist already: a missing SQLite file is an error, not a new empty
/// store (a CLI command after the file was removed must not start a fresh CA registry).
pub async fn open_existing(url: &str) -> Result<Arc<dyn Store>> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        if !std::path::Path::new(path).exists() {
            return Err(StoreError::Open {
                location: path.to_owned(),
                detail: "the store file does not exist (removed?); restore it from a backup, or \
                         create a new trust domain with `tapproof server init`"
                    .into(),
            });
        }
    }
    open(url).await
}
