#!/usr/bin/env bash
# Builds the container image localhost/tapproof:<version> from deploy/container/Containerfile with
# buildah (Debian package buildah; as root). The context is made here: the binary (debug info
# stripped), every shared library it loads (from ldd), /etc/passwd and /etc/group naming user
# tapproof (65532), /var/lib/tapproof (0700) and /etc/tapproof. Then it checks the image: the
# binary runs inside its root filesystem (chroot into the mounted image: `tapproof --version`).
#   scripts/image.sh [BINARY]        (default target/release/tapproof, else target/debug/tapproof)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
  for b in target/release/tapproof target/debug/tapproof; do [ -x "$b" ] && { bin=$b; break; }; done
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no tapproof binary: build it first (cargo build --release -p tapproof)" >&2; exit 1; }
command -v buildah >/dev/null 2>&1 || { echo "buildah is not installed (apt-get install buildah)" >&2; exit 1; }
version=$("$bin" --version | awk '{print $2}')
ctx=target/image
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/etc/tapproof" "$ctx/rootfs/var/lib" "$ctx/state/tapproof" "$ctx/rootfs/tmp"
objcopy --strip-debug "$bin" "$ctx/rootfs/usr/bin/tapproof"
# The loader and every library, at the paths the binary asks for.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
printf 'root:x:0:0:root:/:/sbin/nologin\ntapproof:x:65532:65532:tapproof:/var/lib/tapproof:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\ntapproof:x:65532:\n' >"$ctx/rootfs/etc/group"
chmod 0700 "$ctx/state/tapproof"
chmod 1777 "$ctx/rootfs/tmp"
tag=localhost/tapproof:$version
buildah bud --quiet --layers=false -f deploy/container/Containerfile -t "$tag" "$ctx" >/dev/null
# Check: the image's own files are enough to run the binary.
ctr=$(buildah from "$tag")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
out=$(chroot --userspec=65532:65532 "$mnt" /usr/bin/tapproof --version)
[ "$(stat -c '%u %a' "$mnt/var/lib/tapproof")" = "65532 700" ] || { echo "image: /var/lib/tapproof has the wrong owner or mode" >&2; exit 1; }
buildah umount "$ctr" >/dev/null
size=$(buildah inspect --type image --format '{{.Size}}' "$tag" 2>/dev/null || true)
echo "image $tag built: runs inside its root filesystem ($out)${size:+, $size bytes}"
