//! The audit log's hash chain: each row carries SHA-256 over the previous row's hash and its own
//! fields, so editing, removing or reordering any row breaks every later link. (Dropping rows at
//! the very end is only visible against a head hash kept elsewhere, e.g. in logs.)

use crate::model::AuditEntry;
use sha2::{Digest, Sha256};

pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// The hash of one row. Fields are length-prefixed so no two rows can encode alike.
pub fn chain_hash(prev: &[u8], seq: i64, at: i64, actor: &str, action: &str, details: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tapproof-audit-v1");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    for field in [actor, action, details] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditProblem {
    #[error("row {seq}: expected sequence number {expected} (a row was removed or reordered)")]
    Gap { seq: i64, expected: i64 },
    #[error(
        "row {seq}: previous-hash does not match row {prev}'s hash (a row was removed, reordered or edited)"
    )]
    BrokenLink { seq: i64, prev: i64 },
    #[error("row {seq}: hash does not match its contents (the row was edited)")]
    Edited { seq: i64 },
}

/// Checks rows given oldest first, starting after `prev` (seq and hash of the row before them).
/// Returns the new head, or every problem found.
pub fn verify_chain(
    rows: &[AuditEntry],
    mut prev: (i64, Vec<u8>),
) -> Result<(i64, Vec<u8>), Vec<AuditProblem>> {
    let mut problems = Vec::new();
    for row in rows {
        if row.seq != prev.0 + 1 {
            problems.push(AuditProblem::Gap {
                seq: row.seq,
                expected: prev.0 + 1,
            });
        }
        if row.prev_hash != prev.1 {
            problems.push(AuditProblem::BrokenLink {
                seq: row.seq,
                prev: prev.0,
            });
        }
        let want = chain_hash(
            &row.prev_hash,
            row.seq,
            row.at,
            &row.actor,
            &row.action,
            &row.details,
        );
        if row.hash != want {
            problems.push(AuditProblem::Edited { seq: row.seq });
        }
        prev = (row.seq, row.hash.clone());
    }
    if problems.is_empty() {
        Ok(prev)
    } else {
        Err(problems)
    }
}
