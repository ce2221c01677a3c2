//! `tapproof server evidence export` and `tapproof evidence verify` (the format and the checks
//! are `tapproof_server::evidence`'s; this file reads arguments, writes files and prints).

use crate::cli::EvidenceCommand;
use crate::exit::ConfigProblem;
use anyhow::Context;
use std::path::{Path, PathBuf};
use tapproof_identity::TrustDomain;
use tapproof_server::evidence::{self, Period};

/// `server evidence export`: the signed file and its HTML report, both 0600.
pub async fn export(
    store: &dyn tapproof_store::Store,
    kek: &tapproof_server::kek::Kek,
    td: &TrustDomain,
    from: Option<i64>,
    to: Option<i64>,
    out: &Path,
    html: Option<PathBuf>,
) -> anyhow::Result<()> {
    let now = tapproof_identity::when::now();
    let period = Period {
        from: from.unwrap_or(0),
        to: to.unwrap_or(now + 1),
    };
    if period.from >= period.to {
        return Err(ConfigProblem(format!(
            "--from {} is not before --to {}",
            tapproof_identity::when::rfc3339(period.from),
            tapproof_identity::when::rfc3339(period.to)
        ))
        .into());
    }
    let ca = tapproof_server::Ca::load(store, kek, td)
        .await
        .map_err(crate::exit::classify)?;
    let export = evidence::export(store, &ca, period, now)
        .await
        .map_err(crate::exit::classify)?;
    let html = html.unwrap_or_else(|| out.with_extension("html"));
    for (path, bytes) in [
        (out, export.file.as_slice()),
        (html.as_path(), export.html.as_bytes()),
    ] {
        tapproof_tls::write_identity_file(path, bytes, 0o600)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "evidence of {} to {} written to {} ({} bytes, signed), report {}",
        tapproof_identity::when::rfc3339(period.from),
        tapproof_identity::when::rfc3339(period.to),
        out.display(),
        export.file.len(),
        html.display()
    );
    for (section, n) in &export.counts {
        println!("  {section:<18} {n} entries");
    }
    println!(
        "check it: tapproof evidence verify {} --bundle BUNDLE.pem",
        out.display()
    );
    Ok(())
}

/// `evidence verify`: every check, then the verdict; exit 1 unless all hold.
pub fn verify(cmd: EvidenceCommand) -> anyhow::Result<()> {
    let EvidenceCommand::Verify { file, bundle, json } = cmd;
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let bundle = bundle
        .map(|b| std::fs::read_to_string(&b).with_context(|| format!("cannot read --bundle {}", b.display())))
        .transpose()?;
    let checks = evidence::verify(&bytes, bundle.as_deref());
    let failed = checks.iter().filter(|c| !c.ok).count();
    if json {
        println!(
            "{}",
            serde_json::json!({ "file": file, "verified": failed == 0, "checks": checks })
        );
    } else {
        for c in &checks {
            println!(
                "{} {}: {}",
                if c.ok { "ok    " } else { "FAILED" },
                c.check,
                c.detail
            );
        }
    }
    if failed == 0 {
        if !json {
            println!("VERIFIED: {}", file.display());
        }
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{}: NOT verified, {failed} check(s) failed",
            file.display()
        ))
    }
}
