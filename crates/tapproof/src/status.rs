//! `tapproof status`: what a running agent is doing, from its admin endpoint's `/v1/status`.

use crate::cli::StatusArgs;
use anyhow::{bail, Context};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.0 GET for the agent's own loopback admin endpoint (no TLS, no redirects).
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    admin_request(admin, "GET", path).await
}

/// The same with another method (`POST /v1/selftest`, no body).
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.with_context(|| {
        format!("cannot reach the agent's admin endpoint at {admin}; is the agent running?")
    })?;
    tcp.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: {admin}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("admin endpoint sent non-UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("admin endpoint sent a malformed response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!(
            "admin endpoint answered {}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        );
    }
    Ok(body.to_owned())
}

/// `tapproof selftest`: runs the agent's self-test probes now (`POST /v1/selftest`) and prints
/// each; exit code 1 when one was accepted (an alarm), so it can gate a deploy.
pub async fn selftest(args: StatusArgs) -> anyhow::Result<()> {
    let body = admin_request(args.admin, "POST", "/v1/selftest").await?;
    let round: serde_json::Value = serde_json::from_str(&body).context("admin endpoint sent invalid JSON")?;
    if args.json {
        println!("{body}");
    } else {
        println!("self-test of {}", round["target"].as_str().unwrap_or("?"));
        for p in round["probes"].as_array().cloned().unwrap_or_default() {
            println!(
                "  {:<24} {:<15} {}",
                p["probe"].as_str().unwrap_or("?"),
                p["result"].as_str().unwrap_or("?"),
                p["detail"].as_str().unwrap_or("")
            );
        }
    }
    let accepted = round["probes"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["result"] == "accepted"));
    if accepted {
        bail!("a connection that must fail was ACCEPTED by the agent's tunnel listener");
    }
    Ok(())
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let body = admin_get(args.admin, "/v1/status").await?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let s: serde_json::Value = serde_json::from_str(&body).context("admin endpoint sent invalid JSON")?;
    println!("identity   {}", s["id"].as_str().unwrap_or("?"));
    println!("ready      {}", s["ready"]);
    let not_after = s["certificate"]["not_after_unix"].as_i64().unwrap_or(0);
    let now = tapproof_identity::when::now();
    println!(
        "cert       serial {} {} {} ({} bundle roots)",
        s["certificate"]["serial"].as_str().unwrap_or("?"),
        if not_after >= now { "expires" } else { "EXPIRED" },
        tapproof_identity::when::at(not_after, now),
        s["certificate"]["bundle_roots"]
    );
    let tunnels = s["tunnels"].as_array().cloned().unwrap_or_default();
    println!("tunnels    {}", tunnels.len());
    for t in tunnels {
        println!(
            "  #{} {} {} {} {} {} {} streams {} open {} bytes out {} in {}",
            t["id"],
            t["side"].as_str().unwrap_or(""),
            t["peer_addr"].as_str().unwrap_or(""),
            t["peer_id"].as_str().unwrap_or(""),
            t["tls_version"].as_str().unwrap_or(""),
            t["cipher"].as_str().unwrap_or(""),
            t["key_exchange"].as_str().unwrap_or(""),
            t["streams_total"],
            t["streams_open"],
            t["bytes_app_to_tunnel"],
            t["bytes_tunnel_to_app"]
        );
    }
    Ok(())
}
