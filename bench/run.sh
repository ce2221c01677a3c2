#!/usr/bin/env bash
# One command for the benchmark: installs the peers and load tools when missing (Debian packages:
# nginx-light, wrk, iperf3, stunnel4, haproxy, nebula, wireguard-tools, postgresql, redis, matplotlib;
# crates.io: boringtun-cli), builds tapproof in release mode, and runs bench/run.py, which
# measures tapproof and the peers side by side (see its --help). Extra arguments go to run.py,
# e.g. `--runs 5 --seconds 10`, `--sections loopback,veth`, `--write` (update bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in nginx:nginx-light wrk:wrk iperf3:iperf3 stunnel4:stunnel4 haproxy:haproxy nebula:nebula wg:wireguard-tools \
            pgbench:postgresql redis-server:redis-server redis-benchmark:redis-tools tc:iproute2 ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
python3 -c "import matplotlib" 2>/dev/null || need+=(python3-matplotlib)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing ${need[*]}; install them or run as root" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian starts its own redis, postgres and haproxy services on install; the benchmark runs its own.
if ! command -v boringtun-cli >/dev/null 2>&1; then
  cargo install --locked boringtun-cli
fi
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked -p tapproof -p tapproof-bench
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3  # Debian's python3-matplotlib is for the system python
exec "$PY" bench/run.py --tapproof target/release/tapproof --bench-tools target/release/tapproof-bench "$@"
