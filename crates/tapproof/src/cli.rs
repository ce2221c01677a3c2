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
    /// Runtime worker threads; 0: for the agent one per four cores (at least 1, at most 8), which
    /// leaves the cores to the services it carries (one thread moves about 1 GB/s); for the
    /// server and the other commands one per core.
    #[arg(long, global = true, default_value_t = 0, env = "TAPPROOF_THREADS")]
    pub threads: usize,
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
    #[command(
        after_help = "Example:\n  tapproof agent --config /etc/tapproof/agent.toml\n  kill -HUP $(pidof tapproof)    # re-read the config; SIGTERM drains and stops"
    )]
    Agent(AgentArgs),
    /// Run or administer the control plane: CA, join tokens, signing, audit log.
    Server(ServerArgs),
    /// Check a config file and the identity files it names, then exit (0 when usable).
    #[command(after_help = "Example:\n  tapproof check-config --config /etc/tapproof/agent.toml")]
    CheckConfig(ConfigArgs),
    /// A complete local demo: throw-away CA, two agents, traffic through the encrypted tunnel.
    #[command(after_help = "Example:\n  tapproof quickstart --keep-running")]
    Quickstart(QuickstartArgs),
    /// Mint a throw-away CA and node identities into a directory (demos, benchmarks, tests).
    Pki(PkiArgs),
    /// Show a running agent's identity, listeners and tunnels (reads its admin endpoint).
    #[command(after_help = "Example:\n  tapproof status --admin 127.0.0.1:15000")]
    Status(StatusArgs),
    /// Run a running agent's self-test now: connections to its own tunnel listener that must
    /// fail (plaintext, TLS 1.2, no client certificate, a foreign CA, a wrong identity, a
    /// classical-only key exchange where post-quantum is required). Exit code 1 when one was
    /// accepted.
    #[command(after_help = "Example:\n  tapproof selftest --admin 127.0.0.1:15000")]
    Selftest(StatusArgs),
    /// Which TCP links of this host are encrypted, and which are plaintext. Exit code 1 when a
    /// link is plaintext (and not an accepted exception): a deploy gate.
    #[command(after_help = "Example:\n  tapproof audit --config /etc/tapproof/agent.toml --probe")]
    Audit(AuditArgs),
    /// Transparent capture and inbound enforcement: the nftables rules in force, and their
    /// explicit removal (the agent never removes them: they fail closed while it is down).
    #[command(
        subcommand,
        after_help = "Example:\n  tapproof capture status\n  tapproof capture remove --config /etc/tapproof/agent.toml --reason \"decommissioned\""
    )]
    Capture(CaptureCommand),
    /// Evidence exports (`tapproof server evidence export`): check one offline.
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// Print shell completions.
    #[command(after_help = "Example:\n  tapproof completions bash > /etc/bash_completion.d/tapproof")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Subcommand)]
pub enum EvidenceCommand {
    /// Check an evidence export offline: its signature (a key of the control plane chaining to
    /// the bundle), every section's hash, the audit-log chain and the record counts. Exit code 0
    /// only when everything checks, 1 otherwise, naming what failed.
    #[command(after_help = "Example:\n  tapproof evidence verify evidence-2026-q4.json --bundle bundle.pem")]
    Verify {
        /// The export (`tapproof server evidence export --out`).
        file: PathBuf,
        /// The trust domain's bundle (PEM roots), obtained independently of the file (an agent's
        /// bundle.pem, `GET /v1/bundle`). Without it, the roots listed in the export are used,
        /// which shows the file is consistent, not who made it.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// One JSON document with every check instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum CaptureCommand {
    /// Print the rules in force (table inet tapproof, read from the kernel) and their counters.
    /// Exit code 1 when there is no such table.
    #[command(after_help = "Example:\n  tapproof capture status\n  tapproof capture status --json")]
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete the table inet tapproof: captured destinations are then dialled in plaintext and
    /// inbound ports are open to the network again. Logged with who ran it; with a config that
    /// has [control], first recorded in the control plane's audit log (capture.removed, the node
    /// as actor) and refused when that fails, unless --force. Refused while the agent answers on
    /// its admin address (it would install the rules again): stop it first.
    #[command(
        after_help = "Example:\n  systemctl stop tapproof-agent && tapproof capture remove --config /etc/tapproof/agent.toml --reason \"decommissioning db-1\""
    )]
    Remove {
        /// The agent's config: where its admin endpoint is (default 127.0.0.1:15000) and, with
        /// [control], the node identity that records the removal on the control plane.
        #[arg(long, short, env = "TAPPROOF_CONFIG")]
        config: Option<PathBuf>,
        /// The reason, recorded with the removal.
        #[arg(long)]
        reason: Option<String>,
        /// Remove the rules even when the control plane cannot record it (the local log still
        /// says who).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct AuditArgs {
    /// The agent's config: its [audit] allow-list, outbound listeners and forward targets.
    #[arg(long, short, env = "TAPPROOF_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Connect to the listening side of each link that is not tapproof's and offer TLS: reports
    /// version, cipher, group and certificate, and tells other TLS from plaintext.
    #[arg(long)]
    pub probe: bool,
    /// How long a probe waits to connect and again for an answer.
    #[arg(long, default_value = "2s")]
    pub probe_timeout: humantime_arg::Duration,
    /// Count links on loopback too (demos, single-host tests).
    #[arg(long)]
    pub include_loopback: bool,
    /// Also exit 1 when a listening socket is reachable from the network without tapproof.
    #[arg(long)]
    pub strict: bool,
    /// The running agent's admin address, asked which sockets it vouches for (only those count
    /// as through tapproof) [default: the config's admin.listen, else 127.0.0.1:15000].
    #[arg(long, env = "TAPPROOF_AGENT", value_name = "ADDR")]
    pub agent: Option<std::net::SocketAddr>,
    /// Where procfs is mounted.
    #[arg(long, default_value = "/proc", hide = true)]
    pub proc_root: PathBuf,
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
    /// At the end, keep the server, the agents and the dashboard running until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Args)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Mint a root CA and one node identity per `--node`, with the bundle (throw-away PKI).
    #[command(
        after_help = "Example:\n  tapproof pki mint --out /tmp/pki --node web-1 --node db-1\n  # then [identity] cert = \"/tmp/pki/web-1.pem\", key = \"/tmp/pki/web-1.key\", bundle = \"/tmp/pki/bundle.pem\""
    )]
    Mint {
        /// The SPIFFE trust domain of the CA and every identity.
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
        /// Crypto profile of the keys: `default` (ECDSA P-256) or `cnsa2` (ML-DSA-87 root,
        /// intermediate and leaves, for agents with `[tunnel] crypto_profile = "cnsa2"`).
        #[arg(long, default_value = "default", value_parser = crypto_profile)]
        profile: tapproof_tls::CryptoProfile,
    },
}

#[derive(Args)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub command: ServerCommand,
}

#[derive(Args, Clone)]
pub struct ServerStoreArgs {
    /// The server's data directory (server.json, the SQLite store, the key-encryption key).
    #[arg(long, env = "TAPPROOF_DATA_DIR", default_value = "/var/lib/tapproof/server")]
    pub data_dir: PathBuf,
    /// Store URL: `sqlite:PATH` or `postgres://user:password@host/db` (default: what init chose).
    #[arg(long, env = "TAPPROOF_STORE")]
    pub store: Option<String>,
}

/// Run an admin command against a running server over mTLS instead of the local store.
#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// The server's address (host:port); with --admin-dir.
    #[arg(long = "server", env = "TAPPROOF_SERVER", requires = "admin_dir")]
    pub server: Option<String>,
    /// A directory from `tapproof server admin-cert` (admin.pem, admin.key, bundle.pem).
    #[arg(long, env = "TAPPROOF_ADMIN_DIR")]
    pub admin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ServerCommand {
    /// Create the root and intermediate CA of a trust domain (once).
    #[command(
        after_help = "Example:\n  runuser -u tapproof -- tapproof server init --trust-domain example.org --data-dir /var/lib/tapproof/server"
    )]
    Init {
        /// The SPIFFE trust domain (e.g. example.org): every identity is spiffe://<it>/...
        #[arg(long, env = "TAPPROOF_TRUST_DOMAIN")]
        trust_domain: String,
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Key-encryption key file (32 bytes or 64 hex chars, 0600); created if missing.
        /// TAPPROOF_KEK (hex) takes precedence. Default: <data-dir>/kek.key.
        #[arg(long, env = "TAPPROOF_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// Crypto profile of the CA: `default` (ECDSA P-256 root and intermediate) or `cnsa2`
        /// (ML-DSA-87 root and intermediate; agents then run `[tunnel] crypto_profile = "cnsa2"`).
        #[arg(long, default_value = "default", value_parser = crypto_profile)]
        profile: tapproof_tls::CryptoProfile,
    },
    /// Serve the HTTPS API (mTLS) and the admin endpoint (metrics, health, readiness).
    #[command(
        after_help = "Example:\n  tapproof server run --data-dir /var/lib/tapproof/server --listen 0.0.0.0:15443 --admin-listen 127.0.0.1:15001"
    )]
    Run {
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Where the HTTPS API (mTLS) listens.
        #[arg(long, env = "TAPPROOF_SERVER_LISTEN", default_value = "0.0.0.0:15443")]
        listen: SocketAddr,
        /// Where the admin endpoint listens: plain HTTP with /metrics, /healthz and /readyz
        /// (keep it on loopback or a management network; port 0 picks a free port).
        #[arg(long, env = "TAPPROOF_SERVER_ADMIN_LISTEN", default_value = "127.0.0.1:15001")]
        admin_listen: SocketAddr,
        /// Key-encryption key file (32 bytes or 64 hex chars, 0600). TAPPROOF_KEK (hex) takes
        /// precedence. Default: <data-dir>/kek.key.
        #[arg(long, env = "TAPPROOF_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// Lifetime of issued leaf certificates (at least 30s); agents renew at half-life.
        #[arg(long, env = "TAPPROOF_LEAF_TTL", default_value = "1h")]
        leaf_ttl: humantime_arg::Duration,
        /// Write `{"listen": ADDR, "admin": ADDR}` here once both are bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Roll the root over automatically once the signing root is this old (e.g. 180d);
        /// off unless given.
        #[arg(long, env = "TAPPROOF_ROOT_MAX_AGE")]
        root_max_age: Option<humantime_arg::Duration>,
        /// With --root-max-age: how long a prepared root waits (in every bundle) before it signs.
        #[arg(long, env = "TAPPROOF_ROLLOVER_PROPAGATION", default_value = "1h")]
        rollover_propagation: humantime_arg::Duration,
        /// How long agents' handshake records are kept (the evidence export's history).
        #[arg(long, env = "TAPPROOF_HANDSHAKE_RETENTION", default_value = "400d")]
        handshake_retention: humantime_arg::Duration,
        /// How often the control plane probes every agent's tunnel listener with certificates
        /// it must refuse (expired, revoked); the first round one interval after start. 0s: never.
        #[arg(long, env = "TAPPROOF_PROBE_INTERVAL", default_value = "1h")]
        probe_interval: humantime_arg::Duration,
        #[command(flatten)]
        limits: ServerLimitArgs,
    },
    /// Issue an admin identity (spiffe://<td>/admin/<name>) for the admin commands' --admin-dir.
    #[command(
        after_help = "Example:\n  runuser -u tapproof -- tapproof server admin-cert --name alice --out /tmp/alice --ttl 8h"
    )]
    AdminCert {
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Key-encryption key file; TAPPROOF_KEK (hex) takes precedence. Default: <data-dir>/kek.key.
        #[arg(long, env = "TAPPROOF_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// The admin's name: the identity is spiffe://<td>/admin/<name>.
        #[arg(long)]
        name: String,
        /// Where to write admin.pem, admin.key (0600) and bundle.pem.
        #[arg(long)]
        out: PathBuf,
        /// How long the identity is valid.
        #[arg(long, default_value = "24h")]
        ttl: humantime_arg::Duration,
    },
    /// Revoke a node, a SPIFFE ID or a certificate serial: agents close its tunnels within seconds.
    #[command(
        after_help = "Example:\n  tapproof server revoke --node db-1 --reason \"host decommissioned\"\n  tapproof server revoke --serial 36AF8058... --server 10.0.0.1:15443 --admin-dir ~/alice"
    )]
    Revoke {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// A node name.
        #[arg(long, group = "what")]
        node: Option<String>,
        /// A SPIFFE ID.
        #[arg(long, group = "what")]
        id: Option<String>,
        /// A certificate serial (hex, as `tapproof status` prints it).
        #[arg(long, group = "what")]
        serial: Option<String>,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
    },
    /// Probe every agent's tunnel listener now with certificates it must refuse (one that
    /// expired, one whose identity is revoked); recorded in the audit log. Exit code 1 when a
    /// listener accepted one. Runs on the server host (it needs the key-encryption key).
    #[command(after_help = "Example:\n  tapproof server probe --data-dir /var/lib/tapproof-server")]
    Probe {
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Key-encryption key file; TAPPROOF_KEK (hex) takes precedence. Default: <data-dir>/kek.key.
        #[arg(long, env = "TAPPROOF_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// One JSON document per probe instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Agents' tunnel handshake records (both ends, accepted and refused), oldest first.
    #[command(
        after_help = "Example:\n  tapproof server handshakes --from 24h\n  tapproof server handshakes --from 2026-12-01 --to 2026-12-08 --json --server 10.0.0.1:15443 --admin-dir ~/alice"
    )]
    Handshakes {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// From this time: RFC 3339 (2026-12-01T00:00:00Z), a UTC date (2026-12-01), or how long
        /// ago (24h, 7d). Default: the oldest kept.
        #[arg(long, value_parser = when_arg)]
        from: Option<i64>,
        /// Up to (not including) this time, written as --from. Default: now.
        #[arg(long, value_parser = when_arg)]
        to: Option<i64>,
        /// At most this many records (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// One JSON document per record instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Evidence for auditors: one signed file over a period (flows, crypto per node, keys and
    /// certificates, self-tests, handshake records, revocations and their propagation, the audit
    /// log's chain, a control-mapping table) and a printable HTML report.
    Evidence {
        #[command(subcommand)]
        command: ServerEvidenceCommand,
    },
    /// Revocations: how far each one reached (which nodes applied it, when, which not yet).
    Revocation {
        #[command(subcommand)]
        command: RevocationCommand,
    },
    /// Nodes: list them with their certificates' expiry.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Which node may front which service (spiffe://<td>/svc/<service>).
    Registration {
        #[command(subcommand)]
        command: RegistrationCommand,
    },
    /// The policy: which SPIFFE IDs may open which service (agents apply it within seconds).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The certificate authority: root rollover.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Serve the fleet dashboard on this machine's loopback, fetched from the server as the admin
    /// in --admin-dir (mTLS): open the printed URL in a browser.
    #[command(
        after_help = "Example:\n  tapproof server dashboard --server 10.0.0.1:15443 --admin-dir ~/alice"
    )]
    Dashboard {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Where the browser connects; loopback only (the page is served with your admin identity).
        #[arg(long, default_value = "127.0.0.1:15480")]
        listen: SocketAddr,
    },
    /// The tamper-evident audit log.
    AuditLog {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
pub enum ServerEvidenceCommand {
    /// Export the evidence of a period into one signed file (and its HTML report beside it). Runs
    /// on the server host: it signs with a key of the control plane's CA (made for this export,
    /// then dropped), so it needs the key-encryption key.
    #[command(
        after_help = "Example:\n  tapproof server evidence export --data-dir /var/lib/tapproof-server --from 2026-10-01 --to 2027-01-01 --out evidence-2026-q4.json"
    )]
    Export {
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Key-encryption key file; TAPPROOF_KEK (hex) takes precedence. Default: <data-dir>/kek.key.
        #[arg(long, env = "TAPPROOF_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// From this time: RFC 3339, a UTC date (2026-10-01), or how long ago (90d). Default: everything.
        #[arg(long, value_parser = when_arg)]
        from: Option<i64>,
        /// Up to (not including) this time, written as --from. Default: now.
        #[arg(long, value_parser = when_arg)]
        to: Option<i64>,
        /// The export file (written 0600).
        #[arg(long)]
        out: PathBuf,
        /// The HTML report. Default: --out with the extension .html.
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum RevocationCommand {
    /// Every revocation (or one) with when each node applied it (acknowledged through the state
    /// feed), the median and slowest propagation time, and the live nodes that have not yet.
    #[command(
        after_help = "Example:\n  tapproof server revocation show --id 3\n  tapproof server revocation show --json --server 10.0.0.1:15443 --admin-dir ~/alice"
    )]
    Show {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only this revocation (the number `server revoke` printed).
        #[arg(long)]
        id: Option<i64>,
        /// One JSON document per revocation instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Every node, when it was last seen, its newest certificate's expiry, and revocation.
    #[command(
        after_help = "Example:\n  tapproof server node list --server 10.0.0.1:15443 --admin-dir ~/alice"
    )]
    List {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum RegistrationCommand {
    /// Let a node front a service: it gets spiffe://<td>/svc/<service> and the directory lists it.
    #[command(after_help = "Example:\n  tapproof server registration add --node db-2 --service db")]
    Add(RegistrationArgs),
    /// Stop a node fronting a service (it leaves the directory; its service identity is not renewed).
    #[command(after_help = "Example:\n  tapproof server registration remove --node db-2 --service db")]
    Remove(RegistrationArgs),
    /// Every node and the services it fronts.
    #[command(after_help = "Example:\n  tapproof server registration list")]
    List {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Args)]
pub struct RegistrationArgs {
    #[command(flatten)]
    pub store: ServerStoreArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The node's name (as on its join token).
    #[arg(long)]
    pub node: String,
    /// The service's name.
    #[arg(long)]
    pub service: String,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Replace the policy with a TOML file: `[services.db] allow = ["spiffe://td/node/web-1"]`.
    #[command(after_help = "Example:\n  tapproof server policy set --file policy.toml")]
    Set {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// The policy document (TOML).
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the policy (JSON).
    #[command(
        after_help = "Example:\n  tapproof server policy show --server 10.0.0.1:15443 --admin-dir ~/alice"
    )]
    Show {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Root rollover, one step at a time: prepare (new root in every bundle), activate (it signs),
    /// retire (the old root leaves the bundle once what it signed has expired).
    #[command(
        after_help = "Example:\n  runuser -u tapproof -- tapproof server ca rotate prepare\n  # wait until every agent has the new bundle, then:\n  runuser -u tapproof -- tapproof server ca rotate activate"
    )]
    Rotate {
        /// Which step.
        #[arg(value_enum)]
        step: RotateStepArg,
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Key-encryption key file; TAPPROOF_KEK (hex) takes precedence. Default: <data-dir>/kek.key.
        #[arg(long, env = "TAPPROOF_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// retire: even though certificates from before the activation are still valid.
        #[arg(long)]
        force: bool,
        /// prepare: the new root's crypto profile (`default`: ECDSA P-256, `cnsa2`: ML-DSA-87);
        /// without it, the active root's.
        #[arg(long, value_parser = crypto_profile)]
        profile: Option<tapproof_tls::CryptoProfile>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RotateStepArg {
    Prepare,
    Activate,
    Retire,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a single-use join token for a node.
    #[command(
        after_help = "Example:\n  runuser -u tapproof -- tapproof server token create --node db-1 --service db --server 10.0.0.1:15443 > db-1.token\n  runuser -u tapproof -- tapproof server token create --node-pattern 'k8s-*' --uses 20 --ttl 1h --server 10.0.0.1:15443"
    )]
    Create {
        #[command(flatten)]
        store: ServerStoreArgs,
        /// Node name: the agent becomes spiffe://<td>/node/<name> (a single-use token).
        #[arg(
            long,
            required_unless_present = "node_pattern",
            conflicts_with = "node_pattern"
        )]
        node: Option<String>,
        /// A reusable token instead (kubeadm-style, for a DaemonSet or an autoscaling group):
        /// each joining agent names itself (`[control] node`, default its host name) within this
        /// pattern, e.g. `web-*`; a name that already joined is refused. Needs --uses.
        #[arg(long)]
        node_pattern: Option<String>,
        /// With --node-pattern: how many nodes may join with it. Anyone holding the token can
        /// make that many identities until it expires: keep it, the --ttl and the pattern small.
        #[arg(long)]
        uses: Option<u32>,
        /// Services the node(s) may front (repeat): each also gets spiffe://<td>/svc/<service>.
        #[arg(long = "service")]
        services: Vec<String>,
        /// How long the token may be used.
        #[arg(long, default_value = "15m")]
        ttl: humantime_arg::Duration,
        /// The address agents reach this server at (host:port).
        #[arg(long, env = "TAPPROOF_SERVER")]
        server: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: exit 0 when intact, 1 naming every edited, removed or reordered row.
    #[command(
        after_help = "Example:\n  tapproof server audit-log verify --data-dir /var/lib/tapproof/server"
    )]
    Verify {
        #[command(flatten)]
        store: ServerStoreArgs,
    },
    /// Print rows, oldest first.
    #[command(after_help = "Example:\n  tapproof server audit-log show --after 1200 --json")]
    Show {
        #[command(flatten)]
        store: ServerStoreArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Only rows after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// A point in time as an operator writes it, as Unix seconds: RFC 3339 (`2026-12-01T00:00:00Z`),
/// a UTC date (`2026-12-01`, its midnight), or a duration meaning that long ago (`24h`, `7d`).
pub fn when_arg(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .map_err(|_| format!("{text:?} is before 1970"))
    };
    if let Ok(ago) = humantime::parse_duration(text) {
        return unix(std::time::SystemTime::now() - ago);
    }
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    match humantime::parse_rfc3339(&full) {
        Ok(t) => unix(t),
        Err(e) => Err(format!(
            "{text:?}: {e}; write RFC 3339 (2026-12-01T00:00:00Z), a UTC date (2026-12-01) or how long ago (24h, 7d)"
        )),
    }
}

/// A `--profile` value: a crypto profile this build can honour (`fips` is refused here, naming
/// why, for every command that takes one).
fn crypto_profile(text: &str) -> Result<tapproof_tls::CryptoProfile, String> {
    let profile: tapproof_tls::CryptoProfile = text.parse()?;
    profile.available().map_err(str::to_owned)?;
    Ok(profile)
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

/// What one client may cost the control plane (README "Limits").
#[derive(Args, Debug, Clone)]
pub struct ServerLimitArgs {
    /// Connections open at once (capped further by the fd limit, less a reserve of 128).
    #[arg(long, env = "TAPPROOF_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections open at once from one source address (0: no cap).
    #[arg(long, env = "TAPPROOF_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 64)]
    pub max_connections_per_source: usize,
    /// Time a new connection has for its TLS handshake.
    #[arg(long, default_value = "10s")]
    pub handshake_timeout: humantime_arg::Duration,
    /// Time a client has to send a request's headers (HTTP/1.1).
    #[arg(long, default_value = "10s")]
    pub header_read_timeout: humantime_arg::Duration,
    /// Join attempts per source address per minute.
    #[arg(long, env = "TAPPROOF_JOINS_PER_MINUTE", default_value_t = 30)]
    pub joins_per_minute: u32,
    /// Requests per second per client identity (or address without one); 0: no cap.
    #[arg(long, env = "TAPPROOF_REQUESTS_PER_SECOND", default_value_t = 50)]
    pub requests_per_second: u32,
    /// State-feed long-polls one node may hold at once (0: no cap).
    #[arg(long, default_value_t = 4)]
    pub long_polls_per_node: usize,
    /// How long after expiry a node's newest certificate can still renew, so agents recover
    /// from an outage with no new token (0s: never).
    #[arg(long, env = "TAPPROOF_EXPIRED_RENEWAL_WINDOW", default_value = "7d")]
    pub expired_renewal_window: humantime_arg::Duration,
}

impl ServerLimitArgs {
    /// The limits, with the connection cap kept under the process's fd limit.
    pub fn limits(&self, fd_limit: Option<u64>) -> tapproof_server::Limits {
        let by_fds = fd_limit.map_or(usize::MAX, |n| n.saturating_sub(128).max(16) as usize);
        tapproof_server::Limits {
            max_connections: self.max_connections.min(by_fds),
            max_connections_per_source: self.max_connections_per_source,
            handshake_timeout: self.handshake_timeout.0,
            header_read_timeout: self.header_read_timeout.0,
            joins_per_minute: self.joins_per_minute,
            requests_per_second: self.requests_per_second,
            long_polls_per_node: self.long_polls_per_node,
            expired_renewal_window: self.expired_renewal_window.0,
        }
    }
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
    fn times_read_as_operators_write_them() {
        use super::when_arg;
        assert_eq!(when_arg("2026-12-01T00:00:00Z"), Ok(1_796_083_200));
        assert_eq!(when_arg("2026-12-01"), Ok(1_796_083_200));
        let now = tapproof_identity::when::now();
        let ago = when_arg("24h").unwrap();
        assert!((now - 86_400 - ago).abs() <= 2, "{ago}");
        let e = when_arg("yesterday").unwrap_err();
        assert!(e.contains("\"yesterday\"") && e.contains("RFC 3339"), "{e}");
        assert!(when_arg("2026-13-01").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
