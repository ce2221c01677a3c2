#!/usr/bin/env python3
"""A/B of tunnel settings on the site-to-site path: the sites section's tapproof gateways only,
once per setting per round, settings interleaved, medians printed. Each setting is extra
`[tunnel]` lines for both gateways (';' separates lines; "default" adds none):

    python3 bench/levers.py --tapproof target/release/tapproof \\
        --bench-tools target/release/tapproof-bench --rounds 3 \\
        default "receive_buffer = 262144" "stream_window = 1048576;receive_buffer = 262144"

Needs root (network namespaces), nginx, wrk and iperf3, as the sites section does."""
import argparse, os, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common, sites
from common import med


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tapproof", required=True)
    ap.add_argument("--bench-tools", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("settings", nargs="+")
    a = ap.parse_args()
    common.BENCH_TOOLS = a.bench_tools
    common.raise_fd_limit()
    sites.PATHS = ("tapproof gateways",)
    d = tempfile.mkdtemp(prefix="tapproof-levers-")
    os.chmod(d, 0o755)
    s = sites.Sites(d, a.tapproof)
    out = {}
    try:
        s.start()
        for _ in range(a.rounds):
            for setting in a.settings:
                sites.TUNNEL_EXTRA = "" if setting == "default" else setting.replace(";", "\n") + "\n"
                r = sites.run(s, 1, a.seconds)["tapproof gateways"]
                o = out.setdefault(setting, {})
                for k in ("bulk1", "bulk32", "new", "p99_idle", "p99_bulk"):
                    o.setdefault(k, []).extend(r[k])
    finally:
        s.stop()
    print(f"median of {a.rounds} rounds, {a.seconds} s each")
    print("| [tunnel] setting | bulk MB/s, 1 flow | bulk MB/s, 32 flows | new conn/s | p99 ms idle | p99 ms under bulk |")
    print("|---|---|---|---|---|---|")
    for setting, o in out.items():
        print(f"| {setting} | {med(o['bulk1']):,.0f} | {med(o['bulk32']):,.0f} | {med(o['new']):,.0f} | "
              f"{med(o['p99_idle']):.2f} | {med(o['p99_bulk']):.2f} |")


if __name__ == "__main__":
    main()
