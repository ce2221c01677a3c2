//! The usual two-agent setup on loopback: `db-1` serves `db` (an echo service) to `web-1`, and
//! `web-1` has an outbound for `db`. Tests tweak the config text before starting.

use crate::pki::{IdentityPaths, TestPki};
use crate::process::{identity_section, AgentProcess};
use crate::traffic::EchoServer;
use std::net::SocketAddr;

pub struct Pair {
    pub pki: TestPki,
    pub echo: EchoServer,
    pub db_id: IdentityPaths,
    pub web_id: IdentityPaths,
    pub db: AgentProcess,
    pub web: AgentProcess,
}

pub fn db_config(pki: &TestPki, id: &IdentityPaths, forward: SocketAddr, extra_tunnel: &str) -> String {
    format!(
        "trust_domain = \"{td}\"\n{identity}[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\n{extra_tunnel}\n\
         [[inbound]]\nservice = \"db\"\nforward = \"{forward}\"\nallow = [\"spiffe://{td}/node/web-1\", \"spiffe://{td}/svc/*\"]\n",
        td = pki.td,
        identity = identity_section(id),
    )
}

pub fn web_config(
    pki: &TestPki,
    id: &IdentityPaths,
    peers: &[SocketAddr],
    server: &str,
    extra_tunnel: &str,
) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "trust_domain = \"{td}\"\n{identity}[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\n{extra_tunnel}\n\
         [[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\npeers = [{peers}]\nserver_id = \"spiffe://{td}/node/{server}\"\n",
        td = pki.td,
        identity = identity_section(id),
        peers = peers.join(", "),
    )
}

impl Pair {
    pub fn start(exe: &str) -> Self {
        Self::start_with(exe, "", "")
    }

    /// `db_tunnel` and `web_tunnel` are extra lines for each agent's `[tunnel]` section.
    pub fn start_with(exe: &str, db_tunnel: &str, web_tunnel: &str) -> Self {
        Self::build(exe, None, db_tunnel, web_tunnel)
    }

    /// db-1 forwards `db` to `service` instead of the echo server.
    pub fn forwarding_to(exe: &str, service: SocketAddr) -> Self {
        Self::build(exe, Some(service), "", "")
    }

    fn build(exe: &str, service: Option<SocketAddr>, db_tunnel: &str, web_tunnel: &str) -> Self {
        let pki = TestPki::new();
        let echo = EchoServer::start();
        let db_id = pki.node("db-1");
        let web_id = pki.node("web-1");
        let forward = service.unwrap_or(echo.addr);
        let db = AgentProcess::start(
            exe,
            pki.path(),
            "db-1",
            &db_config(&pki, &db_id, forward, db_tunnel),
        );
        let web = AgentProcess::start(
            exe,
            pki.path(),
            "web-1",
            &web_config(&pki, &web_id, &[db.tunnel()], "db-1", web_tunnel),
        );
        Self {
            pki,
            echo,
            db_id,
            web_id,
            db,
            web,
        }
    }

    /// Where apps connect to reach `db` through the tunnel.
    pub fn app_addr(&self) -> SocketAddr {
        self.web.outbound(0)
    }
}
