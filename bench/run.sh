#!/usr/bin/env bash
# One command for the benchmark: installs the peers and load tools (Debian packages) when missing,
# builds tapproof in release mode, and runs bench/run.py, which measures direct plaintext,
# tapproof and a stunnel4 pair side by side on loopback. Extra arguments go to run.py
# (e.g. --runs 5 --seconds 10).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in nginx:nginx-light wrk:wrk iperf3:iperf3 stunnel4:stunnel4; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing ${need[*]}; install them or run as root" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked -p tapproof
exec python3 bench/run.py --tapproof target/release/tapproof "$@"
