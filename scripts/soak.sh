#!/usr/bin/env bash
# The soak: scripts/soak.sh --minutes N [--out DIR] [--tapproof PATH] [--pg-restart] (see
# scripts/soak.py). Installs wrk, nginx and PostgreSQL when missing and run as root, starts the
# local PostgreSQL (scripts/postgres.sh), and builds tapproof (debug, the profile the tests use)
# unless --tapproof is given.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "soak needs ${need[*]} (run as root to install them)"; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
url=$(scripts/postgres.sh)
hostport=${url#*@}; hostport=${hostport%%/*}
args=("$@")
if [[ " $* " != *" --tapproof "* ]]; then
  cargo build --locked -p tapproof
fi
exec python3 scripts/soak.py --pg-addr "$hostport" "${args[@]}"
