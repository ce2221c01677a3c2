//! `tapproof server ...`: init, run, token create, audit-log verify/show.

use crate::cli::{
    AuditCommand, CaCommand, NodeCommand, PolicyCommand, RegistrationCommand, RemoteArgs, RotateStepArg,
    ServerArgs, ServerCommand, TokenCommand,
};
use crate::run_agent::ConfigProblem;
use anyhow::{bail, Context};
use tapproof_identity::TrustDomain;
use tapproof_server::ServerError;

fn classify(e: ServerError) -> anyhow::Error {
    match e {
        ServerError::Invalid(_)
        | ServerError::Kek(_)
        | ServerError::DataDir { .. }
        | ServerError::NotInitialised
        | ServerError::AlreadyInitialised => ConfigProblem(e.to_string()).into(),
        other => anyhow::Error::new(other),
    }
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    match args.command {
        ServerCommand::Init {
            trust_domain,
            store,
            kek_file,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .map_err(|e| ConfigProblem(format!("--trust-domain {trust_domain:?}: {e}")))?;
            let report = tapproof_server::init(td, &store.data_dir, store.store, kek_file)
                .await
                .map_err(classify)?;
            println!(
                "initialised trust domain {} in {}",
                report.trust_domain,
                store.data_dir.display()
            );
            println!("  store       {}", report.store);
            println!("  root sha256 {}", hex_string(&report.root_pin));
            println!(
                "next: tapproof server run --data-dir {}",
                store.data_dir.display()
            );
            Ok(())
        }
        ServerCommand::Run {
            store,
            listen,
            kek_file,
            leaf_ttl,
            ready_file,
            root_max_age,
            rollover_propagation,
        } => {
            let options = tapproof_server::RunOptions {
                data_dir: store.data_dir,
                listen,
                store: store.store,
                kek_file,
                leaf_ttl: leaf_ttl.0,
                ready_file,
                rollover: root_max_age.map(|age| tapproof_server::rollover::Schedule {
                    root_max_age: age.0,
                    propagation: rollover_propagation.0,
                }),
            };
            tapproof_server::run(options, crate::run_agent::shutdown_signal())
                .await
                .map_err(classify)
        }
        ServerCommand::AdminCert {
            store,
            kek_file,
            name,
            out,
            ttl,
        } => {
            let (td, db, kek) = open_with_kek(&store, kek_file).await?;
            let id = tapproof_server::issue_admin(&*db, &kek, &td, &name, ttl.0, &out)
                .await
                .map_err(classify)?;
            println!("issued {id} into {0} (admin.pem, admin.key, bundle.pem); use it with --server ADDR --admin-dir {0}", out.display());
            Ok(())
        }
        ServerCommand::Dashboard { remote, listen } => crate::dashboard_cmd::run(remote, listen).await,
        ServerCommand::Revoke {
            store,
            remote,
            node,
            id,
            serial,
            reason,
        } => {
            use tapproof_store::RevocationKind;
            let (kind, value) = match (node, id, serial) {
                (Some(n), _, _) => (RevocationKind::Node, n),
                (_, Some(i), _) => {
                    tapproof_identity::SpiffeId::parse(&i)
                        .map_err(|e| ConfigProblem(format!("--id {i:?}: {e}")))?;
                    (RevocationKind::SpiffeId, i)
                }
                (_, _, Some(s)) => (RevocationKind::Serial, s.to_uppercase()),
                _ => return Err(ConfigProblem("say what to revoke: --node, --id or --serial".into()).into()),
            };
            let id = if remote.server.is_some() {
                let body = serde_json::json!({ "kind": kind, "value": value, "reason": reason });
                remote_call(&remote, http::Method::POST, "/v1/revocations", Some(body)).await?["id"]
                    .as_i64()
                    .unwrap_or(0)
            } else {
                let (_, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                    .await
                    .map_err(classify)?;
                tapproof_server::revoke(&*db, kind, &value, &reason)
                    .await
                    .map_err(classify)?
                    .id
            };
            println!(
                "revoked {} {} (revocation {id}); agents close its tunnels within seconds",
                kind.as_str(),
                value
            );
            Ok(())
        }
        ServerCommand::Node {
            command: NodeCommand::List { remote, json, .. },
        } if remote.server.is_some() => {
            let nodes = remote_call(&remote, http::Method::GET, "/v1/nodes", None).await?;
            for v in nodes.as_array().cloned().unwrap_or_default() {
                if json {
                    println!("{v}");
                } else {
                    let state = if v["node"]["revoked_at"].is_null() {
                        "active"
                    } else {
                        "REVOKED"
                    };
                    println!(
                        "{:<20} {:<8} not_after {:<12} services {}  {}",
                        v["node"]["name"].as_str().unwrap_or("?"),
                        state,
                        v["cert_not_after"],
                        v["services"],
                        v["node"]["spiffe_id"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(())
        }
        ServerCommand::Node {
            command: NodeCommand::List { store, json, .. },
        } => {
            let (_, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                .await
                .map_err(classify)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let registrations = db.registrations().await.map_err(|e| classify(e.into()))?;
            for node in db.node_list().await.map_err(|e| classify(e.into()))? {
                let certs = db.cert_list(&node.name).await.map_err(|e| classify(e.into()))?;
                let expiry = certs
                    .iter()
                    .filter(|c| c.spiffe_id == node.spiffe_id)
                    .map(|c| c.not_after)
                    .max();
                let services: Vec<&str> = registrations
                    .iter()
                    .filter(|r| r.node == node.name)
                    .map(|r| r.service.as_str())
                    .collect();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "node": node, "services": services, "cert_not_after": expiry })
                    );
                } else {
                    let expires = match expiry {
                        Some(t) if t > now => format!("expires in {}s", t - now),
                        Some(_) => "expired".to_owned(),
                        None => "no certificate".to_owned(),
                    };
                    let state = if node.revoked_at.is_some() {
                        "REVOKED"
                    } else {
                        "active"
                    };
                    let seen = node
                        .last_seen
                        .map(|t| format!("seen {}s ago", now - t))
                        .unwrap_or_default();
                    println!(
                        "{:<20} {:<8} {:<22} {:<18} services [{}]  {}",
                        node.name,
                        state,
                        expires,
                        seen,
                        services.join(", "),
                        node.spiffe_id
                    );
                }
            }
            Ok(())
        }
        ServerCommand::Policy {
            command: PolicyCommand::Set { store, remote, file },
        } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            if remote.server.is_some() {
                let (status, value) =
                    remote_raw(&remote, http::Method::POST, "/v1/policy", Some(text.into_bytes())).await?;
                if status != 200 {
                    return Err(ConfigProblem(format!(
                        "server refused the policy: {}",
                        value["error"]["message"].as_str().unwrap_or("?")
                    ))
                    .into());
                }
            } else {
                let (meta, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                    .await
                    .map_err(classify)?;
                let td =
                    TrustDomain::new(&meta.trust_domain).context("server.json holds a bad trust domain")?;
                let policy = tapproof_server::Policy::parse(&text, &td).map_err(classify)?;
                tapproof_server::set_policy(&*db, &policy, "cli")
                    .await
                    .map_err(classify)?;
            }
            println!(
                "policy from {} set; agents apply it within seconds",
                file.display()
            );
            Ok(())
        }
        ServerCommand::Policy {
            command: PolicyCommand::Show { store, remote },
        } => {
            let policy = if remote.server.is_some() {
                remote_call(&remote, http::Method::GET, "/v1/policy", None).await?
            } else {
                let (_, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                    .await
                    .map_err(classify)?;
                serde_json::to_value(tapproof_server::get_policy(&*db).await.map_err(classify)?)?
            };
            println!("{}", serde_json::to_string_pretty(&policy)?);
            Ok(())
        }
        ServerCommand::Registration { command } => {
            let (store, remote, change) = match command {
                RegistrationCommand::Add(a) => (a.store, a.remote, Some((true, a.node, a.service))),
                RegistrationCommand::Remove(a) => (a.store, a.remote, Some((false, a.node, a.service))),
                RegistrationCommand::List { store, remote } => (store, remote, None),
            };
            if remote.server.is_some() {
                match change {
                    Some((add, node, service)) => {
                        let body = serde_json::json!({ "node": node, "service": service, "add": add });
                        let v =
                            remote_call(&remote, http::Method::POST, "/v1/registrations", Some(body)).await?;
                        println!(
                            "{} {node} / {service}",
                            if v["changed"] == true {
                                "changed:"
                            } else {
                                "no change:"
                            }
                        );
                    }
                    None => {
                        for r in remote_call(&remote, http::Method::GET, "/v1/registrations", None)
                            .await?
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                        {
                            println!(
                                "{:<20} {}",
                                r["node"].as_str().unwrap_or("?"),
                                r["service"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
                return Ok(());
            }
            let (meta, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                .await
                .map_err(classify)?;
            match change {
                Some((add, node, service)) => {
                    let td = TrustDomain::new(&meta.trust_domain)
                        .context("server.json holds a bad trust domain")?;
                    let changed = tapproof_server::register(&*db, &td, &node, &service, add)
                        .await
                        .map_err(classify)?;
                    let verb = if add { "registered" } else { "unregistered" };
                    if changed {
                        println!("{verb} spiffe://{td}/svc/{service} for node {node}");
                    } else {
                        println!("no change: {node} / {service} was already {verb}");
                    }
                }
                None => {
                    for r in db.registrations().await.map_err(|e| classify(e.into()))? {
                        println!("{:<20} {}", r.node, r.service);
                    }
                }
            }
            Ok(())
        }
        ServerCommand::Ca {
            command:
                CaCommand::Rotate {
                    step,
                    store,
                    kek_file,
                    force,
                },
        } => {
            use tapproof_server::rollover::{rotate, RotateStep};
            let (td, db, kek) = open_with_kek(&store, kek_file).await?;
            let step = match step {
                RotateStepArg::Prepare => RotateStep::Prepare,
                RotateStepArg::Activate => RotateStep::Activate,
                RotateStepArg::Retire => RotateStep::Retire { force },
            };
            let summary = rotate(&*db, &kek, &td, step).await.map_err(classify)?;
            println!("{summary}");
            Ok(())
        }
        ServerCommand::Token {
            command:
                TokenCommand::Create {
                    store,
                    node,
                    services,
                    ttl,
                    server,
                },
        } => {
            let (meta, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                .await
                .map_err(classify)?;
            let td = TrustDomain::new(&meta.trust_domain).context("server.json holds a bad trust domain")?;
            let token = tapproof_server::create_token(&*db, &td, server, &node, &services, ttl.0)
                .await
                .map_err(classify)?;
            println!("{token}");
            eprintln!(
                "single-use join token for spiffe://{td}/node/{node}, valid for {}",
                humantime::format_duration(ttl.0)
            );
            Ok(())
        }
        ServerCommand::AuditLog {
            command: AuditCommand::Verify { store },
        } => {
            let (_, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                .await
                .map_err(classify)?;
            match tapproof_server::verify_audit(&*db).await.map_err(classify)? {
                Ok(rows) => {
                    println!("audit log intact: {rows} rows, every hash link verified");
                    Ok(())
                }
                Err(problems) => {
                    for p in &problems {
                        println!("TAMPERED: {p}");
                    }
                    bail!("audit log verification failed: {} problem(s)", problems.len())
                }
            }
        }
        ServerCommand::AuditLog {
            command:
                AuditCommand::Show {
                    remote,
                    after,
                    limit,
                    json,
                    ..
                },
        } if remote.server.is_some() => {
            let path = format!("/v1/audit-log?after={after}&limit={limit}");
            for row in remote_call(&remote, http::Method::GET, &path, None)
                .await?
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                if json {
                    println!("{row}");
                } else {
                    println!(
                        "{:>6} {:<12} {:<28} {:<16} {}",
                        row["seq"],
                        row["at"],
                        row["actor"].as_str().unwrap_or(""),
                        row["action"].as_str().unwrap_or(""),
                        row["details"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        ServerCommand::AuditLog {
            command:
                AuditCommand::Show {
                    store,
                    after,
                    limit,
                    json,
                    ..
                },
        } => {
            let (_, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                .await
                .map_err(classify)?;
            for row in db
                .audit_list(after, limit)
                .await
                .map_err(|e| classify(e.into()))?
            {
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                } else {
                    let at = time::OffsetDateTime::from_unix_timestamp(row.at)
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                    println!(
                        "{:>6} {at} {:<28} {:<16} {}",
                        row.seq, row.actor, row.action, row.details
                    );
                }
            }
            Ok(())
        }
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One admin API call over mTLS with the identity in `--admin-dir`; a non-200 answer is an error.
async fn remote_call(
    remote: &RemoteArgs,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (status, value) = remote_raw(remote, method, path, body.map(|b| b.to_string().into_bytes())).await?;
    if status != 200 {
        bail!(
            "server refused ({status}): {}: {}",
            value["error"]["code"].as_str().unwrap_or("?"),
            value["error"]["message"].as_str().unwrap_or("")
        );
    }
    Ok(value)
}

/// The status and JSON body of one admin API call.
async fn remote_raw(
    remote: &RemoteArgs,
    method: http::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (server, tls) = admin_client(remote)?;
    let (status, bytes) = tapproof_agent::control::request(
        &server,
        &tls,
        method,
        path,
        body,
        std::time::Duration::from_secs(15),
    )
    .await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

/// The server's address and a client config presenting the admin identity in `--admin-dir`.
pub fn admin_client(remote: &RemoteArgs) -> anyhow::Result<(String, tapproof_tls::ControlClientTls)> {
    let server = remote.server.as_deref().context("--server is required")?;
    let dir = remote
        .admin_dir
        .as_deref()
        .context("--admin-dir is required with --server")?;
    let files = tapproof_tls::IdentityFiles {
        cert: dir.join("admin.pem"),
        key: dir.join("admin.key"),
        bundle: dir.join("bundle.pem"),
    };
    let (tls, _) = tapproof_tls::ControlClientTls::from_files(&files, None)
        .map_err(|e| ConfigProblem(format!("--admin-dir {}: {e}", dir.display())))?;
    Ok((server.to_owned(), tls))
}

/// The store, its trust domain and the key-encryption key: what commands that sign need.
async fn open_with_kek(
    store: &crate::cli::ServerStoreArgs,
    kek_file: Option<std::path::PathBuf>,
) -> anyhow::Result<(
    TrustDomain,
    std::sync::Arc<dyn tapproof_store::Store>,
    tapproof_server::kek::Kek,
)> {
    let (meta, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
        .await
        .map_err(classify)?;
    let td = TrustDomain::new(&meta.trust_domain).context("server.json holds a bad trust domain")?;
    let kek_path = kek_file.unwrap_or_else(|| tapproof_server::default_kek_file(&store.data_dir));
    let kek = tapproof_server::kek::Kek::load(&kek_path).map_err(|e| classify(e.into()))?;
    Ok((td, db, kek))
}
