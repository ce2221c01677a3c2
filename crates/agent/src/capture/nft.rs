//! The agent's nftables table, `inet tapproof`, through the `nft` program's JSON interface
//! (libnftables-json(5)): a whole ruleset is written as one JSON document and applied by one
//! `nft -j -f -`, which the kernel commits as one transaction; counters are read back with
//! `nft -j list table`. Nothing here touches another table.

use super::Plan;
use serde_json::{json, Value};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use tapproof_audit::{InboundMode, PlaintextAttempt};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "tapproof";
const OUTPUT_CHAIN: &str = "capture_output";
const INPUT_CHAIN: &str = "inbound_input";
const GATEWAY_PREROUTING: &str = "gateway_prerouting";
const GATEWAY_FORWARD: &str = "gateway_forward";
const GATEWAY_UDP: &str = "gateway_udp";
const HOST_UDP_OUTPUT: &str = "remote_udp_output";
/// The mangle priority: TPROXY must see a packet before routing decides to forward it.
const MANGLE_PRIORITY: i32 = -150;
/// NAT chains run in priority order and the first to map a connection wins: -110 runs before
/// dstnat (-100), where Docker and firewalld put theirs.
const NAT_PRIORITY: i32 = -110;
/// Before the filter hook's usual users (0), so an accept elsewhere cannot hide an attempt.
const FILTER_PRIORITY: i32 = -10;
/// Monitor-mode sources remembered per family, and for how long after their last packet.
const ATTEMPTS_SIZE: u32 = 4096;
const ATTEMPTS_TIMEOUT_S: u32 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "the nft program was not found ({0}); capture needs it (Debian/Ubuntu: apt-get install nftables)"
    )]
    NotInstalled(String),
    #[error("nftables refused: not permitted (the agent needs CAP_NET_ADMIN: run it as root or with AmbientCapabilities=CAP_NET_ADMIN): {0}")]
    NotPermitted(String),
    #[error("nftables refused: {0}")]
    Refused(String),
    #[error("nft's output did not parse: {0}")]
    Output(String),
}

fn program() -> &'static str {
    // Not every user's PATH has /usr/sbin.
    if std::path::Path::new("/usr/sbin/nft").exists() {
        "/usr/sbin/nft"
    } else {
        "nft"
    }
}

/// Runs nft with `args`, `input` on stdin; its stdout, or why not.
fn run(args: &[&str], input: Option<&[u8]>) -> Result<String, NftError> {
    let mut child = Command::new(program())
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NftError::NotInstalled(e.to_string()))?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(bytes)
            .map_err(|e| NftError::Refused(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NftError::Refused(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().replace('\n', " / ");
    if said.contains("Operation not permitted") {
        Err(NftError::NotPermitted(said))
    } else {
        Err(NftError::Refused(said))
    }
}

fn table() -> Value {
    json!({"family": FAMILY, "name": TABLE})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr}}})
}

fn set(name: &str, set_type: Value, elements: Vec<Value>, dynamic: bool) -> Value {
    let mut s = json!({"family": FAMILY, "table": TABLE, "name": name, "type": set_type});
    if !elements.is_empty() {
        s["elem"] = Value::Array(elements);
    }
    if dynamic {
        // Filled from the packet path (`update`): nft 1.0's JSON takes "timeout" here and makes
        // such a set dynamic by itself.
        s["flags"] = json!(["timeout"]);
        s["timeout"] = json!(ATTEMPTS_TIMEOUT_S);
        s["size"] = json!(ATTEMPTS_SIZE);
        // A counter per element: packets per (source, port).
        s["stmt"] = json!([{"counter": null}]);
    }
    json!({"add": {"set": s}})
}

fn family_of(ip: &IpAddr) -> (&'static str, &'static str) {
    match ip {
        IpAddr::V4(_) => ("ip", "4"),
        IpAddr::V6(_) => ("ip6", "6"),
    }
}

/// The whole table for `plan`, as one transaction: the table is created if absent and deleted
/// (so a previous version of it goes with every rule in it), then built again; the kernel
/// applies all of it or none, so there is no moment without the rules.
pub fn ruleset(plan: &Plan) -> Value {
    let mut cmds = replace_table();
    cmds.extend(outbound_part(plan));
    cmds.extend(inbound_part(plan));
    cmds.extend(gateway_part(plan));
    json!({"nftables": cmds})
}

/// An interval set of networks (`BASE/LEN` each).
fn network_set(name: &str, addr_type: &str, networks: &[&String]) -> Value {
    let elements: Vec<Value> = networks
        .iter()
        .filter_map(|n| {
            let (addr, len) = n.split_once('/')?;
            Some(json!({"prefix": {"addr": addr, "len": len.parse::<u8>().ok()?}}))
        })
        .collect();
    let mut s =
        json!({"family": FAMILY, "table": TABLE, "name": name, "type": addr_type, "flags": ["interval"]});
    if !elements.is_empty() {
        s["elem"] = Value::Array(elements);
    }
    json!({"add": {"set": s}})
}

/// A site gateway's rules: routed TCP from the local networks to a remote site's networks is
/// redirected to the capture listener (NAT prerouting, before Docker's and firewalld's DNAT),
/// routed UDP handed to the agent's UDP socket (TPROXY); anything else routed to a remote site's
/// networks is dropped (filter forward), so nothing but the tunnel crosses the interconnect. A
/// host with `[[remote]]` gets the same for its own TCP and UDP to those networks, nothing for
/// routed traffic.
fn gateway_part(plan: &Plan) -> Vec<Value> {
    let Some(g) = &plan.gateway else {
        return Vec::new();
    };
    let mut cmds = Vec::new();
    for (family, addr_type) in [("4", "ipv4_addr"), ("6", "ipv6_addr")] {
        let v6 = family == "6";
        let local: Vec<&String> = g.local.iter().filter(|n| n.contains(':') == v6).collect();
        let remote: Vec<&String> = g.remote.iter().filter(|n| n.contains(':') == v6).collect();
        cmds.push(network_set(&format!("gw_local{family}"), addr_type, &local));
        cmds.push(network_set(&format!("gw_remote{family}"), addr_type, &remote));
    }
    if g.is_host() {
        // A host reaching remote sites as itself: its own TCP to their networks goes to the
        // capture listener (the output chain's first rule passes the agent's marked sockets).
        for (family, proto) in [("4", "ip"), ("6", "ip6")] {
            cmds.push(rule(
                OUTPUT_CHAIN,
                vec![
                    matches(payload(proto, "daddr"), json!(format!("@gw_remote{family}"))),
                    matches(json!({"meta": {"key": "l4proto"}}), json!("tcp")),
                    json!({"counter": null}),
                    json!({"redirect": {"port": plan.port}}),
                ],
            ));
        }
        // Its own UDP to their networks: TPROXY works only where packets come in, so a route
        // chain marks the datagram on its way out (not the agent's own sockets), the mark's
        // policy route (`route.rs`) sends it round through lo, and it comes in there to the
        // agent's UDP socket like a gateway's routed UDP.
        cmds.push(json!({"add": {"chain": {
            "family": FAMILY, "table": TABLE, "name": HOST_UDP_OUTPUT,
            "type": "route", "hook": "output", "prio": MANGLE_PRIORITY, "policy": "accept"}}}));
        for (family, proto) in [("4", "ip"), ("6", "ip6")] {
            cmds.push(rule(
                HOST_UDP_OUTPUT,
                vec![
                    json!({"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": plan.mark}}),
                    matches(payload(proto, "daddr"), json!(format!("@gw_remote{family}"))),
                    matches(json!({"meta": {"key": "l4proto"}}), json!("udp")),
                    json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": g.udp_mark}}),
                ],
            ));
        }
        let from_lo = |_: &str, _: &str| {
            vec![
                matches(json!({"meta": {"key": "iifname"}}), json!("lo")),
                matches(json!({"meta": {"key": "mark"}}), json!(g.udp_mark)),
            ]
        };
        cmds.extend(udp_tproxy(plan, g, &from_lo));
        return cmds;
    }
    cmds.push(json!({"add": {"chain": {
        "family": FAMILY, "table": TABLE, "name": GATEWAY_PREROUTING,
        "type": "nat", "hook": "prerouting", "prio": NAT_PRIORITY, "policy": "accept"}}}));
    cmds.push(json!({"add": {"chain": {
        "family": FAMILY, "table": TABLE, "name": GATEWAY_FORWARD,
        "type": "filter", "hook": "forward", "prio": FILTER_PRIORITY, "policy": "accept"}}}));
    for (family, proto) in [("4", "ip"), ("6", "ip6")] {
        cmds.push(rule(
            GATEWAY_PREROUTING,
            vec![
                matches(payload(proto, "saddr"), json!(format!("@gw_local{family}"))),
                matches(payload(proto, "daddr"), json!(format!("@gw_remote{family}"))),
                matches(json!({"meta": {"key": "l4proto"}}), json!("tcp")),
                json!({"counter": null}),
                json!({"redirect": {"port": plan.port}}),
            ],
        ));
    }
    // Routed UDP from a local network to a remote one goes to the agent's UDP socket.
    let from_local = |family: &str, proto: &str| {
        vec![matches(
            payload(proto, "saddr"),
            json!(format!("@gw_local{family}")),
        )]
    };
    cmds.extend(udp_tproxy(plan, g, &from_local));
    for (family, proto) in [("4", "ip"), ("6", "ip6")] {
        cmds.push(rule(
            GATEWAY_FORWARD,
            vec![
                matches(payload(proto, "daddr"), json!(format!("@gw_remote{family}"))),
                json!({"counter": null}),
                json!({"drop": null}),
            ],
        ));
    }
    cmds
}

/// The chain that hands UDP to remote sites' networks, matched by `first` (per family: "4" and
/// "ip", "6" and "ip6"), to the agent's UDP socket on the capture port: TPROXY keeps the
/// packet's destination, and the mark makes the policy route (`route.rs`) deliver it to this
/// host instead of forwarding it.
fn udp_tproxy(plan: &Plan, g: &super::GatewayPlan, first: &dyn Fn(&str, &str) -> Vec<Value>) -> Vec<Value> {
    let mut cmds = vec![json!({"add": {"chain": {
        "family": FAMILY, "table": TABLE, "name": GATEWAY_UDP,
        "type": "filter", "hook": "prerouting", "prio": MANGLE_PRIORITY, "policy": "accept"}}})];
    for (family, proto) in [("4", "ip"), ("6", "ip6")] {
        let mut expr = first(family, proto);
        expr.extend([
            matches(payload(proto, "daddr"), json!(format!("@gw_remote{family}"))),
            matches(json!({"meta": {"key": "l4proto"}}), json!("udp")),
            json!({"counter": null}),
            json!({"tproxy": {"family": proto, "port": plan.port}}),
            json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": g.udp_mark}}),
            json!({"accept": null}),
        ]);
        cmds.push(rule(GATEWAY_UDP, expr));
    }
    cmds
}

/// Add (so that delete cannot fail), delete, add: the table, empty.
fn replace_table() -> Vec<Value> {
    vec![
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
    ]
}

/// The captured sets and the NAT output chain that redirects them to the capture listener.
fn outbound_part(plan: &Plan) -> Vec<Value> {
    let mut cmds = Vec::new();
    for (family, addr_type) in [("4", "ipv4_addr"), ("6", "ipv6_addr")] {
        cmds.push(set(
            &format!("captured{family}"),
            json!([addr_type, "inet_service"]),
            captured_elements(plan, family),
            false,
        ));
    }
    cmds.push(json!({"add": {"chain": {
        "family": FAMILY, "table": TABLE, "name": OUTPUT_CHAIN,
        "type": "nat", "hook": "output", "prio": NAT_PRIORITY, "policy": "accept"}}}));
    // The agent's own connections (tunnels, forwards) carry its mark: never captured, so a
    // tunnel to a captured address cannot loop back into the agent.
    cmds.push(rule(
        OUTPUT_CHAIN,
        vec![
            matches(json!({"meta": {"key": "mark"}}), json!(plan.mark)),
            json!({"return": null}),
        ],
    ));
    for (family, proto) in [("4", "ip"), ("6", "ip6")] {
        cmds.push(rule(
            OUTPUT_CHAIN,
            vec![
                matches(
                    json!({"concat": [payload(proto, "daddr"), payload("tcp", "dport")]}),
                    json!(format!("@captured{family}")),
                ),
                json!({"counter": null}),
                json!({"redirect": {"port": plan.port}}),
            ],
        ));
    }
    cmds
}

/// The inbound ports, the attempt sets and the filter input chain (none when the mode is off
/// or there is no port).
fn inbound_part(plan: &Plan) -> Vec<Value> {
    let mut cmds = Vec::new();
    if plan.inbound == InboundMode::Off || plan.inbound_ports.is_empty() {
        return cmds;
    }
    let ports = plan.inbound_ports.iter().map(|p| json!(p)).collect();
    cmds.push(set("inbound_ports", json!("inet_service"), ports, false));
    cmds.push(set(
        "attempts4",
        json!(["ipv4_addr", "inet_service"]),
        Vec::new(),
        true,
    ));
    cmds.push(set(
        "attempts6",
        json!(["ipv6_addr", "inet_service"]),
        Vec::new(),
        true,
    ));
    cmds.push(json!({"add": {"chain": {
        "family": FAMILY, "table": TABLE, "name": INPUT_CHAIN,
        "type": "filter", "hook": "input", "prio": FILTER_PRIORITY, "policy": "accept"}}}));
    // The agent's forward legs (and anything else on this host) arrive over loopback.
    cmds.push(rule(
        INPUT_CHAIN,
        vec![
            matches(json!({"meta": {"key": "iif"}}), json!("lo")),
            json!({"return": null}),
        ],
    ));
    let to_port = || matches(payload("tcp", "dport"), json!("@inbound_ports"));
    for (family, proto) in [("4", "ip"), ("6", "ip6")] {
        cmds.push(rule(
            INPUT_CHAIN,
            vec![
                to_port(),
                json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}),
                json!({"set": {"op": "update", "set": format!("@attempts{family}"),
                    "elem": {"concat": [payload(proto, "saddr"), payload("tcp", "dport")]}}}),
            ],
        ));
    }
    if plan.inbound == InboundMode::Enforce {
        // Only packets of connections the network opened: replies to this host's own
        // connections that happen to use such a port as their source pass.
        cmds.push(rule(
            INPUT_CHAIN,
            vec![
                to_port(),
                matches(json!({"ct": {"key": "direction"}}), json!("original")),
                json!({"counter": null}),
                json!({"drop": null}),
            ],
        ));
    }
    cmds
}

/// The captured set's elements of one family ("4" or "6").
fn captured_elements(plan: &Plan, family: &str) -> Vec<Value> {
    plan.captured
        .iter()
        .filter(|a| family_of(&a.ip()).1 == family)
        .map(|a| json!({"concat": [a.ip().to_string(), a.port()]}))
        .collect()
}

/// Replaces only the captured destinations, in one transaction (both sets flushed and filled
/// again): the inbound sets with their per-source counters, and every rule's counter, stay.
pub fn update_captured(plan: &Plan) -> Result<(), NftError> {
    let mut cmds = Vec::new();
    for family in ["4", "6"] {
        let name = format!("captured{family}");
        cmds.push(json!({"flush": {"set": {"family": FAMILY, "table": TABLE, "name": name}}}));
        let elem = captured_elements(plan, family);
        if !elem.is_empty() {
            cmds.push(
                json!({"add": {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elem}}}),
            );
        }
    }
    apply(&json!({"nftables": cmds}))
}

/// Applies `plan`'s table in one transaction.
pub fn install(plan: &Plan) -> Result<(), NftError> {
    apply(&ruleset(plan))
}

/// Commits `doc` (a libnftables-json document) as one transaction.
fn apply(doc: &Value) -> Result<(), NftError> {
    run(&["-j", "-f", "-"], Some(doc.to_string().as_bytes())).map(drop)
}

/// Asks the kernel whether `doc` would apply, committing nothing (`nft --check`).
fn check(doc: &Value) -> Result<(), NftError> {
    run(&["-c", "-j", "-f", "-"], Some(doc.to_string().as_bytes())).map(drop)
}

/// What the kernel must support, checked one feature at a time so that the error names the one
/// missing. Nothing is committed.
pub fn check_kernel(plan: &Plan) -> Result<(), String> {
    let probe = Plan {
        captured: vec![
            "192.0.2.1:9".parse().expect("constant"),
            "[2001:db8::1]:9".parse().expect("constant"),
        ],
        inbound: InboundMode::Enforce,
        inbound_ports: vec![9],
        ..plan.clone()
    };
    let doc = |part: Vec<Value>| {
        let mut all = replace_table();
        all.extend(part);
        json!({"nftables": all})
    };
    let step = |what: &str, d: Value| match check(&d) {
        Ok(()) => Ok(()),
        Err(NftError::Refused(said))
            if said.contains("No such file or directory") || said.contains("not supported") =>
        {
            Err(format!("the kernel lacks {what}: nftables refused: {said}"))
        }
        Err(NftError::Refused(said)) => Err(format!(
            "nftables refused the rules for {what} (an nft older than 1.0, or a tapproof bug): {said}"
        )),
        Err(e) => Err(e.to_string()),
    };
    step(
        "nf_tables (CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET)",
        doc(Vec::new()),
    )?;
    step(
        "NAT redirect for IPv4 and IPv6 (nft_chain_nat, nft_redirect, nf_nat, nf_conntrack; IPv6 enabled)",
        doc(outbound_part(&probe)),
    )?;
    step(
        "conntrack matches and sets with per-element counters (nft_ct, nft_dynset, nft_counter)",
        doc(inbound_part(&probe)),
    )?;
    if plan.gateway.is_some() {
        step(
            "remote sites: NAT redirect, TPROXY for UDP, a route chain (a host's own UDP), the forward hook and interval sets (nft_chain_nat, nft_redirect, nft_tproxy, nf_tproxy_ipv4/6, nf_tables route chains, nft_set_rbtree)",
            doc({
                // A host's rules go into the output chain, which comes with the outbound part.
                let mut part = outbound_part(plan);
                part.extend(gateway_part(plan));
                part
            }),
        )?;
    }
    Ok(())
}

/// Deletes the table; `Ok(false)` when there was none.
pub fn remove() -> Result<bool, NftError> {
    match apply(&json!({"nftables": [{"delete": {"table": table()}}]})) {
        Ok(()) => Ok(true),
        Err(NftError::Refused(said)) if said.contains("No such file or directory") => Ok(false),
        Err(e) => Err(e),
    }
}

/// The table as the kernel has it, or `None` when it does not exist.
pub fn list() -> Result<Option<Listed>, NftError> {
    match run(&["-j", "list", "table", FAMILY, TABLE], None) {
        Ok(out) => parse(&out).map(Some),
        Err(NftError::Refused(said)) if said.contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `nft -j list table inet tapproof` shows, read back into the plan's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    pub captured: Vec<SocketAddr>,
    pub inbound: InboundMode,
    pub inbound_ports: Vec<u16>,
    pub mark: Option<u32>,
    pub port: Option<u16>,
    pub captured_connections: u64,
    pub dropped_packets: u64,
    pub attempts: Vec<PlaintextAttempt>,
    pub gateway: Option<super::GatewayPlan>,
    /// Routed TCP connections the gateway rules redirected into the tunnel.
    pub routed_connections: u64,
    /// Routed packets to remote sites dropped (not TCP or UDP from a local network).
    pub routed_dropped: u64,
    /// Routed UDP datagrams from the local networks to remote sites handed to the agent.
    pub routed_datagrams: u64,
}

/// A network as `nft -j list` shows an interval set's element: a prefix, or one address.
fn network_text(v: &Value) -> Option<String> {
    if let Some(p) = v.get("prefix") {
        return Some(format!("{}/{}", p["addr"].as_str()?, p["len"].as_u64()?));
    }
    let addr: IpAddr = v.as_str()?.parse().ok()?;
    Some(format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 }))
}

fn packets(expr: &[Value]) -> u64 {
    expr.iter()
        .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
        .sum()
}

fn concat_pair(v: &Value) -> Option<(IpAddr, u16)> {
    let parts = v.get("concat")?.as_array()?;
    let ip = parts.first()?.as_str()?.parse().ok()?;
    let port = u16::try_from(parts.get(1)?.as_u64()?).ok()?;
    Some((ip, port))
}

pub fn parse(out: &str) -> Result<Listed, NftError> {
    let doc: Value = serde_json::from_str(out).map_err(|e| NftError::Output(e.to_string()))?;
    let objects = doc["nftables"]
        .as_array()
        .ok_or_else(|| NftError::Output("no \"nftables\" array".into()))?;
    let mut listed = Listed::default();
    let mut has_input = false;
    let mut has_drop = false;
    for o in objects {
        if let Some(s) = o.get("set") {
            let name = s["name"].as_str().unwrap_or_default();
            let elems = s["elem"].as_array().cloned().unwrap_or_default();
            for e in &elems {
                match name {
                    "captured4" | "captured6" => {
                        if let Some((ip, port)) = concat_pair(e) {
                            listed.captured.push(SocketAddr::new(ip, port));
                        }
                    }
                    "inbound_ports" => {
                        if let Some(p) = e.as_u64().and_then(|p| u16::try_from(p).ok()) {
                            listed.inbound_ports.push(p);
                        }
                    }
                    "gw_local4" | "gw_local6" | "gw_remote4" | "gw_remote6" => {
                        let g = listed.gateway.get_or_insert_with(Default::default);
                        if let Some(n) = network_text(e) {
                            if name.starts_with("gw_local") {
                                g.local.push(n);
                            } else {
                                g.remote.push(n);
                            }
                        }
                    }
                    "attempts4" | "attempts6" => {
                        // Dynamic elements are listed as {"elem": {"val": .., "counter": ..}}.
                        let inner = &e["elem"];
                        if let Some((source, port)) = concat_pair(&inner["val"]) {
                            let packets = inner["counter"]["packets"].as_u64().unwrap_or(0);
                            listed.attempts.push(PlaintextAttempt {
                                source,
                                port,
                                packets,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(r) = o.get("rule") {
            let expr = r["expr"].as_array().cloned().unwrap_or_default();
            let has = |key: &str| expr.iter().any(|e| e.get(key).is_some());
            match r["chain"].as_str() {
                Some(OUTPUT_CHAIN) => {
                    let remote = expr.iter().any(|e| {
                        e["match"]["right"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("@gw_remote"))
                    });
                    if has("redirect") && remote {
                        listed.gateway.get_or_insert_with(Default::default);
                        listed.routed_connections += packets(&expr);
                    } else if has("redirect") {
                        listed.captured_connections += packets(&expr);
                        listed.port = expr
                            .iter()
                            .find_map(|e| e.get("redirect")?.get("port")?.as_u64())
                            .and_then(|p| u16::try_from(p).ok());
                    } else if has("return") {
                        listed.mark = expr
                            .iter()
                            .find_map(|e| e.get("match")?.get("right")?.as_u64())
                            .and_then(|m| u32::try_from(m).ok());
                    }
                }
                Some(GATEWAY_PREROUTING) => {
                    listed.gateway.get_or_insert_with(Default::default);
                    listed.routed_connections += packets(&expr);
                }
                Some(GATEWAY_UDP) => {
                    let g = listed.gateway.get_or_insert_with(Default::default);
                    listed.routed_datagrams += packets(&expr);
                    if let Some(mark) = expr
                        .iter()
                        .find_map(|e| e.get("mangle")?.get("value")?.as_u64())
                        .and_then(|m| u32::try_from(m).ok())
                    {
                        g.udp_mark = mark;
                    }
                }
                Some(GATEWAY_FORWARD) => {
                    listed.gateway.get_or_insert_with(Default::default);
                    listed.routed_dropped += packets(&expr);
                }
                Some(INPUT_CHAIN) => {
                    has_input = true;
                    if has("drop") {
                        has_drop = true;
                        listed.dropped_packets += packets(&expr);
                    }
                }
                _ => {}
            }
        }
    }
    listed.inbound = match (has_input, has_drop) {
        (_, true) => InboundMode::Enforce,
        (true, false) => InboundMode::Monitor,
        _ => InboundMode::Off,
    };
    listed.captured.sort();
    if let Some(g) = listed.gateway.as_mut() {
        g.local.sort();
        g.remote.sort();
    }
    listed.inbound_ports.sort_unstable();
    listed.attempts.sort_by_key(|a| (a.source, a.port));
    Ok(listed)
}

impl Listed {
    /// Whether the kernel's table is the one `plan` installs (counters aside).
    pub fn is(&self, plan: &Plan) -> bool {
        let mut captured = plan.captured.clone();
        captured.sort();
        self.captured == captured && self.same_but_captured(plan)
    }

    /// Whether the table is `plan`'s but for the captured destinations (`update_captured` then
    /// makes it so without replacing the table).
    pub fn same_but_captured(&self, plan: &Plan) -> bool {
        let mut ports = plan.inbound_ports.clone();
        ports.sort_unstable();
        let inbound = if ports.is_empty() {
            InboundMode::Off
        } else {
            plan.inbound
        };
        let ports = if inbound == InboundMode::Off {
            Vec::new()
        } else {
            ports
        };
        self.inbound == inbound
            && self.inbound_ports == ports
            && self.mark == Some(plan.mark)
            && self.port == Some(plan.port)
            && self.gateway == plan.gateway
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            captured: vec![
                "10.0.0.2:8080".parse().unwrap(),
                "[fd00::2]:8080".parse().unwrap(),
            ],
            inbound: InboundMode::Enforce,
            inbound_ports: vec![8080],
            port: 15006,
            mark: 0x7470_0001,
            gateway: None,
        }
    }

    /// A gateway's table as nftables 1.0.6 lists it (a /32 comes back as a plain address).
    const GATEWAY_LISTED: &str = r#"{"nftables": [{"table": {"family": "inet", "name": "tapproof", "handle": 1}},
 {"set": {"family": "inet", "name": "gw_local4", "table": "tapproof", "type": "ipv4_addr", "handle": 3, "flags": ["interval"], "elem": ["10.9.9.9", {"prefix": {"addr": "10.71.1.0", "len": 24}}]}},
 {"set": {"family": "inet", "name": "gw_remote6", "table": "tapproof", "type": "ipv6_addr", "handle": 4, "flags": ["interval"], "elem": [{"prefix": {"addr": "fd00:72::", "len": 64}}]}},
 {"chain": {"family": "inet", "table": "tapproof", "name": "capture_output", "handle": 7, "type": "nat", "hook": "output", "prio": -110, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "capture_output", "handle": 8, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1953497089}}, {"return": null}]}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "capture_output", "handle": 9, "expr": [{"match": {"op": "==", "left": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"payload": {"protocol": "tcp", "field": "dport"}}]}, "right": "@captured4"}}, {"counter": {"packets": 0, "bytes": 0}}, {"redirect": {"port": 15006}}]}},
 {"chain": {"family": "inet", "table": "tapproof", "name": "gateway_prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -110, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "tapproof", "name": "gateway_forward", "handle": 2, "type": "filter", "hook": "forward", "prio": -10, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "gateway_prerouting", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@gw_local4"}}, {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"counter": {"packets": 4, "bytes": 240}}, {"redirect": {"port": 15006}}]}},
 {"chain": {"family": "inet", "table": "tapproof", "name": "gateway_udp", "handle": 10, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "gateway_udp", "handle": 11, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@gw_local4"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@gw_remote4"}}, {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, {"counter": {"packets": 2, "bytes": 90}}, {"tproxy": {"family": "ip", "port": 15006}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1953497090}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "gateway_forward", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "@gw_remote6"}}, {"counter": {"packets": 3, "bytes": 300}}, {"drop": null}]}}]}"#;

    #[test]
    fn a_gateways_rules_capture_routed_tcp_drop_the_rest_and_read_back() {
        let gw = Plan {
            captured: Vec::new(),
            inbound: InboundMode::Off,
            inbound_ports: Vec::new(),
            gateway: Some(crate::capture::GatewayPlan {
                local: vec!["10.71.1.0/24".into(), "10.9.9.9/32".into()],
                remote: vec!["fd00:72::/64".into()],
                udp_mark: 0x7470_0002,
            }),
            ..plan()
        };
        let text = ruleset(&gw).to_string();
        assert!(text.contains(r#""hook":"prerouting""#) && text.contains(r#""hook":"forward""#));
        assert!(
            text.contains(r#"{"prefix":{"addr":"10.71.1.0","len":24}}"#),
            "{text}"
        );
        assert!(!ruleset(&plan()).to_string().contains(GATEWAY_PREROUTING));
        let l = parse(GATEWAY_LISTED).unwrap();
        assert!(l.is(&gw), "{l:?}");
        assert_eq!(
            (l.routed_connections, l.routed_dropped, l.routed_datagrams),
            (4, 3, 2)
        );
        assert!(
            text.contains(r#"{"tproxy":{"family":"ip","port":15006}}"#),
            "{text}"
        );
        assert!(!l.is(&plan()), "a gateway table is not a plain one");
    }

    #[test]
    fn a_hosts_own_tcp_and_udp_to_remote_sites_are_captured_and_nothing_routed() {
        let host = Plan {
            gateway: Some(crate::capture::GatewayPlan {
                local: Vec::new(),
                remote: vec!["10.72.0.0/16".into()],
                udp_mark: 0x7470_0002,
            }),
            ..plan()
        };
        let doc = ruleset(&host);
        let text = doc.to_string();
        assert!(!text.contains(GATEWAY_PREROUTING) && !text.contains(GATEWAY_FORWARD));
        let cmds = doc["nftables"].as_array().unwrap();
        let rules = |chain: &str| -> Vec<String> {
            cmds.iter()
                .filter(|c| c["add"]["rule"]["chain"] == chain)
                .map(|c| c["add"]["rule"]["expr"].to_string())
                .collect()
        };
        // Out: the host's UDP to the remote networks is marked, unless it is the agent's own.
        let chain = cmds
            .iter()
            .find(|c| c["add"]["chain"]["name"] == HOST_UDP_OUTPUT)
            .unwrap();
        assert_eq!(chain["add"]["chain"]["type"], "route");
        assert_eq!(chain["add"]["chain"]["hook"], "output");
        let out = rules(HOST_UDP_OUTPUT);
        assert_eq!(out.len(), 2);
        assert!(
            out[0].contains(r#""op":"!=""#) && out[0].contains("1953497089"),
            "{}",
            out[0]
        );
        assert!(
            out[0].contains("@gw_remote4") && out[0].contains("1953497090"),
            "{}",
            out[0]
        );
        // Back in over lo with that mark: to the agent's UDP socket.
        let back = rules(GATEWAY_UDP);
        assert!(
            back[0].contains(r#""right":"lo""#) && back[0].contains("tproxy"),
            "{}",
            back[0]
        );
        assert!(back[1].contains("@gw_remote6"), "{}", back[1]);
        // And its TCP to them is redirected to the capture listener.
        assert!(rules(OUTPUT_CHAIN)
            .iter()
            .any(|r| r.contains("@gw_remote4") && r.contains("redirect")));
    }

    #[test]
    fn the_ruleset_is_one_transaction_on_our_table_only() {
        let doc = ruleset(&plan());
        let cmds = doc["nftables"].as_array().unwrap();
        // Replace idiom: add (so delete cannot fail), delete, add again, all in one batch.
        assert_eq!(cmds[0], json!({"add": {"table": table()}}));
        assert_eq!(cmds[1], json!({"delete": {"table": table()}}));
        for c in cmds {
            let (_, obj) = c.as_object().unwrap().iter().next().unwrap();
            let (_, body) = obj.as_object().unwrap().iter().next().unwrap();
            // A table command names it as "name", everything else as "table".
            let t = body.get("table").unwrap_or(&body["name"]);
            assert_eq!(body["family"], FAMILY, "{c}");
            assert_eq!(t, TABLE, "a command outside table {TABLE}: {c}");
        }
        let text = doc.to_string();
        assert!(text.contains(r#"{"redirect":{"port":15006}}"#));
        assert!(text.contains(r#"{"drop":null}"#));
        let monitor = ruleset(&Plan {
            inbound: InboundMode::Monitor,
            ..plan()
        })
        .to_string();
        assert!(!monitor.contains("drop") && monitor.contains("attempts4"));
        let off = ruleset(&Plan {
            inbound: InboundMode::Off,
            ..plan()
        })
        .to_string();
        assert!(!off.contains(INPUT_CHAIN));
    }

    /// The shape `nft -j list table inet tapproof` prints (nftables 1.0.6), trimmed.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "tapproof", "handle": 1}},
 {"set": {"family": "inet", "name": "captured4", "table": "tapproof", "type": ["ipv4_addr", "inet_service"], "handle": 1, "elem": [{"concat": ["10.0.0.2", 8080]}]}},
 {"set": {"family": "inet", "name": "captured6", "table": "tapproof", "type": ["ipv6_addr", "inet_service"], "handle": 2, "elem": [{"concat": ["fd00::2", 8080]}]}},
 {"set": {"family": "inet", "name": "inbound_ports", "table": "tapproof", "type": "inet_service", "handle": 3, "elem": [8080]}},
 {"set": {"family": "inet", "name": "attempts4", "table": "tapproof", "type": ["ipv4_addr", "inet_service"], "handle": 6, "size": 4096, "flags": ["timeout"], "timeout": 86400,
   "elem": [{"elem": {"val": {"concat": ["10.9.0.3", 8080]}, "expires": 86399, "counter": {"packets": 2, "bytes": 120}}}], "stmt": [{"counter": null}]}},
 {"chain": {"family": "inet", "table": "tapproof", "name": "capture_output", "handle": 1, "type": "nat", "hook": "output", "prio": -110, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "capture_output", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1953497089}}, {"return": null}]}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "capture_output", "handle": 5, "expr": [{"match": {"op": "==", "left": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"payload": {"protocol": "tcp", "field": "dport"}}]}, "right": "@captured4"}}, {"counter": {"packets": 3, "bytes": 180}}, {"redirect": {"port": 15006}}]}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "capture_output", "handle": 6, "expr": [{"match": {"op": "==", "left": {"concat": [{"payload": {"protocol": "ip6", "field": "daddr"}}, {"payload": {"protocol": "tcp", "field": "dport"}}]}, "right": "@captured6"}}, {"counter": {"packets": 1, "bytes": 80}}, {"redirect": {"port": 15006}}]}},
 {"chain": {"family": "inet", "table": "tapproof", "name": "inbound_input", "handle": 2, "type": "filter", "hook": "input", "prio": -10, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "inbound_input", "handle": 11, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"return": null}]}},
 {"rule": {"family": "inet", "table": "tapproof", "chain": "inbound_input", "handle": 14, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": "@inbound_ports"}}, {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "original"}}, {"counter": {"packets": 2, "bytes": 120}}, {"drop": null}]}}]}"#;

    #[test]
    fn a_listing_reads_back_as_the_plan_with_its_counters() {
        let l = parse(LISTED).unwrap();
        assert!(l.is(&plan()), "{l:?}");
        assert_eq!(l.captured_connections, 4);
        assert_eq!(l.dropped_packets, 2);
        assert_eq!(
            l.attempts,
            [PlaintextAttempt {
                source: "10.9.0.3".parse().unwrap(),
                port: 8080,
                packets: 2
            }]
        );
        // Another plan (an address more, another mode) is not what the kernel holds.
        let mut other = plan();
        other.captured.push("10.0.0.3:80".parse().unwrap());
        assert!(!l.is(&other));
        assert!(!l.is(&Plan {
            inbound: InboundMode::Monitor,
            ..plan()
        }));
        assert!(parse("not json").is_err());
        // Only the captured destinations differ: updated in place, counters and attempts kept.
        assert!(
            l.same_but_captured(&other)
                && !l.same_but_captured(&Plan {
                    inbound: InboundMode::Monitor,
                    ..plan()
                })
        );
    }
}
