"""The crypto profiles side by side (issue 15): for `default` (X25519MLKEM768, ECDSA P-256) and
`cnsa2` (ML-KEM-1024, AES-256-GCM, ML-DSA-87 chain and keys), full mTLS handshakes per second on
one core (tapproof-bench handshakes, both ends in one process pinned to CPU 0) and one iperf3
stream through an agent pair on 127.0.0.1 (MB/s, CPU seconds per GB of both agents). The runs
of the two profiles alternate, so machine noise falls on both."""
import os, subprocess
from common import Procs, bench_tools, iperf, log, med, tapproof_configs, wait_port

PROFILES = ("default", "cnsa2")
TD = "bench.example"
IPERF = 25301
# Per profile: tunnel listener, outbound listen, admin ports.
PORTS = {"default": (25008, 25311, (25901, 25902)), "cnsa2": (25018, 25321, (25903, 25904))}


class Profiles:
    def __init__(self, d, tapproof):
        self.d, self.tapproof, self.procs = d, tapproof, Procs()
        self.pids = {}

    def pki(self, profile):
        out = os.path.join(self.d, f"profile-{profile}")
        if not os.path.exists(f"{out}/server.pem"):
            subprocess.run([self.tapproof, "pki", "mint", "--profile", profile, "--trust-domain", TD, "--out", out,
                            "--node", "server", "--node", "client"], check=True, stdout=subprocess.DEVNULL)
        return out

    def start(self):
        self.procs.start("iperf3", ["iperf3", "-s", "-p", str(IPERF)], f"{self.d}/profiles-iperf3.log")
        wait_port(IPERF, "iperf3")
        for profile in PROFILES:
            d = self.pki(profile)
            tunnel, listen, admin = PORTS[profile]
            tapproof_configs(d, TD, "server", "client", f"127.0.0.1:{tunnel}", f"127.0.0.1:{tunnel}",
                             {"iperf": f"127.0.0.1:{IPERF}"}, {"iperf": f"127.0.0.1:{listen}"}, admin)
            line = f'crypto_profile = "{profile}"\n'
            with open(f"{d}/tp-server.toml") as f:
                text = f.read().replace("[tunnel]\n", "[tunnel]\n" + line)
            with open(f"{d}/tp-server.toml", "w") as f:
                f.write(text)
            with open(f"{d}/tp-client.toml", "a") as f:
                f.write("[tunnel]\n" + line)
            agents = [self.procs.start(f"{profile}-{n}", [self.tapproof, "--log-level", "warn", "agent", "-c",
                                                          f"{d}/tp-{n}.toml"], f"{d}/tp-{n}.log")
                      for n in ("server", "client")]
            wait_port(listen, f"tapproof ({profile})")
            self.pids[profile] = [p.pid for p in agents]

    def stop(self):
        self.procs.stop()


def run(pr, runs, seconds):
    """{profile: {rate, server_side_rate, client_side_rate, group, cipher, bulk: [..], cpu: [..]}}"""
    out = {p: dict(rate=[], server_side_rate=[], client_side_rate=[], bulk=[], cpu=[]) for p in PROFILES}
    for _ in range(runs):
        for profile in PROFILES:
            line = subprocess.run(["taskset", "-c", "0", bench_tools(), "--threads", "1", "handshakes", "--pki",
                                   pr.pki(profile), "--trust-domain", TD, "--seconds", str(seconds), "--profile",
                                   profile], check=True, capture_output=True, text=True).stdout
            log(f"handshakes {profile}: {line.strip()}")
            kv = dict(x.split("=") for x in line.split())
            o = out[profile]
            for k in ("rate", "server_side_rate", "client_side_rate"):
                o[k].append(float(kv[k]))
            o["group"], o["cipher"] = kv["group"], kv["cipher"]
            mbs, cpu = iperf("127.0.0.1", PORTS[profile][1], seconds, pr.pids[profile])
            log(f"bulk {profile}: {mbs:.0f} MB/s, {cpu:.2f} CPU s/GB")
            o["bulk"].append(mbs)
            o["cpu"].append(cpu)
    return out


def report(P, p, f0, f2):
    p("### Crypto profiles\n")
    p("Full mTLS 1.3 handshakes (no resumption, both ends in one process on one core) and one iperf3 stream "
      "through an agent pair on 127.0.0.1, the profiles' runs alternating.\n")
    p("| profile | group | cipher | handshakes/s (server side, per core) | complete handshakes/s | bulk MB/s | "
      "CPU s/GB (both agents) |")
    p("|---|---|---|---|---|---|---|")
    for profile, r in P.items():
        p(f"| {profile} | {r['group']} | {r['cipher']} | {f0(med(r['server_side_rate']))} | {f0(med(r['rate']))} | "
          f"{f0(med(r['bulk']))} | {f2(med(r['cpu']))} |")
    d, c = P["default"], P["cnsa2"]
    p(f"\ncnsa2 against default: handshakes {med(c['server_side_rate']) / med(d['server_side_rate']):.2f}x "
      f"(server side), bulk {med(c['bulk']) / med(d['bulk']):.2f}x.\n")
