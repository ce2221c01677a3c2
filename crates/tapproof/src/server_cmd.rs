//! `tapproof server ...`: the commands that need the server's data dir (init, run, admin-cert,
//! token create, CA rollover steps, audit-log verify), and the dispatch of the admin commands that
//! also run remotely (`admin_cmd.rs`).

use crate::admin_cmd::{self, Admin};
use crate::cli::{
    AuditCommand, CaCommand, NodeCommand, PolicyCommand, RegistrationCommand, RevocationCommand,
    RotateStepArg, ServerArgs, ServerCommand, ServerEvidenceCommand, TokenCommand,
};
use crate::exit::{classify, ConfigProblem};
use anyhow::{bail, Context};
use tapproof_api::{AuditQuery, RegistrationChange, RevocationKind};
use tapproof_identity::TrustDomain;

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    match args.command {
        ServerCommand::Init {
            trust_domain,
            store,
            kek_file,
            profile,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .map_err(|e| ConfigProblem(format!("--trust-domain {trust_domain:?}: {e}")))?;
            let report = tapproof_server::init_with(
                td,
                &store.data_dir,
                store.store,
                kek_file,
                profile.key_algorithm(),
            )
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
            admin_listen,
            kek_file,
            leaf_ttl,
            ready_file,
            root_max_age,
            rollover_propagation,
            handshake_retention,
            probe_interval,
            limits,
        } => {
            let fd_limit = crate::fd_limit::raise();
            let options = tapproof_server::RunOptions {
                limits: limits.limits(fd_limit),
                data_dir: store.data_dir,
                listen,
                store: store.store,
                kek_file,
                leaf_ttl: leaf_ttl.0,
                admin_listen: Some(admin_listen),
                ready_file,
                rollover: root_max_age.map(|age| tapproof_server::rollover::Schedule {
                    root_max_age: age.0,
                    propagation: rollover_propagation.0,
                }),
                handshake_retention: handshake_retention.0,
                probe_interval: (!probe_interval.0.is_zero()).then_some(probe_interval.0),
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
            let (kind, value) = match (node, id, serial) {
                (Some(n), _, _) => (RevocationKind::Node, n),
                (_, Some(i), _) => (RevocationKind::SpiffeId, i),
                (_, _, Some(s)) => (RevocationKind::Serial, s),
                _ => return Err(ConfigProblem("say what to revoke: --node, --id or --serial".into()).into()),
            };
            admin_cmd::revoke(&Admin::open(&store, &remote).await?, kind, value, reason).await
        }
        ServerCommand::Node {
            command: NodeCommand::List { store, remote, json },
        } => admin_cmd::node_list(&Admin::open(&store, &remote).await?, json).await,
        ServerCommand::Evidence {
            command:
                ServerEvidenceCommand::Export {
                    store,
                    kek_file,
                    from,
                    to,
                    out,
                    html,
                },
        } => {
            let (td, db, kek) = open_with_kek(&store, kek_file).await?;
            crate::evidence_cmd::export(&*db, &kek, &td, from, to, &out, html).await
        }
        ServerCommand::Probe {
            store,
            kek_file,
            json,
        } => {
            let (td, db, kek) = open_with_kek(&store, kek_file).await?;
            let ca = tapproof_server::Ca::load(&*db, &kek, &td)
                .await
                .map_err(classify)?;
            let probes = tapproof_server::probes::round(&*db, &ca, "cli")
                .await
                .map_err(classify)?;
            if probes.is_empty() && !json {
                println!("no live node has announced a tunnel listener: nothing to probe");
            }
            for p in &probes {
                if json {
                    println!("{}", serde_json::to_string(p)?);
                } else {
                    println!(
                        "{:<20} {:<22} {:<8} {:<15} {}",
                        p.node, p.target, p.probe, p.result, p.detail
                    );
                }
            }
            let accepted = probes.iter().filter(|p| p.result == "accepted").count();
            if accepted > 0 {
                anyhow::bail!(
                    "{accepted} probe(s) ACCEPTED: a tunnel listener took a certificate it must refuse"
                );
            }
            Ok(())
        }
        ServerCommand::Handshakes {
            store,
            remote,
            from,
            to,
            limit,
            json,
        } => {
            let query = tapproof_api::HandshakeQuery {
                from_ms: from.map_or(0, |t| t.saturating_mul(1000)),
                to_ms: to.map_or(i64::MAX, |t| t.saturating_mul(1000)),
                limit,
            };
            admin_cmd::handshakes(&Admin::open(&store, &remote).await?, &query, json).await
        }
        ServerCommand::Revocation {
            command:
                RevocationCommand::Show {
                    store,
                    remote,
                    id,
                    json,
                },
        } => admin_cmd::revocation_show(&Admin::open(&store, &remote).await?, id, json).await,
        ServerCommand::Policy {
            command: PolicyCommand::Set { store, remote, file },
        } => admin_cmd::policy_set(&Admin::open(&store, &remote).await?, &file).await,
        ServerCommand::Policy {
            command: PolicyCommand::Show { store, remote },
        } => admin_cmd::policy_show(&Admin::open(&store, &remote).await?).await,
        ServerCommand::Registration { command } => match command {
            RegistrationCommand::Add(a) => registration_change(a, true).await,
            RegistrationCommand::Remove(a) => registration_change(a, false).await,
            RegistrationCommand::List { store, remote } => {
                admin_cmd::registration_list(&Admin::open(&store, &remote).await?).await
            }
        },
        ServerCommand::Ca {
            command:
                CaCommand::Rotate {
                    step,
                    store,
                    kek_file,
                    force,
                    profile,
                },
        } => {
            use tapproof_server::rollover::{rotate, RotateStep};
            let (td, db, kek) = open_with_kek(&store, kek_file).await?;
            let step = match step {
                RotateStepArg::Prepare => RotateStep::Prepare {
                    algorithm: profile.map(tapproof_tls::CryptoProfile::key_algorithm),
                },
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
                    node_pattern,
                    uses,
                    services,
                    ttl,
                    server,
                },
        } => {
            // (clap's `requires` did not hold these together; checked here.)
            match (&node_pattern, uses) {
                (None, Some(_)) => {
                    return Err(ConfigProblem(
                        "--uses needs --node-pattern (a token for one --node is single-use)".into(),
                    )
                    .into())
                }
                (Some(_), None) => {
                    return Err(ConfigProblem(
                        "--node-pattern needs --uses N: how many nodes may join with the token".into(),
                    )
                    .into())
                }
                _ => {}
            }
            let (meta, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
                .await
                .map_err(classify)?;
            let td = TrustDomain::new(&meta.trust_domain).context("server.json holds a bad trust domain")?;
            let nodes = match (node, node_pattern) {
                (_, Some(pattern)) => tapproof_server::TokenFor::Pattern {
                    pattern,
                    uses: uses.unwrap_or_default(),
                },
                (Some(node), None) => tapproof_server::TokenFor::Node(node),
                (None, None) => unreachable!("clap requires --node or --node-pattern"),
            };
            let token = tapproof_server::create_token_for(&*db, &td, server, &nodes, &services, ttl.0)
                .await
                .map_err(classify)?;
            println!("{token}");
            let valid = humantime::format_duration(ttl.0);
            match &nodes {
                tapproof_server::TokenFor::Node(node) => {
                    eprintln!("single-use join token for spiffe://{td}/node/{node}, valid for {valid}")
                }
                tapproof_server::TokenFor::Pattern { pattern, uses } => eprintln!(
                    "REUSABLE join token: up to {uses} nodes named {pattern} (spiffe://{td}/node/<name>), valid for {valid}; anyone holding it can join that many nodes"
                ),
            }
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
                    store,
                    remote,
                    after,
                    limit,
                    json,
                },
        } => {
            admin_cmd::audit_show(
                &Admin::open(&store, &remote).await?,
                AuditQuery { after, limit },
                json,
            )
            .await
        }
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `registration add` (`add`) or `remove`.
async fn registration_change(a: crate::cli::RegistrationArgs, add: bool) -> anyhow::Result<()> {
    let admin = Admin::open(&a.store, &a.remote).await?;
    let change = RegistrationChange {
        node: a.node,
        service: a.service,
        add,
    };
    admin_cmd::registration_change(&admin, change).await
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
