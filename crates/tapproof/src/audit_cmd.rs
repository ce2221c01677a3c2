//! `tapproof audit`: the host's coverage report, as a table or JSON, with an exit code for gates.

use crate::cli::AuditArgs;
use crate::run_agent::ConfigProblem;
use tapproof_agent::AgentConfig;

/// Exit code 1 without an error message: the report already says what is plaintext.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Flagged(pub String);

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let mut options = tapproof_audit::Options {
        probe: args.probe.then_some(args.probe_timeout.0),
        include_loopback: args.include_loopback,
        ..Default::default()
    };
    if let Some(path) = &args.config {
        let config = AgentConfig::load(path).map_err(|e| ConfigProblem(e.to_string()))?;
        options.allow = config.audit.allow.clone();
        options.known = config.audit_known();
    }
    let proc_root = args.proc_root.clone();
    // Reading procfs and probing block; keep them off the runtime's worker.
    let report = tokio::task::spawn_blocking(move || tapproof_audit::audit(&proc_root, &options)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", tapproof_audit::render(&report));
    }
    let s = &report.summary;
    if s.plaintext > 0 {
        return Err(Flagged(format!("{} plaintext links", s.plaintext)).into());
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
