//! The evidence export: one file an auditor checks offline (`tapproof evidence verify`), holding
//! the flow inventory, the crypto in use per node, the key and certificate inventory, self-test
//! results, revocations with their propagation, the handshake records (summary and every record),
//! the capture history, the audit log's chain over the period and a control-mapping table.
//!
//! Format (`FORMAT`): the file is the canonical JSON (serde_json, keys sorted, no whitespace) of
//! `{"content": C, "signature": S}` and a newline. `C.hashes` holds the SHA-256 of each section's
//! canonical JSON; `S` is a signature over the canonical bytes of `C`, made by a key generated
//! for this export alone (`spiffe://<td>/server/evidence`, a leaf of the active intermediate,
//! `Authority::sign_once`) and dropped after. So one byte changed anywhere fails: inside a value
//! the section's hash or the signature, outside them the canonical form.

use crate::{Ca, ServerError};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use tapproof_store::Store;

pub const FORMAT: &str = "tapproof-evidence/1";
/// Records a single export holds at most (the summary still counts them all).
pub const MAX_RECORDS: i64 = 1_000_000;
/// The signing certificate's lifetime: the export is signed within it, and verified as of then.
const SIGNER_LIFETIME: time::Duration = time::Duration::hours(1);

/// The period an export covers, Unix seconds, `to` excluded.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    pub from: i64,
    pub to: i64,
}

/// An export: the file's bytes and the human-readable report.
pub struct Export {
    pub file: Vec<u8>,
    pub html: String,
    /// Per section, how many entries it holds (for the CLI's summary).
    pub counts: BTreeMap<String, usize>,
}

/// The canonical bytes of a JSON value (sorted keys: serde_json's map is ordered).
pub fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a serde_json::Value always serialises")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn day(unix: i64) -> String {
    tapproof_identity::when::rfc3339(unix.div_euclid(86_400) * 86_400)[..10].to_owned()
}

fn share(part: usize, whole: usize) -> Value {
    if whole == 0 {
        Value::Null
    } else {
        json!((part as f64 * 10_000.0 / whole as f64).round() / 100.0)
    }
}

/// Builds and signs the export of `period` from the store. Refuses a period with no data.
pub async fn export(store: &dyn Store, ca: &Ca, period: Period, now: i64) -> Result<Export, ServerError> {
    let Period { from, to } = period;
    let in_period = |t: i64| t >= from && t < to;
    let from_ms = from.saturating_mul(1000);
    let to_ms = to.saturating_mul(1000);

    let records = store.handshakes_list(from_ms, to_ms, MAX_RECORDS).await?;
    let points: Vec<_> = store
        .coverage_history(from)
        .await?
        .into_iter()
        .filter(|p| in_period(p.at))
        .collect();
    let mut audit = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_list(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        audit.extend(page);
    }
    let log_head = audit.last().map(|r| (r.seq, hex::encode(&r.hash)));
    let anchor = audit
        .iter()
        .take_while(|r| r.at < from)
        .last()
        .map_or((0, hex::encode(tapproof_store::GENESIS_HASH)), |r| {
            (r.seq, hex::encode(&r.hash))
        });
    let audit_rows: Vec<_> = audit.iter().filter(|r| in_period(r.at)).collect();
    if records.is_empty() && points.is_empty() && audit_rows.is_empty() {
        return Err(ServerError::Invalid(format!(
            "no data between {} and {}: no handshake records, coverage reports or audit-log rows in that period; nothing exported",
            tapproof_identity::when::rfc3339(from),
            tapproof_identity::when::rfc3339(to)
        )));
    }
    let latest: Vec<_> = store
        .coverage_latest()
        .await?
        .into_iter()
        .filter(|r| in_period(r.point.at))
        .collect();
    let uploads: Vec<(String, tapproof_audit::CoverageUpload)> = latest
        .iter()
        .filter_map(|r| {
            serde_json::from_str(&r.report)
                .ok()
                .map(|u| (r.point.node.clone(), u))
        })
        .collect();

    let mut sections = Map::new();
    let flows = flows_section(&points, &uploads);
    let handshakes = handshake_sections(&records);
    sections.insert("crypto".into(), crypto_section(&records));
    sections.insert("pki".into(), pki_section(store, &audit_rows, period).await?);
    sections.insert(
        "revocations".into(),
        serde_json::to_value(crate::admin::revocation_propagation(store).await?).unwrap_or_default(),
    );
    sections.insert("selftests".into(), selftest_section(&uploads, &audit_rows));
    sections.insert("capture".into(), capture_section(&points, &audit_rows));
    sections.insert(
        "audit_log".into(),
        json!({
            "anchor": { "seq": anchor.0, "hash": anchor.1 },
            "rows": audit_rows.iter().map(|r| json!({
                "seq": r.seq, "at": r.at, "actor": r.actor, "action": r.action, "details": r.details,
                "prev_hash": hex::encode(&r.prev_hash), "hash": hex::encode(&r.hash),
            })).collect::<Vec<_>>(),
            "period_head": audit_rows.last().map_or(anchor.1.clone(), |r| hex::encode(&r.hash)),
            "log_head": log_head.map(|(seq, hash)| json!({ "seq": seq, "hash": hash })),
        }),
    );
    let controls = controls_section(&flows, &handshakes.0, &sections);
    sections.insert("flows".into(), flows);
    sections.insert("handshake_summary".into(), handshakes.0);
    sections.insert("handshake_records".into(), handshakes.1);
    sections.insert("controls".into(), controls);

    let hashes: Map<String, Value> = sections
        .iter()
        .map(|(name, v)| (name.clone(), Value::String(sha256_hex(&canonical(v)))))
        .collect();
    let counts = sections
        .iter()
        .map(|(name, v)| (name.clone(), count(v)))
        .collect();
    let content = json!({
        "format": FORMAT,
        "trust_domain": ca.trust_domain.to_string(),
        "period": { "from": from, "to": to },
        "exported_at": now,
        "exported_by": {
            "software": format!("tapproof {}", env!("CARGO_PKG_VERSION")),
            "tls_library": "rustls 0.23 (TLS 1.3 only)",
            "crypto_module": "AWS-LC through aws-lc-rs",
            "fips_mode": aws_lc_rs::try_fips_mode().is_ok(),
        },
        "sections": sections,
        "hashes": hashes,
    });
    let id = tapproof_identity::SpiffeId::new(ca.trust_domain.clone(), "/server/evidence")
        .map_err(|e| ServerError::Ca(e.to_string()))?;
    let signed = canonical(&content);
    let (chain, signature) = ca
        .signer
        .sign_once(&id, SIGNER_LIFETIME, &signed)
        .map_err(|e| ServerError::Ca(format!("cannot sign the export: {e}")))?;
    let html = crate::evidence_report::render(&content);
    let file = json!({
        "content": content,
        "signature": {
            "scheme": tapproof_identity::ca::first_der(&chain)
                .ok()
                .and_then(|der| tapproof_identity::inspect_svid(&der).ok())
                .map(|i| i.signature_scheme),
            "chain": chain,
            "value": hex::encode(signature),
        },
    });
    let mut bytes = canonical(&file);
    bytes.push(b'\n');
    Ok(Export {
        file: bytes,
        html,
        counts,
    })
}

/// How many entries a section holds, for the summary (its longest list).
fn count(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.values().map(count).max().unwrap_or(0),
        _ => 0,
    }
}

fn flows_section(
    points: &[tapproof_store::CoveragePoint],
    uploads: &[(String, tapproof_audit::CoverageUpload)],
) -> Value {
    // Per day and node, the day's last report; per day, the fleet's sum of those.
    let mut last: BTreeMap<(String, String), (&tapproof_store::CoveragePoint, usize)> = BTreeMap::new();
    for p in points {
        let e = last.entry((day(p.at), p.node.clone())).or_insert((p, 0));
        e.0 = p;
        e.1 += 1;
    }
    let mut fleet: BTreeMap<String, (i64, i64, i64, usize)> = BTreeMap::new();
    let daily: Vec<Value> = last
        .iter()
        .map(|((d, node), (p, reports))| {
            let f = fleet.entry(d.clone()).or_default();
            f.0 += p.links;
            f.1 += p.encrypted;
            f.2 += p.plaintext;
            f.3 += 1;
            json!({
                "day": d, "node": node, "reports": reports, "links": p.links, "encrypted": p.encrypted,
                "plaintext": p.plaintext, "coverage_percent": share(p.encrypted as usize, p.links as usize),
                "capture_mode": p.capture_mode, "plaintext_attempts": p.plaintext_attempts,
            })
        })
        .collect();
    let fleet: Vec<Value> = fleet
        .into_iter()
        .map(|(d, (links, encrypted, plaintext, nodes))| {
            json!({ "day": d, "nodes": nodes, "links": links, "encrypted": encrypted, "plaintext": plaintext,
                    "coverage_percent": share(encrypted as usize, links as usize) })
        })
        .collect();
    let mut links = Vec::new();
    let mut exceptions = Vec::new();
    for (node, upload) in uploads {
        for l in &upload.report.links {
            let mut v = serde_json::to_value(l).unwrap_or_default();
            v["node"] = json!(node);
            v["at"] = json!(upload.report.generated_at);
            if l.class == tapproof_audit::Class::Allowed {
                exceptions.push(json!({
                    "node": node, "local": l.local.to_string(), "remote": l.remote.to_string(),
                    "process": l.process, "reason": l.detail,
                    // `[[audit.allow]]` records a reason; owner and expiry are not recorded yet.
                    "owner": null, "expires": null,
                }));
            }
            links.push(v);
        }
    }
    json!({ "daily": daily, "fleet_daily": fleet, "links": links, "exceptions": exceptions })
}

/// (summary, records).
fn handshake_sections(records: &[tapproof_store::HandshakeRow]) -> (Value, Value) {
    let mut by: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut tally = |what: &'static str, key: Option<&str>| {
        *by.entry(what)
            .or_default()
            .entry(key.unwrap_or("(none)").to_owned())
            .or_default() += 1;
    };
    let ok: Vec<_> = records.iter().filter(|r| r.outcome == "ok").collect();
    for r in records {
        tally("outcome", Some(&r.outcome));
        if let Some(reason) = &r.reason {
            tally("refused_reason", Some(reason));
        }
    }
    for r in &ok {
        tally("tls_version", r.tls_version.as_deref());
        tally("cipher", r.cipher.as_deref());
        tally("group", r.group.as_deref());
        tally("signature_scheme", r.signature_scheme.as_deref());
    }
    let post_quantum = ok
        .iter()
        .filter(|r| r.group.as_deref().is_some_and(|g| g.contains("MLKEM")))
        .count();
    let mlkem1024 = ok
        .iter()
        .filter(|r| r.group.as_deref() == Some("MLKEM1024"))
        .count();
    let mldsa = ok
        .iter()
        .filter(|r| {
            r.signature_scheme
                .as_deref()
                .is_some_and(|s| s.starts_with("mldsa"))
        })
        .count();
    let summary = json!({
        "total": records.len(), "ok": ok.len(), "refused": records.len() - ok.len(),
        "truncated": records.len() as i64 >= MAX_RECORDS,
        "by": by,
        "post_quantum_percent": share(post_quantum, ok.len()),
        "mlkem1024_percent": share(mlkem1024, ok.len()),
        "mldsa_signature_percent": share(mldsa, ok.len()),
        "tls13_only": ok.iter().all(|r| r.tls_version.as_deref() == Some("TLSv1.3")),
    });
    let rows = serde_json::to_value(
        records
            .iter()
            .cloned()
            .map(crate::admin::handshake)
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    (summary, json!({ "count": records.len(), "records": rows }))
}

fn crypto_section(records: &[tapproof_store::HandshakeRow]) -> Value {
    let mut nodes: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.outcome == "ok") {
        let suite = format!(
            "{} {} {} {}",
            r.tls_version.as_deref().unwrap_or("?"),
            r.cipher.as_deref().unwrap_or("?"),
            r.group.as_deref().unwrap_or("?"),
            r.signature_scheme.as_deref().unwrap_or("?")
        );
        *nodes.entry(&r.node).or_default().entry(suite).or_default() += 1;
    }
    json!({
        "control_plane": {
            "tls_versions": ["TLSv1.3"],
            "crypto_module": "AWS-LC through aws-lc-rs",
            "fips_mode": aws_lc_rs::try_fips_mode().is_ok(),
        },
        "nodes": nodes.into_iter().map(|(node, suites)| json!({
            "node": node,
            "negotiated": suites.into_iter().map(|(s, n)| json!({ "suite": s, "handshakes": n })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "note": "per node: the TLS version, cipher suite, key-exchange group and the peer's signature scheme its accepted handshakes negotiated in the period (from the handshake records)",
    })
}

async fn pki_section(
    store: &dyn Store,
    audit: &[&tapproof_store::AuditEntry],
    period: Period,
) -> Result<Value, ServerError> {
    let cas: Vec<Value> = store
        .ca_list()
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id, "kind": c.kind.as_str(), "state": c.state.as_str(),
                "parent_id": c.parent_id,
                "algorithm": tapproof_identity::key_algorithm_of(&c.cert_pem).map(|a| a.as_str()).unwrap_or("unknown"),
                "not_after": c.not_after, "created_at": c.created_at,
                "sha256": tapproof_tls::cert_pin(&c.cert_pem).map(hex::encode).unwrap_or_default(),
                "key_location": "control-plane store, sealed (AES-256-GCM under the key-encryption key)",
                "cert_pem": c.cert_pem,
            })
        })
        .collect();
    let mut leaves = Vec::new();
    for node in store.node_list().await? {
        for c in store.cert_list(&node.name).await? {
            if c.issued_at >= period.from && c.issued_at < period.to {
                leaves.push(json!({
                    "serial": c.serial, "spiffe_id": c.spiffe_id, "node": c.node, "not_before": c.not_before,
                    "not_after": c.not_after, "issued_at": c.issued_at,
                    "key_location": "generated on the node; only its CSR reached the CA",
                }));
            }
        }
    }
    let events: Vec<Value> = audit
        .iter()
        .filter(|r| r.action.starts_with("ca.") || r.action.starts_with("revocation."))
        .map(|r| json!({ "seq": r.seq, "at": r.at, "action": r.action, "actor": r.actor, "details": r.details }))
        .collect();
    Ok(json!({ "cas": cas, "leaves_issued": leaves, "rotation_and_revocation_events": events }))
}

fn selftest_section(
    uploads: &[(String, tapproof_audit::CoverageUpload)],
    audit: &[&tapproof_store::AuditEntry],
) -> Value {
    // The control plane's own rounds (`probes.rs`): one audit row each.
    let server_rounds: Vec<Value> = audit
        .iter()
        .filter(|r| r.action == "selftest.server_round" || r.action == "selftest.accepted")
        .map(|r| {
            let details: Value = serde_json::from_str(&r.details).unwrap_or_default();
            json!({ "seq": r.seq, "at": r.at, "actor": r.actor, "probes": details["probes"] })
        })
        .collect();
    let server_accepted = server_rounds
        .iter()
        .flat_map(|r| r["probes"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["result"] == "accepted")
        .count();
    let rounds: Vec<Value> = uploads
        .iter()
        .filter_map(|(node, u)| u.selftest.as_ref().map(|r| (node, r)))
        .map(|(node, r)| json!({ "node": node, "at": r.at, "target": r.target, "probes": r.probes }))
        .collect();
    let accepted = uploads
        .iter()
        .filter_map(|(_, u)| u.selftest.as_ref())
        .flat_map(|r| &r.probes)
        .filter(|p| p.result == "accepted")
        .count();
    json!({
        "rounds": rounds, "server_rounds": server_rounds, "accepted": accepted + server_accepted,
        "note": "rounds: each node's own latest round reported in the period; server_rounds: every round of the control plane's probes (expired and revoked certificates) in the period",
    })
}

fn capture_section(points: &[tapproof_store::CoveragePoint], audit: &[&tapproof_store::AuditEntry]) -> Value {
    let mut changes = Vec::new();
    let mut seen: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for p in points {
        let mode = p.capture_mode.as_deref();
        if seen.insert(&p.node, mode) != Some(mode) {
            changes.push(json!({ "node": p.node, "at": p.at, "mode": mode }));
        }
    }
    let policy: Vec<Value> = audit
        .iter()
        .filter(|r| r.action.starts_with("capture."))
        .map(|r| json!({ "seq": r.seq, "at": r.at, "action": r.action, "actor": r.actor, "details": r.details }))
        .collect();
    json!({ "modes_reported": changes, "changes_made": policy })
}

/// `met` / `not met`, or `no data` when the period holds nothing to judge by.
fn judged(data: bool, ok: bool) -> &'static str {
    if data {
        status(ok)
    } else {
        "no data"
    }
}

fn status(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

/// Every probe of every round in `rounds`.
fn all_probes(rounds: &Value) -> Vec<&Value> {
    rounds
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["probes"].as_array().into_iter().flatten())
        .collect()
}

/// Whether the probe `name` ran at least once (not `not_applicable`) and was refused every time.
fn every_run_refused(probes: &[&Value], name: &str) -> bool {
    let ran: Vec<_> = probes
        .iter()
        .filter(|p| p["probe"] == name && p["result"] != "not_applicable")
        .collect();
    !ran.is_empty() && ran.iter().all(|p| p["result"] == "refused")
}

fn controls_section(flows: &Value, summary: &Value, sections: &Map<String, Value>) -> Value {
    let days = flows["fleet_daily"].as_array().cloned().unwrap_or_default();
    let plaintext: i64 = days.iter().filter_map(|d| d["plaintext"].as_i64()).sum();
    let links: i64 = days.iter().filter_map(|d| d["links"].as_i64()).sum();
    let total = summary["total"].as_u64().unwrap_or(0);
    let tls13 = summary["tls13_only"].as_bool().unwrap_or(false);
    let refused_untrusted: u64 = [
        "unknown_ca",
        "bad_certificate",
        "expired",
        "revoked",
        "no_client_cert",
    ]
    .iter()
    .filter_map(|r| summary["by"]["refused_reason"][*r].as_u64())
    .sum();
    let node_probes = all_probes(&sections["selftests"]["rounds"]);
    let server_probes = all_probes(&sections["selftests"]["server_rounds"]);
    let probe_refused = |name: &str| every_run_refused(&node_probes, name);
    let server_refused = |name: &str| every_run_refused(&server_probes, name);
    let fips = sections["crypto"]["control_plane"]["fips_mode"]
        .as_bool()
        .unwrap_or(false);
    let cas = sections["pki"]["cas"].as_array().map_or(0, Vec::len);
    let mut seen = BTreeSet::new();
    let mut row = |framework: &str,
                   control: &str,
                   requirement: &str,
                   evidence: &[&str],
                   status: &str,
                   figure: String| {
        seen.insert(control.to_owned());
        json!({ "framework": framework, "control": control, "requirement": requirement, "evidence": evidence, "status": status, "figure": figure })
    };
    let pq = &summary["post_quantum_percent"];
    let ml1024 = &summary["mlkem1024_percent"];
    json!([
        row("PCI DSS 4.0", "4.2.1 a", "strong cryptography protects data in transit", &["handshake_summary", "handshake_records", "crypto"],
            judged(total > 0, tls13), format!("{total} handshakes, TLS 1.3 only: {tls13}")),
        row("PCI DSS 4.0", "4.2.1 b", "certificates are valid, not expired or revoked; untrusted ones are refused", &["handshake_summary", "revocations", "pki", "selftests"],
            judged(!server_probes.is_empty(), server_refused("expired") && server_refused("revoked")),
            format!("the control plane's expired and revoked probes refused by every probed node; {refused_untrusted} handshakes refused for an untrusted, expired, revoked or missing certificate")),
        row("PCI DSS 4.0", "4.2.1 c", "connections with untrusted certificates fail (examined)", &["selftests"],
            judged(!node_probes.is_empty(), probe_refused("foreign_ca") && probe_refused("no_client_cert")), "self-test probes foreign_ca and no_client_cert refused on every node that ran a round".into()),
        row("PCI DSS 4.0", "4.2.1 d", "only secure versions and configurations", &["selftests", "crypto"],
            judged(!node_probes.is_empty(), probe_refused("tls12") && probe_refused("plaintext") && tls13), "TLS 1.2 and plaintext probes refused; TLS 1.3 only negotiated".into()),
        row("PCI DSS 4.0", "4.2.1.1", "inventory of trusted keys and certificates", &["pki"],
            status(cas > 0), format!("{cas} CA certificates, leaves issued in the period listed with their key location")),
        row("SOC 2", "CC6.1", "logical access: identities, issuance and revocation", &["pki", "revocations", "audit_log"],
            status(cas > 0), "every issuance, renewal and revocation in the hash-chained audit log".into()),
        row("SOC 2", "CC6.7", "transmission of data is protected", &["flows", "handshake_summary"],
            judged(links > 0, plaintext == 0), format!("{plaintext} plaintext of {links} observed network links (sum of daily reports)")),
        row("FedRAMP", "SC-8(1)", "cryptographic protection of transmitted information", &["flows", "handshake_records"],
            judged(links > 0 || total > 0, plaintext == 0 && tls13), format!("{plaintext} plaintext of {links} observed network links; TLS 1.3 only: {tls13}")),
        row("FedRAMP", "SC-12", "key establishment and management", &["pki", "audit_log"],
            status(cas > 0), "node keys generated on the node, short-lived certificates, CA keys sealed".into()),
        row("FedRAMP", "SC-13", "FIPS-validated cryptography", &["crypto"],
            status(fips), format!("FIPS mode: {fips} (this build has no FIPS-validated module)")),
        row("NIST SP 800-52r2", "3.1 / 3.3", "TLS 1.3 with approved suites and groups", &["handshake_summary", "crypto"],
            judged(total > 0, tls13), format!("suites: {}", summary["by"]["cipher"])),
        row("CNSA 2.0", "readiness", "ML-KEM-1024 and AES-256 on every link", &["handshake_summary"],
            if ml1024.as_f64() == Some(100.0) { "met" } else if pq.as_f64().is_some_and(|p| p > 0.0) { "partial" } else { "not met" },
            format!("post-quantum key exchange on {pq} % of accepted handshakes, ML-KEM-1024 on {ml1024} %")),
    ])
}

/// One check of `verify` and its outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn check(out: &mut Vec<Check>, name: impl Into<String>, result: Result<String, String>) {
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    out.push(Check {
        check: name.into(),
        ok,
        detail,
    });
}

/// Checks an export: its form, every section's hash, the audit chain, the counts, and the
/// signature against `bundle_pem` (else the roots the export itself lists, which proves only that
/// it is consistent: say so). Every check is returned; the file passes when all are ok.
pub fn verify(file: &[u8], bundle_pem: Option<&str>) -> Vec<Check> {
    let mut out = Vec::new();
    let doc: Value = match serde_json::from_slice(file) {
        Ok(v) => v,
        Err(e) => {
            check(
                &mut out,
                "file",
                Err(format!(
                    "not a complete evidence file (truncated, or not JSON): {e}"
                )),
            );
            return out;
        }
    };
    let content = &doc["content"];
    if content["format"] != FORMAT {
        check(
            &mut out,
            "format",
            Err(format!("not a {FORMAT} file (format {})", content["format"])),
        );
        return out;
    }
    check(&mut out, "format", Ok(FORMAT.into()));
    let mut expected = canonical(&doc);
    expected.push(b'\n');
    check(
        &mut out,
        "canonical form",
        if expected == file {
            Ok("the bytes are exactly as exported".into())
        } else {
            let at = expected
                .iter()
                .zip(file)
                .position(|(a, b)| a != b)
                .unwrap_or(expected.len().min(file.len()));
            Err(format!(
                "the bytes differ from the exported form from byte {at} on (edited after export)"
            ))
        },
    );
    let sections = content["sections"].as_object().cloned().unwrap_or_default();
    let hashes = content["hashes"].as_object().cloned().unwrap_or_default();
    for name in sections.keys().chain(hashes.keys()).collect::<BTreeSet<_>>() {
        let result = match (sections.get(name), hashes.get(name).and_then(Value::as_str)) {
            (Some(v), Some(h)) if sha256_hex(&canonical(v)) == h => Ok(format!("sha256 {h}")),
            (Some(_), Some(_)) => {
                Err("its content does not match its hash (changed, or entries removed)".to_owned())
            }
            (None, _) => Err("the section is missing".to_owned()),
            (Some(_), None) => Err("the section has no hash".to_owned()),
        };
        check(&mut out, format!("section {name}"), result);
    }
    let records = content["sections"]["handshake_records"]["records"]
        .as_array()
        .map_or(0, Vec::len) as u64;
    check(
        &mut out,
        "handshake records",
        match content["sections"]["handshake_summary"]["total"].as_u64() {
            Some(total) if total == records => Ok(format!("{records} records, as summarised")),
            other => Err(format!(
                "{records} records, the summary says {other:?} (records removed?)"
            )),
        },
    );
    check(
        &mut out,
        "audit chain",
        audit_chain(&content["sections"]["audit_log"]),
    );
    check(&mut out, "signature", signature(&doc, bundle_pem));
    out
}

fn audit_chain(log: &Value) -> Result<String, String> {
    let bytes = |v: &Value, what: &str| {
        v.as_str()
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| format!("{what} is not hex"))
    };
    let anchor = (
        log["anchor"]["seq"].as_i64().ok_or("no anchor")?,
        bytes(&log["anchor"]["hash"], "the anchor hash")?,
    );
    let mut rows = Vec::new();
    for r in log["rows"].as_array().ok_or("no rows")? {
        rows.push(tapproof_store::AuditEntry {
            seq: r["seq"].as_i64().ok_or("a row without seq")?,
            at: r["at"].as_i64().ok_or("a row without time")?,
            actor: r["actor"].as_str().unwrap_or_default().to_owned(),
            action: r["action"].as_str().unwrap_or_default().to_owned(),
            details: r["details"].as_str().unwrap_or_default().to_owned(),
            prev_hash: bytes(&r["prev_hash"], "prev_hash")?,
            hash: bytes(&r["hash"], "hash")?,
        });
    }
    let (seq, head) = tapproof_store::verify_chain(&rows, anchor).map_err(|problems| {
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let stated = log["period_head"].as_str().unwrap_or_default();
    if hex::encode(&head) != stated {
        return Err(format!(
            "the chain ends at row {seq} with {}, the export states {stated}",
            hex::encode(&head)
        ));
    }
    Ok(format!(
        "{} rows chain from row {} to head {stated}",
        rows.len(),
        log["anchor"]["seq"]
    ))
}

fn signature(doc: &Value, bundle_pem: Option<&str>) -> Result<String, String> {
    let content = &doc["content"];
    let sig = &doc["signature"];
    let td = content["trust_domain"]
        .as_str()
        .and_then(|t| tapproof_identity::TrustDomain::new(t).ok())
        .ok_or("the export names no valid trust domain")?;
    let value = sig["value"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .ok_or("the signature is not hex")?;
    let chain = sig["chain"].as_str().ok_or("no signing chain")?;
    let embedded;
    let (roots, whose) = match bundle_pem {
        Some(b) => (b, "the given bundle"),
        None => {
            embedded = content["sections"]["pki"]["cas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["kind"] == "root")
                .filter_map(|c| c["cert_pem"].as_str())
                .collect::<String>();
            (
                embedded.as_str(),
                "the roots listed in the export itself (pass --bundle with a bundle obtained independently to check who signed)",
            )
        }
    };
    let at = content["exported_at"].as_i64().ok_or("no export time")?;
    let (id, scheme) =
        tapproof_tls::verify_document_signature(chain, roots, &td, at, &canonical(content), &value)
            .map_err(|e| e.to_string())?;
    if !id.path().starts_with("/server") {
        return Err(format!("signed by {id}, which is not a control-plane identity"));
    }
    Ok(format!("{scheme} by {id}, chaining to {whose}"))
}
