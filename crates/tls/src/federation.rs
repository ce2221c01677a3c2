//! Roots of the other trust domains this node federates with (SPIFFE federation). A peer whose
//! SVID names such a domain is checked against that domain's roots and no others, and a peer of
//! our own domain against our own bundle only: a federated CA can never vouch for an identity of
//! another domain, ours included.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::sync::Arc;
use tapproof_identity::TrustDomain;

#[derive(Debug, Clone, Default)]
pub struct ForeignRoots {
    by_domain: BTreeMap<TrustDomain, (Arc<RootCertStore>, Vec<Vec<u8>>)>,
}

impl ForeignRoots {
    /// Sets `td`'s roots (DER), replacing what it had. Every root must be a usable trust anchor.
    pub fn insert(&mut self, td: TrustDomain, roots: Vec<Vec<u8>>) -> Result<(), String> {
        if roots.is_empty() {
            return Err(format!("the bundle of {td} holds no root"));
        }
        let mut store = RootCertStore::empty();
        for (i, der) in roots.iter().enumerate() {
            store.add(CertificateDer::from(der.clone())).map_err(|e| {
                format!(
                    "root {i} of {td} is not a usable trust anchor: {}",
                    crate::tls_error_text(&e)
                )
            })?;
        }
        self.by_domain.insert(td, (Arc::new(store), roots));
        Ok(())
    }

    /// The same from PEM text (one or more CERTIFICATE blocks).
    pub fn insert_pem(&mut self, td: TrustDomain, pem: &str) -> Result<(), String> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not valid PEM: {e}"))?;
        self.insert(td, roots)
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.by_domain.keys()
    }

    pub fn contains(&self, td: &TrustDomain) -> bool {
        self.by_domain.contains_key(td)
    }

    /// `td`'s roots, DER, as last set.
    pub fn roots_der(&self, td: &TrustDomain) -> Option<&[Vec<u8>]> {
        self.by_domain.get(td).map(|(_, ders)| ders.as_slice())
    }

    pub(crate) fn store(&self, td: &TrustDomain) -> Option<&Arc<RootCertStore>> {
        self.by_domain.get(td).map(|(store, _)| store)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&TrustDomain, &Arc<RootCertStore>)> {
        self.by_domain.iter().map(|(td, (store, _))| (td, store))
    }
}
