#!/usr/bin/env python3
"""Side-by-side benchmark on loopback: direct plaintext, a tapproof agent pair, a stunnel4 pair.

Each path fronts the same nginx (1 KiB static response) and iperf3 server. For each path and run:
  bulk        iperf3, one stream, MB/s, plus CPU seconds per GB spent in the two proxy processes
  new conn/s  wrk with "Connection: close": every request is a new app connection
  keep-alive  wrk on persistent connections: requests/s, p50 and p99 latency
The table shows the median of --runs runs. Traffic goes to 127.0.0.1 only; every process started
here is stopped (by PID) at the end.
"""
import argparse, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

PORTS = dict(nginx=18080, iperf=15201,
             tp_admin_s=25000, tp_admin_c=25001, tp_tunnel=25008, tp_http=28080, tp_iperf=25201,
             st_http_s=38443, st_iperf_s=38444, st_http=38080, st_iperf=35201)
TICK = os.sysconf("SC_CLK_TCK")


def wait_port(port, what, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, name, args, log):
        p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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


def setup(d, tapproof, procs):
    www = os.path.join(d, "www")
    os.makedirs(www)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(b"x" * 1024)
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(f"""daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 120;
  server {{ listen 127.0.0.1:{PORTS['nginx']} backlog=4096; location / {{ root {www}; }} }} }}
""")
    procs.start("nginx", ["nginx", "-c", f"{d}/nginx.conf", "-e", f"{d}/nginx-error.log"], f"{d}/nginx.log")
    procs.start("iperf3", ["iperf3", "-s", "-p", str(PORTS["iperf"])], f"{d}/iperf3.log")
    wait_port(PORTS["nginx"], "nginx")
    wait_port(PORTS["iperf"], "iperf3")

    subprocess.run([tapproof, "pki", "mint", "--trust-domain", "bench.example", "--out", d,
                    "--node", "server", "--node", "client"], check=True, stdout=subprocess.DEVNULL)
    ident = lambda n: f'[identity]\ncert = "{d}/{n}.pem"\nkey = "{d}/{n}.key"\nbundle = "{d}/bundle.pem"\n'
    with open(f"{d}/tp-server.toml", "w") as f:
        f.write(f'trust_domain = "bench.example"\n{ident("server")}[admin]\nlisten = "127.0.0.1:{PORTS["tp_admin_s"]}"\n'
                f'[tunnel]\nlisten = "127.0.0.1:{PORTS["tp_tunnel"]}"\n'
                f'[[inbound]]\nservice = "http"\nforward = "127.0.0.1:{PORTS["nginx"]}"\nallow = ["spiffe://bench.example/node/client"]\n'
                f'[[inbound]]\nservice = "iperf"\nforward = "127.0.0.1:{PORTS["iperf"]}"\nallow = ["spiffe://bench.example/node/client"]\n')
    with open(f"{d}/tp-client.toml", "w") as f:
        out = lambda svc, port: (f'[[outbound]]\nlisten = "127.0.0.1:{port}"\nservice = "{svc}"\n'
                                 f'peers = ["127.0.0.1:{PORTS["tp_tunnel"]}"]\nserver_id = "spiffe://bench.example/node/server"\n')
        f.write(f'trust_domain = "bench.example"\n{ident("client")}[admin]\nlisten = "127.0.0.1:{PORTS["tp_admin_c"]}"\n'
                + out("http", PORTS["tp_http"]) + out("iperf", PORTS["tp_iperf"]))
    tp = [procs.start("tapproof-server", [tapproof, "--log-level", "warn", "agent", "-c", f"{d}/tp-server.toml"], f"{d}/tp-server.log"),
          procs.start("tapproof-client", [tapproof, "--log-level", "warn", "agent", "-c", f"{d}/tp-client.toml"], f"{d}/tp-client.log")]
    for p in ("tp_tunnel", "tp_http", "tp_iperf"):
        wait_port(PORTS[p], "tapproof")

    common = (f"cert = {d}/{{n}}.pem\nkey = {d}/{{n}}.key\nCAfile = {d}/bundle.pem\nverifyChain = yes\n"
              "sslVersionMin = TLSv1.3\n")
    with open(f"{d}/st-server.conf", "w") as f:
        f.write(f"foreground = yes\npid = {d}/st-server.pid\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
                f"[http]\naccept = 127.0.0.1:{PORTS['st_http_s']}\nconnect = 127.0.0.1:{PORTS['nginx']}\n" + common.format(n="server") +
                f"[iperf]\naccept = 127.0.0.1:{PORTS['st_iperf_s']}\nconnect = 127.0.0.1:{PORTS['iperf']}\n" + common.format(n="server"))
    with open(f"{d}/st-client.conf", "w") as f:
        f.write(f"foreground = yes\nclient = yes\npid = {d}/st-client.pid\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
                f"[http]\naccept = 127.0.0.1:{PORTS['st_http']}\nconnect = 127.0.0.1:{PORTS['st_http_s']}\n" + common.format(n="client") +
                f"[iperf]\naccept = 127.0.0.1:{PORTS['st_iperf']}\nconnect = 127.0.0.1:{PORTS['st_iperf_s']}\n" + common.format(n="client"))
    st = [procs.start("stunnel-server", ["stunnel4", f"{d}/st-server.conf"], f"{d}/st-server.log"),
          procs.start("stunnel-client", ["stunnel4", f"{d}/st-client.conf"], f"{d}/st-client.log")]
    for p in ("st_http_s", "st_http", "st_iperf"):
        wait_port(PORTS[p], "stunnel")
    return {
        "direct plaintext": dict(http=PORTS["nginx"], iperf=PORTS["iperf"], pids=[]),
        "tapproof pair": dict(http=PORTS["tp_http"], iperf=PORTS["tp_iperf"], pids=[p.pid for p in tp]),
        "stunnel4 pair": dict(http=PORTS["st_http"], iperf=PORTS["st_iperf"], pids=[p.pid for p in st]),
    }


def bulk(port, pids, seconds):
    before = cpu_seconds(pids)
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {out.stdout[-400:]} {out.stderr[-400:]}")
    cpu = cpu_seconds(pids) - before
    r = json.loads(out.stdout)["end"]["sum_received"]
    gb = r["bytes"] / 1e9
    return r["bits_per_second"] / 8 / 1e6, (cpu / gb if pids else None)


def parse_wrk(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[pct] = float(val) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, lat, errors.group(0) if errors else ""


def wrk(port, seconds, conns, close):
    args = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/1k"], capture_output=True, text=True, timeout=seconds + 30)
    return parse_wrk(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tapproof", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the work directory with configs and logs")
    a = ap.parse_args()
    for tool in ("nginx", "wrk", "iperf3", "stunnel4"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (bench/run.sh installs it)")
    d = tempfile.mkdtemp(prefix="tapproof-bench-")
    os.chmod(d, 0o755)  # nginx workers run unprivileged and must read www/ (key files stay 0600)
    procs = Procs()
    results = {}
    try:
        paths = setup(d, a.tapproof, procs)
        for run in range(a.runs):
            for name, p in paths.items():
                r = results.setdefault(name, dict(bulk=[], cpu=[], new=[], ka=[], p50=[], p99=[], notes=set()))
                mbs, cpu = bulk(p["iperf"], p["pids"], a.seconds)
                r["bulk"].append(mbs)
                if cpu is not None:
                    r["cpu"].append(cpu)
                rps, _, err = wrk(p["http"], a.seconds, 16, close=True)
                r["new"].append(rps)
                if err:
                    r["notes"].add("new-conn: " + err)
                rps, lat, err = wrk(p["http"], a.seconds, 32, close=False)
                r["ka"].append(rps)
                r["p50"].append(lat.get("50", float("nan")))
                r["p99"].append(lat.get("99", float("nan")))
                if err:
                    r["notes"].add("keep-alive: " + err)
                print(f"run {run + 1}/{a.runs} {name:17} bulk {mbs:8.0f} MB/s  new {r['new'][-1]:8.0f}/s  "
                      f"keep-alive {rps:8.0f}/s p99 {r['p99'][-1]:.2f} ms", flush=True)
    finally:
        procs.stop()
        if a.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)

    med = lambda xs: statistics.median(xs) if xs else float("nan")
    st = results["stunnel4 pair"]
    print(f"\nMedian of {a.runs} runs, {a.seconds} s each, loopback, {os.cpu_count()} cores:\n")
    print("| path | bulk MB/s | proxy CPU s/GB | new conn/s | keep-alive req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cpu = f"{med(r['cpu']):.2f}" if r["cpu"] else "-"
        print(f"| {name} | {med(r['bulk']):,.0f} | {cpu} | {med(r['new']):,.0f} | {med(r['ka']):,.0f} | "
              f"{med(r['p50']):.2f} | {med(r['p99']):.2f} |")
    tp = results["tapproof pair"]
    print(f"\ntapproof / stunnel4: bulk {med(tp['bulk']) / med(st['bulk']):.2f}x, "
          f"CPU per GB {med(tp['cpu']) / med(st['cpu']):.2f}x, new conn/s {med(tp['new']) / med(st['new']):.2f}x, "
          f"keep-alive {med(tp['ka']) / med(st['ka']):.2f}x")
    for name, r in results.items():
        for n in sorted(r["notes"]):
            print(f"note: {name}: {n}")


if __name__ == "__main__":
    main()
