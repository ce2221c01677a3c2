#!/usr/bin/env python3
"""The soak (issue 11): a control plane with 60 s leaf certificates and a scheduled root rollover
half-way, two agents on loopback, wrk (HTTP to nginx) and pgbench (PostgreSQL) through the
tunnel, and faults fired at random intervals: the server SIGKILLed and restarted, an agent
SIGKILLed and restarted, an agent SIGSTOPped then continued, PostgreSQL restarted.

Load runs in slices of 10 s. A slice that overlaps a fault's window (from the fault to the
recovery of what it broke, plus 5 s) is excused; errors in any other slice are failures, and the
goal is 0. Every 5 s it samples RSS, open fds and open tunnels of each tapproof process. It prints
a line per slice and per fault, a summary, and writes soak.json and soak.svg to --out.

Usage: scripts/soak.sh --minutes N [--out DIR] [--tapproof PATH]. Needs wrk, nginx and a
PostgreSQL server (scripts/soak.sh installs and starts them when run as root)."""
import argparse, json, os, random, re, signal, subprocess, sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from common import Procs, nginx_conf, wait_port, rss_kib  # noqa: E402

TD = "soak.example"
SERVER, HTTP_APP, PG_APP, NGINX = "127.0.0.1:25443", 25481, 25482, 25480
ADMIN = {"db-1": 25201, "web-1": 25202}
TUNNEL = "127.0.0.1:25008"
SLICE = 10
GRACE = 5


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Soak:
    def __init__(self, a):
        self.a, self.d = a, tempfile.mkdtemp(prefix="tapproof-soak-")
        # nginx's worker runs as nobody when started as root: it must be able to read www/.
        # The data directories inside are tapproof's own (0700, keys 0600).
        os.chmod(self.d, 0o755)
        self.procs = Procs()
        self.windows = []  # (start, end or None, what)
        self.lock = threading.Lock()
        self.samples, self.slices, self.faults = [], [], []
        self.stop = threading.Event()
        self.server = self.agents = None

    def cli(self, *args):
        return subprocess.run([self.a.tapproof, "--log-level", "warn"] + list(args), check=True,
                              capture_output=True, text=True).stdout

    def start_server(self):
        minutes = self.a.minutes
        args = [self.a.tapproof, "--log-level", "info", "server", "run", "--data-dir", f"{self.d}/server",
                "--listen", SERVER, "--leaf-ttl", "60s", "--admin-listen", "127.0.0.1:0",
                # The root is rolled over once, half-way (prepare, then activate a propagation later).
                "--root-max-age", f"{max(60, minutes * 30)}s", "--rollover-propagation", "30s"]
        p = subprocess.Popen(args, stdout=open(f"{self.d}/server.log", "a"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.procs.adopt("server", p)
        wait_port(int(SERVER.rsplit(":", 1)[1]), "tapproof server")
        self.server = p

    def start_agent(self, name):
        p = subprocess.Popen([self.a.tapproof, "--log-level", "info", "agent", "-c", f"{self.d}/{name}.toml"],
                             stdout=open(f"{self.d}/{name}.log", "a"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.procs.adopt(name, p)
        self.agents[name] = p
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[name]}/readyz", timeout=1)
                return p
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} not ready: {open(f'{self.d}/{name}.log').read()[-500:]}")

    def setup(self):
        d = self.d
        self.cli("server", "init", "--trust-domain", TD, "--data-dir", f"{d}/server")
        self.start_server()
        self.agents = {}
        tokens = {}
        for name, services in (("db-1", ["http", "pg"]), ("web-1", [])):
            args = ["server", "token", "create", "--data-dir", f"{d}/server", "--node", name, "--server", SERVER]
            for s in services:
                args += ["--service", s]
            tokens[name] = self.cli(*args).strip().splitlines()[-1]
        pg_host, pg_port = self.a.pg_addr.rsplit(":", 1)
        with open(f"{d}/db-1.toml", "w") as f:
            f.write(f'trust_domain = "{TD}"\n[control]\ndata_dir = "{d}/db-1"\ntoken = "{tokens["db-1"]}"\n'
                    f'[admin]\nlisten = "127.0.0.1:{ADMIN["db-1"]}"\n[tunnel]\nlisten = "{TUNNEL}"\n'
                    f'[[inbound]]\nservice = "http"\nforward = "127.0.0.1:{NGINX}"\nallow = ["spiffe://{TD}/node/web-1"]\n'
                    f'[[inbound]]\nservice = "pg"\nforward = "{pg_host}:{pg_port}"\nallow = ["spiffe://{TD}/node/web-1"]\n')
        with open(f"{d}/web-1.toml", "w") as f:
            f.write(f'trust_domain = "{TD}"\n[control]\ndata_dir = "{d}/web-1"\ntoken = "{tokens["web-1"]}"\n'
                    f'[admin]\nlisten = "127.0.0.1:{ADMIN["web-1"]}"\n'
                    f'[[outbound]]\nlisten = "127.0.0.1:{HTTP_APP}"\nservice = "http"\npeers = ["{TUNNEL}"]\n'
                    f'server_id = "spiffe://{TD}/node/db-1"\n'
                    f'[[outbound]]\nlisten = "127.0.0.1:{PG_APP}"\nservice = "pg"\npeers = ["{TUNNEL}"]\n'
                    f'server_id = "spiffe://{TD}/node/db-1"\n')
        self.procs.start("nginx", ["nginx", "-c", nginx_conf(d, f"127.0.0.1:{NGINX}")], f"{d}/nginx.log")
        wait_port(NGINX, "nginx")
        self.start_agent("db-1")
        self.start_agent("web-1")
        env = dict(os.environ, PGPASSWORD=self.a.pg_password)
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(PG_APP), "-U", self.a.pg_user, "-d", "postgres", "-qc",
                        "DROP DATABASE IF EXISTS tapproof_soak"], env=env, check=True, capture_output=True)
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(PG_APP), "-U", self.a.pg_user, "-d", "postgres", "-qc",
                        "CREATE DATABASE tapproof_soak"], env=env, check=True, capture_output=True)
        subprocess.run(["pgbench", "-i", "-q", "-s", "2", "-h", "127.0.0.1", "-p", str(PG_APP), "-U", self.a.pg_user,
                        "tapproof_soak"], env=env, check=True, capture_output=True)

    # --- load ---------------------------------------------------------------------------------
    def wrk_slice(self):
        out = subprocess.run(["wrk", "-t1", "-c8", f"-d{SLICE}s", f"http://127.0.0.1:{HTTP_APP}/1k"],
                             capture_output=True, text=True, timeout=SLICE + 60).stdout
        reqs = int(m.group(1)) if (m := re.search(r"(\d+) requests in", out)) else 0
        errors = 0
        if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
            errors += sum(int(x) for x in m.groups())
        if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
            # Counted in "requests" too: those are not successes.
            errors += int(m.group(1))
            reqs -= int(m.group(1))
        return reqs, errors

    def pgbench_slice(self):
        env = dict(os.environ, PGPASSWORD=self.a.pg_password)
        p = subprocess.run(["pgbench", "-n", "-c", "4", "-j", "2", "-T", str(SLICE), "-h", "127.0.0.1", "-p",
                            str(PG_APP), "-U", self.a.pg_user, "tapproof_soak"], env=env, capture_output=True,
                           text=True, timeout=SLICE + 60)
        out = p.stdout + p.stderr
        done = int(m.group(1)) if (m := re.search(r"number of transactions actually processed: (\d+)", out)) else 0
        failed = int(m.group(1)) if (m := re.search(r"number of failed transactions: (\d+)", out)) else 0
        if p.returncode != 0:
            failed = max(failed, 1)
        return done, failed

    def load(self, kind):
        run = self.wrk_slice if kind == "wrk" else self.pgbench_slice
        while not self.stop.is_set():
            start = time.time()
            ok, errors = run()
            end = time.time()
            with self.lock:
                excused = any(w0 <= end and (w1 is None or w1 + GRACE >= start) for w0, w1, _ in self.windows)
                self.slices.append(dict(kind=kind, start=start, end=end, ok=ok, errors=errors, excused=excused))
            if errors:
                log(f"{kind}: {errors} errors in {ok + errors} ({'excused: a fault window' if excused else 'FAILURE'})")

    # --- faults ---------------------------------------------------------------------------------
    def ready(self, name):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[name]}/readyz", timeout=1)
            return True
        except OSError:
            return False

    def carries(self):
        """One HTTP request through the tunnel."""
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{HTTP_APP}/1k", timeout=2).status == 200
        except OSError:
            return False

    def pg_carries(self):
        """One PostgreSQL query through the tunnel."""
        env = dict(os.environ, PGPASSWORD=self.a.pg_password)
        try:
            return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(PG_APP), "-U", self.a.pg_user, "-d",
                                   "tapproof_soak", "-qtAc", "select 1"], env=env, capture_output=True,
                                  timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def fault(self, what, act, recovered, limit=120):
        with self.lock:
            self.windows.append([time.time(), None, what])
            w = self.windows[-1]
        t0 = time.time()
        act()
        while not recovered() and time.time() - t0 < limit:
            time.sleep(0.2)
        took = time.time() - t0
        ok = recovered()
        with self.lock:
            w[1] = time.time()
        self.faults.append(dict(what=what, at=t0, recovery_s=round(took, 1), recovered=ok))
        log(f"fault {what}: {'recovered' if ok else 'NOT recovered'} in {took:.1f} s")

    def kill_server(self):
        def act():
            self.server.kill()
            self.server.wait()
            time.sleep(random.uniform(3, 15))
            self.start_server()
        self.fault("server SIGKILL, back after 3-15 s", act, lambda: self.server.poll() is None)

    def kill_agent(self):
        name = random.choice(["db-1", "web-1"])

        def act():
            self.agents[name].kill()
            self.agents[name].wait()
            self.start_agent(name)
        self.fault(f"{name} SIGKILL and restart", act, self.carries)

    def stop_agent(self):
        name = random.choice(["db-1", "web-1"])

        def act():
            self.agents[name].send_signal(signal.SIGSTOP)
            time.sleep(random.uniform(1, 5))
            self.agents[name].send_signal(signal.SIGCONT)
        self.fault(f"{name} SIGSTOP 1-5 s, SIGCONT", act, self.carries)

    def restart_postgres(self):
        version = sorted(os.listdir("/usr/lib/postgresql"), key=int)[-1]

        def act():
            subprocess.run(["pg_ctlcluster", version, "main", "restart"], check=True, capture_output=True)
        self.fault("PostgreSQL restart", act, self.pg_carries)

    def faults_loop(self):
        kinds = [self.kill_server, self.kill_agent, self.stop_agent]
        if self.a.pg_restart:
            kinds.append(self.restart_postgres)
        while not self.stop.wait(random.uniform(*self.a.fault_every)):
            random.choice(kinds)()

    # --- samples --------------------------------------------------------------------------------
    def sample_loop(self):
        while not self.stop.wait(5):
            row = dict(t=time.time())
            for name, p in [("server", self.server)] + list(self.agents.items()):
                if p.poll() is None:
                    row[f"{name}_rss_kib"] = rss_kib(p.pid)
                    try:
                        row[f"{name}_fds"] = len(os.listdir(f"/proc/{p.pid}/fd"))
                    except OSError:
                        pass
            for name in self.agents:
                try:
                    status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[name]}/v1/status", timeout=1))
                    row[f"{name}_tunnels"] = len(status.get("tunnels", []))
                except (OSError, ValueError):
                    pass
            self.samples.append(row)

    def run(self):
        self.setup()
        log(f"set up in {self.d}: server {SERVER}, db-1 and web-1, nginx, PostgreSQL at {self.a.pg_addr}")
        threads = [threading.Thread(target=self.load, args=(k,), daemon=True) for k in ("wrk", "pgbench")]
        threads += [threading.Thread(target=t, daemon=True) for t in (self.faults_loop, self.sample_loop)]
        t0 = time.time()
        for t in threads:
            t.start()
        end = t0 + self.a.minutes * 60
        while time.time() < end:
            time.sleep(min(30, max(0.1, end - time.time())))
            s = self.samples[-1] if self.samples else {}
            log(f"{(time.time() - t0) / 60:.1f} min: " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "t"))
        self.stop.set()
        for t in threads:
            t.join(SLICE + 130)
        return self.report(t0)

    def report(self, t0):
        rollover = "ca.activate" in self.cli("server", "audit-log", "show", "--data-dir", f"{self.d}/server",
                                             "--limit", "100000")
        summary = {}
        for kind in ("wrk", "pgbench"):
            sl = [s for s in self.slices if s["kind"] == kind]
            summary[kind] = dict(
                requests=sum(s["ok"] for s in sl),
                failed_outside_faults=sum(s["errors"] for s in sl if not s["excused"]),
                failed_in_fault_windows=sum(s["errors"] for s in sl if s["excused"]))
        first, last = (self.samples[1] if len(self.samples) > 1 else {}), (self.samples[-1] if self.samples else {})
        result = dict(minutes=self.a.minutes, root_rolled_over=rollover, load=summary, faults=self.faults,
                      first_sample=first, last_sample=last, samples=self.samples, dir=self.d)
        os.makedirs(self.a.out, exist_ok=True)
        with open(os.path.join(self.a.out, "soak.json"), "w") as f:
            json.dump(result, f, indent=1)
        svg(os.path.join(self.a.out, "soak.svg"), self.samples, t0, self.faults)
        log(f"done: {self.a.minutes} min, root rolled over: {rollover}, faults: {len(self.faults)} "
            f"({sum(1 for f in self.faults if f['recovered'])} recovered; recovery s: "
            f"{sorted(f['recovery_s'] for f in self.faults)})")
        for kind, s in summary.items():
            log(f"{kind}: {s['requests']} ok, {s['failed_outside_faults']} failed outside fault windows, "
                f"{s['failed_in_fault_windows']} inside them")
        log(f"first -> last sample: " + ", ".join(f"{k} {first.get(k)} -> {last.get(k)}"
                                                   for k in sorted(last) if k != "t"))
        log(f"wrote {self.a.out}/soak.json and soak.svg")
        bad = sum(s["failed_outside_faults"] for s in summary.values())
        unrecovered = [f for f in self.faults if not f["recovered"]]
        return 0 if bad == 0 and not unrecovered and (rollover or self.a.minutes < 2) else 1


def svg(path, samples, t0, faults):
    """RSS and fds of each process over time, faults as marks: a plain SVG (no plotting library)."""
    series = sorted({k for s in samples for k in s if k.endswith(("_rss_kib", "_fds", "_tunnels"))})
    w, h, pad = 900, 170, 40
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22"]
    tmax = max([s["t"] - t0 for s in samples] + [1])
    groups = [g for g in ("_rss_kib", "_fds", "_tunnels") if any(k.endswith(g) for k in series)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h * len(groups) + 20}" font-family="sans-serif" font-size="11">']
    for gi, g in enumerate(groups):
        y0 = gi * h + 10
        keys = [k for k in series if k.endswith(g)]
        vmax = max([s.get(k, 0) for s in samples for k in keys] + [1])
        out.append(f'<text x="{pad}" y="{y0 + 10}">{g.strip("_")} (max {vmax})</text>')
        out.append(f'<rect x="{pad}" y="{y0 + 15}" width="{w - 2 * pad}" height="{h - 40}" fill="none" stroke="#ccc"/>')
        for f in faults:
            x = pad + (f["at"] - t0) / tmax * (w - 2 * pad)
            out.append(f'<line x1="{x:.1f}" y1="{y0 + 15}" x2="{x:.1f}" y2="{y0 + h - 25}" stroke="#f99"/>')
        for ki, k in enumerate(keys):
            pts = " ".join(f'{pad + (s["t"] - t0) / tmax * (w - 2 * pad):.1f},'
                           f'{y0 + h - 25 - s[k] / vmax * (h - 45):.1f}' for s in samples if k in s)
            c = colors[ki % len(colors)]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}"/>')
            out.append(f'<text x="{w - pad - 150}" y="{y0 + 28 + 12 * ki}" fill="{c}">{k}</text>')
    out.append(f'<text x="{pad}" y="{h * len(groups) + 15}">minutes 0 to {tmax / 60:.1f}; red lines: faults</text></svg>')
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--out", default="soak-out")
    ap.add_argument("--tapproof", default="target/debug/tapproof")
    ap.add_argument("--pg-addr", default="127.0.0.1:5432")
    ap.add_argument("--pg-user", default="tapproof_test")
    ap.add_argument("--pg-password", default="tapproof_test")
    ap.add_argument("--pg-restart", action="store_true", help="also restart PostgreSQL as a fault (needs root)")
    ap.add_argument("--fault-every", type=float, nargs=2, default=[20, 60], metavar=("MIN_S", "MAX_S"))
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    random.seed(a.seed)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally below stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    s = Soak(a)
    try:
        code = s.run()
    finally:
        s.stop.set()
        s.procs.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
