//! The command line. Every subcommand's options also read `TAPPROOF_*` environment variables.

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tapproof",
    version,
    about = "Tap-proof server-to-server links: mutual-TLS 1.3 tunnels with SPIFFE identities",
    long_about = "tapproof carries TCP between services over mutually authenticated TLS 1.3 \
(post-quantum hybrid key exchange preferred), many connections multiplexed over pooled \
long-lived tunnels, with every peer's SPIFFE identity checked against policy. It never falls back \
to plaintext.\n\nStart with `tapproof quickstart` for a complete local demo.",
    after_help = "Exit codes: 0 success; 1 runtime failure; 2 bad configuration, identity files or usage.\n\
Logs go to stderr; RUST_LOG-style filters in --log-level / TAPPROOF_LOG."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "TAPPROOF_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `tapproof_agent=debug,info`.
    #[arg(long, global = true, default_value = "info", env = "TAPPROOF_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent: outbound and inbound mTLS tunnels, as the config file says.
    Agent(AgentArgs),
    /// Check a config file and the identity files it names, then exit (0 when usable).
    CheckConfig(ConfigArgs),
    /// A complete local demo: throw-away CA, two agents, traffic through the encrypted tunnel.
    Quickstart(QuickstartArgs),
    /// Mint a throw-away CA and node identities into a directory (demos, benchmarks, tests).
    Pki(PkiArgs),
    /// Show a running agent's identity, listeners and tunnels (reads its admin endpoint).
    Status(StatusArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Helpers for tests and benchmarks.
    #[command(hide = true)]
    Dev(DevArgs),
}

#[derive(Args)]
pub struct ConfigArgs {
    /// The agent's TOML config file.
    #[arg(long, short, env = "TAPPROOF_CONFIG")]
    pub config: PathBuf,
}

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Override `admin.listen`.
    #[arg(long, env = "TAPPROOF_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Override `tunnel.listen`.
    #[arg(long, env = "TAPPROOF_TUNNEL_LISTEN")]
    pub tunnel_listen: Option<SocketAddr>,
    /// Override `tunnel.require_post_quantum` (true: refuse handshakes without X25519MLKEM768).
    #[arg(long, env = "TAPPROOF_REQUIRE_POST_QUANTUM")]
    pub require_post_quantum: Option<bool>,
    /// Once every listener is bound, write the bound addresses here as JSON (for supervisors
    /// and tests that use port 0).
    #[arg(long, env = "TAPPROOF_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct QuickstartArgs {
    /// Keep the demo's directory (certificates, configs, logs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Number of concurrent app connections to send through the tunnel.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
}

#[derive(Args)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Mint a root CA and one identity per `--node` (and per `--service`).
    Mint {
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        /// Directory to write into (created; files are 0600 for keys).
        #[arg(long)]
        out: PathBuf,
        /// Node names: each gets spiffe://<td>/node/<name> in <name>.pem / <name>.key.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Leaf lifetime, e.g. 24h, 10m.
        #[arg(long, default_value = "24h")]
        lifetime: humantime_arg::Duration,
    },
}

#[derive(Args)]
pub struct StatusArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:15000", env = "TAPPROOF_ADMIN")]
    pub admin: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: DevCommand,
}

#[derive(Subcommand)]
pub enum DevCommand {
    /// Echo every byte back on each connection; half-close aware.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect, send `--data`, half-close, print what came back.
    Send {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        data: String,
    },
}

pub mod humantime_arg {
    /// A clap value parsed with humantime ("30s", "24h").
    #[derive(Debug, Clone, Copy)]
    pub struct Duration(pub std::time::Duration);

    impl std::str::FromStr for Duration {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, Self::Err> {
            humantime::parse_duration(s)
                .map(Duration)
                .map_err(|e| format!("{e} (e.g. 30s, 10m, 24h)"))
        }
    }
}

pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "tapproof", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
