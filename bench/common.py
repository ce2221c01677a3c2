"""Shared helpers for the benchmark sections: processes stopped by PID, ports, CPU and memory of
processes, and the wrk / iperf3 / network-namespace wrappers."""
import json, os, re, resource, signal, socket, statistics, subprocess, sys, time

# The test and benchmark helpers (echo server, plain relay, load generators) live in their own
# binary, tapproof-bench, which is never installed with the product. run.py sets this.
BENCH_TOOLS = None


def bench_tools():
    if BENCH_TOOLS is None:
        raise RuntimeError("run.py --bench-tools was not given")
    return BENCH_TOOLS

TICK = os.sysconf("SC_CLK_TCK")


def med(xs):
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else float("nan")


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listening(port, ns=None):
    """True when something listens on the TCP port (in network namespace `ns`). Read from /proc
    rather than probed with a connection: a probe through a proxy reaches iperf3 as an empty test
    and upsets the next one."""
    if ns:
        out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/tcp", "/proc/net/tcp6"],
                             capture_output=True, text=True).stdout.splitlines()
    else:
        out = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    out += f.read().splitlines()
            except OSError:
                pass
    for line in out:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_port(port, what, ns=None, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if listening(port, ns):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def rss_kib(pid):
    """Resident set of a process and its threads, KiB (children not included)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Procs:
    """Every process a section starts; stop() ends them by PID, newest first."""

    def __init__(self):
        self.procs = []

    def start(self, name, args, log, ns=None, env=None):
        if ns:
            args = ["ip", "netns", "exec", ns] + args
        p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env)
        self.procs.append((name, p))
        return p

    def adopt(self, name, p):
        """A process started elsewhere (say, with a stdin pipe), stopped with the others."""
        self.procs.append((name, p))
        return p

    def stop(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def in_ns(ns, args):
    return (["ip", "netns", "exec", ns] if ns else []) + args


def sh(*args, check=True):
    """Runs a command, output captured as text."""
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def ns_run(n, *args, check=True):
    """Runs a command inside network namespace `n`."""
    return sh(*in_ns(n, list(args)), check=check)


def iperf(host, port, seconds, pids=(), ns=None, streams=1):
    """One iperf3 test: (MB/s received, CPU seconds per GB in `pids`)."""
    for _ in range(3):
        before = cpu_seconds(pids)
        out = subprocess.run(in_ns(ns, ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams),
                                        "-J"]), capture_output=True, text=True, timeout=seconds + 60)
        if out.returncode == 0:
            break
        time.sleep(1)  # iperf3 serves one test at a time; the previous one may still be closing
    else:
        raise RuntimeError(f"iperf3 to {host}:{port} failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    cpu = cpu_seconds(pids) - before
    r = json.loads(out.stdout)["end"]["sum_received"]
    gb = r["bytes"] / 1e9
    return r["bits_per_second"] / 8 / 1e6, (cpu / gb if pids and gb else None)


def parse_wrk(text):
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {text[-300:]}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[pct] = float(val) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return float(m.group(1)), lat, errors.group(0) if errors else ""


def wrk(host, port, seconds, conns, close, ns=None):
    """(requests/s, {"50": ms, "99": ms}, error text)."""
    args = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(in_ns(ns, args + [f"http://{host}:{port}/1k"]), capture_output=True, text=True,
                         timeout=seconds + 60)
    return parse_wrk(out.stdout)


def measure_paths(section, paths, runs, seconds):
    """Bulk (iperf3), new connections and keep-alive (wrk) for each path, `runs` times, paths
    interleaved. paths: {name: dict(host, http, iperf, pids, ns)}; returns {name: {metric: [values]}}."""
    res = {p: dict(bulk=[], cpu=[], new=[], ka=[], p50=[], p99=[], notes=set()) for p in paths}
    for run in range(runs):
        for name, p in paths.items():
            r = res[name]
            try:
                mbs, cpu = iperf(p["host"], p["iperf"], seconds, p["pids"], ns=p.get("ns"))
            except RuntimeError as e:
                mbs, cpu = float("nan"), None
                r["notes"].add(f"bulk: {str(e)[:120]}")
            r["bulk"].append(mbs)
            if cpu is not None:
                r["cpu"].append(cpu)
            rps, _, err = wrk(p["host"], p["http"], seconds, 16, close=True, ns=p.get("ns"))
            r["new"].append(rps)
            if err:
                r["notes"].add("new-conn: " + err)
            rps, lat, err = wrk(p["host"], p["http"], seconds, 16, close=False, ns=p.get("ns"))
            r["ka"].append(rps)
            r["p50"].append(lat.get("50", float("nan")))
            r["p99"].append(lat.get("99", float("nan")))
            if err:
                r["notes"].add("keep-alive: " + err)
            log(f"{section} run {run + 1}/{runs} {name:17} bulk {mbs:6.0f} MB/s new {r['new'][-1]:7.0f}/s "
                f"keep-alive {rps:7.0f}/s p99 {r['p99'][-1]:.2f} ms")
    return res


def nginx_conf(d, listen, name="nginx"):
    """A one-worker nginx serving a 1 KiB file; returns the config path."""
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(b"x" * 1024)
    path = os.path.join(d, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""daemon off; worker_processes 1; pid {d}/{name}.pid; error_log {d}/{name}-error.log;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 120;
  server {{ listen {listen} backlog=4096; location / {{ root {www}; }} }} }}
""")
    return path


def pki_dir(d, tapproof, td, sub):
    """A directory `d/sub` holding server and client identities of trust domain `td` (one
    `tapproof pki mint` per run, in `d`, shared by every section through hard links)."""
    if not os.path.exists(f"{d}/server.pem"):
        subprocess.run([tapproof, "pki", "mint", "--trust-domain", td, "--out", d, "--node", "server", "--node",
                        "client"], check=True, stdout=subprocess.DEVNULL)
    out = f"{d}/{sub}"
    os.makedirs(out, exist_ok=True)
    for f in ("server.pem", "server.key", "client.pem", "client.key", "bundle.pem"):
        if not os.path.exists(f"{out}/{f}"):
            os.link(f"{d}/{f}", f"{out}/{f}")
    return out


def tapproof_configs(d, td, server_name, client_name, tunnel_listen, peer, inbound, outbound, admin_ports):
    """Writes tp-server.toml and tp-client.toml for a file-identity agent pair.
    inbound: {service: forward}; outbound: {service: listen}."""
    ident = lambda n: f'[identity]\ncert = "{d}/{n}.pem"\nkey = "{d}/{n}.key"\nbundle = "{d}/bundle.pem"\n'
    client_id = f"spiffe://{td}/node/{client_name}"
    with open(f"{d}/tp-server.toml", "w") as f:
        f.write(f'trust_domain = "{td}"\n{ident(server_name)}[admin]\nlisten = "127.0.0.1:{admin_ports[0]}"\n'
                f'[tunnel]\nlisten = "{tunnel_listen}"\n')
        for svc, fwd in inbound.items():
            f.write(f'[[inbound]]\nservice = "{svc}"\nforward = "{fwd}"\nallow = ["{client_id}"]\n')
    with open(f"{d}/tp-client.toml", "w") as f:
        f.write(f'trust_domain = "{td}"\n{ident(client_name)}[admin]\nlisten = "127.0.0.1:{admin_ports[1]}"\n')
        for svc, listen in outbound.items():
            f.write(f'[[outbound]]\nlisten = "{listen}"\nservice = "{svc}"\npeers = ["{peer}"]\n'
                    f'server_id = "spiffe://{td}/node/{server_name}"\n')


def stunnel_configs(d, services):
    """services: {name: (client_accept, server_accept, backend)}; writes st-server.conf, st-client.conf."""
    common = (f"cert = {d}/{{n}}.pem\nkey = {d}/{{n}}.key\nCAfile = {d}/bundle.pem\nverifyChain = yes\n"
              "sslVersionMin = TLSv1.3\n")
    head = "foreground = yes\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
    with open(f"{d}/st-server.conf", "w") as f:
        f.write(head + f"pid = {d}/st-server.pid\n")
        for name, (_, accept, backend) in services.items():
            f.write(f"[{name}]\naccept = {accept}\nconnect = {backend}\n" + common.format(n="server"))
    with open(f"{d}/st-client.conf", "w") as f:
        f.write(head + f"client = yes\npid = {d}/st-client.pid\n")
        for name, (accept, server_accept, _) in services.items():
            f.write(f"[{name}]\naccept = {accept}\nconnect = {server_accept}\n" + common.format(n="client"))


def log(msg):
    print(msg, flush=True, file=sys.stderr)


def wg_keys(d, names):
    """A WireGuard key pair per name: private keys written 0600 as d/<name>.key; the public keys."""
    os.makedirs(d, exist_ok=True)
    keys = []
    for n in names:
        private = sh("wg", "genkey").stdout.strip()
        public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                                check=True).stdout.strip()
        with open(f"{d}/{n}.key", "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(private)
        keys.append(public)
    return keys


def start_boringtun(procs, name, dev, log, ns):
    """boringtun-cli on `dev` in `ns`, once its control socket is up (then `wg set` configures it)."""
    p = procs.start(name, ["boringtun-cli", "--foreground", "--disable-drop-privileges", dev], log, ns=ns)
    for _ in range(100):
        if os.path.exists(f"/var/run/wireguard/{dev}.sock"):
            break
        time.sleep(0.05)
    return p.pid

