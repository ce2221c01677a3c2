"""Across two network namespaces joined by a veth: direct plaintext, tapproof (the app dials the
agent's outbound listener), tapproof captured (the app dials the server's address, nftables
redirects it into the same agent), Nebula and boringtun (userspace WireGuard), each carrying the
same nginx and iperf3 in the server namespace to clients in the client namespace.
Namespaces, links and addresses are this harness's own (tpbench-*, 10.231-233.0.0/24) and are
removed at the end, as is every process started here."""
import os, subprocess, time
from common import (Procs, log, measure_paths, nginx_conf, ns_run as ns, pki_dir, sh, start_boringtun,
                    tapproof_configs, wait_port, wg_keys)

NS_C, NS_S = "tpbench-c", "tpbench-s"
VETH_C, VETH_S = "tpbc0", "tpbs0"
# The captured path dials a second address of the server (CAPTURED), so that the direct path to
# the first one is not captured.
CAPTURED = "10.231.0.3"
IP = dict(veth=("10.231.0.1", "10.231.0.2"), nebula=("10.232.0.1", "10.232.0.2"),
          wg=("10.233.0.1", "10.233.0.2"))
HTTP, IPERF, TUNNEL, TP_HTTP, TP_IPERF = 18080, 15201, 25008, 28080, 25201
PATHS = ("direct plaintext", "tapproof", "tapproof captured", "Nebula", "boringtun")
TD = "bench.example"



def cleanup():
    for n in (NS_C, NS_S):
        sh("ip", "netns", "del", n, check=False)
    for name in ("tpbwgc", "tpbwgs"):
        try:
            os.unlink(f"/var/run/wireguard/{name}.sock")
        except OSError:
            pass


class Veth:
    def __init__(self, d, tapproof):
        self.d, self.tapproof, self.procs = d, tapproof, Procs()
        self.pids = {p: [] for p in PATHS}
        self.host = {"direct plaintext": IP["veth"][1], "tapproof": "127.0.0.1", "tapproof captured": CAPTURED,
                     "Nebula": IP["nebula"][1], "boringtun": IP["wg"][1]}
        self.skipped = {}

    def port(self, path, what):
        if path == "tapproof":  # "tapproof captured" dials the service's own ports
            return TP_HTTP if what == "http" else TP_IPERF
        return HTTP if what == "http" else IPERF

    def start(self):
        cleanup()
        sh("ip", "netns", "add", NS_C)
        sh("ip", "netns", "add", NS_S)
        sh("ip", "link", "add", VETH_C, "netns", NS_C, "type", "veth", "peer", "name", VETH_S, "netns", NS_S)
        for n, dev, ip in ((NS_C, VETH_C, IP["veth"][0]), (NS_S, VETH_S, IP["veth"][1])):
            ns(n, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            ns(n, "ip", "link", "set", dev, "up")
            ns(n, "ip", "link", "set", "lo", "up")
        ns(NS_S, "ip", "addr", "add", f"{CAPTURED}/24", "dev", VETH_S)
        d, tp = self.d, self.tapproof
        self.procs.start("nginx", ["nginx", "-c", nginx_conf(d, f"0.0.0.0:{HTTP}", "nginx-veth"), "-e",
                                   f"{d}/nginx-veth-error.log"], f"{d}/nginx-veth.log", ns=NS_S)
        self.procs.start("iperf3", ["iperf3", "-s", "-p", str(IPERF)], f"{d}/iperf3-veth.log", ns=NS_S)
        wait_port(HTTP, "nginx", NS_S)
        wait_port(IPERF, "iperf3", NS_S)
        vd = pki_dir(d, tp, TD, "veth")
        tapproof_configs(vd, TD, "server", "client", f"{IP['veth'][1]}:{TUNNEL}", f"{IP['veth'][1]}:{TUNNEL}",
                         {"http": f"127.0.0.1:{HTTP}", "iperf": f"127.0.0.1:{IPERF}"},
                         {"http": f"127.0.0.1:{TP_HTTP}", "iperf": f"127.0.0.1:{TP_IPERF}"}, (25100, 25101))
        with open(f"{vd}/tp-client.toml", "a") as f:
            for svc, port in (("http", HTTP), ("iperf", IPERF)):
                f.write(f'[[outbound]]\ncapture = "{CAPTURED}:{port}"\nservice = "{svc}"\n'
                        f'peers = ["{IP["veth"][1]}:{TUNNEL}"]\nserver_id = "spiffe://{TD}/node/server"\n')
        a = [self.procs.start(f"tp-{n}", [tp, "--log-level", "warn", "agent", "-c", f"{vd}/tp-{n}.toml"],
                              f"{vd}/tp-{n}.log", ns=space) for n, space in (("server", NS_S), ("client", NS_C))]
        wait_port(TP_HTTP, "tapproof", NS_C)
        wait_port(TUNNEL, "tapproof", NS_S)
        self.pids["tapproof"] = self.pids["tapproof captured"] = [p.pid for p in a]
        for name, starter in (("Nebula", self.start_nebula), ("boringtun", self.start_boringtun)):
            try:
                self.pids[name] = starter()
            except Exception as e:  # a missing peer must not hide the other results
                self.skipped[name] = str(e)
                log(f"veth: {name} not measured: {e}")

    def start_nebula(self):
        d = f"{self.d}/nebula"
        os.makedirs(d, exist_ok=True)
        sh("nebula-cert", "ca", "-name", "tpbench", "-out-crt", f"{d}/ca.crt", "-out-key", f"{d}/ca.key")
        pids = []
        for i, (n, space) in enumerate((("c", NS_C), ("s", NS_S))):
            other = 1 - i
            sh("nebula-cert", "sign", "-ca-crt", f"{d}/ca.crt", "-ca-key", f"{d}/ca.key", "-name", n,
               "-ip", f"{IP['nebula'][i]}/24", "-out-crt", f"{d}/{n}.crt", "-out-key", f"{d}/{n}.key")
            with open(f"{d}/{n}.yml", "w") as f:
                f.write(f"""pki: {{ca: {d}/ca.crt, cert: {d}/{n}.crt, key: {d}/{n}.key}}
static_host_map: {{"{IP['nebula'][other]}": ["{IP['veth'][other]}:4242"]}}
lighthouse: {{am_lighthouse: false, interval: 60, hosts: []}}
listen: {{host: 0.0.0.0, port: 4242}}
punchy: {{punch: false}}
cipher: aes
tun: {{dev: tpbneb, mtu: 1300}}
logging: {{level: warning}}
firewall:
  outbound: [{{port: any, proto: any, host: any}}]
  inbound: [{{port: any, proto: any, host: any}}]
""")
            pids.append(self.procs.start(f"nebula-{n}", ["nebula", "-config", f"{d}/{n}.yml"], f"{d}/{n}.log",
                                         ns=space).pid)
        self.wait_ping(IP["nebula"][1], "Nebula")
        return pids

    def start_boringtun(self):
        d = f"{self.d}/wg"
        keys = wg_keys(d, ("c", "s"))
        pids = []
        for i, (n, space, dev) in enumerate((("c", NS_C, "tpbwgc"), ("s", NS_S, "tpbwgs"))):
            other = 1 - i
            pids.append(start_boringtun(self.procs, f"boringtun-{n}", dev, f"{d}/{n}.log", space))
            ns(space, "wg", "set", dev, "private-key", f"{d}/{n}.key", "listen-port", str(51820 + i),
               "peer", keys[other], "endpoint", f"{IP['veth'][other]}:{51820 + other}",
               "allowed-ips", f"{IP['wg'][other]}/32")
            ns(space, "ip", "addr", "add", f"{IP['wg'][i]}/24", "dev", dev)
            ns(space, "ip", "link", "set", dev, "mtu", "1420", "up")
        self.wait_ping(IP["wg"][1], "boringtun")
        return pids

    def wait_ping(self, ip, what):
        """Waits until nginx in the server namespace answers a TCP connect over the overlay."""
        probe = f"exec 3<>/dev/tcp/{ip}/{HTTP}"
        for _ in range(50):
            if ns(NS_C, "timeout", "2", "bash", "-c", probe, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what}: {ip}:{HTTP} unreachable from the client namespace")

    def stop(self):
        self.procs.stop()
        cleanup()


def run_basic(v, runs, seconds):
    paths = {p: dict(host=v.host[p], http=v.port(p, "http"), iperf=v.port(p, "iperf"), pids=v.pids[p], ns=NS_C)
             for p in PATHS if p not in v.skipped}
    return measure_paths("veth", paths, runs, seconds)
