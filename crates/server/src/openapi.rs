//! The OpenAPI 3.1 document of `/v1`, served at `/v1/openapi.json`. Written by hand; the tests
//! below hold it against the wire types of `tapproof_api`: every schema lists exactly the fields
//! its type serialises (a field added to a type and not here fails them), every error code the
//! document names exists, the `Error` schema lists every `ErrorCode`, and every path the router
//! serves is described.

use serde_json::{json, Value};
use tapproof_api::{paths, ErrorCode};

fn error_response(codes: &[ErrorCode]) -> Value {
    let names: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
    json!({ "description": names.join(", "), "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn body(schema: &str) -> Value {
    json!({ "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn ok(description: &str, schema: &str) -> Value {
    let mut v = body(schema);
    v["description"] = json!(description);
    v
}

fn ok_list(description: &str, schema: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": format!("#/components/schemas/{schema}") } } } } })
}

fn string() -> Value {
    json!({ "type": "string" })
}

fn int() -> Value {
    json!({ "type": "integer" })
}

fn nullable_string() -> Value {
    json!({ "type": ["string", "null"] })
}

fn number() -> Value {
    json!({ "type": "number" })
}

fn nullable_int() -> Value {
    json!({ "type": ["integer", "null"] })
}

fn strings() -> Value {
    json!({ "type": "array", "items": { "type": "string" } })
}

fn reference(schema: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{schema}") })
}

fn list_of(schema: &str) -> Value {
    json!({ "type": "array", "items": reference(schema) })
}

/// An object schema; `strict` for request bodies (unknown fields are refused).
fn object(required: &[&str], properties: Value, strict: bool) -> Value {
    let mut v = json!({ "type": "object", "required": required, "properties": properties });
    if strict {
        v["additionalProperties"] = json!(false);
    }
    v
}

fn schemas() -> Value {
    use crate::coverage::MAX_SELFTEST_PROBES;
    use ErrorCode as E;
    let codes: Vec<&str> = E::ALL.iter().map(|c| c.as_str()).collect();
    let kinds = json!({ "type": "string", "enum": ["node", "spiffe_id", "serial"] });
    let mut all = json!({
        "Error": object(&["error"], json!({ "error": reference("ErrorDetail") }), false),
        "ErrorDetail": object(&["code", "message"], json!({
            "code": { "type": "string", "enum": codes },
            "message": string(),
        }), false),
        "Bundle": object(&["trust_domain", "roots"], json!({ "trust_domain": string(), "roots": strings() }), false),
        "SpiffeBundle": object(&["keys", "spiffe_refresh_hint"], json!({
            "keys": { "type": "array", "items": object(&["use", "kty", "x5c"], json!({
                "use": { "type": "string", "const": "x509-svid" },
                "kty": { "type": "string", "enum": ["EC", "RSA"] },
                "crv": string(), "x": string(), "y": string(), "n": string(), "e": string(),
                "x5c": { "type": "array", "items": string(), "minItems": 1, "maxItems": 1, "description": "the root certificate, base64 DER" },
            }), false) },
            "spiffe_refresh_hint": { "type": "integer", "minimum": 0, "description": "seconds until a federated peer should fetch again" },
            "spiffe_sequence": { "type": "integer", "minimum": 0 },
        }), false),
        "JoinRequest": object(&["token", "csr"], json!({
            "token": string(),
            "csr": { "type": "string", "description": "PEM CSR, ECDSA P-256 or Ed25519; only its public key is used" },
            "node": { "type": "string", "description": "the name the node gives itself: required by a reusable token (within its pattern, not a node that joined before), ignored by a single-use token" },
        }), true),
        "Identity": object(&["id", "chain_pem", "not_after"], json!({
            "id": string(), "chain_pem": { "type": "string", "description": "leaf first, then intermediates" }, "not_after": int(),
        }), false),
        "JoinResponse": object(&["node", "identity", "bundle", "services"], json!({
            "node": string(), "identity": reference("Identity"), "bundle": strings(), "services": strings(),
        }), false),
        "SignItem": object(&["id", "csr"], json!({ "id": string(), "csr": string() }), true),
        "SignRequest": object(&["csrs"], json!({
            "csrs": { "type": "array", "minItems": 1, "maxItems": tapproof_api::MAX_CSRS, "items": reference("SignItem") },
        }), true),
        "SignResponse": object(&["identities", "bundle", "services"], json!({
            "identities": list_of("Identity"), "bundle": strings(), "services": strings(),
        }), false),
        "Revocation": object(&["id", "kind", "value", "reason", "revoked_at"], json!({
            "id": int(), "kind": kinds, "value": string(), "reason": string(), "revoked_at": int(),
        }), false),
        "DirectoryEntry": object(&["service", "node", "id", "tunnel"], json!({
            "service": string(), "node": string(), "id": string(), "tunnel": { "type": "string", "description": "ADDR:PORT" },
            "addresses": { "type": "array", "items": { "type": "string" }, "description": "ADDR:PORT where clients reach the service, as its node announced them: what agents with capture.directory redirect into a tunnel to this node" },
        }), false),
        "State": object(&["version", "revocations", "bundle", "directory", "policy"], json!({
            "version": { "type": "integer", "description": "pass as `since` next time" },
            "revocations": list_of("Revocation"),
            "bundle": strings(),
            "directory": list_of("DirectoryEntry"),
            "policy": { "type": "object", "additionalProperties": strings(), "description": "service -> SPIFFE ID patterns allowed to open it" },
            "capture": reference("CapturePolicy"),
        }), false),
        "NodeView": object(&["name", "spiffe_id", "tunnel_addr", "created_at", "last_seen", "revoked_at", "services", "cert_not_after"], json!({
            "name": string(), "spiffe_id": string(), "tunnel_addr": { "type": ["string", "null"] }, "created_at": int(),
            "last_seen": nullable_int(), "revoked_at": nullable_int(), "services": strings(), "cert_not_after": nullable_int(),
        }), false),
        "Registration": object(&["node", "service"], json!({ "node": string(), "service": string(), "addresses": strings() }), false),
        "RegistrationChange": object(&["node", "service", "add"], json!({
            "node": string(), "service": string(), "add": { "type": "boolean", "description": "true adds, false removes" },
        }), true),
        "Changed": object(&["changed"], json!({ "changed": { "type": "boolean" } }), false),
        "RevokeRequest": object(&["kind", "value"], json!({
            "kind": { "type": "string", "enum": ["node", "spiffe_id", "serial"] },
            "value": { "type": "string", "description": "a node name, a SPIFFE ID, or a serial in hex" },
            "reason": string(),
        }), true),
        "AuditEntry": object(&["seq", "at", "actor", "action", "details", "prev_hash", "hash"], json!({
            "seq": int(), "at": int(), "actor": string(), "action": string(),
            "details": { "type": "string", "description": "JSON text" }, "prev_hash": string(), "hash": string(),
        }), false),
        "ServicePolicy": object(&["allow"], json!({ "allow": strings() }), true),
        "Policy": object(&[], json!({
            "services": { "type": "object", "additionalProperties": reference("ServicePolicy") },
            "capture": reference("CapturePolicy"),
        }), true),
        "Dashboard": object(&["generated_at", "fleet", "nodes", "links", "history", "denials", "audit", "revocations", "ca"], json!({
            "generated_at": int(), "fleet": reference("Fleet"), "nodes": list_of("DashboardNode"), "links": list_of("DashboardLink"),
            "history": list_of("HistoryPoint"), "denials": list_of("DashboardDenial"), "audit": list_of("AuditEntry"),
            "revocations": list_of("Revocation"), "ca": list_of("DashboardCa"),
        }), false),
        "DashboardCa": object(&["id", "kind", "state", "not_after", "created_at"], json!({
            "id": int(), "kind": { "type": "string", "enum": ["root", "intermediate"] },
            "state": { "type": "string", "enum": ["prepared", "active", "retired"] }, "not_after": int(), "created_at": int(),
        }), false),
        "Fleet": object(&["coverage_percent", "links", "encrypted", "plaintext", "nodes", "nodes_reporting"], json!({
            "coverage_percent": number(), "links": int(), "encrypted": int(), "plaintext": int(), "nodes": int(), "nodes_reporting": int(),
        }), false),
        "DashboardNode": object(&["name", "spiffe_id", "cert_not_after", "last_seen", "revoked", "last_report", "coverage_percent", "plaintext"], json!({
            "name": string(), "spiffe_id": string(), "cert_not_after": nullable_int(), "last_seen": nullable_int(), "revoked": { "type": "boolean" },
            "last_report": nullable_int(), "coverage_percent": { "type": ["number", "null"] }, "plaintext": nullable_int(),
            "capture_mode": { "type": ["string", "null"], "enum": ["off", "monitor", "enforce", null], "description": "capture.inbound in the latest report; null when the agent runs no capture" },
            "plaintext_attempts": { "type": ["integer", "null"], "description": "sources a monitor-mode agent let through with plaintext, latest report" },
        }), false),
        "DashboardLink": object(&["from", "to", "remote", "local", "class", "via", "process", "detail", "from_id", "peer_id", "service", "tls_version", "cipher", "group"], json!({
            "from": string(), "to": { "type": ["string", "null"] }, "remote": string(), "local": string(),
            "class": { "type": "string", "enum": ["tapproof", "other_tls", "plaintext", "allowed"] },
            "via": { "type": ["string", "null"], "enum": ["tunnel_in", "tunnel_out", "control", null] },
            "process": { "type": ["string", "null"] }, "detail": string(),
            "from_id": nullable_string(), "peer_id": nullable_string(), "service": nullable_string(),
            "tls_version": nullable_string(), "cipher": nullable_string(), "group": nullable_string(),
        }), false),
        "HistoryPoint": object(&["at", "coverage_percent", "links", "plaintext_attempts"], json!({ "at": int(), "coverage_percent": { "type": ["number", "null"], "description": "null while no link has been seen" }, "links": int(), "plaintext_attempts": int() }), false),
        "DashboardDenial": object(&["node", "at", "peer", "service", "reason"], json!({
            "node": string(), "at": int(), "peer": string(), "service": string(), "reason": string(),
        }), false),
        "CoverageUpload": object(&["report"], json!({
            "report": { "type": "object", "description": "the report as `tapproof audit --json` prints it" },
            "denials": { "type": "array", "maxItems": tapproof_audit::MAX_UPLOAD_DENIALS, "items": { "type": "object" } },
            "handshakes": { "type": "array", "maxItems": tapproof_audit::MAX_UPLOAD_HANDSHAKES, "items": reference("HandshakeRecord") },
            "selftest": reference("SelftestRound"),
        }), true),
    });
    // Apart from the map above, which is at json!'s recursion limit.
    all["InboundMode"] = json!({ "type": "string", "enum": ["off", "monitor", "enforce"] });
    all["CapturePolicy"] = object(
        &[],
        json!({
            "inbound": { "anyOf": [reference("InboundMode"), { "type": "null" }], "description": "every node's mode; absent or null: the agents' configs rule" },
            "nodes": { "type": "object", "additionalProperties": reference("InboundMode"), "description": "node name -> mode, over `inbound`" },
        }),
        true,
    );
    all["DashboardNode"]["properties"]["capture_history"] = json!({
        "type": "array", "items": reference("DashboardCapturePoint"),
        "description": "the node's capture mode and plaintext attempts where they changed over the chart's period",
    });
    all["DashboardNode"]["properties"]["selftest"] = json!({
        "type": ["object", "null"], "description": "the node's latest self-test round: probes refused, and those ACCEPTED (an alarm)",
        "properties": { "at": int(), "refused": int(), "accepted": { "type": "array", "items": { "type": "string" } } },
        "required": ["at", "refused", "accepted"], "additionalProperties": false,
    });
    all["DashboardCapturePoint"] = object(
        &["at", "mode", "plaintext_attempts"],
        json!({ "at": int(), "mode": { "type": ["string", "null"], "enum": ["off", "monitor", "enforce", null] }, "plaintext_attempts": int() }),
        false,
    );
    all["Dashboard"]["properties"]["sites"] = json!({
        "type": "array", "items": reference("DashboardSite"),
        "description": "site gateways' traffic per remote site and direction, from their latest reports",
    });
    if let Some(required) = all["Dashboard"]["required"].as_array_mut() {
        required.push(json!("sites"));
    }
    all["DashboardSite"] = object(
        &[
            "node",
            "site",
            "remote_site",
            "direction",
            "tcp_flows",
            "udp_flows",
            "bytes_sent",
            "bytes_received",
            "refused",
            "routed_connections",
            "routed_datagrams",
            "dropped_packets",
        ],
        json!({
            "node": string(), "site": string(), "remote_site": string(),
            "direction": { "type": "string", "enum": ["to", "from"] },
            "tcp_flows": int(), "udp_flows": int(), "bytes_sent": int(), "bytes_received": int(), "refused": int(),
            "routed_connections": int(), "routed_datagrams": int(), "dropped_packets": int(),
        }),
        false,
    );
    all["NodeEvent"] = object(
        &["kind", "by", "reason"],
        json!({
            "kind": { "type": "string", "enum": ["capture_removed"] },
            "by": { "type": "string", "maxLength": tapproof_api::MAX_EVENT_TEXT, "description": "who did it, as the command saw it" },
            "reason": { "type": "string", "maxLength": tapproof_api::MAX_EVENT_TEXT },
            "captured": { "type": "integer", "minimum": 0, "description": "destinations the removed rules captured" },
            "inbound": reference("InboundMode"),
        }),
        true,
    );
    let text = || json!({ "type": "string", "maxLength": 2048 });
    let maybe = || json!({ "type": ["string", "null"], "maxLength": 2048 });
    all["HandshakeRecord"] = object(
        &[
            "at_ms",
            "seq",
            "side",
            "local",
            "remote",
            "local_id",
            "local_serial",
            "resumed",
            "outcome",
        ],
        json!({
            "at_ms": int(), "seq": { "type": "integer", "minimum": 0, "maximum": i64::MAX },
            "side": { "type": "string", "enum": ["inbound", "outbound"] },
            "local": text(), "remote": text(), "local_id": text(), "local_serial": text(),
            "peer_id": maybe(), "peer_serial": maybe(), "tls_version": maybe(), "cipher": maybe(),
            "group": maybe(), "signature_scheme": maybe(), "resumed": { "type": "boolean" },
            "outcome": { "type": "string", "enum": ["ok", "refused"] },
            "reason": maybe(),
        }),
        true,
    );
    all["Handshake"] = object(
        &[
            "node",
            "at_ms",
            "seq",
            "side",
            "local",
            "remote",
            "local_id",
            "local_serial",
            "resumed",
            "outcome",
        ],
        json!({
            "node": string(), "at_ms": int(), "seq": int(),
            "side": { "type": "string", "enum": ["inbound", "outbound"] },
            "local": string(), "remote": string(), "local_id": string(), "local_serial": string(),
            "peer_id": nullable_string(), "peer_serial": nullable_string(), "tls_version": nullable_string(),
            "cipher": nullable_string(), "group": nullable_string(), "signature_scheme": nullable_string(),
            "resumed": { "type": "boolean" }, "outcome": { "type": "string", "enum": ["ok", "refused"] },
            "reason": nullable_string(),
        }),
        false,
    );
    all["SelftestRound"] = object(
        &["at", "target", "probes"],
        json!({
            "at": int(), "target": text(),
            "probes": { "type": "array", "maxItems": MAX_SELFTEST_PROBES, "items": reference("SelftestProbe") },
        }),
        true,
    );
    all["SelftestProbe"] = object(
        &["probe", "result", "detail"],
        json!({ "probe": text(), "result": { "type": "string", "enum": ["refused", "accepted", "not_applicable", "error"] }, "detail": text() }),
        true,
    );
    all["NodeApplied"] = object(
        &["node", "applied_at", "seconds", "joined_after"],
        json!({
            "node": string(), "applied_at": int(), "seconds": { "type": "integer", "description": "applied_at - revoked_at" },
            "joined_after": { "type": "boolean", "description": "the node joined after the revocation (applied it on joining)" },
        }),
        false,
    );
    all["RevocationPropagation"] = object(
        &["revocation", "applied", "pending"],
        json!({
            "revocation": reference("Revocation"),
            "version": { "type": ["integer", "null"], "description": "the state-feed version of the first document that carried it" },
            "applied": list_of("NodeApplied"),
            "pending": { "type": "array", "items": { "type": "string" }, "description": "live nodes that have not acknowledged it" },
        }),
        false,
    );
    all
}

pub fn document() -> Value {
    use ErrorCode as E;
    let node = [E::IdentityRequired, E::CertificateExpired];
    let node_refused = [
        E::NotANode,
        E::UnknownNode,
        E::NodeRevoked,
        E::IdentityRevoked,
        E::CertificateRevoked,
    ];
    let admin_refused = [E::AdminRequired, E::IdentityRevoked, E::CertificateRevoked];
    let mut paths = serde_json::Map::new();
    let mut add = |path: &str, item: Value| {
        paths.insert(path.to_owned(), item);
    };
    add(
        paths::HEALTHZ,
        json!({ "get": { "summary": "Liveness", "security": [],
            "responses": { "200": { "description": "serving", "content": { "text/plain": { "schema": { "type": "string", "const": "ok\n" } } } } } } }),
    );
    add(
        paths::OPENAPI,
        json!({ "get": { "summary": "This document", "security": [],
            "responses": { "200": { "description": "OpenAPI document", "content": { "application/json": { "schema": { "type": "object", "required": ["openapi", "info", "paths"] } } } } } } }),
    );
    add(
        paths::BUNDLE,
        json!({ "get": {
        "summary": "Trust bundle: every root agents must trust (no client certificate needed)",
        "security": [],
        "responses": { "200": ok("bundle", "Bundle") }
    } }),
    );
    add(
        paths::SPIFFE_BUNDLE,
        json!({ "get": {
        "summary": "SPIFFE bundle endpoint (https_spiffe profile): the trust bundle as a JWK Set, for trust domains that federate with this one (no client certificate needed)",
        "security": [],
        "responses": {
            "200": ok("SPIFFE bundle", "SpiffeBundle"),
            "500": error_response(&[E::CaError])
        }
    } }),
    );
    add(
        paths::JOIN,
        json!({ "post": {
        "summary": "Exchange a join token and a CSR for the node identity (no client certificate needed). The token and CSR are checked before the token is consumed",
        "security": [],
        "requestBody": body("JoinRequest"),
        "responses": {
            "200": ok("joined", "JoinResponse"),
            "400": error_response(&[E::TokenMalformed, E::CsrInvalid, E::BadNode, E::BadJson, E::BadBody]),
            "401": error_response(&[E::TokenInvalid, E::TokenExpired, E::TokenUsed]),
            "413": error_response(&[E::BodyTooLarge]),
            "429": error_response(&[E::RateLimited]),
            "503": error_response(&[E::StoreUnavailable, E::StoreFailed])
        }
    } }),
    );
    add(
        paths::SIGN,
        json!({ "post": {
        "summary": "Sign CSRs for the caller's node identity and its registered services (mTLS with an unrevoked node identity). Nothing is signed unless every CSR passes",
        "requestBody": body("SignRequest"),
        "responses": {
            "200": ok("signed", "SignResponse"),
            "400": error_response(&[E::CsrInvalid, E::BadId, E::BadRequest, E::BadJson]),
            "401": error_response(&node), "429": error_response(&[E::RateLimited]),
            "403": error_response(&[&node_refused[..], &[E::NotRegistered]].concat()),
            "413": error_response(&[E::BodyTooLarge])
        }
    } }),
    );
    add(
        paths::STATE,
        json!({ "get": {
        "summary": format!("State feed for agents (mTLS with an unrevoked node identity): revocations, the trust bundle, the service directory and the policy. Answers at once when the version is newer than `since`, else holds the request up to {} s. `tunnel` announces where the caller's tunnel listener is reached, `addresses` where clients reach its services", tapproof_api::LONG_POLL_SECS),
        "parameters": [
            { "name": "since", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 }, "description": "the version held; absent: answer at once" },
            { "name": "tunnel", "in": "query", "required": false, "schema": { "type": "string", "description": "ADDR:PORT" } },
            { "name": "addresses", "in": "query", "required": false, "schema": { "type": "string", "description": "SERVICE=ADDR:PORT pairs joined by commas: where clients reach the caller's inbound services" } }
        ],
        "responses": {
            "200": ok("state", "State"),
            "400": error_response(&[E::BadQuery]),
            "401": error_response(&node), "429": error_response(&[E::RateLimited]),
            "403": error_response(&node_refused)
        }
    } }),
    );
    add(
        paths::NODES,
        json!({ "get": { "summary": "Admin: nodes with services and certificate expiry",
        "responses": { "200": ok_list("nodes", "NodeView"), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } } }),
    );
    add(
        paths::REGISTRATIONS,
        json!({
            "get": { "summary": "Admin: which node fronts which service", "responses": { "200": ok_list("registrations", "Registration"), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } },
            "post": { "summary": "Admin: add or remove a registration", "requestBody": body("RegistrationChange"),
                "responses": { "200": ok("whether anything changed", "Changed"), "400": error_response(&[E::BadRequest, E::BadJson]), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } }
        }),
    );
    add(
        paths::REVOCATIONS,
        json!({
            "get": { "summary": "Admin: every revocation", "responses": { "200": ok_list("revocations", "Revocation"), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } },
            "post": { "summary": "Admin: revoke a node, a SPIFFE ID or a certificate serial; in force on this server at once, on agents within seconds", "requestBody": body("RevokeRequest"),
                "responses": { "200": ok("the revocation", "Revocation"), "400": error_response(&[E::BadRequest, E::BadJson]), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } }
        }),
    );
    add(
        paths::REVOCATION_PROPAGATION,
        json!({
            "get": { "summary": "Admin: per revocation, when each node applied it (acknowledged through the state feed) and which live nodes have not yet", "responses": { "200": ok_list("revocations with their propagation", "RevocationPropagation"), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } }
        }),
    );
    add(
        paths::HANDSHAKES,
        json!({ "get": { "summary": "Admin: agents' tunnel handshake records (both ends, accepted and refused) with from_ms <= at_ms < to_ms, oldest first, at most `limit`",
        "parameters": [{ "name": "from_ms", "in": "query", "schema": { "type": "integer" } }, { "name": "to_ms", "in": "query", "schema": { "type": "integer" } }, { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 10000 } }],
        "responses": { "200": ok_list("handshake records", "Handshake"), "400": error_response(&[E::BadQuery]), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } } }),
    );
    add(
        paths::AUDIT_LOG,
        json!({ "get": { "summary": "Admin: audit-log rows after `after`, at most `limit`",
        "parameters": [{ "name": "after", "in": "query", "schema": { "type": "integer", "minimum": 0 } }, { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000 } }],
        "responses": { "200": ok_list("rows", "AuditEntry"), "400": error_response(&[E::BadQuery]), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } } }),
    );
    add(
        paths::POLICY,
        json!({
            "get": { "summary": "Admin: the policy document (service -> allowed SPIFFE ID patterns)", "responses": { "200": ok("policy", "Policy"), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused), "503": error_response(&[E::PolicyUnavailable]) } },
            "post": { "summary": "Admin: replace the policy document (JSON, or TOML); agents apply it within seconds", "requestBody": body("Policy"),
                "responses": { "200": ok("the stored policy", "Policy"), "400": error_response(&[E::BadPolicy, E::BadJson]), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } }
        }),
    );
    add(
        paths::EVENTS,
        json!({ "post": {
        "summary": "What an operator did on a node, for the audit log (mTLS with an unrevoked node identity): `tapproof capture remove` sends capture_removed, audited as capture.removed with the node as actor",
        "requestBody": body("NodeEvent"),
        "responses": {
            "204": { "description": "recorded in the audit log" },
            "400": error_response(&[E::BadJson, E::BadBody, E::BadRequest]),
            "401": error_response(&node), "429": error_response(&[E::RateLimited]),
            "403": error_response(&node_refused),
            "413": error_response(&[E::BodyTooLarge]),
            "503": error_response(&[E::StoreFailed])
        }
    } }),
    );
    add(
        paths::COVERAGE,
        json!({ "post": {
        "summary": "An agent's coverage report (mTLS with an unrevoked node identity). Kept as history for the dashboard",
        "requestBody": body("CoverageUpload"),
        "responses": {
            "204": { "description": "kept" },
            "400": error_response(&[E::BadJson, E::BadBody, E::BadRequest, E::ReportTooLarge]),
            "401": error_response(&node), "429": error_response(&[E::RateLimited]),
            "403": error_response(&node_refused),
            "413": error_response(&[E::BodyTooLarge])
        }
    } }),
    );
    add(
        paths::DASHBOARD_DATA,
        json!({ "get": { "summary": "Admin: the fleet dashboard's data: nodes and certificate expiry, links with their class, coverage history, recent denials and audit-log rows",
        "responses": { "200": ok("dashboard data (read by the dashboard's script)", "Dashboard"), "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } } }),
    );
    add(
        paths::DASHBOARD,
        json!({ "get": { "summary": "Admin: the fleet dashboard page (HTML; its script and stylesheet are /dashboard/app.js and /dashboard/style.css). Browsers reach it through `tapproof server dashboard`",
        "responses": { "200": { "description": "HTML", "content": { "text/html": { "schema": { "type": "string" } } } }, "401": error_response(&node), "429": error_response(&[E::RateLimited]), "403": error_response(&admin_refused) } } }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tapproof control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Join with a single-use token, then sign (renew) and follow the state feed over mTLS with the node identity; admins use admin identities. Every error carries a stable code; revoked identities (by node, SPIFFE ID or serial) are refused everywhere."
        },
        "paths": paths,
        // Every operation needs a client certificate unless it says `"security": []`: a node
        // identity (spiffe://<td>/node/<name>) for the agent endpoints, an admin identity
        // (spiffe://<td>/admin/<name>) for the admin ones.
        "security": [{ "mtls": [] }],
        "components": {
            "schemas": schemas(),
            "securitySchemes": { "mtls": {
                "type": "mutualTLS",
                "description": "TLS 1.3 with a client certificate issued by this control plane: a node identity (spiffe://<td>/node/<name>, from /v1/join) for /v1/sign, /v1/state and /v1/coverage; an admin identity (spiffe://<td>/admin/<name>, from `tapproof server admin-cert`) for the admin endpoints. Revoked identities are refused everywhere."
            } }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use tapproof_api::*;

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"))
            .keys()
            .cloned()
            .collect()
    }

    /// The schema `name` lists exactly the fields `example` serialises.
    fn same_fields<T: serde::Serialize>(name: &str, example: T) {
        let doc = document();
        let schema = &doc["components"]["schemas"][name];
        let documented = keys(&schema["properties"]);
        let actual = keys(&serde_json::to_value(example).unwrap());
        assert_eq!(documented, actual, "schema {name} and its type disagree");
        for required in schema["required"].as_array().unwrap() {
            assert!(actual.contains(required.as_str().unwrap()), "{name}: {required}");
        }
    }

    #[test]
    fn every_schema_matches_its_type() {
        same_fields(
            "Error",
            ErrorBody {
                error: ErrorDetail {
                    code: ErrorCode::Internal,
                    message: String::new(),
                },
            },
        );
        same_fields(
            "ErrorDetail",
            ErrorDetail {
                code: ErrorCode::Internal,
                message: String::new(),
            },
        );
        same_fields("Bundle", BundleResponse::default());
        same_fields(
            "JoinRequest",
            JoinRequest {
                node: Some(String::new()),
                ..Default::default()
            },
        );
        same_fields("Identity", IssuedIdentity::default());
        same_fields("JoinResponse", JoinResponse::default());
        same_fields("SignItem", SignItem::default());
        same_fields("SignRequest", SignRequest::default());
        same_fields("SignResponse", SignResponse::default());
        same_fields("Revocation", Revocation::default());
        same_fields("NodeApplied", tapproof_api::NodeApplied::default());
        same_fields(
            "Handshake",
            tapproof_api::Handshake {
                peer_id: Some(String::new()),
                ..Default::default()
            },
        );
        same_fields(
            "RevocationPropagation",
            tapproof_api::RevocationPropagation {
                version: Some(3),
                ..Default::default()
            },
        );
        let capture = tapproof_api::CapturePolicy {
            inbound: Some(tapproof_api::InboundMode::Monitor),
            nodes: [("db-1".to_owned(), tapproof_api::InboundMode::Enforce)].into(),
        };
        same_fields("CapturePolicy", capture.clone());
        same_fields("NodeEvent", tapproof_api::NodeEvent::default());
        same_fields(
            "DirectoryEntry",
            DirectoryEntry {
                addresses: vec!["10.0.0.2:8080".into()],
                ..Default::default()
            },
        );
        same_fields(
            "State",
            StateResponse {
                capture: capture.clone(),
                ..Default::default()
            },
        );
        same_fields("NodeView", NodeView::default());
        same_fields("Registration", Registration::default());
        same_fields("RegistrationChange", RegistrationChange::default());
        same_fields("Changed", Changed::default());
        same_fields("RevokeRequest", RevokeRequest::default());
        same_fields("AuditEntry", AuditEntry::default());
        same_fields("ServicePolicy", ServicePolicy::default());
        same_fields(
            "Policy",
            Policy {
                capture,
                ..Default::default()
            },
        );
        let report: tapproof_audit::Report = tapproof_audit::classify(
            &tapproof_audit::scan::Scan::default(),
            &tapproof_audit::Options::default(),
            "h".into(),
            0,
        );
        same_fields(
            "CoverageUpload",
            tapproof_audit::CoverageUpload {
                report,
                denials: vec![],
                handshakes: vec![Default::default()],
                selftest: Some(Default::default()),
            },
        );
        same_fields("SelftestRound", tapproof_audit::SelftestRound::default());
        same_fields("SelftestProbe", tapproof_audit::SelftestProbe::default());
        same_fields(
            "HandshakeRecord",
            tapproof_audit::HandshakeRecord {
                peer_id: Some(String::new()),
                ..Default::default()
            },
        );
        use crate::dashboard::*;
        let fleet = || Fleet {
            coverage_percent: 0.0,
            links: 0,
            encrypted: 0,
            plaintext: 0,
            nodes: 0,
            nodes_reporting: 0,
        };
        same_fields("Fleet", fleet());
        let node = NodeRow {
            name: String::new(),
            spiffe_id: String::new(),
            cert_not_after: None,
            last_seen: None,
            revoked: false,
            last_report: None,
            coverage_percent: None,
            plaintext: None,
            capture_mode: None,
            plaintext_attempts: None,
            capture_history: vec![CapturePoint {
                at: 0,
                mode: None,
                plaintext_attempts: 0,
            }],
            selftest: Some(SelftestSummary {
                at: 0,
                refused: 5,
                accepted: vec![],
            }),
        };
        let link = LinkRow {
            from: String::new(),
            to: None,
            remote: String::new(),
            local: String::new(),
            class: tapproof_audit::Class::Tapproof,
            via: None,
            process: None,
            detail: String::new(),
            from_id: None,
            peer_id: None,
            service: None,
            tls_version: None,
            cipher: None,
            group: None,
        };
        let denial = DenialRow {
            node: String::new(),
            denial: tapproof_audit::Denial {
                at: 0,
                peer: String::new(),
                service: String::new(),
                reason: String::new(),
            },
        };
        same_fields("DashboardNode", &node);
        same_fields("DashboardCapturePoint", &node.capture_history[0]);
        same_fields("DashboardLink", &link);
        same_fields("DashboardDenial", &denial);
        same_fields(
            "HistoryPoint",
            HistoryPoint {
                at: 0,
                coverage_percent: Some(0.0),
                links: 0,
                plaintext_attempts: 0,
            },
        );
        same_fields(
            "Dashboard",
            Dashboard {
                generated_at: 0,
                fleet: fleet(),
                nodes: vec![node],
                links: vec![link],
                history: vec![],
                denials: vec![denial],
                audit: vec![],
                revocations: vec![],
                ca: vec![],
                sites: vec![],
            },
        );
        same_fields(
            "DashboardSite",
            SiteRow {
                node: String::new(),
                site: String::new(),
                remote_site: String::new(),
                direction: "to".into(),
                tcp_flows: 0,
                udp_flows: 0,
                bytes_sent: 0,
                bytes_received: 0,
                refused: 0,
                routed_connections: 0,
                routed_datagrams: 0,
                dropped_packets: 0,
            },
        );
        same_fields(
            "DashboardCa",
            CaRow {
                id: 0,
                kind: String::new(),
                state: String::new(),
                not_after: 0,
                created_at: 0,
            },
        );
        let q = StateQuery {
            since: Some(1),
            tunnel: Some("10.0.0.1:15008".into()),
            addresses: Some("web=10.0.0.1:8080".into()),
        };
        let params: BTreeSet<String> = document()["paths"][paths::STATE]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(params, keys(&serde_json::to_value(q).unwrap()));
        let params: BTreeSet<String> = document()["paths"][paths::AUDIT_LOG]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            params,
            keys(&serde_json::to_value(AuditQuery::default()).unwrap())
        );
    }

    /// Every operation says what its success looks like (a schema for every body), and only the
    /// four that need no client certificate say so.
    #[test]
    fn every_operation_has_a_response_schema_and_security() {
        let doc = document();
        assert_eq!(doc["components"]["securitySchemes"]["mtls"]["type"], "mutualTLS");
        assert_eq!(doc["security"], json!([{ "mtls": [] }]));
        let mut open = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if op.get("security") == Some(&json!([])) {
                    open.insert(path.as_str());
                }
                for (status, response) in op["responses"].as_object().unwrap() {
                    if status == "204" {
                        continue;
                    }
                    let content = response["content"]
                        .as_object()
                        .unwrap_or_else(|| panic!("{method} {path} {status}: no content"));
                    for (kind, media) in content {
                        assert!(
                            media.get("schema").is_some(),
                            "{method} {path} {status} {kind}: no schema"
                        );
                    }
                }
            }
        }
        assert_eq!(
            open,
            BTreeSet::from([
                paths::HEALTHZ,
                paths::OPENAPI,
                paths::BUNDLE,
                paths::SPIFFE_BUNDLE,
                paths::JOIN
            ])
        );
    }

    #[test]
    fn every_code_named_exists_and_every_code_is_listed() {
        let doc = document();
        let listed: BTreeSet<&str> = doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
            ["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let all: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(listed, all);
        let mut refs = Vec::new();
        let text = doc.to_string();
        for (i, _) in text.match_indices("#/components/schemas/") {
            let rest = &text[i + "#/components/schemas/".len()..];
            refs.push(rest[..rest.find('"').unwrap()].to_owned());
        }
        for r in refs {
            assert!(
                doc["components"]["schemas"].get(&r).is_some(),
                "dangling $ref {r}"
            );
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, response) in op["responses"].as_object().unwrap() {
                    let Some(schema) = response["content"]["application/json"]["schema"]["$ref"].as_str()
                    else {
                        continue;
                    };
                    if schema.ends_with("/Error") {
                        for code in response["description"].as_str().unwrap().split(", ") {
                            let parsed: ErrorCode = serde_json::from_value(json!(code)).unwrap();
                            assert_ne!(parsed, ErrorCode::Unknown, "{method} {path} {status}: {code}");
                            assert_eq!(parsed.status().to_string(), *status, "{method} {path}: {code}");
                        }
                    }
                }
            }
        }
    }
}
