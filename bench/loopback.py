"""Loopback sections: direct plaintext, a tapproof agent pair, a stunnel4 pair, an HAProxy TLS 1.3
mutual-auth pair, a plain relay pair and a plain HAProxy pair (`option splice-auto`) in front of the
same nginx, iperf3, PostgreSQL, Redis and echo servers; all on 127.0.0.1.

The plain relay pair (`tapproof-bench relay` twice, chained: no TLS, no HTTP/2, one upstream TCP
connection per app connection, one worker thread each like the agents) is the floor under any
two-process proxy on this machine: what the two extra socket hops cost with nothing else. The plain
HAProxy pair (mode tcp, splice-auto: the kernel moves bytes between sockets without copying them
through user space) is the stronger floor. Each proxy process runs one thread, like the agents on
this 2-core machine (one runtime worker per four cores, at least one)."""
import os, re, shutil, socket, subprocess, time
from common import (Procs, bench_tools, log, measure_paths, nginx_conf, rss_kib, stunnel_configs, tapproof_configs,
                    wait_port)

TD = "bench.example"
# backend, tapproof outbound, stunnel client accept, stunnel server accept, relay front, relay back,
# HAProxy TLS client accept, HAProxy TLS server accept, HAProxy plain front, HAProxy plain back.
# All below the ephemeral range (32768-60999), where a busy run's own connections would collide.
PORTS = dict(http=(18080, 28080, 29080, 30080, 31080, 32080, 20080, 21080, 22080, 23080),
             iperf=(15201, 25201, 29201, 30201, 31201, 32201, 20201, 21201, 22201, 23201),
             pg=(15432, 25432, 29432, 30432, 31432, 32432, 20432, 21432, 22432, 23432),
             redis=(16379, 26379, 29379, 30379, 31379, 32379, 20379, 21379, 22379, 23379),
             echo=(17007, 27007, 29007, 30007, 31007, 32007, 20007, 21007, 22007, 23007))
TUNNEL, ADMIN = 25008, (25000, 25001)
PATHS = ("direct plaintext", "tapproof pair", "stunnel4 pair", "HAProxy TLS pair", "plain relay pair (no TLS)",
         "HAProxy plain pair (splice, no TLS)")
# The path a service is reached on: the index of its client-facing port in PORTS.
ENTRY = {"direct plaintext": 0, "tapproof pair": 1, "stunnel4 pair": 2, "HAProxy TLS pair": 6,
         "plain relay pair (no TLS)": 4, "HAProxy plain pair (splice, no TLS)": 8}


def port(service, path):
    return PORTS[service][ENTRY[path]]


def haproxy_configs(d, services):
    """Writes ha-tls-server.cfg, ha-tls-client.cfg (TLS 1.3 only, both sides present a certificate
    of the bench CA and require the other's; HAProxy checks the chain, not the SPIFFE ID) and
    ha-plain-front.cfg, ha-plain-back.cfg (mode tcp, splice-auto). services: {name: ports}."""
    for n in ("server", "client"):
        with open(f"{d}/{n}.pem") as c, open(f"{d}/{n}.key") as k, open(f"{d}/ha-{n}.pem", "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(c.read() + k.read())
    head = ("global\n  nbthread 1\n  maxconn 5000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n"
            "  ssl-default-server-options ssl-min-ver TLSv1.3\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
            "  maxconn 5000\n")
    tls = f"ssl crt {d}/ha-{{n}}.pem ca-file {d}/bundle.pem verify required"
    configs = {"tls-server": "", "tls-client": "", "plain-front": "", "plain-back": ""}
    for name, p in services.items():
        configs["tls-client"] += f"listen {name}\n  bind 127.0.0.1:{p[6]}\n  server s 127.0.0.1:{p[7]} {tls.format(n='client')}\n"
        configs["tls-server"] += f"listen {name}\n  bind 127.0.0.1:{p[7]} {tls.format(n='server')}\n  server s 127.0.0.1:{p[0]}\n"
        splice = "  option splice-auto\n"
        configs["plain-front"] += f"listen {name}\n{splice}  bind 127.0.0.1:{p[8]}\n  server s 127.0.0.1:{p[9]}\n"
        configs["plain-back"] += f"listen {name}\n{splice}  bind 127.0.0.1:{p[9]}\n  server s 127.0.0.1:{p[0]}\n"
    for n, body in configs.items():
        with open(f"{d}/ha-{n}.cfg", "w") as f:
            f.write(head + body)


class Loopback:
    def __init__(self, d, tapproof, with_clients):
        self.d, self.tapproof, self.procs = d, tapproof, Procs()
        self.with_clients = with_clients
        self.pids = {}

    def start(self):
        d, tp = self.d, self.tapproof
        self.procs.start("nginx", ["nginx", "-c", nginx_conf(d, f"127.0.0.1:{PORTS['http'][0]}"), "-e",
                                   f"{d}/nginx-error.log"], f"{d}/nginx.log")
        self.procs.start("iperf3", ["iperf3", "-s", "-p", str(PORTS["iperf"][0])], f"{d}/iperf3.log")
        self.procs.start("echo", [bench_tools(), "--threads", "1", "echo-server", "--listen",
                                  f"127.0.0.1:{PORTS['echo'][0]}"], f"{d}/echo.log")
        if self.with_clients:
            self.start_postgres()
            self.procs.start("redis", ["redis-server", "--port", str(PORTS["redis"][0]), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", d], f"{d}/redis.log")
        for s in ("http", "iperf", "echo") + (("pg", "redis") if self.with_clients else ()):
            wait_port(PORTS[s][0], s)
        services = [s for s in PORTS if s in ("http", "iperf", "echo") or self.with_clients]

        subprocess.run([tp, "pki", "mint", "--trust-domain", TD, "--out", d, "--node", "server", "--node", "client"],
                       check=True, stdout=subprocess.DEVNULL)
        tapproof_configs(d, TD, "server", "client", f"127.0.0.1:{TUNNEL}", f"127.0.0.1:{TUNNEL}",
                         {s: f"127.0.0.1:{PORTS[s][0]}" for s in services},
                         {s: f"127.0.0.1:{PORTS[s][1]}" for s in services}, ADMIN)
        agents = [self.procs.start(n, [tp, "--log-level", "warn", "agent", "-c", f"{d}/tp-{n}.toml"], f"{d}/tp-{n}.log")
                  for n in ("server", "client")]
        stunnel_configs(d, {s: (f"127.0.0.1:{PORTS[s][2]}", f"127.0.0.1:{PORTS[s][3]}", f"127.0.0.1:{PORTS[s][0]}")
                            for s in services})
        st = [self.procs.start(f"stunnel-{n}", ["stunnel4", f"{d}/st-{n}.conf"], f"{d}/st-{n}.log")
              for n in ("server", "client")]
        haproxy_configs(d, {s: PORTS[s] for s in services})
        ha = {n: self.procs.start(f"haproxy-{n}", ["haproxy", "-db", "-f", f"{d}/ha-{n}.cfg"], f"{d}/ha-{n}.log")
              for n in ("tls-server", "tls-client", "plain-back", "plain-front")}
        relays = []
        for s in services:
            for name, listen, to in (("back", PORTS[s][5], PORTS[s][0]), ("front", PORTS[s][4], PORTS[s][5])):
                relays.append(self.procs.start(f"relay-{s}-{name}", [bench_tools(), "--threads", "1", "relay", "--listen",
                                                                     f"127.0.0.1:{listen}", "--to", f"127.0.0.1:{to}"],
                                               f"{d}/relay-{s}-{name}.log"))
        for s in services:
            wait_port(PORTS[s][1], "tapproof")
            wait_port(PORTS[s][2], "stunnel")
            wait_port(PORTS[s][4], "relay")
            wait_port(PORTS[s][6], "haproxy")
            wait_port(PORTS[s][8], "haproxy")
        self.pids = {"direct plaintext": [], "tapproof pair": [p.pid for p in agents],
                     "stunnel4 pair": [p.pid for p in st], "plain relay pair (no TLS)": [p.pid for p in relays],
                     "HAProxy TLS pair": [ha["tls-server"].pid, ha["tls-client"].pid],
                     "HAProxy plain pair (splice, no TLS)": [ha["plain-back"].pid, ha["plain-front"].pid]}

    def start_postgres(self):
        """A throwaway cluster owned by the postgres user, trust auth on loopback only, Debian's
        defaults otherwise (fsync and synchronous commit on, as a real database runs)."""
        bindir = sorted(os.listdir("/usr/lib/postgresql"))[-1]
        bindir = f"/usr/lib/postgresql/{bindir}/bin"
        pgdata = os.path.join(self.d, "pg")
        os.makedirs(pgdata)
        shutil.chown(pgdata, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(as_pg + [f"{bindir}/initdb", "-D", pgdata, "--auth=trust", "-U", "postgres"],
                       check=True, stdout=subprocess.DEVNULL)
        self.procs.start("postgres", as_pg + [f"{bindir}/postgres", "-D", pgdata, "-p", str(PORTS["pg"][0]),
                                              "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pgdata}",
                                              "-c", "max_connections=200"], f"{self.d}/postgres.log")

    def stop(self):
        self.procs.stop()


def run_basic(lb, runs, seconds):
    """bulk, new connections, keep-alive for each path; returns {path: {metric: [values]}}."""
    paths = {p: dict(host="127.0.0.1", http=port("http", p), iperf=port("iperf", p), pids=lb.pids[p]) for p in PATHS}
    return measure_paths("loopback", paths, runs, seconds)


def run_clients(lb, runs, seconds):
    """pgbench (8 clients, TPC-B-like) and redis-benchmark GET (16 clients) through each path."""
    d = lb.d
    pg = lambda args, path: ["pgbench", "-h", "127.0.0.1", "-p", str(port("pg", path)), "-U", "postgres"] + args
    subprocess.run(pg(["-i", "-q", "-s", "10", "postgres"], "direct plaintext"), check=True,
                   capture_output=True, timeout=300)
    res = {p: dict(tps=[], redis=[], errors=[]) for p in PATHS}
    for run in range(runs):
        for path in PATHS:
            out = subprocess.run(pg(["-c", "8", "-j", "2", "-T", str(seconds), "-n", "postgres"], path),
                                 capture_output=True, text=True, timeout=seconds + 120)
            m = re.search(r"tps = ([\d.]+)", out.stdout)
            failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
            res[path]["tps"].append(float(m.group(1)) if m else float("nan"))
            if out.returncode != 0 or not m or (failed and int(failed.group(1))):
                res[path]["errors"].append(f"pgbench: {out.stderr[-200:]}")
            n = 40000 * seconds
            out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port("redis", path)), "-t", "get",
                                  "-c", "16", "-n", str(n), "--csv"], capture_output=True, text=True, timeout=600)
            m = re.search(r'"GET","([\d.]+)"', out.stdout)
            res[path]["redis"].append(float(m.group(1)) if m else float("nan"))
            if out.returncode != 0 or not m:
                res[path]["errors"].append(f"redis-benchmark: {out.stderr[-200:]}")
            log(f"clients run {run + 1}/{runs} {path:17} pgbench {res[path]['tps'][-1]:8.0f} tps  "
                f"redis GET {res[path]['redis'][-1]:9.0f}/s")
    return res


def run_memory(lb, conns):
    """Opens `conns` connections through each proxy to the echo server, one byte echoed on each so
    every hop is up, then reads each proxy's resident memory: (after - before) / conns."""
    res = {}
    for path in ("tapproof pair", "stunnel4 pair"):
        pids = lb.pids[path]
        time.sleep(1)
        before = [rss_kib(p) for p in pids]
        socks, failed = [], ""
        try:
            for i in range(conns):
                s = socket.create_connection(("127.0.0.1", port("echo", path)), timeout=10)
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise RuntimeError("echo did not answer")
                socks.append(s)
        except (OSError, RuntimeError) as e:
            failed = f"stopped at {len(socks)} connections: {e}"
        time.sleep(2)
        after = [rss_kib(p) for p in pids]
        n = max(len(socks), 1)
        res[path] = dict(conns=len(socks), per_conn_kib=[(a - b) / n for a, b in zip(after, before)],
                         rss_after_kib=after, note=failed)
        for s in socks:
            s.close()
        log(f"memory {path}: {len(socks)} idle connections, per connection KiB per process "
            f"{[round(x, 1) for x in res[path]['per_conn_kib']]} {failed}")
        time.sleep(3)
    return res
