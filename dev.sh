#!/usr/bin/env bash
# One entry point for a fresh Debian (bookworm) machine, as root: installs what is missing
# (apt: Ceres, Eigen, CMake, Ninja, g++, Python with venv and headers), makes .venv, builds the
# package when its C++ or build files changed, then runs the command. Each set-up step prints
# one line; its output goes to .dev-setup.log. Quick when everything is already done.
#   ./dev.sh demo     simulate the default dataset, refine it, report   (the main job)
#   ./dev.sh test     the test suite (also installs Debian's chromium for the HTML-report test)
#   ./dev.sh bench    the benchmarks
#   ./dev.sh fuzz ... fuzzed shoebox files through `pixelrefine refine` (python -m pixelrefine.fuzz)
#   ./dev.sh setup    set-up only
#   ./dev.sh run ...  any command inside the environment, e.g. ./dev.sh run pixelrefine --help
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
LOG="$ROOT/.dev-setup.log"

say() { printf 'dev.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# step DESCRIPTION COMMAND...: one line on the terminal, the command's output in the log; on
# failure the log's last lines and one line saying what failed.
step() {
  local what=$1 t0=$SECONDS rc=0
  shift
  printf 'dev.sh: %s ...' "$what" >&2
  printf '\n=== %s: %s\n' "$(date -u +%FT%TZ)" "$what" >>"$LOG"
  "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    printf ' done (%d s)\n' $((SECONDS - t0)) >&2
    return 0
  fi
  printf ' failed\n' >&2
  grep -v '^WARNING: Location' "$LOG" | tail -n 4 | sed 's/^/  | /' >&2
  die "'$what' failed (exit $rc); the whole output is in $LOG"
}

# --- system packages --------------------------------------------------------------------
version_at_least() {  # version_at_least "3.25.1" 3 15
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [ "${major:-0}" -gt "$2" ] || { [ "${major:-0}" -eq "$2" ] && [ "${minor:-0}" -ge "$3" ]; }
}
python_is_usable() {  # Python >= 3.10 with venv and the headers extensions compile against
  command -v python3 >/dev/null && python3 -c 'import sys, os, sysconfig, venv, ensurepip
sys.exit(not (sys.version_info >= (3, 10) and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))))' 2>/dev/null
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for pkg in libceres-dev libeigen3-dev g++ make; do
  command -v dpkg-query >/dev/null && installed "$pkg" || missing+=("$pkg")
done
# Build tools and Python from elsewhere (a pyenv Python, a newer CMake) are as good as Debian's.
{ command -v cmake >/dev/null && version_at_least "$(cmake --version | head -n 1 | awk '{print $3}')" 3 15; } ||
  missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
python_is_usable || missing+=(python3 python3-venv python3-dev)

apt_updated=0
apt_install() {  # apt_install WHY PACKAGE...: as root (or sudo -n), apt-get update once per run
  local why=$1 SUDO=""
  shift
  command -v apt-get >/dev/null ||
    die "missing $*, and this machine has no apt-get: $why"
  if [ "$(id -u)" -ne 0 ]; then
    sudo -n true 2>/dev/null ||
      die "missing $*: run ./dev.sh as root, or first: sudo apt-get install $*"
    SUDO="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then
    step "apt-get update" $SUDO apt-get update -q
    apt_updated=1
  fi
  step "apt-get install $* (a few minutes on a fresh machine)" \
    $SUDO apt-get install -y -q --no-install-recommends "$@"
}

if [ ${#missing[@]} -gt 0 ]; then
  apt_install "install Ceres 2.1 and Eigen 3.4 (development files), CMake >= 3.15, Ninja, g++ and Python >= 3.10 with venv and headers, then run again" "${missing[@]}"
  python_is_usable || die "python3 still lacks venv or its headers after apt-get install"
fi

# The tests load the HTML report in headless Chromium (Debian's package); only `test` needs it.
ensure_chromium() {
  command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null ||
    apt_install "install Chromium (the report test renders the HTML page headless), then run again" chromium
}

# --- virtual environment and build ------------------------------------------------------
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
  rm -rf "$VENV"
  step "making the virtual environment .venv" python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.pixelrefine-build"
want=$( (cat pyproject.toml CMakeLists.txt cpp/*; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c 'import pixelrefine._core' 2>/dev/null; then
  step "pip: upgrading pip in .venv" "$PY" -m pip install --upgrade pip
  step "pip: build requirements (scikit-build-core, pybind11, numpy)" \
    "$PY" -m pip install scikit-build-core pybind11 numpy
  step "building pixelrefine (C++ core with Ceres; 1-2 min) and its dependencies" \
    "$PY" -m pip install --no-build-isolation -e ".[test]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) ;;
  demo) exec pixelrefine demo "$@" ;;
  test) ensure_chromium; exec "$PY" -m pytest tests "$@" ;;
  bench) exec "$PY" -m pytest benchmarks --benchmark-only "$@" ;;
  fuzz) exec "$PY" -m pixelrefine.fuzz "$@" ;;
  run) exec "$@" ;;
  *) die "usage: ./dev.sh {demo|test|bench|fuzz|setup|run CMD...}" ;;
esac
