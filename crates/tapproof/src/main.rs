//! `tapproof`: one binary for the agent, the demo, and (later) the control plane and audit.
//! This file only parses the command line and sets up logging; each subcommand lives in its own
//! module.

mod admin_cmd;
mod audit_cmd;
mod capture_cmd;
mod cli;
mod dashboard_cmd;
mod evidence_cmd;
mod exit;
mod fd_limit;
mod logging;
mod pki;
mod quickstart;
mod run_agent;
mod server_cmd;
mod status;

use clap::Parser;
use std::process::ExitCode;

/// Exit codes, documented in `tapproof --help`.
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;

/// The agent shares its host with the services it carries: one worker thread per four cores. On a
/// loopback pair with 2 cores, one thread per agent moved 1.6x the bytes of two (bench/README.md):
/// cross-thread wake-ups cost more than a second core gains while the services need the cores.
/// The server (and everything else) uses every core.
fn worker_threads(asked: usize, agent: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match (asked, agent) {
        (0, true) => (cores / 4).clamp(1, 8),
        (0, false) => cores,
        (n, _) => n,
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    let threads = worker_threads(cli.threads, matches!(cli.command, cli::Command::Agent(_)));
    // A multi-thread runtime even with one worker: with the current-thread runtime the loopback
    // pair moved about 30% fewer bytes (bench/README.md), as the block_on thread and the worker
    // then share one thread's I/O polling.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Agent(args) => run_agent::run(args).await,
            cli::Command::CheckConfig(args) => run_agent::check(args).await,
            cli::Command::Server(args) => server_cmd::run(args).await,
            cli::Command::Quickstart(args) => quickstart::run(args).await,
            cli::Command::Pki(args) => pki::run(args),
            cli::Command::Status(args) => status::run(args).await,
            cli::Command::Selftest(args) => status::selftest(args).await,
            cli::Command::Audit(args) => audit_cmd::run(args).await,
            cli::Command::Capture(cmd) => capture_cmd::run(cmd).await,
            cli::Command::Evidence(cmd) => evidence_cmd::verify(cmd),
            cli::Command::Completions { shell } => {
                cli::completions(shell);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<exit::ConfigProblem>().is_some() {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            };
            // The audit's report already said what is plaintext; only the exit code is left to give.
            if e.downcast_ref::<audit_cmd::Flagged>().is_none() {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
