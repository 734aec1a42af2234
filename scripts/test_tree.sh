#!/usr/bin/env bash
# Prints the path of a minimal Debian bookworm tree for the container tests
# (tests/test_systemd_rollout.py boots one under systemd-nspawn; tests/test_aarch64.py runs
# the agent in an arm64 one under qemu-user), building it with debootstrap the first time.
#   scripts/test_tree.sh amd64|arm64 [EXTRA,PACKAGES]
# The tree is what a fresh Raspberry Pi OS Lite board has that matters here: systemd as
# PID 1, dbus, Python 3.11, nothing of edge-agent's. It is cached outside the repository,
# under $EDGE_AGENT_TEST_CACHE (/var/cache/edge-agent-test), named by a hash of everything
# that goes into it, and never changed after it is built: the tests boot it under an
# overlay of their own. Root only (debootstrap). About 2 minutes for amd64; arm64 runs
# debootstrap's second stage under qemu-user (binfmt must be registered, see
# tests/nspawn.py's qemu_aarch64), a few minutes. EXTRA packages make another tree (the
# aarch64 run adds what the role would install: python3-venv, libgomp1).
set -euo pipefail

arch=${1:?usage: scripts/test_tree.sh amd64|arm64 [EXTRA,PACKAGES]}
extra=${2:-}
cache=${EDGE_AGENT_TEST_CACHE:-/var/cache/edge-agent-test}
mirror=${EDGE_AGENT_TEST_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
variant=minbase
include=systemd,systemd-sysv,dbus,python3${extra:+,$extra}
recipe=2  # bump when the steps below change what the tree holds

key=$(printf '%s\n' "$recipe" "$suite" "$arch" "$variant" "$include" "$mirror" | sha256sum | cut -c1-12)
tree="$cache/trees/$suite-$arch-$key"
if [ -f "$tree/.complete" ]; then
  echo "$tree"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "test_tree: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "test_tree: debootstrap is not installed" >&2; exit 1; }
mkdir -p "$cache/trees"
# One builder at a time (two test runs may start together); the second finds it done.
exec 9>"$cache/trees/.lock-$suite-$arch"
flock 9
if [ -f "$tree/.complete" ]; then
  echo "$tree"
  exit 0
fi

work="$tree.partial"
rm -rf "$work"
started=$SECONDS
echo "test_tree: debootstrap $suite $arch into $tree (once; cached)" >&2
debootstrap --arch="$arch" --variant="$variant" --include="$include" "$suite" "$work" "$mirror" \
  >"$cache/trees/debootstrap-$arch.log" 2>&1 || {
    echo "test_tree: debootstrap failed; its log: $cache/trees/debootstrap-$arch.log" >&2
    tail -20 "$cache/trees/debootstrap-$arch.log" >&2
    exit 1
  }
# A board's apt sees the updates and security suites too (libgomp1 and friends come from
# there when a point release moved them).
cat >"$work/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${mirror%/debian}/debian-security $suite-security main
EOF
# Each boot gets a machine id of its own (systemd makes a transient one when it is empty).
: >"$work/etc/machine-id"
echo "edge-test" >"$work/etc/hostname"
apt_clean() { rm -rf "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/*_Packages; }
apt_clean
touch "$work/.complete"
mv "$work" "$tree"
echo "test_tree: built in $((SECONDS - started)) s" >&2
echo "$tree"
