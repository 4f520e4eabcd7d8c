#!/usr/bin/env bash
# One entry point for a fresh Debian (bookworm) machine, as root: installs what is missing
# (apt: Ceres, Eigen, Python venv/headers, compiler), makes .venv, builds the package when its
# C++/build sources changed, then runs the command. Quick when everything is already done.
#   ./dev.sh demo     simulate the default dataset, refine it, report   (the main job)
#   ./dev.sh test     the test suite
#   ./dev.sh bench    the benchmarks
#   ./dev.sh setup    set-up only
#   ./dev.sh run ...  any command inside the environment, e.g. ./dev.sh run pixelrefine --help
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

apt_packages=(libceres-dev libeigen3-dev g++ make python3 python3-venv python3-dev)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# A Python from elsewhere (pyenv) brings its own venv and headers: no need for Debian's.
if command -v python3 >/dev/null && python3 -c 'import venv, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  keep=(); for pkg in "${missing[@]}"; do case "$pkg" in python3|python3-venv|python3-dev) ;; *) keep+=("$pkg");; esac; done
  missing=("${keep[@]+"${keep[@]}"}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "dev.sh: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.pixelrefine-build"
want=$( (cat pyproject.toml CMakeLists.txt cpp/*; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c 'import pixelrefine._core' 2>/dev/null; then
  echo "dev.sh: building pixelrefine into $VENV" >&2
  "$PY" -m pip install -q --upgrade pip >/dev/null
  "$PY" -m pip install -q scikit-build-core pybind11 numpy
  "$PY" -m pip install -q --no-build-isolation -e ".[test]"
  echo "$want" > "$stamp"
fi
# The MS-SSIM reference (pytorch_msssim) needs torch: take the CPU build this machine kind
# ships as a local file, never a registry build (those pull GBs of CUDA packages).
if [ "${1:-}" = test ] && ! "$PY" -c 'import pytorch_msssim' 2>/dev/null; then
  torch_wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$torch_wheel" ]; then
    echo "dev.sh: installing torch (CPU, $torch_wheel) and pytorch-msssim for the MS-SSIM comparison" >&2
    "$PY" -m pip install -q "$torch_wheel" pytorch-msssim || echo "dev.sh: torch not installed; those tests skip" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) ;;
  demo) exec pixelrefine demo "$@" ;;
  test) exec "$PY" -m pytest tests "$@" ;;
  bench) exec "$PY" -m pytest benchmarks --benchmark-only "$@" ;;
  run) exec "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|bench|setup|run CMD...}" >&2; exit 2 ;;
esac
