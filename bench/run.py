#!/usr/bin/env python3
"""tapproof's benchmark: every figure of the performance issue, side by side with the peers, in one run.

Sections (--sections, default all):
  loopback    direct / tapproof pair / stunnel4 pair / HAProxy TLS 1.3 mutual-auth pair / plain relay
              pair and HAProxy splice pair (no TLS, the floors of any
              two-process proxy) on 127.0.0.1: iperf3 bulk MB/s and proxy CPU seconds per GB,
              wrk new connections/s (Connection: close), wrk keep-alive req/s, p50, p99
  clients     pgbench (8 clients, TPC-B-like) and redis-benchmark GET (16 clients) through each path
  memory      resident memory per idle proxied connection at --idle-conns connections (tapproof, stunnel4)
  handshakes  full mTLS 1.3 handshakes (X25519MLKEM768, ECDSA P-256, no resumption) per second, one core
  profiles    the crypto profiles side by side (default, cnsa2): handshakes/s on one core, one iperf3
              stream through an agent pair on loopback (MB/s, CPU s/GB)
  veth        two network namespaces + veth: direct, tapproof (listener and captured), Nebula, boringtun (bulk, new conn, keep-alive)
  sites       site to site, A1 -- GA == GB -- B1 in four namespaces: routed plaintext, tapproof gateways, stunnel4
              gateways (TCP only), boringtun,
              Nebula (bulk with 1 and 32 flows, new conn/s, UDP 1 KiB packets/s and loss, p99 idle and under bulk)
  longfat     two namespaces on a link with a 10 ms delay each way (netem, else bench/delaylink.py);
              one iperf3 stream direct vs tapproof
  control     signings/s on SQLite; --feed-agents simulated agents on the state feed, revocation latency
Medians of --runs runs. Results: a table on stdout, bench/results.json, bench/README.md's figures
section and bench/plot.png (with --write). Every process and namespace started here is stopped.
"""
import argparse, datetime, json, os, shutil, signal, subprocess, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import log, med, raise_fd_limit
import common, control, longfat, loopback, profiles, sites, veth

HERE = os.path.dirname(os.path.abspath(__file__))
ALL = ["loopback", "clients", "memory", "handshakes", "profiles", "veth", "sites", "longfat", "control"]
TOOLS = dict(loopback=["nginx", "wrk", "iperf3", "stunnel4", "haproxy"], clients=["pgbench", "redis-server", "redis-benchmark"],
             memory=["stunnel4"], veth=["nginx", "wrk", "iperf3", "ip"], sites=["nginx", "wrk", "iperf3", "ip", "stunnel4"],
             longfat=["iperf3", "ip"], profiles=["iperf3", "taskset"])


def f0(x):
    return "-" if x != x else f"{x:,.0f}"


def f2(x):
    return "-" if x != x else f"{x:.2f}"


def ratio(a, b):
    return a / b if b and b == b and a == a else float("nan")


def report(R, a):
    """Markdown tables and the target checks; returns the text."""
    out = []
    p = out.append
    targets = []

    def target(name, ok, detail):
        targets.append(f"| {name} | {'met' if ok else 'NOT met'} | {detail} |")

    if "loopback" in R:
        L = R["loopback"]
        p("### Loopback (2 cores, everything on 127.0.0.1)\n")
        p("| path | bulk MB/s | proxy CPU s/GB | new conn/s | keep-alive req/s | p50 ms | p99 ms |")
        p("|---|---|---|---|---|---|---|")
        for path, r in L.items():
            p(f"| {path} | {f0(med(r['bulk']))} | {f2(med(r['cpu'])) if r['cpu'] else '-'} | {f0(med(r['new']))} | "
              f"{f0(med(r['ka']))} | {f2(med(r['p50']))} | {f2(med(r['p99']))} |")
        tp, st = L["tapproof pair"], L["stunnel4 pair"]
        b, c = ratio(med(tp["bulk"]), med(st["bulk"])), ratio(med(tp["cpu"]), med(st["cpu"]))
        k = ratio(med(tp["ka"]), med(st["ka"]))
        p(f"\ntapproof / stunnel4: bulk {b:.2f}x, CPU per GB {c:.2f}x, new conn/s "
          f"{ratio(med(tp['new']), med(st['new'])):.1f}x, keep-alive {k:.2f}x")
        rl = L.get("plain relay pair (no TLS)")
        if rl:
            p(f"tapproof / plain relay pair: bulk {ratio(med(tp['bulk']), med(rl['bulk'])):.2f}x, new conn/s "
              f"{ratio(med(tp['new']), med(rl['new'])):.2f}x, keep-alive {ratio(med(tp['ka']), med(rl['ka'])):.2f}x")
        hf, ht = L.get("HAProxy plain pair (splice, no TLS)"), L.get("HAProxy TLS pair")
        if hf and ht:
            r = lambda m, o: ratio(med(tp[m]), med(o[m]))
            p(f"tapproof / HAProxy splice pair (floor): bulk {r('bulk', hf):.2f}x, new conn/s {r('new', hf):.2f}x, "
              f"keep-alive {r('ka', hf):.2f}x, p99 {r('p99', hf):.2f}x")
            p(f"tapproof / HAProxy TLS pair: bulk {r('bulk', ht):.2f}x, new conn/s {r('new', ht):.2f}x, "
              f"keep-alive {r('ka', ht):.2f}x, p99 {r('p99', ht):.2f}x")
            target("keep-alive >= 1.0x HAProxy splice floor", r("ka", hf) >= 1.0, f"{r('ka', hf):.2f}x")
            target("keep-alive >= 1.5x HAProxy TLS", r("ka", ht) >= 1.5, f"{r('ka', ht):.2f}x")
            target("bulk >= 0.85x HAProxy splice floor", r("bulk", hf) >= 0.85, f"{r('bulk', hf):.2f}x")
            target("bulk >= 1.5x HAProxy TLS", r("bulk", ht) >= 1.5, f"{r('bulk', ht):.2f}x")
            target("new conn/s >= HAProxy splice floor's", r("new", hf) >= 1.0, f"{r('new', hf):.2f}x")
            target("p99 no worse than HAProxy splice floor's", r("p99", hf) <= 1.0,
                   f"{f2(med(tp['p99']))} vs {f2(med(hf['p99']))} ms")
        p("")
        target("bulk >= 2x stunnel4", b >= 2, f"{b:.2f}x")
        target("CPU s/GB below stunnel4's", c < 1, f"{c:.2f}x")
        target("new conn/s >= 8,000 on loopback", med(tp["new"]) >= 8000, f0(med(tp["new"])))
        target("keep-alive >= 2.5x stunnel4", k >= 2.5, f"{k:.2f}x")
        target("keep-alive p99 < 1 ms (loopback)", med(tp["p99"]) < 1, f"{f2(med(tp['p99']))} ms")
    if "clients" in R:
        C = R["clients"]
        p("### Real clients through the pair (loopback)\n")
        p("| path | pgbench TPS (8 clients) | % of direct | redis GET/s (16 clients) | % of direct | errors |")
        p("|---|---|---|---|---|---|")
        dt, dr = med(C["direct plaintext"]["tps"]), med(C["direct plaintext"]["redis"])
        for path, r in C.items():
            p(f"| {path} | {f0(med(r['tps']))} | {100 * ratio(med(r['tps']), dt):.0f}% | {f0(med(r['redis']))} | "
              f"{100 * ratio(med(r['redis']), dr):.0f}% | {len(r['errors'])} |")
        tp = C["tapproof pair"]
        target("pgbench >= 80% of direct", ratio(med(tp["tps"]), dt) >= 0.8 and not tp["errors"],
               f"{100 * ratio(med(tp['tps']), dt):.0f}%")
        target("redis GET >= 70% of direct", ratio(med(tp["redis"]), dr) >= 0.7 and not tp["errors"],
               f"{100 * ratio(med(tp['redis']), dr):.0f}%")
        p("")
    if "memory" in R:
        M = R["memory"]
        p(f"### Memory per idle proxied connection\n")
        p("| path | connections open | KiB per connection, each process (server side, client side) |")
        p("|---|---|---|")
        for path, r in M.items():
            p(f"| {path} | {r['conns']:,} | {', '.join(f'{x:.1f}' for x in r['per_conn_kib'])} {r['note']} |")
        worst = max(M["tapproof pair"]["per_conn_kib"])
        target(f"< 16 KiB per idle connection per agent at {M['tapproof pair']['conns']:,}",
               worst < 16 and M["tapproof pair"]["conns"] >= a.idle_conns, f"{worst:.1f} KiB")
        p("")
    if "handshakes" in R:
        H = R["handshakes"]
        p("### Full mTLS handshakes, one core\n")
        p(f"X25519MLKEM768, ECDSA P-256 chain, TLS 1.3, no resumption ({H['resumed']} resumed), both ends in one "
          f"process pinned to one core: {f0(H['rate'])} complete handshakes/s; CPU time of the server side alone: "
          f"{f0(H['server_side_rate'])}/s per core; client side {f0(H['client_side_rate'])}/s per core.\n")
        target(">= 2,000 full handshakes/s on one core (server side)", H["server_side_rate"] >= 2000,
               f"{f0(H['server_side_rate'])}/s")
    if "profiles" in R:
        profiles.report(R["profiles"], p, f0, f2)
    if "veth" in R:
        V = R["veth"]
        p("### Across two network namespaces (veth)\n")
        p("| path | bulk MB/s | CPU s/GB (tunnel processes) | new conn/s | keep-alive req/s | p50 ms | p99 ms |")
        p("|---|---|---|---|---|---|---|")
        for path, r in V["results"].items():
            p(f"| {path} | {f0(med(r['bulk']))} | {f2(med(r['cpu'])) if r['cpu'] else '-'} | {f0(med(r['new']))} | "
              f"{f0(med(r['ka']))} | {f2(med(r['p50']))} | {f2(med(r['p99']))} |")
        for name, why in V["skipped"].items():
            p(f"\n{name} not measured: {why}")
        cap = V["results"].get("tapproof captured")
        if cap:
            tp = V["results"]["tapproof"]
            cn, ck = ratio(med(cap["new"]), med(tp["new"])), ratio(med(cap["ka"]), med(tp["ka"]))
            p(f"\ntapproof captured / explicit outbound listener: new conn/s {cn:.2f}x, keep-alive {ck:.2f}x, bulk "
              f"{ratio(med(cap['bulk']), med(tp['bulk'])):.2f}x\n")
            target("captured new conn/s within 10% of the explicit path", cn >= 0.9, f"{cn:.2f}x")
            target("captured keep-alive within 10% of the explicit path", ck >= 0.9, f"{ck:.2f}x")
        meshes = [V["results"][m] for m in ("Nebula", "boringtun") if m in V["results"]]
        if meshes:
            tp = V["results"]["tapproof"]
            bn = max(med(m["new"]) for m in meshes)
            bk = max(med(m["ka"]) for m in meshes)
            rn, rk = ratio(med(tp["new"]), bn), ratio(med(tp["ka"]), bk)
            p(f"\ntapproof / best L3 mesh: new conn/s {rn:.2f}x, keep-alive {rk:.2f}x, bulk "
              f"{ratio(med(tp['bulk']), max(med(m['bulk']) for m in meshes)):.1f}x\n")
            target("new conn/s >= 1.3x best of Nebula/boringtun", rn >= 1.3, f"{rn:.2f}x")
            target("keep-alive >= 1.5x best of Nebula/boringtun", rk >= 1.5, f"{rk:.2f}x")
            target("keep-alive p99 < 1 ms (veth)", med(tp["p99"]) < 1, f"{f2(med(tp['p99']))} ms")
        for path, r in V["results"].items():
            for n in sorted(r["notes"]):
                p(f"note: {path}: {n}")
        p("")
    if "sites" in R:
        S = R["sites"]
        p("### Site to site (A1 -- GA == interconnect == GB -- B1, four namespaces)\n")
        p("| path | bulk MB/s, 1 flow | CPU s/GB (gateways) | bulk MB/s, 32 flows | new conn/s | UDP 1 KiB pkt/s | "
          "UDP loss % | p99 ms idle | p99 ms under bulk |")
        p("|---|---|---|---|---|---|---|---|---|")
        for path, r in S["results"].items():
            if not r["bulk1"]:
                continue
            p(f"| {path} | {f0(med(r['bulk1']))} | {f2(med(r['cpu'])) if r['cpu'] else '-'} | "
              f"{f0(med(r['bulk32']))} | {f0(med(r['new']))} | {f0(med(r['udp_pps']))} | {f2(med(r['udp_loss']))} | "
              f"{f2(med(r['p99_idle']))} | {f2(med(r['p99_bulk']))} |")
        for name, why in S["skipped"].items():
            p(f"\n{name} not measured: {why}")
        res = S["results"]
        tp, floor = res.get("tapproof gateways"), res.get("routed plaintext")
        if tp and tp["bulk1"] and floor and floor["bulk1"]:
            p(f"\ntapproof gateways / routed plaintext: bulk 1 flow {ratio(med(tp['bulk1']), med(floor['bulk1'])):.2f}x, "
              f"32 flows {ratio(med(tp['bulk32']), med(floor['bulk32'])):.2f}x, new conn/s "
              f"{ratio(med(tp['new']), med(floor['new'])):.2f}x, UDP pkt/s "
              f"{ratio(med(tp['udp_pps']), med(floor['udp_pps'])):.2f}x")
            for peer in ("stunnel4 gateways", "boringtun", "Nebula"):
                o = res.get(peer)
                if o and o["bulk1"]:
                    p(f"tapproof gateways / {peer}: bulk 1 flow {ratio(med(tp['bulk1']), med(o['bulk1'])):.2f}x, "
                      f"32 flows {ratio(med(tp['bulk32']), med(o['bulk32'])):.2f}x, new conn/s "
                      f"{ratio(med(tp['new']), med(o['new'])):.2f}x, UDP pkt/s "
                      f"{ratio(med(tp['udp_pps']), med(o['udp_pps'])):.2f}x")
            q = ratio(med(tp["p99_bulk"]), med(tp["p99_idle"]))
            p(f"p99 under bulk / idle: tapproof gateways {q:.1f}x, routed plaintext "
              f"{ratio(med(floor['p99_bulk']), med(floor['p99_idle'])):.1f}x" + "".join(
                f", {peer} {ratio(med(res[peer]['p99_bulk']), med(res[peer]['p99_idle'])):.1f}x"
                for peer in ("stunnel4 gateways", "boringtun", "Nebula") if res.get(peer) and res[peer]["bulk1"]))
            p("")
            target("sites: p99 under bulk <= 2x idle p99 (tapproof gateways)", q <= 2, f"{q:.2f}x")
            st = res.get("stunnel4 gateways")
            if st and st["bulk1"]:
                target("sites: p99 under bulk better than stunnel4's separate connections",
                       med(tp["p99_bulk"]) < med(st["p99_bulk"]),
                       f"{f2(med(tp['p99_bulk']))} vs {f2(med(st['p99_bulk']))} ms")
        for path, r in res.items():
            for n in sorted(r["notes"]):
                p(f"note: {path}: {n}")
        p("")
    if "longfat" in R:
        F = R["longfat"]
        p(f"### Long fat link\n\nTwo namespaces on one Ethernet segment through {F['link']}; hosts with 32 MiB TCP "
          "buffers; one iperf3 stream. The row without delay is what this machine's CPU allows over the same "
          "path.\n")
        p("| delay each way | measured RTT ms | direct MB/s | tapproof MB/s | tapproof % of direct |")
        p("|---|---|---|---|---|")
        for ms, r in sorted(F["delays"].items(), key=lambda kv: int(kv[0])):
            d, t = med(r["direct plaintext"]), med(r["tapproof"])
            p(f"| {ms} ms | {r['rtt_ms']:.1f} | {f0(d)} | {f0(t)} | {100 * ratio(t, d):.0f}% |")
        long = F["delays"][max(F["delays"], key=int)]
        d, t = med(long["direct plaintext"]), med(long["tapproof"])
        p("")
        target("long fat link >= 80% of direct", ratio(t, d) >= 0.8, f"{100 * ratio(t, d):.0f}%")
    if "control" in R:
        S, Fd = R["control"]["sign"], R["control"]["feed"]
        p("### Control plane (server on SQLite, 127.0.0.1)\n")
        p(f"- Signings: {f0(med(S['rate']))}/s (32 concurrent node connections, one CSR each per request, "
          f"{S['failed']} failed), {med(S['cpu']):.2f} ms server CPU per signing.")
        p(f"- State feed: {Fd['agents']:,} simulated agents (own mTLS connection each, connected in "
          f"{Fd['connect_s']:.1f} s); after `server revoke`, {Fd['notified']:,} saw the revocation, p50 "
          f"{Fd['p50_s']:.2f} s, p99 {Fd['p99_s']:.2f} s, last {Fd['max_s']:.2f} s, {Fd['errors']} errors. Server "
          f"memory {Fd['server_rss_before_mib']:.0f} MiB before, {Fd['server_rss_mib']:.0f} MiB peak; server CPU "
          f"{Fd['server_cpu_s']:.1f} s over the {Fd['wall_s']:.0f} s run.\n")
        target(">= 1,000 signings/s on SQLite", med(S["rate"]) >= 1000 and not S["failed"], f0(med(S["rate"])))
        target(f"revocation reaches all {Fd['agents']:,} agents within 5 s",
               Fd["notified"] == Fd["agents"] and Fd["max_s"] <= 5, f"last after {Fd['max_s']:.2f} s")
    text = "\n".join(out)
    if targets:
        text += "\n### Targets\n\n| target | status | measured |\n|---|---|---|\n" + "\n".join(targets) + "\n"
    return text


def plot(R, path):
    """Bar charts of tapproof against the peers: loopback and veth."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (apt-get install python3-matplotlib): no plot")
        return False
    panels = []
    if "loopback" in R:
        panels += [("loopback: bulk MB/s", R["loopback"], "bulk"), ("loopback: new conn/s", R["loopback"], "new"),
                   ("loopback: keep-alive req/s", R["loopback"], "ka")]
    if "profiles" in R:
        profiles.report(R["profiles"], p, f0, f2)
    if "veth" in R:
        V = R["veth"]["results"]
        panels += [("veth: bulk MB/s", V, "bulk"), ("veth: new conn/s", V, "new"), ("veth: keep-alive req/s", V, "ka")]
    if not panels:
        return False
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4.2 * rows), squeeze=False)
    for ax, (title, data, key) in zip(axes.flat, panels):
        names = list(data)
        vals = [med(data[n][key]) for n in names]
        colors = ["#2a7" if "tapproof" in n else ("#999" if "direct" in n or "no TLS" in n else "#c55")
                  for n in names]
        ax.bar(range(len(names)), [0 if v != v else v for v in vals], color=colors)
        ax.set_xticks(range(len(names)), [n.replace(" plaintext", "").replace(" pair", "").replace(" (no TLS)", "")
                                          for n in names], rotation=15)
        ax.set_title(title)
        for i, v in enumerate(vals):
            if v == v:
                ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("tapproof vs peers (green: tapproof, grey: direct plaintext and the no-TLS relay floors, red: peers); "
                 "median of runs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def write_readme(text, a, sections):
    readme = os.path.join(HERE, "README.md")
    with open(readme) as f:
        body = f.read()
    marker = "## Latest figures"
    head = body.split(marker)[0]
    stamp = datetime.date.today().isoformat()
    cmd = f"bench/run.sh --runs {a.runs} --seconds {a.seconds}" + (
        f" --sections {','.join(sections)}" if sections != ALL else "")
    with open(readme, "w") as f:
        f.write(head + marker + f"\n\n{stamp}, {os.cpu_count()} cores, command `{cmd}`, median of {a.runs} runs. "
                "The machine is noisy: compare ratios from one run, not absolute figures across runs.\n\n"
                "![tapproof against the peers](plot.png)\n\n" + text + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tapproof", required=True)
    ap.add_argument("--bench-tools", required=True, help="the tapproof-bench binary (echo server, relay, load generators)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--sections", default=",".join(ALL))
    ap.add_argument("--idle-conns", type=int, default=8000)
    ap.add_argument("--feed-agents", type=int, default=10000)
    ap.add_argument("--delay-ms", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="write bench/results.json, bench/README.md, bench/plot.png")
    ap.add_argument("--keep", action="store_true", help="keep the work directory with configs and logs")
    a = ap.parse_args()
    common.BENCH_TOOLS = a.bench_tools
    sections = [s for s in a.sections.split(",") if s]
    for s in sections:
        if s not in ALL:
            sys.exit(f"unknown section {s!r}; choose from {', '.join(ALL)}")
        for tool in TOOLS.get(s, []):
            if not shutil.which(tool):
                sys.exit(f"{tool} not found (bench/run.sh installs it)")
    if any(s in sections for s in ("veth", "sites", "longfat", "clients")) and os.geteuid() != 0:
        sys.exit("the veth, sites, longfat and clients sections need root (network namespaces, a throwaway PostgreSQL)")
    raise_fd_limit()
    # SIGTERM/SIGINT end the run through the finally blocks below, which stop every process and
    # remove the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    d = tempfile.mkdtemp(prefix="tapproof-bench-")
    os.chmod(d, 0o755)  # nginx and postgres run unprivileged and must reach their files (keys stay 0600)
    R = {}
    try:
        if any(s in sections for s in ("loopback", "clients", "memory")):
            lb = loopback.Loopback(d, a.tapproof, with_clients="clients" in sections)
            try:
                lb.start()
                if "loopback" in sections:
                    R["loopback"] = loopback.run_basic(lb, a.runs, a.seconds)
                if "clients" in sections:
                    R["clients"] = loopback.run_clients(lb, a.runs, a.seconds)
                if "memory" in sections:
                    R["memory"] = loopback.run_memory(lb, a.idle_conns)
            finally:
                lb.stop()
        if "handshakes" in sections:
            if not os.path.exists(f"{d}/server.pem"):
                subprocess.run([a.tapproof, "pki", "mint", "--trust-domain", "bench.example", "--out", d, "--node",
                                "server", "--node", "client"], check=True, stdout=subprocess.DEVNULL)
            runs = []
            for _ in range(a.runs):
                out = subprocess.run(["taskset", "-c", "0", a.bench_tools, "--threads", "1", "handshakes", "--pki",
                                      d, "--trust-domain", "bench.example", "--seconds", str(a.seconds)],
                                     check=True, capture_output=True, text=True).stdout
                runs.append(dict(kv.split("=") for kv in out.split()))
                log(f"handshakes: {out.strip()}")
            R["handshakes"] = {k: med([float(r[k]) for r in runs]) for k in ("rate", "server_side_rate",
                                                                           "client_side_rate", "resumed")}
        if "profiles" in sections:
            pr = profiles.Profiles(d, a.tapproof)
            try:
                pr.start()
                R["profiles"] = profiles.run(pr, a.runs, a.seconds)
            finally:
                pr.stop()
        if "veth" in sections:
            v = veth.Veth(d, a.tapproof)
            try:
                v.start()
                R["veth"] = dict(results=veth.run_basic(v, a.runs, a.seconds), skipped=v.skipped)
            finally:
                v.stop()
        if "sites" in sections:
            st = sites.Sites(d, a.tapproof)
            try:
                st.start()
                R["sites"] = dict(results=sites.run(st, a.runs, a.seconds), skipped=st.skipped)
            finally:
                st.stop()
        if "longfat" in sections:
            lf = longfat.LongFat(d, a.tapproof, a.delay_ms)
            try:
                lf.start()
                R["longfat"] = longfat.run(lf, a.runs, a.seconds * 2)
            finally:
                lf.stop()
        if "control" in sections:
            cp = control.ControlPlane(d, a.tapproof)
            try:
                cp.start()
                R["control"] = dict(sign=control.run_signings(cp, a.runs, a.seconds),
                                    feed=control.run_feed(cp, a.feed_agents))
            finally:
                cp.stop()
    finally:
        if a.keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    text = report(R, a)
    print(f"\nMedian of {a.runs} runs, {a.seconds} s each, {os.cpu_count()} cores:\n\n{text}")
    if a.write:
        def plain(o):
            return sorted(o) if isinstance(o, set) else str(o)
        with open(os.path.join(HERE, "results.json"), "w") as f:
            json.dump(R, f, indent=1, default=plain)
        plot(R, os.path.join(HERE, "plot.png"))
        write_readme(text, a, sections)


if __name__ == "__main__":
    main()
