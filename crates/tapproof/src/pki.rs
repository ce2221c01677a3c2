//! `tapproof pki mint`: a throw-away CA and node identities on disk, in the layout the agent's
//! `[identity]` section expects. For demos, benchmarks and tests; production identities come
//! from the control plane or your own PKI.

use crate::cli::{PkiArgs, PkiCommand};
use anyhow::Context;
use std::path::Path;
use tapproof_identity::{Authority, KeyAlgorithm, TrustDomain};

pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    match args.command {
        PkiCommand::Mint {
            trust_domain,
            out,
            nodes,
            lifetime,
            profile,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .map_err(|e| crate::exit::ConfigProblem(format!("--trust-domain {trust_domain:?}: {e}")))?;
            let lifetime = time::Duration::try_from(lifetime.0).context("--lifetime is too long")?;
            mint_with(&td, &out, &nodes, lifetime, profile.key_algorithm())?;
            println!(
                "wrote bundle.pem and {} identities to {}",
                nodes.len(),
                out.display()
            );
            Ok(())
        }
    }
}

/// Writes `bundle.pem`, and `<node>.pem` + `<node>.key` (0600) for each node, every key (root,
/// intermediate, leaves) of `algorithm`.
pub fn mint_with(
    td: &TrustDomain,
    out: &Path,
    nodes: &[String],
    lifetime: time::Duration,
    algorithm: KeyAlgorithm,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let root = Authority::new_root_with(td.clone(), time::Duration::days(365), algorithm)
        .context("cannot make the root CA")?;
    let ca = root
        .new_intermediate(time::Duration::days(30))
        .context("cannot make the intermediate CA")?;
    write(&out.join("bundle.pem"), root.cert_pem(), 0o644)?;
    for node in nodes {
        let id = td
            .node_id(node)
            .map_err(|e| crate::exit::ConfigProblem(format!("--node {node:?}: {e}")))?;
        let issued = ca
            .issue_with_new_key(&id, lifetime)
            .with_context(|| format!("cannot issue {id}"))?;
        write(&out.join(format!("{node}.pem")), &issued.chain_pem, 0o644)?;
        write(&out.join(format!("{node}.key")), &issued.key_pem, 0o600)?;
    }
    Ok(())
}

/// Creates the file with its final mode from the start, so a key is never briefly world-readable.
pub fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    tapproof_tls::write_identity_file(path, contents.as_bytes(), mode)
        .with_context(|| format!("cannot write {}", path.display()))
}
