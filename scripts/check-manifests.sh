#!/usr/bin/env bash
# Validates deploy/kubernetes/*.yaml against the Kubernetes API schemas (PyPI
# kubernetes-validate, strict: unknown fields are errors), and checks what a schema cannot: the
# images name this checkout's version (scripts/image.sh builds localhost/tapproof:<version>), and
# no key-encryption key is mounted as a file (a Secret file's mode under fsGroup is one the server
# refuses; TAPPROOF_KEK from the Secret instead).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TAPPROOF_MANIFEST_VENV:-target/manifest-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv" 2>/dev/null || {
    [ "$(id -u)" = 0 ] || { echo "python3 -m venv failed: install python3-venv" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q 'kubernetes-validate==1.37.0'
fi
"$venv/bin/kubernetes-validate" --strict --quiet deploy/kubernetes/*.yaml
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
bad=$(grep -h '^ *image:' deploy/kubernetes/*.yaml | grep -v "image: localhost/tapproof:$version\$" || true)
[ -z "$bad" ] || { echo "manifests name another image than localhost/tapproof:$version:" >&2; echo "$bad" >&2; exit 1; }
if grep -n 'TAPPROOF_KEK_FILE' deploy/kubernetes/*.yaml; then
  echo "a manifest mounts the KEK as a file; give it as TAPPROOF_KEK from the Secret" >&2; exit 1
fi
echo "manifests: $(ls deploy/kubernetes/*.yaml | wc -l) files valid (kubernetes-validate --strict, Kubernetes 1.37), images localhost/tapproof:$version"
