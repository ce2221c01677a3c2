//! `tapproof capture status|remove`: the agent's nftables table as the kernel has it, and its
//! explicit removal (the only way the rules go: the agent leaves them in place when it stops, so
//! captured connections fail closed while it is down).

use crate::audit_cmd::Flagged;
use crate::cli::CaptureCommand;
use crate::exit::ConfigProblem;
use tapproof_agent::capture::nft;
use tapproof_agent::AgentConfig;

pub async fn run(cmd: CaptureCommand) -> anyhow::Result<()> {
    match cmd {
        CaptureCommand::Status { json } => status(json).await,
        CaptureCommand::Remove {
            config,
            reason,
            force,
        } => remove(config, reason, force).await,
    }
}

async fn status(json: bool) -> anyhow::Result<()> {
    let listed = tokio::task::spawn_blocking(nft::list).await??;
    let Some(l) = listed else {
        if json {
            println!("null");
        } else {
            println!(
                "no capture rules: table {} {} does not exist",
                nft::FAMILY,
                nft::TABLE
            );
        }
        return Err(Flagged("no capture rules".into()).into());
    };
    if json {
        let doc = serde_json::json!({
            "table": format!("{} {}", nft::FAMILY, nft::TABLE),
            "captured": l.captured,
            "capture_port": l.port,
            "mark": l.mark,
            "captured_connections": l.captured_connections,
            "inbound": l.inbound,
            "inbound_ports": l.inbound_ports,
            "dropped_packets": l.dropped_packets,
            "attempts": l.attempts,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("table {} {}", nft::FAMILY, nft::TABLE);
    println!(
        "outbound capture: {} destinations -> 127.0.0.1/::1 port {}, agent's sockets exempt by mark {}; {} connections redirected",
        l.captured.len(),
        l.port.map_or_else(|| "?".into(), |p| p.to_string()),
        l.mark.map_or_else(|| "?".into(), |m| format!("{m:#x}")),
        l.captured_connections
    );
    for d in &l.captured {
        println!("  {d}");
    }
    let ports: Vec<String> = l.inbound_ports.iter().map(u16::to_string).collect();
    println!(
        "inbound: {} on ports [{}]; {} packets dropped",
        l.inbound.as_str(),
        ports.join(", "),
        l.dropped_packets
    );
    for a in &l.attempts {
        println!(
            "  plaintext from {} to port {}: {} packets",
            a.source, a.port, a.packets
        );
    }
    Ok(())
}

/// Who is running this, for the record: the login behind sudo when there is one.
fn who() -> String {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| "?".into(), |u| u.name);
    match std::env::var("SUDO_USER") {
        Ok(sudo) => format!("{sudo} (via sudo as {user}, uid {uid})"),
        Err(_) => format!("{user} (uid {uid})"),
    }
}

async fn remove(
    config: Option<std::path::PathBuf>,
    reason: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    let config = match &config {
        Some(path) => Some(AgentConfig::load(path).map_err(|e| ConfigProblem(e.to_string()))?),
        None => None,
    };
    let admin = config
        .as_ref()
        .map_or_else(tapproof_agent::config::default_admin_listen, |c| c.admin.listen);
    if let Ok(sockets) = tapproof_agent::vouch::ask(admin, std::time::Duration::from_secs(1)).await {
        if sockets.capture.is_some() {
            anyhow::bail!(
                "the agent at {admin} (pid {}) is running with capture and would install the rules again; stop it first, then remove them",
                sockets.pid
            );
        }
    }
    let who = who();
    let reason = reason.unwrap_or_else(|| "none given".into());
    let Some(before) = tokio::task::spawn_blocking(nft::list).await?? else {
        println!(
            "no capture rules to remove: table {} {} does not exist",
            nft::FAMILY,
            nft::TABLE
        );
        return Ok(());
    };
    let (captured, inbound) = (before.captured.len(), before.inbound);
    // The control plane records it first: a removal it cannot record does not happen unless
    // the operator says so.
    let recorded = match config
        .as_ref()
        .and_then(|c| c.control.as_ref().map(|ctl| (c, ctl)))
    {
        None => "not recorded on a control plane (no [control] in the config)".to_owned(),
        Some((c, ctl)) => {
            let event = tapproof_api::NodeEvent {
                kind: tapproof_api::NodeEventKind::CaptureRemoved,
                by: who.clone(),
                reason: reason.clone(),
                captured: u32::try_from(captured).unwrap_or(u32::MAX),
                inbound,
            };
            match tapproof_agent::control::record_event(ctl, &c.trust_domain, &event).await {
                Ok(()) => "recorded in the control plane's audit log (capture.removed)".to_owned(),
                Err(e) if force => {
                    tracing::warn!(error = %e, "the control plane could not record the removal; removing anyway (--force)");
                    format!("NOT recorded on the control plane ({e}); removed with --force")
                }
                Err(e) => anyhow::bail!(
                    "the control plane could not record the removal, so the rules stay: {e}\n(give --force to remove them anyway; the local log still says who)"
                ),
            }
        }
    };
    let removed = tokio::task::spawn_blocking(nft::remove).await??;
    // A gateway's UDP capture also has a policy route (`capture/route.rs`).
    if let Some(g) = &before.gateway {
        let table = config
            .as_ref()
            .and_then(|c| c.gateway.as_ref())
            .map_or(tapproof_agent::config::DEFAULT_UDP_ROUTE_TABLE, |g| {
                g.udp_route_table
            });
        let (mark, ipv6) = (g.udp_mark, std::path::Path::new("/proc/net/if_inet6").exists());
        if mark != 0 {
            tokio::task::spawn_blocking(move || tapproof_agent::capture::route::remove(mark, table, ipv6))
                .await?
                .map_err(|e| anyhow::anyhow!("removing the gateway's UDP policy route: {e}"))?;
        }
    }
    if removed {
        let inbound = inbound.as_str();
        tracing::warn!(by = %who, %reason, captured, inbound, recorded = %recorded,
            "capture rules removed (table inet tapproof): captured destinations are dialled in plaintext and inbound ports are open to the network again");
        println!(
            "removed table {} {} ({captured} captured destinations, inbound {inbound}); by {who}; reason: {reason}; {recorded}",
            nft::FAMILY,
            nft::TABLE
        );
    } else {
        println!(
            "no capture rules to remove: table {} {} does not exist",
            nft::FAMILY,
            nft::TABLE
        );
    }
    Ok(())
}
