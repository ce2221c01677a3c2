//! `tapproof quickstart`: the README's first command, the whole story on the embedded default. A
//! control-plane server on SQLite in a temp dir, two agents (real child processes of this binary)
//! that join with single-use tokens, a plaintext echo service behind one of them, traffic through
//! the encrypted tunnel while 30-second certificates rotate, and a report of what it saw.

use crate::cli::QuickstartArgs;
use crate::status::admin_get;
use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::RngCore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tapproof_identity::TrustDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const TRUST_DOMAIN: &str = "quickstart.example";
const BULK_BYTES: usize = 16 * 1024 * 1024;
const SMALL_BYTES: usize = 64 * 1024;

struct Agent {
    name: &'static str,
    child: Child,
    log: PathBuf,
    ready: Value,
}

impl Agent {
    async fn start(name: &'static str, config: &Path, dir: &Path) -> anyhow::Result<Self> {
        let args = ["agent".as_ref(), "--config".as_ref(), config.as_os_str()];
        Self::spawn(name, &args, dir).await
    }

    /// Starts `tapproof <args> --ready-file <dir>/<name>.ready.json` and waits for the file.
    async fn spawn(name: &'static str, args: &[&std::ffi::OsStr], dir: &Path) -> anyhow::Result<Self> {
        let ready_file = dir.join(format!("{name}.ready.json"));
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)?;
        let exe = std::env::current_exe().context("cannot find this binary to start the agents")?;
        let mut child = Command::new(exe)
            .args(args)
            .arg("--ready-file")
            .arg(&ready_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start agent {name}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                let ready: Value = serde_json::from_str(&text)?;
                return Ok(Self {
                    name,
                    child,
                    log,
                    ready,
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "agent {name} exited with {status}; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {name} did not become ready in 20 s; its log is {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addr(&self, pointer: &str) -> anyhow::Result<SocketAddr> {
        self.ready
            .pointer(pointer)
            .and_then(Value::as_str)
            .context("ready file lacks an address")?
            .parse()
            .context("ready file holds a bad address")
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM).context("cannot signal agent")?;
        }
        let status = tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .context("agent did not exit after SIGTERM")??;
        if !status.success() {
            bail!(
                "agent {} exited with {status}; its log is {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }
}

/// Issues an admin identity and starts `tapproof server dashboard` with it; returns the process
/// (killed on drop) and the URL it printed.
async fn dashboard(data: &Path, server: SocketAddr, dir: &Path) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let admin = dir.join("admin");
    let status = Command::new(&exe)
        .args([
            "--log-level",
            "warn",
            "server",
            "admin-cert",
            "--name",
            "quickstart",
            "--data-dir",
        ])
        .arg(data)
        .arg("--out")
        .arg(&admin)
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("cannot issue the demo's admin identity ({status})");
    }
    let mut child = Command::new(&exe)
        .args([
            "--log-level",
            "warn",
            "server",
            "dashboard",
            "--listen",
            "127.0.0.1:0",
            "--server",
        ])
        .arg(server.to_string())
        .arg("--admin-dir")
        .arg(&admin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the dashboard")?;
    let stdout = child.stdout.take().context("dashboard stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(stdout), &mut line),
    )
    .await
    .context("the dashboard did not start in 20 s")??;
    let url = line
        .trim()
        .strip_prefix("dashboard: ")
        .with_context(|| format!("the dashboard printed {line:?}"))?
        .to_owned();
    Ok((child, url))
}

/// Step 8: the fleet's coverage as the server holds it, and this host's own audit, with db-1
/// (whose admin API is `agent_admin`) vouching for its sockets as `tapproof audit` would ask it.
async fn coverage(dashboard_url: &str, agent_admin: SocketAddr) -> anyhow::Result<()> {
    let addr: SocketAddr = dashboard_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .context("dashboard URL")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let fleet: Value = loop {
        let v: Value = serde_json::from_str(&admin_get(addr, "/v1/dashboard").await?)?;
        if v["fleet"]["nodes_reporting"].as_u64() >= Some(2) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let f = &fleet["fleet"];
    println!("\n8. Coverage, as the agents reported it to the server (fleet dashboard {dashboard_url}):");
    let coverage = if f["links"].as_i64().unwrap_or(0) == 0 {
        "no links between hosts seen yet".to_owned()
    } else {
        format!(
            "{:.1}% of {} links between hosts encrypted ({} plaintext)",
            f["coverage_percent"].as_f64().unwrap_or(0.0),
            f["links"],
            f["plaintext"]
        )
    };
    println!(
        "     fleet: {coverage}; {} of {} nodes reporting",
        f["nodes_reporting"], f["nodes"]
    );
    for n in fleet["nodes"].as_array().into_iter().flatten() {
        println!(
            "     {:<6} {}  coverage {}  plaintext links {}",
            n["name"].as_str().unwrap_or("?"),
            n["spiffe_id"].as_str().unwrap_or("?"),
            n["coverage_percent"]
                .as_f64()
                .map_or("-".into(), |c| format!("{c:.1}%")),
            n["plaintext"]
        );
    }
    println!("   (The demo runs on loopback, so its tunnel is not a link between hosts; on real hosts every");
    println!("   link appears here, classed tapproof, TLS or PLAINTEXT.) This host, by `tapproof audit`:");
    let scan = tokio::task::spawn_blocking(|| tapproof_audit::scan::scan(Path::new("/proc"))).await?;
    let agent = match tapproof_agent::vouch::ask(agent_admin, Duration::from_secs(3)).await {
        Ok(sockets) => tapproof_audit::AgentView::Vouched(sockets),
        Err(e) => tapproof_audit::AgentView::Unavailable(format!("db-1's admin API at {agent_admin}: {e}")),
    };
    let options = tapproof_audit::Options {
        agent,
        ..Default::default()
    };
    let report = tapproof_audit::classify(&scan, &options, tapproof_audit::hostname(), tapproof_audit::now());
    for line in tapproof_audit::render(&report).lines() {
        println!("     {line}");
    }
    Ok(())
}

/// One app connection: send `payload`, half-close, read the echo, compare digests.
async fn round_trip(addr: SocketAddr, payload: Vec<u8>) -> anyhow::Result<usize> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut r, mut w) = tcp.into_split();
    let want = Sha256::digest(&payload);
    let len = payload.len();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).await?;
    writer.await??;
    if back.len() != len || Sha256::digest(&back) != want {
        bail!("echo mismatch: sent {len} bytes, got {} back", back.len());
    }
    Ok(len)
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    rand::rng().fill_bytes(&mut v);
    v
}

pub async fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("tapproof-quickstart-")
        .tempdir()?;
    let dir = tmp.path().to_owned();
    let td = TrustDomain::new(TRUST_DOMAIN).expect("constant trust domain is valid");
    println!("tapproof quickstart: a control plane and two agents on loopback, one encrypted tunnel\n");

    let data = dir.join("server");
    let report = tapproof_server::init(td.clone(), &data, None, None).await?;
    let root_sha: String = report.root_pin.iter().map(|b| format!("{b:02x}")).collect();
    println!("1. Control plane initialised on SQLite ({}):", report.store);
    println!(
        "     root and intermediate CA for spiffe://{TRUST_DOMAIN}, CA keys sealed with a key-encryption key"
    );
    println!("     root SHA-256 {root_sha}");
    let server = Agent::spawn(
        "server",
        &[
            "server".as_ref(),
            "run".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--leaf-ttl".as_ref(),
            LEAF_TTL.as_ref(),
            "--admin-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
        ],
        &dir,
    )
    .await?;
    let server_addr = server.addr("/listen")?;
    println!("   Server listening on {server_addr} (TLS 1.3), issuing {LEAF_TTL} certificates renewed at half-life.");

    let (_, store) = tapproof_server::open_store(&data, None).await?;
    let ttl = std::time::Duration::from_secs(600);
    let db_token =
        tapproof_server::create_token(&*store, &td, server_addr.to_string(), "db-1", &["db".into()], ttl)
            .await?;
    let web_token =
        tapproof_server::create_token(&*store, &td, server_addr.to_string(), "web-1", &[], ttl).await?;
    println!("2. Created two single-use join tokens (the server keeps only their hashes).");

    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(demo_service(echo));
    println!("3. Started a plaintext demo service (echo) on {echo_addr}, standing in for a database.");

    let d = dir.display();
    let db_config = dir.join("db-1.toml");
    std::fs::write(&db_config, format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\n[control]\ndata_dir = \"{d}/db-1\"\ntoken = \"{db_token}\"\nreload_interval = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n\
         [[inbound]]\nservice = \"db\"\nforward = \"{echo_addr}\"\nallow = [\"spiffe://{TRUST_DOMAIN}/node/web-1\"]\n"))?;
    let db = Agent::start("db-1", &db_config, &dir).await?;
    let tunnel = db.addr("/tunnel")?;
    let web_config = dir.join("web-1.toml");
    std::fs::write(&web_config, format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\n[control]\ndata_dir = \"{d}/web-1\"\ntoken = \"{web_token}\"\nreload_interval = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\ndrain_timeout = \"5s\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\npeers = [\"{tunnel}\"]\nserver_id = \"spiffe://{TRUST_DOMAIN}/node/db-1\"\n"))?;
    let web = Agent::start("web-1", &web_config, &dir).await?;
    let outbound = web.addr("/outbound/0/listen")?;
    println!("4. Agents joined: each made its key locally, sent a CSR with its token (trusting the server");
    println!("   through the root pin in the token) and got its identity:");
    println!("     db-1  spiffe://{TRUST_DOMAIN}/node/db-1   tunnel {tunnel}, serves \"db\" -> {echo_addr}, allows only web-1");
    println!("     web-1 spiffe://{TRUST_DOMAIN}/node/web-1  apps connect in plaintext to {outbound}");
    let (dashboard, dashboard_url) = dashboard(&data, server_addr, &dir).await?;
    println!("   Each agent audits its host and reports its coverage; the fleet dashboard, served with an");
    println!("   admin identity issued for this demo, is at {dashboard_url} while the demo runs.");

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        tasks.push(tokio::spawn(round_trip(outbound, random(SMALL_BYTES))));
    }
    tasks.push(tokio::spawn(round_trip(outbound, random(BULK_BYTES))));
    let mut total = 0;
    for t in tasks {
        total += t.await?.context("an app connection through the tunnel failed")?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("5. Sent {} app connections through web-1 -> db-1 ({} x 64 KiB and one 16 MiB), every byte echoed and checked",
             args.connections + 1, args.connections);
    println!(
        "   by SHA-256: {:.1} MiB each way in {:.2} s.",
        total as f64 / 1048576.0,
        secs
    );

    let web_admin = web.addr("/admin")?;
    let db_admin = db.addr("/admin")?;
    let first_serial = serial(web_admin).await?;
    println!("6. Sending four requests a second while both agents renew their {LEAF_TTL} certificates ...");
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut ok, mut failed) = (0u32, 0u32);
    while renewals(web_admin).await? < 1.0 || renewals(db_admin).await? < 1.0 {
        if Instant::now() > deadline {
            bail!("no renewal within 90 s; logs are in {}", dir.display());
        }
        match round_trip(outbound, random(1024)).await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let second_serial = serial(web_admin).await?;
    println!(
        "   Both renewed (web-1 serial {} -> {}) while {ok} requests went through, {failed} failed.",
        short(&first_serial),
        short(&second_serial)
    );
    if failed > 0 {
        bail!("{failed} requests failed during rotation");
    }

    let web_status: Value = serde_json::from_str(&admin_get(web_admin, "/v1/status").await?)?;
    let db_status: Value = serde_json::from_str(&admin_get(db_admin, "/v1/status").await?)?;
    let t = web_status["tunnels"].get(0).cloned().unwrap_or(Value::Null);
    let inbound = db_status["tunnels"].get(0).cloned().unwrap_or(Value::Null);
    println!("\n7. What crossed the link (from the agents' /v1/status):");
    println!(
        "     web-1 proved          {}",
        inbound["peer_id"].as_str().unwrap_or("?")
    );
    println!(
        "     db-1 proved           {}",
        t["peer_id"].as_str().unwrap_or("?")
    );
    println!(
        "     TLS version           {}",
        t["tls_version"].as_str().unwrap_or("?")
    );
    println!(
        "     cipher                {}",
        t["cipher"].as_str().unwrap_or("?")
    );
    println!(
        "     key exchange          {} (post-quantum hybrid)",
        t["key_exchange"].as_str().unwrap_or("?")
    );
    println!(
        "     TLS connections       {} open now (tunnels are re-made when a certificate they used expires)",
        web_status["tunnels"].as_array().map(|a| a.len()).unwrap_or(0)
    );
    println!(
        "     streams on it         {} (one per app connection)",
        t["streams_total"]
    );
    println!("     bytes app -> tunnel   {}", t["bytes_app_to_tunnel"]);
    println!("     bytes tunnel -> app   {}", t["bytes_tunnel_to_app"]);
    if t["key_exchange"].as_str() != Some(tapproof_tls::POST_QUANTUM_GROUP)
        || t["tls_version"].as_str() != Some("TLSv1.3")
    {
        bail!(
            "the tunnel did not negotiate TLS 1.3 with {}",
            tapproof_tls::POST_QUANTUM_GROUP
        );
    }

    coverage(&dashboard_url, db_admin).await?;
    if args.keep_running {
        println!("\n   Everything keeps running (dashboard {dashboard_url}); Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(dashboard);
    web.stop().await?;
    db.stop().await?;
    server.stop().await?;
    let rows = match tapproof_server::verify_audit(&*store).await? {
        Ok(rows) => rows,
        Err(problems) => bail!(
            "the audit log does not verify: {}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    println!("\n9. Stopped the agents and the server with SIGTERM (they drained and exited 0).");
    println!("   Audit log: {rows} rows (CA init, tokens, joins, renewals), hash chain verified.");
    evidence(&*store, &td, &data, &dir).await?;
    if args.keep {
        let kept = tmp.keep();
        println!(
            "   Kept the server data, agent data dirs, configs and logs in {}",
            kept.display()
        );
    }
    println!("\nNext: README.md walks through a two-host install; `tapproof --help` lists every command.");
    Ok(())
}

const LEAF_TTL: &str = "30s";

/// Step 10: the evidence an auditor would get for this demo, exported, signed and verified.
async fn evidence(
    store: &dyn tapproof_store::Store,
    td: &TrustDomain,
    data: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    use tapproof_server::evidence;
    let kek = tapproof_server::kek::Kek::load(&tapproof_server::default_kek_file(data))?;
    let ca = tapproof_server::Ca::load(store, &kek, td).await?;
    let now = tapproof_identity::when::now();
    let export = evidence::export(store, &ca, evidence::Period { from: 0, to: now + 1 }, now).await?;
    let file = dir.join("evidence.json");
    tapproof_tls::write_identity_file(&file, &export.file, 0o600)?;
    tapproof_tls::write_identity_file(&file.with_extension("html"), export.html.as_bytes(), 0o600)?;
    let checks = evidence::verify(&export.file, Some(&ca.bundle.concat()));
    if let Some(failed) = checks.iter().find(|c| !c.ok) {
        bail!(
            "the demo's evidence export does not verify: {}: {}",
            failed.check,
            failed.detail
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&export.file)?;
    let h = &doc["content"]["sections"]["handshake_summary"];
    println!(
        "\n10. Evidence for an auditor: {} bytes, signed by spiffe://{TRUST_DOMAIN}/server/evidence, holding {} handshake",
        export.file.len(),
        h["total"]
    );
    println!(
        "    records ({} accepted, post-quantum on {} %), the key inventory, the audit log and a control mapping;",
        h["ok"], h["post_quantum_percent"]
    );
    println!(
        "    all {} checks of `tapproof evidence verify` hold (with --keep: {} and its .html report).",
        checks.len(),
        file.display()
    );
    Ok(())
}

async fn renewals(admin: SocketAddr) -> anyhow::Result<f64> {
    let text = admin_get(admin, "/metrics").await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("tapproof_renewals_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

async fn serial(admin: SocketAddr) -> anyhow::Result<String> {
    let status: Value = serde_json::from_str(&admin_get(admin, "/v1/status").await?)?;
    Ok(status["certificate"]["serial"].as_str().unwrap_or("?").to_owned())
}

fn short(serial: &str) -> &str {
    &serial[..serial.len().min(8)]
}

/// The demo's plaintext service: echoes each connection until the client half-closes, then
/// closes its own side (so the demo's checksums see every byte come back).
async fn demo_service(listener: TcpListener) {
    use tokio::io::AsyncWriteExt;
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}
