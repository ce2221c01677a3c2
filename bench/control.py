"""Control plane: certificate signings per second on the embedded SQLite store, and many simulated
agents long-polling one server's state feed while a revocation is made. Server on 127.0.0.1."""
import json, os, re, subprocess, threading, time
from common import Procs, bench_tools, cpu_seconds, log, rss_kib, wait_port

TD = "bench.example"
LISTEN = "127.0.0.1:25443"


class ControlPlane:
    def __init__(self, d, tapproof):
        self.d, self.tapproof, self.procs = f"{d}/control", tapproof, Procs()
        os.makedirs(self.d, exist_ok=True)

    def bench(self, *args):
        return subprocess.run([bench_tools()] + list(args), check=True, stdout=subprocess.PIPE, text=True)

    def cli(self, *args):
        return subprocess.run([self.tapproof, "--log-level", "warn"] + list(args), check=True,
                              capture_output=True, text=True)

    def start(self):
        d = self.d
        self.cli("server", "init", "--trust-domain", TD, "--data-dir", f"{d}/server")
        self.server = self.procs.start("server", [self.tapproof, "--log-level", "warn", "server", "run",
                                                  "--data-dir", f"{d}/server", "--listen", LISTEN,
                                                  "--admin-listen", "127.0.0.1:0",
                                                  # One load generator stands in for thousands of
                                                  # agents, all one node on one address: lift the
                                                  # per-client limits that would otherwise bite.
                                                  "--max-connections-per-source", "0",
                                                  "--max-connections", "100000",
                                                  "--requests-per-second", "0",
                                                  "--long-polls-per-node", "0"],
                                       f"{d}/server.log")
        wait_port(int(LISTEN.rsplit(":", 1)[1]), "tapproof server")
        time.sleep(0.3)
        if self.server.poll() is not None:  # the port is someone else's
            raise RuntimeError(f"tapproof server exited: {open(f'{d}/server.log').read()[-300:]}")
        token = self.cli("server", "token", "create", "--data-dir", f"{d}/server", "--node", "load",
                         "--server", LISTEN).stdout.strip().splitlines()[-1]
        with open(f"{d}/token", "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(token)
        with open(f"{d}/agent.toml", "w") as f:
            f.write(f'trust_domain = "{TD}"\n[control]\ndata_dir = "{d}/agent"\ntoken_file = "{d}/token"\n'
                    f'[admin]\nlisten = "127.0.0.1:25200"\n')
        agent = self.procs.start("agent", [self.tapproof, "--log-level", "warn", "agent", "-c", f"{d}/agent.toml"],
                                 f"{d}/agent.log")
        for _ in range(200):
            if os.path.exists(f"{d}/agent/node.pem"):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the load node did not join: {open(f'{d}/agent.log').read()[-300:]}")
        time.sleep(0.5)
        agent.terminate()
        agent.wait()

    def node_args(self):
        return ["--server", LISTEN, "--data-dir", f"{self.d}/agent", "--trust-domain", TD]

    def stop(self):
        self.procs.stop()


def run_signings(cp, runs, seconds):
    res = dict(rate=[], failed=0, cpu=[])
    for run in range(runs):
        before = cpu_seconds([cp.server.pid])
        out = cp.bench("sign-load", *cp.node_args(), "--concurrency", "32", "--seconds", str(seconds)).stdout
        cpu = cpu_seconds([cp.server.pid]) - before
        m = dict(re.findall(r"(\w+)=([\w.]+)", out))
        res["rate"].append(float(m["rate"]))
        res["failed"] += int(m["failed"])
        res["cpu"].append(cpu / max(int(m["signings"]), 1) * 1000)
        log(f"control plane run {run + 1}/{runs}: {m['rate']} signings/s, {m['failed']} failed")
    return res


def run_feed(cp, agents):
    """`agents` simulated agents on the state feed; a revocation; when each saw it."""
    pid = cp.server.pid
    rss_before = rss_kib(pid)
    peak = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], rss_kib(pid))
            except OSError:
                return
            time.sleep(0.2)

    t = threading.Thread(target=sample)
    t.start()
    cpu_before = cpu_seconds([pid])
    started = time.time()
    try:
        out = cp.bench("feed-load", *cp.node_args(), "--agents", str(agents), "--then", cp.tapproof,
                     "--log-level", "warn", "server", "revoke", "--data-dir", f"{cp.d}/server", "--id",
                     f"spiffe://{TD}/node/victim", "--reason", "benchmark").stdout
    finally:
        stop.set()
        t.join()
    m = dict(re.findall(r"(\w+)=([\w.]+)", out))
    res = dict(agents=int(m["agents"]), notified=int(m["notified"]), errors=int(m["errors"]),
               p50_s=float(m["p50_s"]), p99_s=float(m["p99_s"]), max_s=float(m["max_s"]),
               connect_s=float(m["connected_s"]), server_rss_mib=peak[0] / 1024,
               server_rss_before_mib=rss_before / 1024, server_cpu_s=cpu_seconds([pid]) - cpu_before,
               wall_s=time.time() - started)
    log(f"state feed: {res}")
    return res
