//! `tapproof agent` and `tapproof check-config`.

use crate::cli::{AgentArgs, ConfigArgs};
use crate::exit::ConfigProblem;
use anyhow::Context;
use tapproof_agent::control::ControlError;
use tapproof_agent::{AgentConfig, AgentError, RunOptions};
use tapproof_tls::Material;

fn load(args: &ConfigArgs) -> anyhow::Result<AgentConfig> {
    AgentConfig::load(&args.config).map_err(|e| ConfigProblem(e.to_string()).into())
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // SIGHUP never stops the agent: from here on the default action (exit) is replaced (tokio
    // keeps its handler installed for the life of the process). Before the agent serves, a
    // SIGHUP is ignored; then the agent's reload handles it.
    if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tracing::warn!(error = %e, "cannot install the SIGHUP handler");
    }
    let mut config = load(&args.config)?;
    if let Some(a) = args.admin_listen {
        config.admin.listen = a;
    }
    if let Some(a) = args.tunnel_listen {
        config.tunnel.listen = a;
    }
    if let Some(pq) = args.require_post_quantum {
        config.tunnel.require_post_quantum = pq;
    }
    let options = RunOptions {
        ready_file: args.ready_file,
        fd_limit: crate::fd_limit::raise(),
        config_path: Some(args.config.config.clone()),
    };
    match tapproof_agent::run(config, options, shutdown_signal()).await {
        Ok(()) => Ok(()),
        Err(e @ AgentError::Identity(_)) => Err(ConfigProblem(e.to_string()).into()),
        // A refused or malformed token will not fix itself: a configuration problem. An
        // unreachable server is a runtime failure (a supervisor may retry).
        Err(AgentError::Control(
            e @ (ControlError::Token(_) | ControlError::Refused { .. } | ControlError::DataDir { .. }),
        )) => Err(ConfigProblem(e.to_string()).into()),
        Err(e) => Err(e).context("agent stopped"),
    }
}

pub async fn check(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load(&args)?;
    let files = tapproof_agent::identity_files(&config);
    if let Some(control) = &config.control {
        if !files.cert.exists() {
            let token = match (&control.token, &control.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| ConfigProblem(format!("control.token_file {}: {e}", f.display())))?,
                (None, None) => String::new(),
            };
            tapproof_identity::JoinToken::parse(&token)
                .map_err(|e| ConfigProblem(format!("not joined yet and control.token is unusable: {e}")))?;
            println!(
                "config {}: ok (not joined yet; will join with the token on first start)",
                args.config.display()
            );
            return Ok(());
        }
    }
    let material = Material::load(&files, &config.trust_domain).map_err(|e| ConfigProblem(e.to_string()))?;
    // The identity must fit the crypto profile, as the agent checks at start.
    tapproof_tls::ServerTls::new(&material, config.tunnel.crypto_policy())
        .map_err(|e| ConfigProblem(e.to_string()))?;
    tapproof_agent::federation::load_files(&config.federation).map_err(|e| ConfigProblem(e.to_string()))?;
    println!("config {}: ok", args.config.display());
    println!("  identity        {}", material.id());
    println!("  crypto profile  {}", config.tunnel.crypto_profile.as_str());
    println!("  expires in      {} s", material.seconds_to_expiry());
    println!("  bundle roots    {}", material.root_count());
    println!(
        "  inbound         {}",
        config
            .inbound
            .iter()
            .map(|i| i.service.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !config.federation.is_empty() {
        println!(
            "  federated with  {}",
            config
                .federation
                .iter()
                .map(|f| match &f.endpoint {
                    Some(url) => format!("{} (bundle from {url})", f.trust_domain),
                    None => format!("{} (bundle file only)", f.trust_domain),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  outbound        {}",
        config
            .outbound
            .iter()
            .map(|o| o.service.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if config.uses_capture() {
        // What the agent checks at start, checked here too (systemd runs this before it, with
        // the same capabilities): nothing is committed.
        let plan = tapproof_agent::capture::Plan::of(&config);
        println!(
            "  capture         {} destinations, inbound {} on ports {:?}",
            plan.captured.len(),
            plan.inbound.as_str(),
            plan.inbound_ports
        );
        tokio::task::spawn_blocking(move || tapproof_agent::capture::nft::check_kernel(&plan))
            .await?
            .map_err(|e| anyhow::anyhow!("capture: {e}"))?;
        println!("  capture rules   the kernel accepts them (nft --check)");
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT: the agent then drains.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; the agent will only stop when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
