//! The CA as the running server uses it: the active intermediate (key unsealed in memory only),
//! and the trust bundle (every root that is not retired).

use crate::kek::Kek;
use crate::ServerError;
use tapproof_identity::{Authority, KeyAlgorithm, TrustDomain};
use tapproof_store::{CaKind, CaState, Store};

/// Associated data for sealed CA keys: a sealed blob cannot be reused for anything else.
pub(crate) const SEAL_PURPOSE: &str = "tapproof-ca-key-v1";

pub struct Ca {
    pub trust_domain: TrustDomain,
    /// Signs leaves.
    pub signer: Authority,
    /// PEM of each root agents must trust.
    pub bundle: Vec<String>,
    /// PEM of the root above `signer` (sent in the server's chain for pinned first contact).
    pub signer_root_pem: String,
}

impl Ca {
    pub async fn load(store: &dyn Store, kek: &Kek, trust_domain: &TrustDomain) -> Result<Self, ServerError> {
        let cas = store.ca_list().await?;
        let bundle: Vec<String> = cas
            .iter()
            .filter(|c| c.kind == CaKind::Root && c.state != CaState::Retired)
            .map(|c| c.cert_pem.clone())
            .collect();
        let signer = cas
            .iter()
            .filter(|c| c.kind == CaKind::Intermediate && c.state == CaState::Active)
            .max_by_key(|c| c.id)
            .ok_or(ServerError::NotInitialised)?;
        let root = cas
            .iter()
            .find(|c| Some(c.id) == signer.parent_id)
            .ok_or_else(|| ServerError::Ca(format!("intermediate {} has no root in the store", signer.id)))?;
        let key = kek.open(SEAL_PURPOSE, &signer.key_sealed)?;
        let key_pem = String::from_utf8(key).map_err(|_| ServerError::Ca("sealed key is not PEM".into()))?;
        let signer = Authority::load(trust_domain.clone(), &signer.cert_pem, &key_pem, "", false)
            .map_err(|e| ServerError::Ca(e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            signer,
            bundle,
            signer_root_pem: root.cert_pem.clone(),
        })
    }
}

/// A new root and an intermediate under it, keys sealed, recorded in `state`; returns their ids
/// and the root's SHA-256 pin. Used by `init` (active) and by rollover's prepare (prepared); every
/// key of `algorithm` (ML-DSA-87 for a `cnsa2` fleet).
pub(crate) async fn create_pair(
    store: &dyn Store,
    kek: &Kek,
    trust_domain: &TrustDomain,
    state: CaState,
    algorithm: KeyAlgorithm,
) -> Result<(i64, i64, [u8; 32]), ServerError> {
    let ca_err = |e: tapproof_identity::CaError| ServerError::Ca(e.to_string());
    let root =
        Authority::new_root_with(trust_domain.clone(), crate::ROOT_LIFETIME, algorithm).map_err(ca_err)?;
    let inter = root
        .new_intermediate(crate::INTERMEDIATE_LIFETIME)
        .map_err(ca_err)?;
    let t = crate::now();
    let mut parent = None;
    let mut ids = Vec::new();
    for (kind, ca) in [(CaKind::Root, &root), (CaKind::Intermediate, &inter)] {
        let id = store
            .ca_insert(tapproof_store::NewCa {
                kind,
                parent_id: parent,
                cert_pem: ca.cert_pem().to_owned(),
                key_sealed: kek.seal(SEAL_PURPOSE, ca.key_pem().as_bytes())?,
                state,
                not_after: ca.not_after().unix_timestamp(),
                created_at: t,
            })
            .await?;
        parent = Some(id);
        ids.push(id);
    }
    let pin = tapproof_tls::cert_pin(root.cert_pem()).map_err(|e| ServerError::Ca(e.to_string()))?;
    Ok((ids[0], ids[1], pin))
}
