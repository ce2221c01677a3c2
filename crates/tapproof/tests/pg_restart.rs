//! Fault case (issue 11): PostgreSQL restarts under two server replicas. The test runs its own
//! PostgreSQL cluster (initdb in a temporary directory, a port of its own, loopback only), so
//! stopping it touches no other test; it stops the cluster and removes it at the end.
//!
//! What the user sees: traffic between agents never stops (certificates are still valid); while
//! the database is down, joins and CLI commands fail with an error that names the store; once it
//! is back, both replicas serve again without a restart, both agents renew, and the audit chain
//! is intact.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tapproof_test_util::process::{run_tapproof, AgentProcess};
use tapproof_test_util::server::{control_section, ServerProcess};
use tapproof_test_util::traffic::{round_trip, EchoServer, Legit};
use tapproof_test_util::{in_ci, is_root};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");
const TD: &str = "example.org";

/// A PostgreSQL cluster of this test's own, run as the `postgres` user.
struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn new() -> Option<Self> {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()?;
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        let dir = tempfile::Builder::new().prefix("tapproof-pg-").tempdir().unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Self { bin, dir, port };
        // Trust authentication: a throw-away cluster on loopback, for this test only.
        c.pg(&[
            "initdb",
            "-D",
            &c.data(),
            "-U",
            "tapproof",
            "-A",
            "trust",
            "--no-sync",
        ]);
        c.start();
        Some(c)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(args[0]))
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log").display().to_string();
        self.pg(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &log,
            "-w",
            "start",
        ]);
    }

    fn stop(&self) {
        self.pg(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://tapproof@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn agent_config(dir: &Path, name: &str, token: &str, server: SocketAddr, body: &str) -> String {
    format!(
        "trust_domain = \"{TD}\"\n{}server = \"{server}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{body}",
        control_section(&dir.join(name), token)
    )
}

fn renewals(a: &AgentProcess) -> f64 {
    a.metric("tapproof_renewals_total", &[])
}

#[test]
fn postgresql_restart_under_two_replicas() {
    if !is_root() || !Path::new("/usr/lib/postgresql").exists() {
        assert!(
            !in_ci(),
            "CI must run the PostgreSQL restart test (root and postgresql)"
        );
        eprintln!("skipped: needs root and Debian's postgresql (scripts/postgres.sh installs it)");
        return;
    }
    let cluster = Cluster::new().expect("a PostgreSQL installation");
    let url = cluster.url();
    let dir = tempfile::Builder::new()
        .prefix("tapproof-pgr-")
        .tempdir()
        .unwrap();
    let (a_dir, b_dir) = tapproof_test_util::server::init_replicas(EXE, dir.path(), TD, &url);
    let start = |data: &Path| ServerProcess::start_with_store(EXE, data, "127.0.0.1:0", "30s", Some(&url));
    let mut a = start(&a_dir);
    let mut b = start(&b_dir);

    // db-1 joins through replica a, web-1 through replica b; web-1 reaches db-1's echo.
    let echo = EchoServer::start();
    let db = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &agent_config(
            dir.path(),
            "db-1",
            &a.token(EXE, "db-1", &["db"], "5m"),
            a.addr,
            &format!(
                "[tunnel]\nlisten = \"127.0.0.1:0\"\n[[inbound]]\nservice = \"db\"\nforward = \"{}\"\nallow = [\"spiffe://{TD}/node/web-1\"]\n",
                echo.addr
            ),
        ),
    );
    let web = AgentProcess::start(
        EXE,
        dir.path(),
        "web-1",
        &agent_config(
            dir.path(),
            "web-1",
            &b.token(EXE, "web-1", &[], "5m"),
            b.addr,
            &format!(
                "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\npeers = [\"{}\"]\nserver_id = \"spiffe://{TD}/node/db-1\"\n",
                db.tunnel()
            ),
        ),
    );
    assert_eq!(round_trip(web.outbound(0), b"before").unwrap(), b"before");
    let legit = Legit::start(web.outbound(0));

    // The database goes away for 12 s: a renewal of each agent (30 s certificates, renewed at
    // about 15 s) falls into it or just after.
    cluster.stop();
    let down = Instant::now();
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "token",
            "create",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--node",
            "late",
            "--store",
            &url,
        ],
    );
    assert_ne!(code, 0, "a token was made with the store down: {out}");
    assert!(
        err.to_lowercase().contains("store") || err.to_lowercase().contains("database"),
        "the error does not name the store: {err}"
    );
    std::thread::sleep(Duration::from_secs(12).saturating_sub(down.elapsed()));
    assert!(
        a.wait_exit(Duration::ZERO).is_none(),
        "replica a exited: {}",
        a.log()
    );
    assert!(
        b.wait_exit(Duration::ZERO).is_none(),
        "replica b exited: {}",
        b.log()
    );
    let (renew_db, renew_web) = (renewals(&db), renewals(&web));
    cluster.start();
    let up = Instant::now();

    // Both replicas serve again: a join through each, then a renewal of each agent.
    let mut joined = Vec::new();
    for (i, server) in [&a, &b].into_iter().enumerate() {
        let name = format!("late-{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = loop {
            let args = [
                "server",
                "token",
                "create",
                "--data-dir",
                server.data_dir.to_str().unwrap(),
                "--node",
                &name,
                "--server",
                &server.addr.to_string(),
                "--store",
                &url,
            ];
            let (code, out, err) = run_tapproof(EXE, &args);
            if code == 0 {
                break out.trim().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no token 30 s after the database returned: {err}"
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        joined.push(AgentProcess::start(
            EXE,
            dir.path(),
            &name,
            &agent_config(dir.path(), &name, &token, server.addr, ""),
        ));
    }
    let first_join = up.elapsed();
    for agent in [&db, &web] {
        agent.wait_for(
            "a renewal after the database returned",
            Duration::from_secs(40),
            |x| renewals(x) > if x.name == "db-1" { renew_db } else { renew_web },
        );
    }
    let renewed = up.elapsed();
    let (ok, failed) = legit.finish();
    assert_eq!(failed, 0, "traffic failed while the database restarted ({ok} ok)");
    for (server, name) in [(&mut a, "a"), (&mut b, "b")] {
        assert!(
            server.wait_exit(Duration::ZERO).is_none(),
            "replica {name} exited: {}",
            server.log()
        );
    }
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "audit-log",
            "verify",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--store",
            &url,
        ],
    );
    assert_eq!(code, 0, "audit chain after the restart: {out}{err}");
    eprintln!(
        "fault: PostgreSQL down 12 s under two replicas -> {ok} requests, 0 failed; joins on both \
         replicas {:.1} s and renewals of both agents {:.1} s after it returned",
        first_join.as_secs_f64(),
        renewed.as_secs_f64()
    );
    let failed_renewals = [&db, &web]
        .iter()
        .filter(|x| x.log().contains("cannot renew"))
        .count();
    eprintln!("agents whose renewal failed while the database was down: {failed_renewals} of 2");
    drop(joined);
}
