#!/usr/bin/env bash
# The README's test command. Installs what the tests need when it is missing and we are root
# (iproute2, tcpdump, nftables, dig and dnsmasq for the network-namespace and fault tests; chromium and chromedriver for the
# dashboard's browser test; promtool for the metrics format; a local PostgreSQL server for the store's conformance suite;
# a Python venv with py-spiffe and schemathesis), then
# runs every test in the workspace. Without root those tests say they were skipped; under CI=true
# they must run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# dig and dnsmasq: a real DNS query through the site gateways (tests/gateway.rs).
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# promtool (package prometheus, without the recommended exporters) checks both roles' /metrics.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing prometheus (promtool) for the metrics format tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]} for the network-namespace and browser tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: ${need[*]} missing and not root: the tests needing them will be skipped"
  fi
fi

if [ -z "${TAPPROOF_TEST_POSTGRES:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "starting a local PostgreSQL server for the store tests (scripts/postgres.sh)"
    TAPPROOF_TEST_POSTGRES=$(scripts/postgres.sh)
    export TAPPROOF_TEST_POSTGRES
  else
    echo "note: not root and TAPPROOF_TEST_POSTGRES unset: the PostgreSQL store tests will be skipped"
  fi
fi

# The tests that drive real third-party clients (py-spiffe against the Workload API, schemathesis
# against the OpenAPI document) use a Python with both, in target/test-venv (test-util/python.rs).
venv=target/test-venv
if ! "$venv/bin/python" -c 'import spiffe, schemathesis' >/dev/null 2>&1; then
  echo "making $venv (PyPI spiffe, schemathesis) for the Workload API and OpenAPI tests"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      echo "note: python3 -m venv failed and not root: the Workload API and OpenAPI tests will be skipped"
    fi
  fi
  if [ -x "$venv/bin/pip" ]; then
    "$venv/bin/pip" install -q 'spiffe==0.3.2' 'schemathesis==4.32.5'
  fi
fi

# The walkthrough test runs the README's two-host install with the package: as root, build this
# checkout's .deb (dev profile, the binary the tests build anyway; `cargo deb -p tapproof` alone
# builds a release one) and install it over any older one.
if [ "$(id -u)" = 0 ]; then
  echo "building and installing this checkout's .deb for the walkthrough test (cargo-deb)"
  command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet
  cargo build --locked -p tapproof
  rm -f target/debian/tapproof_*.deb
  cargo deb -p tapproof --profile dev --no-build --quiet
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall ./target/debian/tapproof_*.deb >/dev/null
else
  echo "note: not root: the walkthrough test (README install with the package) will be skipped"
fi

# cargo prints one "test result" line per test binary (the last is often an empty doc-test run),
# so close with one total line that says what ran.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "\ntotal: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
