//! The SQL both backends share, written once. The two schemas differ only in column types, and
//! every query here uses `$N` placeholders in ascending order, which SQLite and PostgreSQL both
//! accept. Each backend type supplies `pool`, `begin_write` (a transaction that may write) and
//! `lock_audit` (serialises audit appends across processes).

use crate::error::StoreError;

pub(crate) fn corrupt(what: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

macro_rules! impl_store {
    ($store:ty, $db:ty, $name:literal) => {
        use crate::audit::{chain_hash, GENESIS_HASH};
        use crate::backend::corrupt;
        use crate::error::{q, StoreError, TokenRejection};
        use crate::model::*;
        use crate::Result;
        use sqlx::Row;

        fn ca_from(row: &<$db as sqlx::Database>::Row) -> Result<CaRecord> {
            let kind: String = row.try_get("kind").map_err(q)?;
            let state: String = row.try_get("state").map_err(q)?;
            Ok(CaRecord {
                id: row.try_get("id").map_err(q)?,
                kind: CaKind::parse(&kind).ok_or_else(|| corrupt("CA kind", &kind))?,
                parent_id: row.try_get("parent_id").map_err(q)?,
                cert_pem: row.try_get("cert_pem").map_err(q)?,
                key_sealed: row.try_get("key_sealed").map_err(q)?,
                state: CaState::parse(&state).ok_or_else(|| corrupt("CA state", &state))?,
                not_after: row.try_get("not_after").map_err(q)?,
                created_at: row.try_get("created_at").map_err(q)?,
            })
        }

        fn token_from(row: &<$db as sqlx::Database>::Row) -> Result<JoinToken> {
            let services: String = row.try_get("services").map_err(q)?;
            Ok(JoinToken {
                id: row.try_get("id").map_err(q)?,
                node: row.try_get("node").map_err(q)?,
                pattern: row.try_get("pattern").map_err(q)?,
                services: serde_json::from_str(&services).map_err(|e| corrupt("token services", e))?,
                expires_at: row.try_get("expires_at").map_err(q)?,
                used_at: row.try_get("used_at").map_err(q)?,
                created_at: row.try_get("created_at").map_err(q)?,
                max_uses: row.try_get("max_uses").map_err(q)?,
                uses: row.try_get("uses").map_err(q)?,
            })
        }

        fn node_from(row: &<$db as sqlx::Database>::Row) -> Result<Node> {
            Ok(Node {
                name: row.try_get("name").map_err(q)?,
                spiffe_id: row.try_get("spiffe_id").map_err(q)?,
                tunnel_addr: row.try_get("tunnel_addr").map_err(q)?,
                created_at: row.try_get("created_at").map_err(q)?,
                last_seen: row.try_get("last_seen").map_err(q)?,
                revoked_at: row.try_get("revoked_at").map_err(q)?,
            })
        }

        fn cert_from(row: &<$db as sqlx::Database>::Row) -> Result<IssuedCert> {
            Ok(IssuedCert {
                serial: row.try_get("serial").map_err(q)?,
                spiffe_id: row.try_get("spiffe_id").map_err(q)?,
                node: row.try_get("node").map_err(q)?,
                not_before: row.try_get("not_before").map_err(q)?,
                not_after: row.try_get("not_after").map_err(q)?,
                issued_at: row.try_get("issued_at").map_err(q)?,
            })
        }

        fn revocation_from(row: &<$db as sqlx::Database>::Row) -> Result<Revocation> {
            let kind: String = row.try_get("kind").map_err(q)?;
            Ok(Revocation {
                id: row.try_get("id").map_err(q)?,
                kind: RevocationKind::parse(&kind).ok_or_else(|| corrupt("revocation kind", &kind))?,
                value: row.try_get("value").map_err(q)?,
                reason: row.try_get("reason").map_err(q)?,
                revoked_at: row.try_get("revoked_at").map_err(q)?,
                version: row.try_get("version").map_err(q)?,
            })
        }

        fn coverage_point_from(row: &<$db as sqlx::Database>::Row) -> Result<CoveragePoint> {
            Ok(CoveragePoint {
                node: row.try_get("node").map_err(q)?,
                at: row.try_get("at").map_err(q)?,
                links: row.try_get("links").map_err(q)?,
                encrypted: row.try_get("encrypted").map_err(q)?,
                plaintext: row.try_get("plaintext").map_err(q)?,
                capture_mode: row.try_get("capture_mode").map_err(q)?,
                plaintext_attempts: row.try_get("plaintext_attempts").map_err(q)?,
            })
        }

        fn audit_from(row: &<$db as sqlx::Database>::Row) -> Result<AuditEntry> {
            Ok(AuditEntry {
                seq: row.try_get("seq").map_err(q)?,
                at: row.try_get("at").map_err(q)?,
                actor: row.try_get("actor").map_err(q)?,
                action: row.try_get("action").map_err(q)?,
                details: row.try_get("details").map_err(q)?,
                prev_hash: row.try_get("prev_hash").map_err(q)?,
                hash: row.try_get("hash").map_err(q)?,
            })
        }

        #[async_trait::async_trait]
        impl crate::Store for $store {
            fn backend(&self) -> &'static str {
                $name
            }

            fn check_alive(&self) -> Result<()> {
                self.check_file()
            }

            async fn listen_changes(&self) -> Result<Box<dyn crate::ChangeListener>> {
                self.change_listener().await
            }

            async fn notify_change(&self) -> Result<()> {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                sqlx::query("INSERT INTO changes (at) VALUES ($1)").bind(now).execute(&self.pool).await.map_err(q)?;
                self.notify().await
            }

            async fn change_version(&self) -> Result<i64> {
                let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS v FROM changes")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(q)?;
                row.try_get("v").map_err(q)
            }

            async fn node_set_tunnel(&self, name: &str, tunnel_addr: &str) -> Result<bool> {
                let done = sqlx::query(
                    "UPDATE nodes SET tunnel_addr = $1 WHERE name = $2 AND (tunnel_addr IS NULL OR tunnel_addr <> $1)",
                )
                .bind(tunnel_addr)
                .bind(name)
                .execute(&self.pool)
                .await
                .map_err(q)?;
                Ok(done.rows_affected() == 1)
            }

            async fn ca_insert(&self, ca: NewCa) -> Result<i64> {
                let row = sqlx::query(
                    "INSERT INTO cas (kind, parent_id, cert_pem, key_sealed, state, not_after, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                )
                .bind(ca.kind.as_str())
                .bind(ca.parent_id)
                .bind(&ca.cert_pem)
                .bind(&ca.key_sealed)
                .bind(ca.state.as_str())
                .bind(ca.not_after)
                .bind(ca.created_at)
                .fetch_one(&self.pool)
                .await
                .map_err(q)?;
                row.try_get("id").map_err(q)
            }

            async fn ca_list(&self) -> Result<Vec<CaRecord>> {
                let rows = sqlx::query("SELECT * FROM cas ORDER BY id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q)?;
                rows.iter().map(ca_from).collect()
            }

            async fn ca_set_state(&self, id: i64, state: CaState) -> Result<()> {
                let done = sqlx::query("UPDATE cas SET state = $1 WHERE id = $2")
                    .bind(state.as_str())
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(q)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound {
                        what: "CA",
                        value: id.to_string(),
                    });
                }
                Ok(())
            }

            async fn token_insert(&self, t: NewToken) -> Result<()> {
                let services =
                    serde_json::to_string(&t.services).map_err(|e| StoreError::Query(e.to_string()))?;
                sqlx::query(
                    "INSERT INTO join_tokens (id, secret_hash, node, services, expires_at, created_at, pattern, max_uses) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&t.id)
                .bind(&t.secret_hash[..])
                .bind(&t.node)
                .bind(services)
                .bind(t.expires_at)
                .bind(t.created_at)
                .bind(t.pattern)
                .bind(t.max_uses.max(1))
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "join token", &t.id))?;
                Ok(())
            }

            async fn token_check(&self, id: &str, secret_hash: &[u8; 32], now: i64) -> Result<JoinToken> {
                let row = sqlx::query("SELECT * FROM join_tokens WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q)?
                    .ok_or(StoreError::Token(TokenRejection::Unknown))?;
                let stored: Vec<u8> = row.try_get("secret_hash").map_err(q)?;
                // Both sides are hashes of fixed length; comparing them leaks nothing useful.
                if stored.as_slice() != secret_hash.as_slice() {
                    return Err(StoreError::Token(TokenRejection::WrongSecret));
                }
                let token = token_from(&row)?;
                if token.uses >= token.max_uses {
                    let at = token.used_at.unwrap_or(token.created_at);
                    return Err(StoreError::Token(if token.max_uses == 1 {
                        TokenRejection::AlreadyUsed { at }
                    } else {
                        TokenRejection::UsesSpent { max: token.max_uses, at }
                    }));
                }
                if token.expires_at <= now {
                    return Err(StoreError::Token(TokenRejection::Expired {
                        at: token.expires_at,
                    }));
                }
                Ok(token)
            }

            async fn token_consume(&self, id: &str, secret_hash: &[u8; 32], now: i64) -> Result<JoinToken> {
                let token = self.token_check(id, secret_hash, now).await?;
                // One statement takes one use, or none when they are spent: of concurrent joins
                // (on any replica) at most `max_uses` win.
                let claimed = sqlx::query(
                    "UPDATE join_tokens SET uses = uses + 1, used_at = $1 WHERE id = $2 AND uses < max_uses \
                     RETURNING uses",
                )
                .bind(now)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q)?;
                let Some(claimed) = claimed else {
                    // Other requests (perhaps on another replica) took the last use between our
                    // read and write.
                    return Err(StoreError::Token(if token.max_uses == 1 {
                        TokenRejection::AlreadyUsed { at: now }
                    } else {
                        TokenRejection::UsesSpent { max: token.max_uses, at: now }
                    }));
                };
                Ok(JoinToken {
                    used_at: Some(now),
                    uses: claimed.try_get("uses").map_err(q)?,
                    ..token
                })
            }

            async fn node_upsert(&self, name: &str, spiffe_id: &str, now: i64) -> Result<Node> {
                sqlx::query(
                    "INSERT INTO nodes (name, spiffe_id, created_at, last_seen) VALUES ($1, $2, $3, $3) \
                     ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
                )
                .bind(name)
                .bind(spiffe_id)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(q)?;
                self.node_get(name)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        what: "node",
                        value: name.to_owned(),
                    })
            }

            async fn node_get(&self, name: &str) -> Result<Option<Node>> {
                let row = sqlx::query("SELECT * FROM nodes WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q)?;
                row.as_ref().map(node_from).transpose()
            }

            async fn node_list(&self) -> Result<Vec<Node>> {
                let rows = sqlx::query("SELECT * FROM nodes ORDER BY name")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q)?;
                rows.iter().map(node_from).collect()
            }

            async fn node_seen(&self, name: &str, now: i64) -> Result<()> {
                sqlx::query("UPDATE nodes SET last_seen = $1 WHERE name = $2")
                    .bind(now)
                    .bind(name)
                    .execute(&self.pool)
                    .await
                    .map_err(q)?;
                Ok(())
            }

            async fn registration_add(&self, node: &str, service: &str) -> Result<bool> {
                let done = sqlx::query(
                    "INSERT INTO registrations (node, service) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(node)
                .bind(service)
                .execute(&self.pool)
                .await
                .map_err(q)?;
                Ok(done.rows_affected() == 1)
            }

            async fn registration_remove(&self, node: &str, service: &str) -> Result<bool> {
                let done = sqlx::query("DELETE FROM registrations WHERE node = $1 AND service = $2")
                    .bind(node)
                    .bind(service)
                    .execute(&self.pool)
                    .await
                    .map_err(q)?;
                Ok(done.rows_affected() == 1)
            }

            async fn registrations(&self) -> Result<Vec<Registration>> {
                let rows = sqlx::query(
                    "SELECT node, service, addresses FROM registrations ORDER BY node, service",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
                rows.iter()
                    .map(|r| {
                        let addresses: String = r.try_get("addresses").map_err(q)?;
                        Ok(Registration {
                            node: r.try_get("node").map_err(q)?,
                            service: r.try_get("service").map_err(q)?,
                            addresses: addresses
                                .split(',')
                                .filter(|a| !a.is_empty())
                                .map(str::to_owned)
                                .collect(),
                        })
                    })
                    .collect()
            }

            async fn registration_set_addresses(
                &self,
                node: &str,
                addresses: &std::collections::BTreeMap<String, Vec<String>>,
            ) -> Result<bool> {
                let services: Vec<String> =
                    sqlx::query_scalar("SELECT service FROM registrations WHERE node = $1")
                        .bind(node)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(q)?;
                let mut changed = false;
                for service in services {
                    let mut list = addresses.get(&service).cloned().unwrap_or_default();
                    list.sort();
                    list.dedup();
                    let done = sqlx::query(
                        "UPDATE registrations SET addresses = $1 WHERE node = $2 AND service = $3 AND addresses <> $1",
                    )
                    .bind(list.join(","))
                    .bind(node)
                    .bind(&service)
                    .execute(&self.pool)
                    .await
                    .map_err(q)?;
                    changed |= done.rows_affected() == 1;
                }
                Ok(changed)
            }

            async fn cert_record(&self, c: IssuedCert) -> Result<()> {
                sqlx::query(
                    "INSERT INTO certificates (serial, spiffe_id, node, not_before, not_after, issued_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&c.serial)
                .bind(&c.spiffe_id)
                .bind(&c.node)
                .bind(c.not_before)
                .bind(c.not_after)
                .bind(c.issued_at)
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "certificate serial", &c.serial))?;
                Ok(())
            }

            async fn cert_count_live(&self, issued_by: i64, now: i64) -> Result<i64> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS n FROM certificates WHERE issued_at <= $1 AND not_after > $2",
                )
                .bind(issued_by)
                .bind(now)
                .fetch_one(&self.pool)
                .await
                .map_err(q)?;
                row.try_get("n").map_err(q)
            }

            async fn cert_list(&self, node: &str) -> Result<Vec<IssuedCert>> {
                let rows =
                    sqlx::query("SELECT * FROM certificates WHERE node = $1 ORDER BY issued_at, serial")
                        .bind(node)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(q)?;
                rows.iter().map(cert_from).collect()
            }

            async fn revoke(
                &self,
                kind: RevocationKind,
                value: &str,
                reason: &str,
                now: i64,
            ) -> Result<Revocation> {
                sqlx::query(
                    "INSERT INTO revocations (kind, value, reason, revoked_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (kind, value) DO NOTHING",
                )
                .bind(kind.as_str())
                .bind(value)
                .bind(reason)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(q)?;
                if kind == RevocationKind::Node {
                    sqlx::query("UPDATE nodes SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
                        .bind(now)
                        .bind(value)
                        .execute(&self.pool)
                        .await
                        .map_err(q)?;
                }
                let row = sqlx::query("SELECT * FROM revocations WHERE kind = $1 AND value = $2")
                    .bind(kind.as_str())
                    .bind(value)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(q)?;
                revocation_from(&row)
            }

            async fn revocations(&self) -> Result<Vec<Revocation>> {
                let rows = sqlx::query("SELECT * FROM revocations ORDER BY id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q)?;
                rows.iter().map(revocation_from).collect()
            }

            async fn revocations_stamp(&self, version: i64, up_to_id: i64) -> Result<()> {
                sqlx::query("UPDATE revocations SET version = $1 WHERE version IS NULL AND id <= $2")
                    .bind(version)
                    .bind(up_to_id)
                    .execute(&self.pool)
                    .await
                    .map_err(q)?;
                Ok(())
            }

            async fn revocation_ack(&self, node: &str, since: i64, now: i64) -> Result<Vec<i64>> {
                // SQLite parses `INSERT ... SELECT ... ON CONFLICT` only with a WHERE in the SELECT.
                let rows = sqlx::query(
                    "INSERT INTO revocation_acks (revocation_id, node, applied_at) \
                     SELECT id, $1, $2 FROM revocations WHERE version IS NOT NULL AND version <= $3 \
                     ON CONFLICT (revocation_id, node) DO NOTHING RETURNING revocation_id",
                )
                .bind(node)
                .bind(now)
                .bind(since)
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
                rows.iter().map(|r| r.try_get("revocation_id").map_err(q)).collect()
            }

            async fn revocation_acks(&self) -> Result<Vec<RevocationAck>> {
                let rows = sqlx::query(
                    "SELECT revocation_id, node, applied_at FROM revocation_acks ORDER BY revocation_id, applied_at, node",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
                rows.iter()
                    .map(|r| {
                        Ok(RevocationAck {
                            revocation_id: r.try_get("revocation_id").map_err(q)?,
                            node: r.try_get("node").map_err(q)?,
                            applied_at: r.try_get("applied_at").map_err(q)?,
                        })
                    })
                    .collect()
            }

            async fn policy_get(&self) -> Result<Option<String>> {
                let row = sqlx::query("SELECT document FROM policy WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q)?;
                row.map(|r| r.try_get("document").map_err(q)).transpose()
            }

            async fn policy_set(&self, document: &str, now: i64) -> Result<()> {
                sqlx::query(
                    "INSERT INTO policy (id, document, updated_at) VALUES (1, $1, $2) \
                     ON CONFLICT (id) DO UPDATE SET document = excluded.document, updated_at = excluded.updated_at",
                )
                .bind(document)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(q)?;
                Ok(())
            }

            async fn audit_append(&self, entry: NewAudit, now: i64) -> Result<AuditEntry> {
                let details = entry.details.to_string();
                let mut tx = self.begin_write().await?;
                Self::lock_audit(&mut tx).await?;
                let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(q)?;
                let (prev_seq, prev_hash): (i64, Vec<u8>) = match last {
                    Some(row) => (
                        row.try_get("seq").map_err(q)?,
                        row.try_get("hash").map_err(q)?,
                    ),
                    None => (0, GENESIS_HASH.to_vec()),
                };
                let seq = prev_seq + 1;
                let hash = chain_hash(&prev_hash, seq, now, &entry.actor, &entry.action, &details).to_vec();
                sqlx::query(
                    "INSERT INTO audit_log (seq, at, actor, action, details, prev_hash, hash) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(seq)
                .bind(now)
                .bind(&entry.actor)
                .bind(&entry.action)
                .bind(&details)
                .bind(&prev_hash)
                .bind(&hash)
                .execute(&mut *tx)
                .await
                .map_err(q)?;
                tx.commit().await.map_err(q)?;
                Ok(AuditEntry {
                    seq,
                    at: now,
                    actor: entry.actor,
                    action: entry.action,
                    details,
                    prev_hash,
                    hash,
                })
            }

            async fn audit_list(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>> {
                let rows = sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q)?;
                rows.iter().map(audit_from).collect()
            }

            async fn audit_tail(&self, limit: i64) -> Result<Vec<AuditEntry>> {
                let rows = sqlx::query("SELECT * FROM audit_log ORDER BY seq DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q)?;
                rows.iter().map(audit_from).collect()
            }

            async fn handshakes_add(&self, rows: &[HandshakeRow], now: i64) -> Result<u64> {
                let mut added = 0;
                let mut tx = self.pool.begin().await.map_err(q)?;
                // 18 parameters a row: 500 rows stay under either backend's parameter limit.
                for chunk in rows.chunks(500) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO handshakes (node, at_ms, seq, side, local_addr, remote_addr, local_id, local_serial, \
                         peer_id, peer_serial, tls_version, cipher, grp, signature_scheme, resumed, outcome, reason, received_at) ",
                    );
                    insert.push_values(chunk, |mut b, r| {
                        b.push_bind(r.node.clone())
                            .push_bind(r.at_ms)
                            .push_bind(r.seq)
                            .push_bind(r.side.clone())
                            .push_bind(r.local_addr.clone())
                            .push_bind(r.remote_addr.clone())
                            .push_bind(r.local_id.clone())
                            .push_bind(r.local_serial.clone())
                            .push_bind(r.peer_id.clone())
                            .push_bind(r.peer_serial.clone())
                            .push_bind(r.tls_version.clone())
                            .push_bind(r.cipher.clone())
                            .push_bind(r.group.clone())
                            .push_bind(r.signature_scheme.clone())
                            .push_bind(r.resumed)
                            .push_bind(r.outcome.clone())
                            .push_bind(r.reason.clone())
                            .push_bind(now);
                    });
                    insert.push(" ON CONFLICT (node, at_ms, seq) DO NOTHING");
                    added += insert.build().execute(&mut *tx).await.map_err(q)?.rows_affected();
                }
                tx.commit().await.map_err(q)?;
                Ok(added)
            }

            async fn handshakes_list(&self, from_ms: i64, to_ms: i64, limit: i64) -> Result<Vec<HandshakeRow>> {
                let rows = sqlx::query(
                    "SELECT * FROM handshakes WHERE at_ms >= $1 AND at_ms < $2 ORDER BY at_ms, node, seq LIMIT $3",
                )
                .bind(from_ms)
                .bind(to_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
                rows.iter()
                    .map(|r| {
                        Ok(HandshakeRow {
                            node: r.try_get("node").map_err(q)?,
                            at_ms: r.try_get("at_ms").map_err(q)?,
                            seq: r.try_get("seq").map_err(q)?,
                            side: r.try_get("side").map_err(q)?,
                            local_addr: r.try_get("local_addr").map_err(q)?,
                            remote_addr: r.try_get("remote_addr").map_err(q)?,
                            local_id: r.try_get("local_id").map_err(q)?,
                            local_serial: r.try_get("local_serial").map_err(q)?,
                            peer_id: r.try_get("peer_id").map_err(q)?,
                            peer_serial: r.try_get("peer_serial").map_err(q)?,
                            tls_version: r.try_get("tls_version").map_err(q)?,
                            cipher: r.try_get("cipher").map_err(q)?,
                            group: r.try_get("grp").map_err(q)?,
                            signature_scheme: r.try_get("signature_scheme").map_err(q)?,
                            resumed: r.try_get("resumed").map_err(q)?,
                            outcome: r.try_get("outcome").map_err(q)?,
                            reason: r.try_get("reason").map_err(q)?,
                        })
                    })
                    .collect()
            }

            async fn handshakes_prune(&self, before_ms: i64) -> Result<u64> {
                Ok(sqlx::query("DELETE FROM handshakes WHERE at_ms < $1")
                    .bind(before_ms)
                    .execute(&self.pool)
                    .await
                    .map_err(q)?
                    .rows_affected())
            }

            async fn coverage_add(&self, c: NewCoverage) -> Result<()> {
                sqlx::query(
                    "INSERT INTO coverage (node, at, links, encrypted, plaintext, capture_mode, plaintext_attempts, report) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&c.node)
                .bind(c.at)
                .bind(c.links)
                .bind(c.encrypted)
                .bind(c.plaintext)
                .bind(&c.capture_mode)
                .bind(c.plaintext_attempts)
                .bind(&c.report)
                .execute(&self.pool)
                .await
                .map_err(q)?;
                Ok(())
            }

            async fn coverage_latest(&self) -> Result<Vec<CoverageRecord>> {
                let rows = sqlx::query(
                    "SELECT c.node, c.at, c.links, c.encrypted, c.plaintext, c.capture_mode, c.plaintext_attempts, c.report FROM coverage c \
                     JOIN (SELECT node, MAX(id) AS id FROM coverage GROUP BY node) m ON c.id = m.id \
                     ORDER BY c.node",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
                rows.iter()
                    .map(|r| {
                        Ok(CoverageRecord {
                            point: coverage_point_from(r)?,
                            report: r.try_get("report").map_err(q)?,
                        })
                    })
                    .collect()
            }

            async fn coverage_history(&self, since: i64) -> Result<Vec<CoveragePoint>> {
                let rows = sqlx::query(
                    "SELECT node, at, links, encrypted, plaintext, capture_mode, plaintext_attempts FROM coverage WHERE at >= $1 ORDER BY at, id",
                )
                .bind(since)
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
                rows.iter().map(coverage_point_from).collect()
            }
        }
    };
}

pub(crate) use impl_store;
