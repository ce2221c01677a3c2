//! `tapproof audit`: the host's coverage report, as a table or JSON, with an exit code for gates.

use crate::cli::AuditArgs;
use crate::exit::ConfigProblem;
use tapproof_agent::AgentConfig;

/// Exit code 1 without an error message: the report already says what is plaintext.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Flagged(pub String);

/// How long the audit waits for the agent's socket list.
const AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let mut options = tapproof_audit::Options {
        probe: args.probe.then_some(args.probe_timeout.0),
        include_loopback: args.include_loopback,
        ..Default::default()
    };
    let mut agent = args.agent;
    if let Some(path) = &args.config {
        let config = AgentConfig::load(path).map_err(|e| ConfigProblem(e.to_string()))?;
        options.allow = config.audit.allow.clone();
        options.known = config.audit_known();
        agent = agent.or(Some(config.admin.listen));
    }
    let agent = agent.unwrap_or_else(tapproof_agent::config::default_admin_listen);
    let proc_root = args.proc_root.clone();
    // Reading procfs blocks; keep it off the runtime's worker. The agent is asked after the scan:
    // every vouched socket the scan saw was open before the list was made.
    let scan = tokio::task::spawn_blocking(move || tapproof_audit::scan::scan(&proc_root)).await?;
    options.agent = match tapproof_agent::vouch::ask(agent, AGENT_TIMEOUT).await {
        Ok(sockets) => tapproof_audit::AgentView::Vouched(sockets),
        Err(e) => tapproof_audit::AgentView::Unavailable(format!("agent admin API at {agent}: {e}")),
    };
    let report = tokio::task::spawn_blocking(move || {
        tapproof_audit::classify(&scan, &options, tapproof_audit::hostname(), tapproof_audit::now())
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", tapproof_audit::render(&report));
    }
    let s = &report.summary;
    if s.plaintext > 0 {
        return Err(Flagged(format!("{} plaintext links", s.plaintext)).into());
    }
    if s.plaintext_attempts > 0 {
        return Err(Flagged(format!(
            "{} sources sent plaintext to inbound ports (capture.inbound = \"monitor\")",
            s.plaintext_attempts
        ))
        .into());
    }
    if args.strict && s.exposed_listeners > 0 {
        return Err(Flagged(format!(
            "{} listeners reachable without tapproof",
            s.exposed_listeners
        ))
        .into());
    }
    Ok(())
}
