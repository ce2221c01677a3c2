//! `tapproof`: one binary for the agent, the demo, and (later) the control plane and audit.
//! This file only parses the command line and sets up logging; each subcommand lives in its own
//! module.

mod cli;
mod dev;
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

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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
            cli::Command::Completions { shell } => {
                cli::completions(shell);
                Ok(())
            }
            cli::Command::Dev(args) => dev::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<run_agent::ConfigProblem>().is_some() {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            };
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}
