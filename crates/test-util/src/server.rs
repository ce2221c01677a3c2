//! A real `tapproof server` process: initialised in a temp dir, started with a ready file, killed
//! by PID when dropped.

use crate::process::run_tapproof;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    child: Child,
    /// `--store` given to every command (PostgreSQL replicas); none for the data dir's SQLite.
    store: Option<String>,
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), on a free loopback port.
    pub admin: SocketAddr,
    log: PathBuf,
}

/// `tapproof server init` into `<dir>/server`.
pub fn init(exe: &str, dir: &Path, trust_domain: &str) -> PathBuf {
    let data_dir = dir.join("server");
    let (code, out, err) = run_tapproof(
        exe,
        &[
            "server",
            "init",
            "--trust-domain",
            trust_domain,
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "server init: {out}{err}");
    data_dir
}

/// Two replicas' data dirs on one PostgreSQL store: `server init --store url` into `<dir>/a`,
/// and `<dir>/b` with the same `server.json` and key-encryption key (as an operator copies them).
pub fn init_replicas(exe: &str, dir: &Path, trust_domain: &str, url: &str) -> (PathBuf, PathBuf) {
    let a = dir.join("a");
    let (code, out, err) = run_tapproof(
        exe,
        &[
            "server",
            "init",
            "--trust-domain",
            trust_domain,
            "--data-dir",
            a.to_str().unwrap(),
            "--store",
            url,
        ],
    );
    assert_eq!(code, 0, "server init --store: {out}{err}");
    let b = dir.join("b");
    std::fs::create_dir_all(&b).unwrap();
    for f in ["server.json", "kek.key"] {
        std::fs::copy(a.join(f), b.join(f)).unwrap();
    }
    (a, b)
}

impl ServerProcess {
    /// Starts `tapproof server run` on `listen` (e.g. `127.0.0.1:0`).
    pub fn start(exe: &str, data_dir: &Path, listen: &str, leaf_ttl: &str) -> Self {
        Self::start_with_store(exe, data_dir, listen, leaf_ttl, None)
    }

    /// Like `start`, against the store at `store`.
    pub fn start_with_store(
        exe: &str,
        data_dir: &Path,
        listen: &str,
        leaf_ttl: &str,
        store: Option<&str>,
    ) -> Self {
        Self::start_with_args(exe, data_dir, listen, leaf_ttl, store, &[])
    }

    /// Like `start_with_store`, with more `server run` arguments.
    pub fn start_with_args(
        exe: &str,
        data_dir: &Path,
        listen: &str,
        leaf_ttl: &str,
        store: Option<&str>,
        extra: &[&str],
    ) -> Self {
        Self::start_in(&[], exe, data_dir, listen, leaf_ttl, store, extra)
    }

    /// Like `start_with_args`, run after `prefix` (`ip netns exec NAME`: a server in a test
    /// host's namespace).
    pub fn start_in(
        prefix: &[&str],
        exe: &str,
        data_dir: &Path,
        listen: &str,
        leaf_ttl: &str,
        store: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let ready = data_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = data_dir.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        ));
        let argv: Vec<&str> = prefix
            .iter()
            .chain(crate::process::FRESH_FD_LIMIT.iter())
            .copied()
            .collect();
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .arg(exe)
            .args([
                "--log-level",
                "debug,h2=info,hyper=info,rustls=info,sqlx=warn",
                "server",
                "run",
            ])
            .args([
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen",
                listen,
                "--leaf-ttl",
                leaf_ttl,
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(store.map(|s| vec!["--store", s]).unwrap_or_default())
            .args(extra)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let addr = v["listen"].as_str().unwrap().parse().unwrap();
                    let admin = v["admin"].as_str().unwrap().parse().unwrap();
                    return Self {
                        admin,
                        child,
                        store: store.map(str::to_owned),
                        data_dir: data_dir.to_owned(),
                        addr,
                        log,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "server exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "server not ready in 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `tapproof server admin-cert --name NAME` into `out` (admin.pem, admin.key, bundle.pem).
    pub fn admin_cert(&self, exe: &str, name: &str, out: &Path) {
        let mut args = vec![
            "server",
            "admin-cert",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(store) = &self.store {
            args.extend(["--store", store]);
        }
        let (code, stdout, err) = run_tapproof(exe, &args);
        assert_eq!(code, 0, "admin-cert: {stdout}{err}");
    }

    /// `tapproof server token create` for `node` with `services`.
    pub fn token(&self, exe: &str, node: &str, services: &[&str], ttl: &str) -> String {
        let mut args = vec![
            "server",
            "token",
            "create",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--node",
            node,
            "--ttl",
            ttl,
        ];
        let server = self.addr.to_string();
        args.extend(["--server", &server]);
        for s in services {
            args.extend(["--service", s]);
        }
        if let Some(store) = &self.store {
            args.extend(["--store", store]);
        }
        let (code, out, err) = run_tapproof(exe, &args);
        assert_eq!(code, 0, "token create: {err}");
        out.trim().to_owned()
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        self.stop_ref();
    }

    /// Like `stop`, for a process held in a struct field.
    pub fn stop_ref(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl ServerProcess {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL (a crash: no drain), and waits for the exit.
    pub fn kill_ref(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `within` for the process to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An agent `[control]` section.
pub fn control_section(data_dir: &Path, token: &str) -> String {
    format!(
        "[control]\ndata_dir = \"{}\"\ntoken = \"{token}\"\nreload_interval = \"200ms\"\n",
        data_dir.display()
    )
}

/// One HTTPS request to the control plane, as an agent (or an attacker) would make it. `trust`:
/// the root pin from a token, or bundle PEMs; `identity`: (chain, key) PEMs for mTLS. Returns the
/// status and the JSON body (Null when the body is not JSON).
pub fn control_request(
    server: SocketAddr,
    trust: tapproof_tls::ServerTrust,
    identity: Option<(&str, &str)>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    try_control_request(server, trust, identity, method, path, body).unwrap()
}

/// `control_request`, with a failed connection or request (a reset stream, say) as an error
/// instead of a panic: for faults where the request may fail.
pub fn try_control_request(
    server: SocketAddr,
    trust: tapproof_tls::ServerTrust,
    identity: Option<(&str, &str)>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, serde_json::Value), String> {
    use http_body_util::{BodyExt, Full};
    let td = tapproof_identity::TrustDomain::new("example.org").unwrap();
    let server_id = tapproof_identity::SpiffeId::new(td, "/server").unwrap();
    let tls = tapproof_tls::ControlClientTls::new(trust, server_id, identity).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let stream = tls.connect(tcp, server).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(format!("https://{server}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    })
}

/// One HTTP/2 connection to the control plane over TLS, kept open for several requests (as an
/// agent's long-lived connection would be), for the in-process API tests. `identity`: (chain,
/// key) PEMs for mTLS.
pub struct ApiConn {
    sender: hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    server: SocketAddr,
}

impl ApiConn {
    /// Connects and completes the TLS and HTTP/2 handshakes. A server that refuses our identity
    /// after the handshake shows up as an error on the first request.
    pub async fn open(
        server: SocketAddr,
        td: &str,
        trust: tapproof_tls::ServerTrust,
        identity: Option<(&str, &str)>,
    ) -> Result<Self, String> {
        let td = tapproof_identity::TrustDomain::new(td).map_err(|e| e.to_string())?;
        let server_id = tapproof_identity::SpiffeId::new(td, "/server").map_err(|e| e.to_string())?;
        let tls =
            tapproof_tls::ControlClientTls::new(trust, server_id, identity).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let stream = tls.connect(tcp, server).await.map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        Ok(Self { sender, server })
    }

    /// One request: the status and the JSON body (Null when the body is not JSON).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, serde_json::Value), String> {
        use http_body_util::BodyExt;
        let req = http::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.server))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }
}
