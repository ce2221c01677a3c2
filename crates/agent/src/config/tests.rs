use super::*;

const EXAMPLE: &str = r#"
trust_domain = "example.org"
[identity]
cert = "/etc/tapproof/node.pem"
key = "/etc/tapproof/node.key"
bundle = "/etc/tapproof/bundle.pem"
[admin]
listen = "127.0.0.1:15000"
[tunnel]
listen = "0.0.0.0:15008"
require_post_quantum = false
[[inbound]]
service = "db"
forward = "127.0.0.1:5432"
allow = ["spiffe://example.org/node/web-1", "spiffe://example.org/svc/*"]
[[outbound]]
listen = "127.0.0.1:15432"
service = "db"
peers = ["10.0.0.2:15008"]
server_id = "spiffe://example.org/node/db-1"
"#;

fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::parse(Path::new("agent.toml"), text)
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

/// The documented example with `lines` in its `[tunnel]` section (in place of its
/// `require_post_quantum = false`).
fn tunnel_with(lines: &str) -> String {
    EXAMPLE.replace("require_post_quantum = false", lines)
}

#[test]
fn parses_the_documented_example() {
    let c = parse(EXAMPLE).unwrap();
    assert_eq!(c.trust_domain.as_str(), "example.org");
    assert_eq!(c.inbound[0].allow.len(), 2);
    assert_eq!(
        c.outbound[0].server_id.as_ref().unwrap().to_string(),
        "spiffe://example.org/node/db-1"
    );
    assert_eq!(c.tunnel.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(c.reload_interval(), DEFAULT_RELOAD_INTERVAL);
}

#[test]
fn defaults_apply_when_sections_are_missing() {
    let c = parse("trust_domain = \"example.org\"\n[identity]\ncert = \"a\"\nkey = \"b\"\nbundle = \"c\"\n")
        .unwrap();
    assert_eq!(c.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
    assert_eq!(c.tunnel.listen.to_string(), DEFAULT_TUNNEL_LISTEN);
    assert!(c.inbound.is_empty() && c.outbound.is_empty());
}

#[test]
fn parses_durations() {
    let text = EXAMPLE.replace(
        "require_post_quantum = false",
        "drain_timeout = \"1m 30s\"\nhandshake_timeout = \"250ms\"",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.tunnel.drain_timeout, Duration::from_secs(90));
    assert_eq!(c.tunnel.handshake_timeout, Duration::from_millis(250));
    let e = err(&tunnel_with("drain_timeout = \"soon\""));
    assert!(e.contains("drain_timeout") && e.contains("30s"), "{e}");
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let e = err(&EXAMPLE.replace("require_post_quantum", "require_postquantum"));
    assert!(e.contains("require_postquantum"), "{e}");
    let e = err(&format!("{EXAMPLE}\nfoo = 1\n"));
    assert!(e.contains("foo"), "{e}");
}

#[test]
fn bad_values_are_errors_that_name_the_key() {
    let cases = [
        (EXAMPLE.replace("127.0.0.1:5432", "db.internal:5432"), "forward"),
        (EXAMPLE.replace("127.0.0.1:5432", "db.internal"), "forward"),
        (EXAMPLE.replace("10.0.0.2:15008", "db 1:15008"), "peers"),
        (
            EXAMPLE.replace("\"example.org\"", "\"Example.org\""),
            "trust_domain",
        ),
        (
            EXAMPLE.replace("spiffe://example.org/node/db-1", "https://db-1"),
            "server_id",
        ),
        (EXAMPLE.replace("10.0.0.2:15008", "10.0.0.2"), "peers"),
    ];
    for (text, key) in cases {
        let e = err(&text);
        assert!(e.contains(key), "{key}: {e}");
    }
    let e = err(&EXAMPLE.replace("spiffe://example.org/svc/*", "spiffe://example.org/svc/**"));
    assert!(e.contains("allow") || e.contains("svc/**"), "{e}");
}

#[test]
fn semantic_rules_name_the_key() {
    let cases = [
        (
            EXAMPLE.replace("127.0.0.1:5432", "10.1.1.1:5432"),
            "inbound[0].forward",
        ),
        (
            EXAMPLE.replace("127.0.0.1:15432", "0.0.0.0:15432"),
            "outbound[0].listen",
        ),
        (EXAMPLE.replace("[\"10.0.0.2:15008\"]", "[]"), "outbound[0].peers"),
        (
            EXAMPLE.replace("spiffe://example.org/node/db-1", "spiffe://other.org/node/db-1"),
            "outbound[0].server_id",
        ),
        (
            EXAMPLE.replace("spiffe://example.org/node/web-1", "spiffe://other.org/node/web-1"),
            "inbound[0].allow[0]",
        ),
        (
            EXAMPLE.replace("service = \"db\"\nforward", "service = \"d b\"\nforward"),
            "inbound[0].service",
        ),
        (
            EXAMPLE.replace(
                "allow = [\"spiffe://example.org/node/web-1\", \"spiffe://example.org/svc/*\"]",
                "allow = []",
            ),
            "inbound[0].allow",
        ),
    ];
    for (text, key) in cases {
        let e = err(&text);
        assert!(e.contains(key), "{key}: {e}");
    }
    let twice = format!("{EXAMPLE}\n[[inbound]]\nservice = \"db\"\nforward = \"127.0.0.1:1\"\nallow = [\"spiffe://example.org/a\"]\n");
    assert!(err(&twice).contains("configured twice"));
}

#[test]
fn overrides_permit_non_loopback_plaintext_legs() {
    let text = EXAMPLE
        .replace("127.0.0.1:5432\"", "10.1.1.1:5432\"\nallow_non_loopback = true")
        .replace("127.0.0.1:15432\"", "0.0.0.0:15432\"\nallow_non_loopback = true");
    parse(&text).unwrap();
}

#[test]
fn the_shipped_example_config_parses() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/agent.toml"));
    let c = AgentConfig::load(path).unwrap();
    assert!(
        c.identity.as_ref().unwrap().cert.is_absolute(),
        "relative paths resolve against the config file"
    );
    assert_eq!(c.outbound[0].peers.len(), 2);
}

#[test]
fn exactly_one_identity_source() {
    let control =
        "trust_domain = \"example.org\"\n[control]\ndata_dir = \"/var/lib/tapproof\"\ntoken = \"tpj1.x\"\n";
    let c = parse(control).unwrap();
    assert!(c.identity.is_none() && c.control.is_some());
    let both = format!("{control}[identity]\ncert = \"a\"\nkey = \"b\"\nbundle = \"c\"\n");
    assert!(err(&both).contains("not both"));
    assert!(err("trust_domain = \"example.org\"\n").contains("[identity]"));
    let two_tokens = control.replace("token = \"tpj1.x\"", "token = \"a\"\ntoken_file = \"b\"");
    assert!(err(&two_tokens).contains("control.token"));
}

#[test]
fn the_shipped_control_plane_example_parses() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/agent-control.toml"
    ));
    let c = AgentConfig::load(path).unwrap();
    assert!(c.control.is_some() && c.identity.is_none());
}

#[test]
fn outbound_peers_come_from_config_or_the_directory() {
    let control = "trust_domain = \"example.org\"\n[control]\ndata_dir = \"/d\"\n[[outbound]]\nlisten = \"127.0.0.1:1\"\nservice = \"db\"\n";
    let c = parse(control).unwrap();
    assert!(c.outbound[0].peers.is_empty() && c.outbound[0].server_id.is_none());
    let files = EXAMPLE
        .replace("peers = [\"10.0.0.2:15008\"]\n", "")
        .replace("server_id = \"spiffe://example.org/node/db-1\"\n", "");
    assert!(err(&files).contains("service directory"), "{}", err(&files));
    let no_id = EXAMPLE.replace("server_id = \"spiffe://example.org/node/db-1\"\n", "");
    assert!(err(&no_id).contains("outbound[0].server_id"));
}

#[test]
fn workload_api_callers_are_checked_and_errors_name_the_key() {
    let with =
        |extra: &str| format!("{EXAMPLE}[workload_api]\nsocket = \"/run/tapproof/workload.sock\"\n{extra}");
    let c = parse(&with(
        "[[workload_api.caller]]\nuser = \"postgres\"\nnode = true\n",
    ))
    .unwrap();
    assert_eq!(
        c.workload_api.unwrap().caller[0].user.as_deref(),
        Some("postgres")
    );
    for (extra, expect) in [
        (
            "[[workload_api.caller]]\nnode = true\n",
            "workload_api.caller[0].uid: missing",
        ),
        (
            "[[workload_api.caller]]\nuid = 1\nuser = \"a\"\nnode = true\n",
            "workload_api.caller[0].uid: give uid or user",
        ),
        (
            "[[workload_api.caller]]\nuid = 1\n",
            "workload_api.caller[0].services: is empty and node is false",
        ),
        (
            "[[workload_api.caller]]\nuid = 1\nservices = [\"db\"]\n",
            "workload_api.caller[0].services[0]: service identities come from the control plane",
        ),
        (
            "[[workload_api.caller]]\nuid = 1\nservices = [\"a/b\"]\n",
            "workload_api.caller[0].services[0]: \"a/b\" is not a valid service name",
        ),
        (
            "[[workload_api.caller]]\nuid = 1\nnode = true\ngid = 3\n",
            "unknown field `gid`",
        ),
    ] {
        let e = err(&with(extra));
        assert!(e.contains(expect), "{extra}: {e}");
    }
    let e = err(&format!("{EXAMPLE}[workload_api]\nsocket = \"workload.sock\"\n"));
    assert!(
        e.contains("workload_api.socket: workload.sock is not an absolute path"),
        "{e}"
    );
}

#[test]
fn federation_entries_are_checked_and_let_foreign_ids_in() {
    let federated = format!(
        "{EXAMPLE}[[federation]]\ntrust_domain = \"partner.org\"\nbundle = \"/etc/tapproof/partner.pem\"\n\
         endpoint = \"https://cp.partner.org:15443/v1/spiffe-bundle\"\nendpoint_id = \"spiffe://partner.org/server\"\n\
         refresh_interval = \"1m\"\n"
    )
    .replace("\"spiffe://example.org/svc/*\"", "\"spiffe://partner.org/svc/*\"")
    .replace("spiffe://example.org/node/db-1", "spiffe://partner.org/node/db-1");
    let c = parse(&federated).unwrap();
    assert!(c.knows_trust_domain(&TrustDomain::new("partner.org").unwrap()));
    assert!(!c.knows_trust_domain(&TrustDomain::new("other.org").unwrap()));
    assert_eq!(c.federation[0].refresh_interval, Some(Duration::from_secs(60)));
    let foreign = federated.replace("partner.org/svc/*", "other.org/svc/*");
    assert!(err(&foreign).contains("inbound[0].allow[1]"), "{}", err(&foreign));
    for (from, to, want) in [
        (
            "trust_domain = \"partner.org\"",
            "trust_domain = \"example.org\"",
            "federation[0].trust_domain",
        ),
        (
            "https://cp.partner.org:15443/v1",
            "https://cp.partner.org/v1",
            "port is required",
        ),
        ("https://cp", "http://cp", "not an https:// URL"),
        (
            "spiffe://partner.org/server",
            "spiffe://other.org/server",
            "federation[0].endpoint_id",
        ),
        (
            "refresh_interval = \"1m\"",
            "refresh_interval = \"100ms\"",
            "at least 1s",
        ),
    ] {
        let e = err(&federated.replacen(from, to, 1));
        assert!(e.contains(want), "{from} -> {to}: {e}");
    }
    assert_eq!(
        BundleEndpoint::parse("https://[2001:db8::1]:8443/b").unwrap(),
        BundleEndpoint {
            authority: "[2001:db8::1]:8443".into(),
            path: "/b".into()
        }
    );
    assert!(BundleEndpoint::parse("https://u@h:1/").is_err());
}

/// The issue's contract, verbatim: `[capture] inbound` and `[[outbound]] capture`.
#[test]
fn capture_contract_parses_and_its_mistakes_name_the_key() {
    let contract = r#"
trust_domain = "example.org"
[identity]
cert = "/c"
key = "/k"
bundle = "/b"
[capture]
inbound = "enforce"
[[inbound]]
service = "db"
forward = "127.0.0.1:8080"
allow = ["spiffe://example.org/node/a"]
[[outbound]]
capture = "10.0.0.2:8080"
service = "web"
peers = ["10.0.0.2:15008"]
server_id = "spiffe://example.org/node/b"
"#;
    let c = parse(contract).unwrap();
    assert_eq!(c.capture.inbound, InboundMode::Enforce);
    assert_eq!(c.capture.port, DEFAULT_CAPTURE_PORT);
    assert_eq!(c.outbound[0].capture, Some("10.0.0.2:8080".parse().unwrap()));
    assert_eq!(c.outbound[0].listen, None);
    assert!(c.uses_capture());
    assert!(!parse(EXAMPLE).unwrap().uses_capture());
    let plan = crate::capture::Plan::of(&c);
    assert_eq!(plan.inbound_ports, [8080]);
    assert_eq!(plan.captured, ["10.0.0.2:8080".parse().unwrap()]);

    let cases = [
        (contract.replace("inbound = \"enforce\"", "inbound = \"block\""), "unknown variant `block`"),
        (
            contract.replace("capture = \"10.0.0.2:8080\"", "capture = \"10.0.0.2:8080\"\nlisten = \"127.0.0.1:1\""),
            "outbound[0].capture",
        ),
        (contract.replace("capture = \"10.0.0.2:8080\"\n", ""), "outbound[0].listen: missing"),
        (contract.replace("10.0.0.2:8080", "127.0.0.1:8080"), "outbound[0].capture"),
        (contract.replace("10.0.0.2:8080", "10.0.0.2:0"), "outbound[0].capture"),
        (
            format!("{contract}[[outbound]]\ncapture = \"10.0.0.2:8080\"\nservice = \"x\"\npeers = [\"10.0.0.2:15008\"]\nserver_id = \"spiffe://example.org/node/b\"\n"),
            "captured by another [[outbound]]",
        ),
        (contract.replace("inbound = \"enforce\"", "port = 0"), "capture.port"),
        (contract.replace("inbound = \"enforce\"", "mark = 0"), "capture.mark"),
        (
            contract.replace("inbound = \"enforce\"", "directory = true"),
            "capture.directory: needs [control]",
        ),
        (
            contract.replace("forward = \"127.0.0.1:8080\"", "forward = \"127.0.0.1:8080\"\naddresses = [\"0.0.0.0:8080\"]"),
            "inbound[0].addresses[0]",
        ),
        (
            contract.replace("forward = \"127.0.0.1:8080\"", "forward = \"127.0.0.1:8080\"\naddresses = [\"10.0.0.1:0\"]"),
            "inbound[0].addresses[0]",
        ),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.contains(want), "want {want:?} in {e}");
    }
}

#[test]
fn key_update_schedule_has_defaults_and_floors() {
    let c = parse(EXAMPLE).unwrap();
    assert_eq!(c.tunnel.key_update_bytes, DEFAULT_KEY_UPDATE_BYTES);
    assert_eq!(c.tunnel.key_update_interval, DEFAULT_KEY_UPDATE_INTERVAL);
    let c = parse(&tunnel_with(
        "key_update_bytes = 1048576\nkey_update_interval = \"10m\"",
    ))
    .unwrap();
    assert_eq!(c.tunnel.key_update_bytes, 1 << 20);
    assert_eq!(c.tunnel.key_update_interval, Duration::from_secs(600));
    let e = err(&tunnel_with("key_update_bytes = 100"));
    assert!(
        e.contains("tunnel.key_update_bytes") && e.contains("16384"),
        "{e}"
    );
    let e = err(&tunnel_with("key_update_interval = \"10ms\""));
    assert!(
        e.contains("tunnel.key_update_interval") && e.contains("1s"),
        "{e}"
    );
}

#[test]
fn tunnel_receive_buffer_is_autotuned_unless_set_within_bounds() {
    assert_eq!(parse(EXAMPLE).unwrap().tunnel.receive_buffer, 0);
    let c = parse(&tunnel_with("receive_buffer = 262144")).unwrap();
    assert_eq!(c.tunnel.receive_buffer, 262_144);
    for bad in ["receive_buffer = 4096", "receive_buffer = 2147483647"] {
        let e = err(&tunnel_with(bad));
        assert!(
            e.contains("tunnel.receive_buffer") && e.contains("65536"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn crypto_profiles_are_named_and_one_this_build_cannot_honour_is_refused() {
    assert_eq!(
        parse(EXAMPLE).unwrap().tunnel.crypto_profile,
        tapproof_tls::CryptoProfile::Default
    );
    let c = parse(&tunnel_with("crypto_profile = \"cnsa2\"")).unwrap();
    assert_eq!(c.tunnel.crypto_profile, tapproof_tls::CryptoProfile::Cnsa2);
    let e = err(&tunnel_with("crypto_profile = \"fips\""));
    assert!(
        e.contains("tunnel.crypto_profile") && e.contains("no FIPS module"),
        "{e}"
    );
    let e = err(&tunnel_with("crypto_profile = \"suite-b\""));
    assert!(
        e.contains("crypto_profile") && e.contains("\"default\", \"cnsa2\" or \"fips\""),
        "{e}"
    );
}

#[test]
fn selftest_interval_is_an_hour_or_set_or_off() {
    assert_eq!(
        parse(EXAMPLE).unwrap().tunnel.selftest_interval,
        std::time::Duration::from_secs(3600)
    );
    assert!(parse(&tunnel_with("selftest_interval = \"0s\""))
        .unwrap()
        .tunnel
        .selftest_interval
        .is_zero());
    let e = err(&tunnel_with("selftest_interval = \"2s\""));
    assert!(
        e.contains("tunnel.selftest_interval") && e.contains("at least 10s"),
        "{e}"
    );
}
