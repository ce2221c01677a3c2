//! Load generators for bench/: full mTLS handshakes in memory, certificate signings against a
//! running server, and thousands of simulated agents on the server's state feed. They print one
//! `key=value` result line each, which bench/run.py parses.

use crate::LoadNodeArgs;
use anyhow::{bail, Context};
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapproof_agent::control::identity_files;
use tapproof_identity::csr::new_csr;
use tapproof_identity::{SpiffeId, TrustDomain};
use tapproof_tls::ControlClientTls;
use tapproof_tls::{accept, client_session, connect, ClientTls, IdentityFiles, Material, ServerTls};

/// Both ends of each handshake run here, on this thread: the rate is a lower bound for one core
/// serving only the server side.
pub async fn handshakes(
    pki: &Path,
    trust_domain: &str,
    seconds: f64,
    profile: tapproof_tls::CryptoProfile,
) -> anyhow::Result<()> {
    let td = TrustDomain::new(trust_domain)?;
    let load = |node: &str| {
        Material::load(
            &IdentityFiles {
                cert: pki.join(format!("{node}.pem")),
                key: pki.join(format!("{node}.key")),
                bundle: pki.join("bundle.pem"),
            },
            &td,
        )
        .with_context(|| format!("{node} identity in {}", pki.display()))
    };
    let (server, client) = (load("server")?, load("client")?);
    profile.available().map_err(anyhow::Error::msg)?;
    let policy = profile.policy(false);
    let server_tls = ServerTls::new(&server, policy)?;
    let client_tls = ClientTls::without_resumption(&client, server.id().clone(), policy)?;
    let addr = "127.0.0.1:1".parse()?;
    let (mut count, mut group, mut cipher, mut resumed) = (0u64, String::new(), String::new(), 0u64);
    let (server_time, client_time) = (
        std::cell::Cell::new(Duration::ZERO),
        std::cell::Cell::new(Duration::ZERO),
    );
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (s, c) = tokio::join!(
            timed(&server_time, accept(&server_tls, a)),
            timed(&client_time, connect(&client_tls, b, addr))
        );
        let (_s, c) = (s?, c?);
        let info = client_session(&c);
        resumed += u64::from(info.resumed);
        group = info.group;
        cipher = info.cipher;
        count += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "handshakes={count} seconds={secs:.2} rate={:.0} server_side_rate={:.0} client_side_rate={:.0} group={group} cipher={cipher} resumed={resumed}",
        count as f64 / secs,
        count as f64 / server_time.get().as_secs_f64(),
        count as f64 / client_time.get().as_secs_f64(),
    );
    Ok(())
}

/// Adds the time spent inside `future`'s polls to `total`: the CPU one side of an in-memory
/// handshake costs (nothing else runs on this thread meanwhile).
async fn timed<F: std::future::Future>(total: &std::cell::Cell<Duration>, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let start = Instant::now();
        let poll = future.as_mut().poll(cx);
        total.set(total.get() + start.elapsed());
        poll
    })
    .await
}

struct Node {
    server: String,
    addr: std::net::SocketAddr,
    tls: ControlClientTls,
    id: SpiffeId,
}

fn node(args: &LoadNodeArgs) -> anyhow::Result<Node> {
    let td = TrustDomain::new(&args.trust_domain)?;
    let (tls, id) = ControlClientTls::from_files(&identity_files(&args.data_dir), Some(&td))?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&args.server)?
        .next()
        .context("server address resolves to nothing")?;
    raise_fd_limit();
    Ok(Node {
        server: args.server.clone(),
        addr,
        tls,
        id,
    })
}

/// Thousands of connections need more than the usual 1024 descriptors.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// One HTTP/2 connection to the server, as the node.
async fn open(node: &Node) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(node.addr).await?;
    let tls = node.tls.connect(tcp, node.addr).await?;
    let (sender, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn call(
    sender: &mut h2::client::SendRequest<Bytes>,
    server: &str,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
) -> anyhow::Result<(u16, Bytes)> {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("https://{server}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(())?;
    let mut ready = sender.clone().ready().await?;
    let (response, mut send) = ready.send_request(request, body.is_none())?;
    if let Some(body) = body {
        send.send_data(body, true)?;
    }
    let response = response.await?;
    let status = response.status().as_u16();
    let mut recv = response.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok((status, Bytes::from(out)))
}

/// `concurrency` connections, each signing one CSR after another for `seconds`. The CSRs are made
/// before the clock starts: the figure is the server's, not the client's key generation.
pub async fn sign_load(args: &LoadNodeArgs, concurrency: usize, seconds: f64) -> anyhow::Result<()> {
    let node = Arc::new(node(args)?);
    let mut bodies = Vec::new();
    for _ in 0..concurrency {
        let (csr, _key) = new_csr(Some(&node.id))?;
        bodies.push(Bytes::from(
            serde_json::json!({ "csrs": [{ "id": node.id.to_string(), "csr": csr }] }).to_string(),
        ));
    }
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for body in bodies {
        let (node, ok, failed) = (node.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = open(&node).await?;
            while Instant::now() < deadline {
                match call(
                    &mut sender,
                    &node.server,
                    http::Method::POST,
                    "/v1/sign",
                    Some(body.clone()),
                )
                .await
                {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok((status, text)) => {
                        eprintln!("sign: {status} {}", String::from_utf8_lossy(&text));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("sign: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        sender = open(&node).await?;
                        0
                    }
                };
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "signings={ok} failed={} seconds={secs:.2} rate={:.0}",
        failed.load(Ordering::Relaxed),
        ok as f64 / secs
    );
    Ok(())
}

#[derive(serde::Deserialize)]
struct FeedState {
    version: i64,
    revocations: Vec<serde_json::Value>,
}

/// Each simulated agent holds its own mTLS connection and long-polls `/v1/state` like an agent.
pub async fn feed_load(args: &LoadNodeArgs, agents: usize, then: &[String]) -> anyhow::Result<()> {
    let Some((program, rest)) = then.split_first() else {
        bail!("--then needs the command that makes the revocation");
    };
    let node = Arc::new(node(args)?);
    let connect_start = Instant::now();
    let mut sender = open(&node).await?;
    let (status, body) = call(&mut sender, &node.server, http::Method::GET, "/v1/state", None).await?;
    if status != 200 {
        bail!("state feed: {status} {}", String::from_utf8_lossy(&body));
    }
    let first: FeedState = serde_json::from_slice(&body)?;
    let (version, before) = (first.version, first.revocations.len());
    let waiting = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut connections = Vec::with_capacity(agents);
    // Connect in waves so the server's accept queue never overflows.
    for chunk in (0..agents).collect::<Vec<_>>().chunks(64) {
        let opened = futures_open(&node, chunk.len()).await?;
        connections.extend(opened);
    }
    let connected = connect_start.elapsed().as_secs_f64();
    for mut sender in connections {
        let (node, tx, waiting) = (node.clone(), tx.clone(), waiting.clone());
        tokio::spawn(async move {
            let path = format!("/v1/state?since={version}");
            loop {
                waiting.fetch_add(1, Ordering::Relaxed);
                let result = call(&mut sender, &node.server, http::Method::GET, &path, None).await;
                let seen = match result {
                    Ok((200, body)) => serde_json::from_slice::<FeedState>(&body)
                        .map(|s| s.revocations.len() > before)
                        .unwrap_or(false),
                    _ => {
                        let _ = tx.send(None);
                        return;
                    }
                };
                if seen {
                    let _ = tx.send(Some(Instant::now()));
                    return;
                }
            }
        });
    }
    drop(tx);
    // All requests sent (and a moment for the server to park them).
    while waiting.load(Ordering::Relaxed) < agents as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let status = tokio::process::Command::new(program).args(rest).status().await?;
    if !status.success() {
        bail!("{program} failed: {status}");
    }
    let mut delays = Vec::with_capacity(agents);
    let mut errors = 0;
    let collect = async {
        while let Some(seen) = rx.recv().await {
            match seen {
                Some(at) => delays.push(at.duration_since(t0).as_secs_f64()),
                None => errors += 1,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), collect).await;
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays.get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)));
    println!(
        "agents={agents} connected_s={connected:.2} notified={} errors={errors} p50_s={:.3} p99_s={:.3} max_s={:.3}",
        delays.len(),
        pct(0.5).copied().unwrap_or(f64::NAN),
        pct(0.99).copied().unwrap_or(f64::NAN),
        delays.last().copied().unwrap_or(f64::NAN),
    );
    Ok(())
}

async fn futures_open(node: &Arc<Node>, n: usize) -> anyhow::Result<Vec<h2::client::SendRequest<Bytes>>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let node = node.clone();
        set.spawn(async move { open(&node).await });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    Ok(out)
}
