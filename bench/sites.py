"""Site to site: host A1 -- gateway GA == interconnect == gateway GB -- host B1, four network
namespaces (the interconnect is the GA-GB veth). A1 reaches nginx and iperf3 on B1 by B1's real
address through, in turn: plain routing (the floor: the gateways forward, nothing encrypts),
tapproof gateways (`[gateway]`: TCP in CONNECT streams, UDP in CONNECT-UDP, on one pooled mTLS
tunnel), stunnel4 between the gateways (one TLS connection per app connection: GA's nftables
redirects A1's connections to B1's web and iperf3 ports to a stunnel client per port, whose stunnel
server on GB connects to B1; TCP only), boringtun (userspace WireGuard between the gateways) and
Nebula (unsafe_routes between the gateways). Per path: iperf3 bulk with 1 and 32 TCP flows, wrk new connections/s, iperf3 UDP
with 1 KiB datagrams (packets/s received and loss), and the p99 of small keep-alive requests idle
and while a 4-flow bulk transfer shares the path.
Namespaces (tpsite-*), links and addresses (10.240-245.0.0/24) are this harness's own and are
removed at the end, as is every process and nftables table started here."""
import os, shutil, subprocess, threading, time
from common import (Procs, iperf, in_ns, log, nginx_conf, ns_run as ns, pki_dir, sh, start_boringtun,
                    stunnel_configs, wait_port, wg_keys, wrk)

NS = dict(a1="tpsite-a1", ga="tpsite-ga", gb="tpsite-gb", b1="tpsite-b1")
SITE_A, SITE_B, IX = "10.241.0", "10.242.0", "10.240.0"
NEB_A, NEB_B = "10.243.0.1", "10.243.0.2"
WG_A, WG_B = "10.244.0.1", "10.244.0.2"
HTTP, IPERF = 18080, 15201
B1 = f"{SITE_B}.2"
PATHS = ("routed plaintext", "tapproof gateways", "stunnel4 gateways", "boringtun", "Nebula")
# stunnel4 gateways: the port on GA each of B1's services is redirected to, and GB's accept port.
STUNNEL = {"http": (HTTP, 28080, 30080), "iperf": (IPERF, 25201, 30201)}
TD = "bench.example"
# More [tunnel] lines for both tapproof gateways (say "stream_window = 1048576"), for measuring a
# lever: set by a script that imports this module; the benchmark runs the defaults.
TUNNEL_EXTRA = ""


def cleanup():
    for n in NS.values():
        # The tapproof path's table and policy route live in the gateway namespaces: going with them.
        sh("ip", "netns", "del", n, check=False)
    for name in ("tpswga", "tpswgb"):
        try:
            os.unlink(f"/var/run/wireguard/{name}.sock")
        except OSError:
            pass


class Sites:
    def __init__(self, d, tapproof):
        self.d, self.tapproof = d, tapproof
        self.base = Procs()  # nginx, iperf3: for the whole section
        self.path_procs = Procs()  # the path under test
        self.skipped = {}

    def start(self):
        cleanup()
        for n in NS.values():
            sh("ip", "netns", "add", n)
            ns(n, "ip", "link", "set", "lo", "up")
        links = (("a1", "tpsa1", "ga", "tpsga"), ("ga", "tpsgx", "gb", "tpsgy"), ("gb", "tpsgb", "b1", "tpsb1"))
        for a, ai, b, bi in links:
            sh("ip", "link", "add", ai, "netns", NS[a], "type", "veth", "peer", "name", bi, "netns", NS[b])
        for n, dev, cidr in (("a1", "tpsa1", f"{SITE_A}.2/24"), ("ga", "tpsga", f"{SITE_A}.1/24"),
                             ("ga", "tpsgx", f"{IX}.1/24"), ("gb", "tpsgy", f"{IX}.2/24"),
                             ("gb", "tpsgb", f"{SITE_B}.1/24"), ("b1", "tpsb1", f"{SITE_B}.2/24")):
            ns(NS[n], "ip", "addr", "add", cidr, "dev", dev)
            ns(NS[n], "ip", "link", "set", dev, "up")
        # A1 is the load generator: wrk's closed connections must not run it out of ports (through
        # a proxy the client often closes first and holds TIME_WAIT; 28k ports / 60 s would cap
        # every path near 470 new connections/s).
        ns(NS["a1"], "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
        ns(NS["a1"], "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535")
        ns(NS["a1"], "ip", "route", "add", f"{SITE_B}.0/24", "via", f"{SITE_A}.1")
        ns(NS["b1"], "ip", "route", "add", f"{SITE_A}.0/24", "via", f"{SITE_B}.1")
        for g in ("ga", "gb"):
            ns(NS[g], "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        d = self.d
        self.base.start("nginx", ["nginx", "-c", nginx_conf(d, f"0.0.0.0:{HTTP}", "nginx-sites"), "-e",
                                  f"{d}/nginx-sites-error.log"], f"{d}/nginx-sites.log", ns=NS["b1"])
        self.base.start("iperf3", ["iperf3", "-s", "-p", str(IPERF)], f"{d}/iperf3-sites.log", ns=NS["b1"])
        wait_port(HTTP, "nginx", NS["b1"])
        wait_port(IPERF, "iperf3", NS["b1"])

    def routes_via_interconnect(self, on):
        """The gateways' routes to the other site: over the interconnect (plain routing and tapproof,
        whose rules take the traffic before it is forwarded), or none (the overlays add theirs)."""
        for g, net, via in (("ga", SITE_B, f"{IX}.2"), ("gb", SITE_A, f"{IX}.1")):
            ns(NS[g], "ip", "route", "del", f"{net}.0/24", check=False)
            if on:
                ns(NS[g], "ip", "route", "add", f"{net}.0/24", "via", via)

    def up(self, path):
        """Sets up `path`; returns the PIDs whose CPU the bulk figure counts."""
        if path == "routed plaintext":
            self.routes_via_interconnect(True)
            return []
        if path == "tapproof gateways":
            self.routes_via_interconnect(True)
            return self.start_tapproof()
        self.routes_via_interconnect(False)
        if path == "stunnel4 gateways":
            return self.start_stunnel()
        # The overlays' MTUs (1420, 1300) are below the sites' 1500: clamp the MSS of forwarded
        # SYNs to the route's MTU, as a site-to-site WireGuard or Nebula setup does.
        for g in ("ga", "gb"):
            subprocess.run(in_ns(NS[g], ["nft", "-f", "-"]), check=True, text=True, input=(
                "table inet tpsbench {\n chain clamp {\n  type filter hook forward priority 0; policy accept;\n"
                "  tcp flags syn tcp option maxseg size set rt mtu\n }\n}\n"))
        return self.start_boringtun() if path == "boringtun" else self.start_nebula()

    def down(self, path):
        self.path_procs.stop()
        if path == "tapproof gateways":
            for g in ("ga", "gb"):
                ns(NS[g], self.tapproof, "capture", "remove", "--reason", "benchmark path done", check=False)
        for dev in ("tpswga", "tpswgb", "tpsneb"):
            for n in ("ga", "gb"):
                ns(NS[n], "ip", "link", "del", dev, check=False)
        for n in ("ga", "gb"):
            ns(NS[n], "nft", "delete", "table", "inet", "tpsbench", check=False)

    def start_tapproof(self):
        d = pki_dir(self.d, self.tapproof, TD, "sites")
        pids = []
        for me, other, listen, peer, local, remote in (("server", "client", f"{IX}.2", f"{IX}.1", SITE_B, SITE_A),
                                                       ("client", "server", f"{IX}.1", f"{IX}.2", SITE_A, SITE_B)):
            g = "gb" if me == "server" else "ga"
            conf = f"{d}/gw-{g}.toml"
            with open(conf, "w") as f:
                f.write(f'trust_domain = "{TD}"\n[identity]\ncert = "{d}/{me}.pem"\nkey = "{d}/{me}.key"\n'
                        f'bundle = "{d}/bundle.pem"\n[tunnel]\nlisten = "{listen}:15008"\n{TUNNEL_EXTRA}'
                        f'[gateway]\nnetworks = ["{local}.0/24"]\n[[gateway.remote]]\nname = "other"\n'
                        f'networks = ["{remote}.0/24"]\ngateways = ["{peer}:15008"]\n'
                        f'server_id = "spiffe://{TD}/node/{other}"\n')
            p = self.path_procs.start(f"tp-{g}", [self.tapproof, "--log-level", "warn", "agent", "-c", conf],
                                      f"{d}/gw-{g}.log", ns=NS[g])
            pids.append(p.pid)
        wait_port(15008, "tapproof", NS["gb"])
        wait_port(15006, "tapproof", NS["ga"])
        self.wait_reachable("tapproof gateways")
        return pids

    def start_stunnel(self):
        """No route to site B on GA: what the redirect does not take (UDP) goes nowhere."""
        d = pki_dir(self.d, self.tapproof, TD, "sites-stunnel")
        stunnel_configs(d, {n: (f"0.0.0.0:{ga}", f"{IX}.2:{gb}", f"{B1}:{b1}") for n, (b1, ga, gb) in STUNNEL.items()})
        rules = "".join(f"  ip daddr {B1} tcp dport {b1} redirect to :{ga}\n" for b1, ga, _ in STUNNEL.values())
        subprocess.run(in_ns(NS["ga"], ["nft", "-f", "-"]), check=True, text=True, input=(
            "table inet tpsbench {\n chain to_stunnel {\n  type nat hook prerouting priority dstnat; policy accept;\n"
            f"{rules} }}\n}}\n"))
        pids = [self.path_procs.start(f"stunnel-{n}", ["stunnel4", f"{d}/st-{n}.conf"], f"{d}/st-{n}.log",
                                      ns=NS[g]).pid for n, g in (("server", "gb"), ("client", "ga"))]
        for _, ga, gb in STUNNEL.values():
            wait_port(gb, "stunnel", NS["gb"])
            wait_port(ga, "stunnel", NS["ga"])
        self.wait_reachable("stunnel4 gateways")
        return pids

    def start_boringtun(self):
        d = f"{self.d}/sites-wg"
        keys = wg_keys(d, ("a", "b"))
        pids = []
        for i, (n, g, dev, wg_ip, far_net, far_ix) in enumerate(
                (("a", "ga", "tpswga", WG_A, SITE_B, f"{IX}.2"), ("b", "gb", "tpswgb", WG_B, SITE_A, f"{IX}.1"))):
            pids.append(start_boringtun(self.path_procs, f"boringtun-{n}", dev, f"{d}/{n}.log", NS[g]))
            other_wg = WG_B if n == "a" else WG_A
            ns(NS[g], "wg", "set", dev, "private-key", f"{d}/{n}.key", "listen-port", str(51830 + i),
               "peer", keys[1 - i], "endpoint", f"{far_ix}:{51830 + 1 - i}",
               "allowed-ips", f"{other_wg}/32,{far_net}.0/24")
            ns(NS[g], "ip", "addr", "add", f"{wg_ip}/24", "dev", dev)
            ns(NS[g], "ip", "link", "set", dev, "mtu", "1420", "up")
            ns(NS[g], "ip", "route", "add", f"{far_net}.0/24", "dev", dev)
        self.wait_reachable("boringtun")
        return pids

    def start_nebula(self):
        d = f"{self.d}/sites-nebula"
        shutil.rmtree(d, ignore_errors=True)  # nebula-cert will not overwrite the last run's CA
        os.makedirs(d)
        sh("nebula-cert", "ca", "-name", "tpsites", "-out-crt", f"{d}/ca.crt", "-out-key", f"{d}/ca.key")
        pids = []
        for n, g, ip, other_ip, other_ix, mine, far in (("a", "ga", NEB_A, NEB_B, f"{IX}.2", SITE_A, SITE_B),
                                                        ("b", "gb", NEB_B, NEB_A, f"{IX}.1", SITE_B, SITE_A)):
            sh("nebula-cert", "sign", "-ca-crt", f"{d}/ca.crt", "-ca-key", f"{d}/ca.key", "-name", n,
               "-ip", f"{ip}/24", "-subnets", f"{mine}.0/24", "-out-crt", f"{d}/{n}.crt", "-out-key", f"{d}/{n}.key")
            with open(f"{d}/{n}.yml", "w") as f:
                f.write(f"""pki: {{ca: {d}/ca.crt, cert: {d}/{n}.crt, key: {d}/{n}.key}}
static_host_map: {{"{other_ip}": ["{other_ix}:4242"]}}
lighthouse: {{am_lighthouse: false, interval: 60, hosts: []}}
listen: {{host: 0.0.0.0, port: 4242}}
punchy: {{punch: false}}
cipher: aes
tun:
  dev: tpsneb
  mtu: 1300
  unsafe_routes:
    - route: {far}.0/24
      via: {other_ip}
logging: {{level: warning}}
firewall:
  outbound: [{{port: any, proto: any, host: any}}]
  inbound: [{{port: any, proto: any, host: any}}]
""")
            pids.append(self.path_procs.start(f"nebula-{n}", ["nebula", "-config", f"{d}/{n}.yml"], f"{d}/{n}.log",
                                              ns=NS[g]).pid)
        self.wait_reachable("Nebula")
        return pids

    def wait_reachable(self, what):
        probe = f"exec 3<>/dev/tcp/{B1}/{HTTP}"
        for _ in range(75):
            if ns(NS["a1"], "timeout", "2", "bash", "-c", probe, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what}: {B1}:{HTTP} unreachable from A1")

    def stop(self):
        for p in PATHS:
            try:
                self.down(p)
            except Exception:
                pass
        self.base.stop()
        cleanup()


def udp(seconds):
    """iperf3 UDP, 1 KiB datagrams as fast as the sender goes: (received packets/s, loss %)."""
    import json
    out = subprocess.run(in_ns(NS["a1"], ["iperf3", "-c", B1, "-p", str(IPERF), "-u", "-l", "1024", "-b", "0",
                                          "-t", str(seconds), "-J"]), capture_output=True, text=True,
                         timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"iperf3 -u failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    s = json.loads(out.stdout)["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    return received / s["seconds"], s["lost_percent"]


def latency_under_bulk(seconds):
    """p99 of small keep-alive requests (wrk, 4 connections) while iperf3 moves 4 bulk flows on the
    same path; (p99 ms, requests/s)."""
    bulk = threading.Thread(target=lambda: subprocess.run(
        in_ns(NS["a1"], ["iperf3", "-c", B1, "-p", str(IPERF), "-P", "4", "-t", str(seconds + 2)]),
        capture_output=True, timeout=seconds + 60))
    bulk.start()
    time.sleep(1)
    try:
        rps, lat, _ = wrk(B1, HTTP, seconds, 4, close=False, ns=NS["a1"])
    finally:
        bulk.join()
    return lat.get("99", float("nan")), rps


def run(s, runs, seconds):
    res = {p: dict(bulk1=[], bulk32=[], cpu=[], new=[], udp_pps=[], udp_loss=[], p99_idle=[], p99_bulk=[],
                   notes=set()) for p in PATHS}
    for run_i in range(runs):
        for path in PATHS:
            if path in s.skipped:
                continue
            r = res[path]
            try:
                pids = s.up(path)
            except Exception as e:
                s.skipped[path] = str(e)[:200]
                log(f"sites: {path} not measured: {e}")
                s.down(path)
                continue
            try:
                mbs, cpu = iperf(B1, IPERF, seconds, pids, ns=NS["a1"])
                r["bulk1"].append(mbs)
                if cpu is not None:
                    r["cpu"].append(cpu)
                time.sleep(1)
                r["bulk32"].append(iperf(B1, IPERF, seconds, (), ns=NS["a1"], streams=32)[0])
                rps, _, err = wrk(B1, HTTP, seconds, 16, close=True, ns=NS["a1"])
                r["new"].append(rps)
                if err:
                    r["notes"].add("new-conn: " + err)
                time.sleep(1)
                pps, loss = udp(seconds) if path != "stunnel4 gateways" else (float("nan"), float("nan"))
                r["udp_pps"].append(pps)
                r["udp_loss"].append(loss)
                time.sleep(1)
                _, lat, _ = wrk(B1, HTTP, seconds, 4, close=False, ns=NS["a1"])
                r["p99_idle"].append(lat.get("99", float("nan")))
                time.sleep(1)
                r["p99_bulk"].append(latency_under_bulk(seconds)[0])
                log(f"sites run {run_i + 1}/{runs} {path:17} bulk {mbs:6.0f} MB/s x32 {r['bulk32'][-1]:6.0f} "
                    f"new {rps:6.0f}/s udp {pps:7.0f} pkt/s loss {loss:4.1f}% p99 idle {r['p99_idle'][-1]:.2f} "
                    f"under bulk {r['p99_bulk'][-1]:.2f} ms")
            except Exception as e:
                r["notes"].add(str(e)[:200])
                log(f"sites: {path}: {e}")
            finally:
                s.down(path)
    return res
