#!/usr/bin/env bash
# Set up everything cnm needs on a Debian 12 host (as root), then run one job:
#   bash scripts/run.sh demo [--containers N]   the main job: `cnm demo` on the embedded store
#   bash scripts/run.sh test [PYTEST ARGS]      ruff, then the whole test suite (+ benchmark smoke)
#   bash scripts/run.sh setup                   only the set-up
# Safe to run again: each step checks before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CNM_VENV:-$ROOT/.venv}

if [ "$(id -u)" != 0 ]; then
  echo "run.sh: run as root (cnm makes network namespaces and kernel devices)" >&2
  exit 1
fi

apt_packages=(python3 python3-venv python3-dev gcc iproute2 util-linux iputils-ping nftables
  containernetworking-plugins docker.io busybox-static clang llvm libbpf-dev iperf3
  etcd-server etcd-client)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # docker.io and etcd-server would start system services (a host dockerd rewrites the
  # firewall): the tests start their own private ones, so keep the packages' services from
  # starting while they install, unless the host already says so.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if trap -p EXIT | grep -q policy-rc.d; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
fi

# Debian's own Python 3.11 (the one a fresh machine has), in a venv of the project's.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$(cat pyproject.toml setup.py fastpath/_codec.pyx ebpf/build.py ebpf/src/*.bpf.c ebpf/include/*.h \
  | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.cnm-installed" 2>/dev/null)" != "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=23" 
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$stamp" > "$VENV/.cnm-installed"
fi
# The install builds the BPF objects when clang is there, but a failed build only warns
# (and -q hides it): build again here, so clang's errors show, and stop when it fails.
if command -v "${CNM_CLANG:-clang}" >/dev/null 2>&1; then
  for src in ebpf/src/*.bpf.c; do
    obj=ebpf/$(basename "${src%.c}").o
    if [ ! -f "$obj" ]; then
      if ! "$VENV/bin/python" ebpf/build.py >/dev/null || [ ! -f "$obj" ]; then
        echo "run.sh: clang is installed but $obj was not built (clang's errors are above);" \
          "the eBPF data path and its tests need it" >&2
        exit 1
      fi
    fi
  done
fi

job=${1:-setup}
shift || true
case "$job" in
  setup)
    echo "run.sh: ready: $VENV/bin/cnm"
    ;;
  demo)
    exec "$VENV/bin/cnm" demo "$@"
    ;;
  test)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    # The native codec must be built here: its tests fail instead of skipping.
    export CNM_REQUIRE_NATIVE=1
    # The benchmarks run once each as a smoke test here, on fewer containers; the README's
    # figures come from full runs (see its Benchmarks section).
    export CNM_BENCH_CONTAINERS=${CNM_BENCH_CONTAINERS:-100} CNM_BENCH_ROUNDS=${CNM_BENCH_ROUNDS:-1}
    # pytest exits 5 when nothing was collected: that is a failure here too.
    exec "$VENV/bin/python" -m pytest tests benchmarks --benchmark-disable -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh demo|test|setup [args]" >&2
    exit 2
    ;;
esac
