"""The long fat link: two hosts (namespaces tpbench-lc and tpbench-ls) on one Ethernet segment
whose frames wait DELAY ms each way in a third namespace (tpbench-lm), measured also without the
delay over the same path, so that a CPU limit shows apart from a window limit. With sch_netem the wait is
`tc qdisc ... netem delay` on both of the middle's interfaces; kernels built without netem (this
project's CI machines) get the same segment from bench/delaylink.py, a user-space relay, and the
report says which one ran. One iperf3 stream, direct TCP vs through a tapproof pair, both over the
same link. Addresses 10.234.0.0/24 and the namespaces are the harness's own and are removed at the
end, as is every process started here."""
import os, subprocess, sys, time
from common import Procs, in_ns, iperf, log, ns_run as ns, pki_dir, sh, tapproof_configs, wait_port

NS_C, NS_M, NS_S = "tpbench-lc", "tpbench-lm", "tpbench-ls"
IP_C, IP_S = "10.234.0.1", "10.234.0.2"
IPERF, TUNNEL, TP_IPERF = 15202, 25009, 25202
TD = "bench.example"
HERE = os.path.dirname(os.path.abspath(__file__))



def cleanup():
    for n in (NS_C, NS_M, NS_S):
        sh("ip", "netns", "del", n, check=False)


class LongFat:
    def __init__(self, d, tapproof, delay_ms):
        self.d, self.tapproof, self.delay_ms, self.procs = d, tapproof, delay_ms, Procs()
        self.link, self.netem, self.relay, self.rtt_ms = None, None, None, None

    def start(self):
        cleanup()
        for n in (NS_C, NS_M, NS_S):
            sh("ip", "netns", "add", n)
            ns(n, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "tplc0", "netns", NS_C, "type", "veth", "peer", "name", "tplm0", "netns", NS_M)
        sh("ip", "link", "add", "tpls0", "netns", NS_S, "type", "veth", "peer", "name", "tplm1", "netns", NS_M)
        for n, dev, ip in ((NS_C, "tplc0", IP_C), (NS_S, "tpls0", IP_S)):
            # Hosts tuned for a long link (32 MiB socket buffers, as on a data-centre
            # interconnect), so that direct TCP is not capped by the default 4 MiB send buffer and
            # the tunnel's HTTP/2 windows are what gets tested.
            for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                ns(n, "sysctl", "-qw", f"{key}=4096 131072 {32 << 20}")
            ns(n, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            ns(n, "ip", "link", "set", dev, "up")
        ns(NS_M, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        for dev in ("tplm0", "tplm1"):
            ns(NS_M, "ip", "link", "set", dev, "up")
        self.set_delay(self.delay_ms)
        d, tp = self.d, self.tapproof
        self.procs.start("iperf3", ["iperf3", "-s", "-p", str(IPERF)], f"{d}/iperf3-longfat.log", ns=NS_S)
        wait_port(IPERF, "iperf3", NS_S)
        ld = pki_dir(d, tp, TD, "longfat")
        tapproof_configs(ld, TD, "server", "client", f"{IP_S}:{TUNNEL}", f"{IP_S}:{TUNNEL}",
                         {"iperf": f"127.0.0.1:{IPERF}"}, {"iperf": f"127.0.0.1:{TP_IPERF}"}, (25110, 25111))
        for n, space in (("server", NS_S), ("client", NS_C)):
            self.procs.start(f"tp-{n}", [tp, "--log-level", "warn", "agent", "-c", f"{ld}/tp-{n}.toml"],
                             f"{ld}/tp-{n}.log", ns=space)
        wait_port(TP_IPERF, "tapproof", NS_C)
        wait_port(TUNNEL, "tapproof", NS_S)

    def set_delay(self, ms):
        """From now on every frame waits `ms` each way: netem on both middle interfaces (joined by
        a bridge) where the kernel has it, else the user-space relay (told the new delay on its stdin).
        Measures the round trip after."""
        devs = ("tplm0", "tplm1")
        if self.netem is None:
            self.netem = all(ns(NS_M, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{ms}ms",
                                "limit", "100000", check=False).returncode == 0 for dev in devs)
            if self.netem:
                ns(NS_M, "ip", "link", "add", "tplbr", "type", "bridge")
                for dev in devs:
                    ns(NS_M, "ip", "link", "set", dev, "master", "tplbr")
                ns(NS_M, "ip", "link", "set", "tplbr", "up")
            else:
                for dev in devs:
                    ns(NS_M, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                    ns(NS_M, "ip", "link", "set", dev, "promisc", "on")
        elif self.netem:
            for dev in devs:
                ns(NS_M, "tc", "qdisc", "change", "dev", dev, "root", "netem", "delay", f"{ms}ms", "limit", "100000")
        if self.netem:
            self.link = "netem on both ends of a bridge"
        else:
            if self.relay:
                self.relay.stdin.write(f"{ms}\n")
                self.relay.stdin.flush()
            else:
                log_path = f"{self.d}/delaylink.log"
                self.relay = subprocess.Popen(in_ns(NS_M, [sys.executable, "-u", f"{HERE}/delaylink.py", *devs, str(ms)]),
                                              stdin=subprocess.PIPE, stdout=open(log_path, "w"),
                                              stderr=subprocess.STDOUT, text=True)
                self.procs.adopt("delaylink", self.relay)
                for _ in range(100):
                    with open(log_path) as f:
                        if "ready" in f.read():
                            break
                    if self.relay.poll() is not None:
                        raise RuntimeError(f"delaylink.py exited: {open(log_path).read()[-300:]}")
                    time.sleep(0.05)
            self.link = "bench/delaylink.py, a user-space relay (this kernel has no sch_netem)"
        self.rtt_ms = self.measure_rtt()

    def measure_rtt(self):
        """Median of ten TCP connects to a closed port of the server host: the refusal comes back
        after one round trip. Timed inside the client namespace, after one attempt settled ARP."""
        code = ("import socket,statistics,time\n"
                f"a=('{IP_S}',9)\nt=[]\n"
                "for i in range(11):\n s=time.monotonic()\n"
                " try: socket.create_connection(a,timeout=5).close()\n except ConnectionRefusedError: pass\n"
                " t.append(time.monotonic()-s)\nprint(statistics.median(t[1:])*1000)")
        return float(ns(NS_C, sys.executable, "-c", code).stdout)

    def stop(self):
        self.procs.stop()
        cleanup()


def run(lf, runs, seconds):
    """One stream direct and through tapproof with the long delay, then with none (what the
    machine's CPU allows over the same path). In this order: BBR keeps the smallest RTT it saw
    for 10 s, so a tunnel that knew a 0.05 ms path is held to a tiny window for seconds once the
    delay appears (5 MB/s, seen here), which no real link's RTT does to a connection."""
    res = dict(delays={})
    for ms in (lf.delay_ms, 0):
        lf.set_delay(ms)
        r = {"rtt_ms": lf.rtt_ms, "direct plaintext": [], "tapproof": []}
        for run in range(runs):
            for path, host, port in (("direct plaintext", IP_S, IPERF), ("tapproof", "127.0.0.1", TP_IPERF)):
                mbs, _ = iperf(host, port, seconds, ns=NS_C)
                r[path].append(mbs)
                log(f"long fat link {ms} ms run {run + 1}/{runs} {path:17} {mbs:6.0f} MB/s")
        res["delays"][ms] = r
    res["link"] = lf.link
    return res
