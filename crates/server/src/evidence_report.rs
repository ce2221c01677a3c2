//! The human-readable report of an evidence export: one self-contained HTML page (no script, no
//! request elsewhere, styles inline, printable), rendered from the export's content. It is a
//! reading aid; what an auditor checks is the signed file (`tapproof evidence verify`).

use serde_json::Value;
use std::fmt::Write;

/// HTML-escapes text.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as table text: strings bare, null as a dash.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

fn when(v: &Value) -> String {
    v.as_i64()
        .map(tapproof_identity::when::rfc3339)
        .map_or_else(|| cell(v), |t| esc(&t))
}

/// A table of `rows` (JSON objects) with `columns` (key, heading); times in `times` columns.
fn table(out: &mut String, rows: &[Value], columns: &[(&str, &str)], times: &[&str], limit: usize) {
    if rows.is_empty() {
        out.push_str("<p class=\"none\">none in this period</p>\n");
        return;
    }
    out.push_str("<table><thead><tr>");
    for (_, heading) in columns {
        let _ = write!(out, "<th>{}</th>", esc(heading));
    }
    out.push_str("</tr></thead><tbody>\n");
    for row in rows.iter().take(limit) {
        out.push_str("<tr>");
        for (key, _) in columns {
            let v = &row[*key];
            let text = if *key == "at_ms" {
                v.as_i64().map_or_else(
                    || cell(v),
                    |ms| esc(&tapproof_identity::when::rfc3339(ms.div_euclid(1000))),
                )
            } else if times.contains(key) {
                when(v)
            } else {
                cell(v)
            };
            let class = match v.as_str() {
                Some("met" | "refused" | "ok") => " class=\"good\"",
                Some("not met" | "accepted" | "plaintext") => " class=\"bad\"",
                Some("partial" | "no data") => " class=\"warn\"",
                _ => "",
            };
            let _ = write!(out, "<td{class}>{text}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
    if rows.len() > limit {
        let _ = writeln!(
            out,
            "<p class=\"none\">{} more in the export file</p>",
            rows.len() - limit
        );
    }
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// One row per probe of `rounds` (a node's own rounds name the node on the round, the control
/// plane's on each probe).
fn probe_table(out: &mut String, rounds: &Value) {
    let rows: Vec<Value> = list(rounds)
        .iter()
        .flat_map(|r| {
            list(&r["probes"])
                .into_iter()
                .map(|p| {
                    let node = if p["node"].is_null() { &r["node"] } else { &p["node"] };
                    serde_json::json!({ "node": node, "at": r["at"], "probe": p["probe"], "result": p["result"], "detail": p["detail"] })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    table(
        out,
        &rows,
        &[
            ("node", "Node"),
            ("at", "At"),
            ("probe", "Probe"),
            ("result", "Result"),
            ("detail", "Detail"),
        ],
        &["at"],
        400,
    );
}

/// Renders the report of an export's `content`.
pub fn render(content: &Value) -> String {
    let s = &content["sections"];
    let td = cell(&content["trust_domain"]);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>tapproof evidence: {td}</title>\n<style>{STYLE}</style></head><body>\n\
         <h1>Encryption evidence: {td}</h1>\n\
         <p class=\"period\">Period {} to {} &middot; exported {} by {} &middot; crypto module {} (FIPS mode: {})</p>\n\
         <p class=\"note\">This page is a reading aid. The evidence is the signed export file: check it with \
         <code>tapproof evidence verify FILE --bundle BUNDLE.pem</code>, which checks the signature, every section's hash and the audit-log chain.</p>\n",
        when(&content["period"]["from"]),
        when(&content["period"]["to"]),
        when(&content["exported_at"]),
        cell(&content["exported_by"]["software"]),
        cell(&content["exported_by"]["crypto_module"]),
        cell(&content["exported_by"]["fips_mode"]),
    );

    out.push_str("<h2 id=\"controls\">Control mapping</h2>\n");
    table(
        &mut out,
        &list(&s["controls"]),
        &[
            ("framework", "Framework"),
            ("control", "Control"),
            ("requirement", "Requirement"),
            ("status", "Status"),
            ("figure", "Figure"),
        ],
        &[],
        100,
    );

    let h = &s["handshake_summary"];
    let _ = write!(
        out,
        "<h2 id=\"handshakes\">Handshakes</h2>\n<p class=\"figures\"><b>{}</b> handshakes: <b>{}</b> accepted, <b>{}</b> refused &middot; \
         post-quantum key exchange on <b>{}</b> % &middot; ML-KEM-1024 on <b>{}</b> % &middot; ML-DSA signatures on <b>{}</b> % &middot; TLS 1.3 only: <b>{}</b></p>\n",
        cell(&h["total"]),
        cell(&h["ok"]),
        cell(&h["refused"]),
        cell(&h["post_quantum_percent"]),
        cell(&h["mlkem1024_percent"]),
        cell(&h["mldsa_signature_percent"]),
        cell(&h["tls13_only"]),
    );
    let by: Vec<Value> = h["by"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(what, counts)| {
            counts
                .as_object()
                .into_iter()
                .flatten()
                .map(move |(k, n)| serde_json::json!({ "what": what, "value": k, "count": n }))
        })
        .collect();
    table(
        &mut out,
        &by,
        &[("what", "Of"), ("value", "Value"), ("count", "Handshakes")],
        &[],
        200,
    );
    out.push_str("<h3>Records (the first 200; every record is in the export file)</h3>\n");
    table(
        &mut out,
        &list(&s["handshake_records"]["records"]),
        &[
            ("at_ms", "At"),
            ("node", "Node"),
            ("side", "Side"),
            ("remote", "Peer address"),
            ("peer_id", "Peer"),
            ("group", "Group"),
            ("cipher", "Cipher"),
            ("signature_scheme", "Signature"),
            ("outcome", "Outcome"),
            ("reason", "Reason"),
        ],
        &[],
        200,
    );

    out.push_str("<h2 id=\"flows\">Flow inventory</h2>\n<h3>Fleet per day</h3>\n");
    table(
        &mut out,
        &list(&s["flows"]["fleet_daily"]),
        &[
            ("day", "Day"),
            ("nodes", "Nodes"),
            ("links", "Links"),
            ("encrypted", "Encrypted"),
            ("plaintext", "Plaintext"),
            ("coverage_percent", "Coverage %"),
        ],
        &[],
        400,
    );
    out.push_str("<h3>Per node and day</h3>\n");
    table(
        &mut out,
        &list(&s["flows"]["daily"]),
        &[
            ("day", "Day"),
            ("node", "Node"),
            ("links", "Links"),
            ("plaintext", "Plaintext"),
            ("coverage_percent", "Coverage %"),
            ("capture_mode", "Capture"),
        ],
        &[],
        400,
    );
    out.push_str("<h3>Links in each node's latest report</h3>\n");
    table(
        &mut out,
        &list(&s["flows"]["links"]),
        &[
            ("node", "Node"),
            ("class", "Class"),
            ("local", "Local"),
            ("remote", "Remote"),
            ("process", "Process"),
            ("detail", "Detail"),
        ],
        &[],
        400,
    );
    out.push_str("<h3>Exceptions register</h3>\n");
    table(
        &mut out,
        &list(&s["flows"]["exceptions"]),
        &[
            ("node", "Node"),
            ("local", "Local"),
            ("remote", "Remote"),
            ("reason", "Reason"),
            ("owner", "Owner"),
            ("expires", "Expires"),
        ],
        &[],
        400,
    );

    out.push_str("<h2 id=\"crypto\">Crypto configuration per node</h2>\n");
    let negotiated: Vec<Value> = list(&s["crypto"]["nodes"])
        .iter()
        .flat_map(|n| {
            list(&n["negotiated"])
                .into_iter()
                .map(|x| serde_json::json!({ "node": n["node"], "suite": x["suite"], "handshakes": x["handshakes"] }))
                .collect::<Vec<_>>()
        })
        .collect();
    table(
        &mut out,
        &negotiated,
        &[
            ("node", "Node"),
            ("suite", "Version, suite, group, signature"),
            ("handshakes", "Handshakes"),
        ],
        &[],
        400,
    );

    out.push_str("<h2 id=\"pki\">Keys and certificates</h2>\n");
    table(
        &mut out,
        &list(&s["pki"]["cas"]),
        &[
            ("id", "Id"),
            ("kind", "Kind"),
            ("state", "State"),
            ("algorithm", "Algorithm"),
            ("created_at", "Created"),
            ("not_after", "Expires"),
            ("key_location", "Key"),
            ("sha256", "SHA-256"),
        ],
        &["created_at", "not_after"],
        100,
    );
    out.push_str("<h3>Leaf certificates issued in the period</h3>\n");
    table(
        &mut out,
        &list(&s["pki"]["leaves_issued"]),
        &[
            ("issued_at", "Issued"),
            ("node", "Node"),
            ("spiffe_id", "Identity"),
            ("serial", "Serial"),
            ("not_after", "Expires"),
            ("key_location", "Key"),
        ],
        &["issued_at", "not_after"],
        400,
    );
    out.push_str("<h3>Rotation and revocation events</h3>\n");
    table(
        &mut out,
        &list(&s["pki"]["rotation_and_revocation_events"]),
        &[
            ("seq", "Row"),
            ("at", "At"),
            ("action", "Action"),
            ("actor", "Actor"),
            ("details", "Details"),
        ],
        &["at"],
        400,
    );

    out.push_str("<h2 id=\"revocations\">Revocations and their propagation</h2>\n");
    let revocations: Vec<Value> = list(&s["revocations"])
        .iter()
        .map(|p| {
            let applied = list(&p["applied"]);
            let slowest = applied.iter().filter_map(|a| a["seconds"].as_i64()).max();
            serde_json::json!({
                "id": p["revocation"]["id"], "kind": p["revocation"]["kind"], "value": p["revocation"]["value"],
                "revoked_at": p["revocation"]["revoked_at"], "applied": applied.len(),
                "slowest": slowest.map(|s| format!("{s} s")), "pending": p["pending"],
            })
        })
        .collect();
    table(
        &mut out,
        &revocations,
        &[
            ("id", "Id"),
            ("kind", "Kind"),
            ("value", "Revoked"),
            ("revoked_at", "At"),
            ("applied", "Nodes applied"),
            ("slowest", "Slowest"),
            ("pending", "Pending"),
        ],
        &["revoked_at"],
        400,
    );

    out.push_str("<h2 id=\"selftests\">Self-test probes</h2>\n");
    probe_table(&mut out, &s["selftests"]["rounds"]);
    out.push_str("<h3>The control plane's probes (expired and revoked certificates)</h3>\n");
    probe_table(&mut out, &s["selftests"]["server_rounds"]);

    out.push_str("<h2 id=\"capture\">Monitor / enforce history</h2>\n");
    table(
        &mut out,
        &list(&s["capture"]["modes_reported"]),
        &[("node", "Node"), ("at", "From"), ("mode", "Mode")],
        &["at"],
        400,
    );

    let log = &s["audit_log"];
    let _ = write!(
        out,
        "<h2 id=\"audit\">Audit log</h2>\n<p>{} rows in the period, chained from row {} (hash <code>{}</code>) to <code>{}</code>.</p>\n",
        list(&log["rows"]).len(),
        cell(&log["anchor"]["seq"]),
        cell(&log["anchor"]["hash"]),
        cell(&log["period_head"]),
    );
    table(
        &mut out,
        &list(&log["rows"]),
        &[
            ("seq", "Row"),
            ("at", "At"),
            ("actor", "Actor"),
            ("action", "Action"),
            ("details", "Details"),
        ],
        &["at"],
        300,
    );
    out.push_str("<h2 id=\"hashes\">Section hashes (SHA-256, signed)</h2>\n");
    let hashes: Vec<Value> = content["hashes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| serde_json::json!({ "section": k, "sha256": v }))
        .collect();
    table(
        &mut out,
        &hashes,
        &[("section", "Section"), ("sha256", "SHA-256")],
        &[],
        100,
    );
    out.push_str("</body></html>\n");
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;color:#1d232a;padding:0 1em}\
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:2px solid #d5dbe1;padding-bottom:.2em}\
h3{font-size:1.05em;margin-top:1.2em}.period,.note{color:#4a5560}.note{background:#f3f6f9;padding:.6em .8em;border-left:4px solid #2f6fb0}\
table{border-collapse:collapse;width:100%;margin:.4em 0 1em;font-size:12.5px}th,td{border:1px solid #d5dbe1;padding:.25em .45em;text-align:left;vertical-align:top;word-break:break-word}\
th{background:#eef2f6;white-space:nowrap}td.good,td.bad,td.warn{white-space:nowrap}td.good{color:#176a2c;font-weight:600}td.bad{color:#a4161a;font-weight:700}td.warn{color:#8a5a00;font-weight:600}\
.none{color:#6b7680;font-style:italic}.figures b{font-size:1.1em}code{font-size:12px;word-break:break-all}\
@media print{body{margin:0;max-width:none;font-size:11px}h2{break-after:avoid}tr{break-inside:avoid}.note{border:1px solid #999}}";
