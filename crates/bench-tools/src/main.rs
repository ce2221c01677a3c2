//! `tapproof-bench`: the test and benchmark helpers that must not ship in the product binary.
//! A half-close-aware echo server and one-shot clients for tests inside network namespaces, the
//! plain TCP relay bench/ chains as the no-TLS floor, and the load generators of bench/
//! (handshakes in memory, signings and state-feed long-polls against a running server). Not
//! installed with tapproof (`publish = false`).

mod dev;
mod loadgen;

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tapproof-bench",
    version,
    about = "Test and benchmark helpers for tapproof (not part of the product)"
)]
struct Cli {
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: DevCommand,
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
    /// Connect, send `--data`, read the echo, print "held", then keep the connection open until
    /// killed (an established link for the audit's tests).
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "hello")]
        data: String,
    },
    /// Benchmark floor: a plaintext TCP relay (no TLS, no HTTP/2, one upstream connection per
    /// app connection). Two of them in a chain cost what any two-hop proxy pair must pay.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Benchmark: full mTLS 1.3 handshakes (no resumption), both ends in this process, in memory.
    Handshakes {
        /// A `tapproof pki mint --node server --node client` directory.
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// `default` or `cnsa2` (the pki must then be `pki mint --profile cnsa2`).
        #[arg(long, default_value = "default", value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<tapproof_tls::CryptoProfile>()))]
        profile: tapproof_tls::CryptoProfile,
    },
    /// Benchmark: certificate signings per second against a running server, as a joined node.
    SignLoad {
        #[command(flatten)]
        node: LoadNodeArgs,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Benchmark: many simulated agents long-polling the state feed; runs `--then` once all wait
    /// and reports when each agent saw a new revocation.
    FeedLoad {
        #[command(flatten)]
        node: LoadNodeArgs,
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Command (and arguments) that makes the revocation.
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        then: Vec<String>,
    },
}

/// The node a load generator acts as: a joined agent's control data dir.
#[derive(Args)]
pub struct LoadNodeArgs {
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub trust_domain: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cli.threads > 0 {
        builder.worker_threads(cli.threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dev::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
