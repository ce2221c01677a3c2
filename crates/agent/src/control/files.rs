//! What the agent keeps in `control.data_dir`: its key (0600, made here, never sent), certificate
//! and trust bundle, the identities of the services registered to it (`svc-<name>.pem/.key`), and
//! `control.json` (server, node, ID, validity). Every file goes through the one identity-file
//! writer (`tapproof_tls::write_identity_file`: mode from the first byte, fsync, rename).

use super::ControlError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tapproof_api::IssuedIdentity;
use tapproof_tls::IdentityFiles;

const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node.key";
const BUNDLE: &str = "bundle.pem";
const STATE: &str = "control.json";

/// What the agent remembers between starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ControlState {
    pub server: String,
    pub node: String,
    pub id: String,
    pub issued_at: i64,
    pub not_after: i64,
    /// Services registered to this node; their identities live in `svc-<name>.pem` / `.key`.
    #[serde(default)]
    pub services: Vec<String>,
}

pub fn identity_files(data_dir: &Path) -> IdentityFiles {
    IdentityFiles {
        cert: data_dir.join(NODE_CERT),
        key: data_dir.join(NODE_KEY),
        bundle: data_dir.join(BUNDLE),
    }
}

pub(crate) fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE)
}

pub(crate) fn read_state(data_dir: &Path) -> Option<ControlState> {
    serde_json::from_slice(&std::fs::read(state_path(data_dir)).ok()?).ok()
}

pub(crate) fn write_state(data_dir: &Path, state: &ControlState) -> Result<(), ControlError> {
    write_file(
        &state_path(data_dir),
        &serde_json::to_vec_pretty(state).unwrap_or_default(),
        0o600,
    )
}

pub(crate) fn data_err(path: &Path, e: impl std::fmt::Display) -> ControlError {
    ControlError::DataDir {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ControlError> {
    tapproof_tls::write_identity_file(path, contents, mode).map_err(|e| data_err(path, e))
}

fn service_files(data_dir: &Path, service: &str) -> (PathBuf, PathBuf) {
    (
        data_dir.join(format!("svc-{service}.pem")),
        data_dir.join(format!("svc-{service}.key")),
    )
}

/// Keeps the service identities the server issued (key 0600 beside each certificate). `keys`
/// holds (id, CSR, key) as made for the request.
pub(crate) fn write_service_identities(
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
