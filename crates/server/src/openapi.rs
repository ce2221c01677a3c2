//! The OpenAPI 3.1 document of `/v1`, served at `/v1/openapi.json`. Kept by hand beside the
//! handlers in `api.rs`; a test checks every route is described.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tapproof control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Join with a single-use token, then sign (renew) over mTLS with the node identity. Errors carry a stable code."
        },
        "paths": {
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "serving" } } } },
            "/v1/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI document" } } } },
            "/v1/bundle": { "get": {
                "summary": "Trust bundle: every root agents must trust",
                "responses": { "200": { "description": "bundle", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Bundle" } } } } }
            } },
            "/v1/join": { "post": {
                "summary": "Exchange a join token and a CSR for the node identity (no client certificate needed)",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/JoinRequest" } } } },
                "responses": {
                    "200": { "description": "joined", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/JoinResponse" } } } },
                    "400": error_response("token_malformed, csr_invalid, bad_json, bad_body"),
                    "401": error_response("token_invalid, token_expired, token_used"),
                    "413": error_response("body_too_large"),
                    "503": error_response("store_unavailable, store_read_only")
                }
            } },
            "/v1/state": { "get": {
                "summary": "State feed for agents (mTLS): revocations and the trust bundle. Answers at once when the version is newer than `since`, else holds the request up to 25 s",
                "parameters": [{ "name": "since", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 } }],
                "responses": {
                    "200": { "description": "state", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/State" } } } },
                    "400": error_response("bad_query"),
                    "401": error_response("identity_required")
                }
            } },
            "/v1/nodes": { "get": { "summary": "Admin: nodes with services and certificate expiry (admin identity)",
                "responses": { "200": { "description": "nodes" }, "401": error_response("identity_required"), "403": error_response("admin_required") } } },
            "/v1/registrations": {
                "get": { "summary": "Admin: which node fronts which service", "responses": { "200": { "description": "registrations" }, "403": error_response("admin_required") } },
                "post": { "summary": "Admin: add or remove a registration ({node, service, add})", "responses": { "200": { "description": "{changed}" }, "400": error_response("bad_request, bad_json"), "403": error_response("admin_required") } }
            },
            "/v1/revocations": {
                "get": { "summary": "Admin: every revocation", "responses": { "200": { "description": "revocations" }, "403": error_response("admin_required") } },
                "post": { "summary": "Admin: revoke ({kind: node|spiffe_id|serial, value, reason})", "responses": { "200": { "description": "the revocation" }, "400": error_response("bad_request, bad_json"), "403": error_response("admin_required") } }
            },
            "/v1/audit-log": { "get": { "summary": "Admin: audit-log rows after `after`, at most `limit`",
                "parameters": [{ "name": "after", "in": "query", "schema": { "type": "integer" } }, { "name": "limit", "in": "query", "schema": { "type": "integer", "maximum": 1000 } }],
                "responses": { "200": { "description": "rows" }, "403": error_response("admin_required") } } },
            "/v1/policy": {
                "get": { "summary": "Admin: the policy document (service -> allowed SPIFFE ID patterns)", "responses": { "200": { "description": "policy" }, "403": error_response("admin_required"), "503": error_response("policy_unavailable") } },
                "post": { "summary": "Admin: replace the policy document; agents apply it within seconds", "responses": { "200": { "description": "the stored policy" }, "400": error_response("bad_policy, bad_json"), "403": error_response("admin_required") } }
            },
            "/v1/coverage": { "post": {
                "summary": "An agent's coverage report (mTLS with the node identity): {report, denials}, as `tapproof audit --json` prints the report. Kept as history for the dashboard",
                "responses": {
                    "204": { "description": "kept" },
                    "400": error_response("bad_json, bad_body, report_too_large"),
                    "401": error_response("identity_required"),
                    "403": error_response("not_a_node, unknown_node, node_revoked"),
                    "413": error_response("body_too_large")
                }
            } },
            "/v1/dashboard": { "get": { "summary": "Admin: the fleet dashboard's data: nodes and certificate expiry, links with their class, coverage history, recent denials and audit-log rows",
                "responses": { "200": { "description": "dashboard data" }, "401": error_response("identity_required"), "403": error_response("admin_required") } } },
            "/dashboard": { "get": { "summary": "Admin: the fleet dashboard page (HTML; its script and stylesheet are /dashboard/app.js and /dashboard/style.css). Browsers reach it through `tapproof server dashboard`",
                "responses": { "200": { "description": "HTML" }, "401": error_response("identity_required"), "403": error_response("admin_required") } } },
            "/v1/sign": { "post": {
                "summary": "Sign CSRs for the caller's node identity and its registered services (mTLS with the node identity)",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SignRequest" } } } },
                "responses": {
                    "200": { "description": "signed", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SignResponse" } } } },
                    "400": error_response("csr_invalid, bad_id, bad_request, bad_json"),
                    "401": error_response("identity_required"),
                    "403": error_response("not_a_node, unknown_node, node_revoked, not_registered"),
                    "413": error_response("body_too_large")
                }
            } }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"],
                "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } } },
            "Bundle": { "type": "object", "properties": { "trust_domain": { "type": "string" }, "roots": { "type": "array", "items": { "type": "string" } } } },
            "JoinRequest": { "type": "object", "additionalProperties": false, "required": ["token", "csr"],
                "properties": { "token": { "type": "string" }, "csr": { "type": "string", "description": "PEM CSR, ECDSA P-256 or Ed25519" } } },
            "Identity": { "type": "object", "properties": { "id": { "type": "string" }, "chain_pem": { "type": "string" }, "not_after": { "type": "integer" } } },
            "JoinResponse": { "type": "object", "properties": { "node": { "type": "string" }, "identity": { "$ref": "#/components/schemas/Identity" },
                "bundle": { "type": "array", "items": { "type": "string" } }, "services": { "type": "array", "items": { "type": "string" } } } },
            "State": { "type": "object", "properties": { "version": { "type": "integer" },
                "revocations": { "type": "array", "items": { "type": "object", "properties": { "id": { "type": "integer" },
                    "kind": { "type": "string", "enum": ["node", "spiffe_id", "serial"] }, "value": { "type": "string" },
                    "reason": { "type": "string" }, "revoked_at": { "type": "integer" } } } },
                "bundle": { "type": "array", "items": { "type": "string" } } } },
            "SignRequest": { "type": "object", "additionalProperties": false, "required": ["csrs"], "properties": { "csrs": { "type": "array", "maxItems": 64,
                "items": { "type": "object", "additionalProperties": false, "required": ["id", "csr"], "properties": { "id": { "type": "string" }, "csr": { "type": "string" } } } } } },
            "SignResponse": { "type": "object", "properties": { "identities": { "type": "array", "items": { "$ref": "#/components/schemas/Identity" } },
                "bundle": { "type": "array", "items": { "type": "string" } }, "services": { "type": "array", "items": { "type": "string" } } } }
        } }
    })
}
