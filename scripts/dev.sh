#!/usr/bin/env bash
# Set up and run valfree's jobs on a fresh Debian machine (or any machine with Python 3.10+).
#   bash scripts/dev.sh demo      set up, then run the label-free checkpoint-selection demo
#   bash scripts/dev.sh test      set up with the test extras, then run the whole test suite
#   bash scripts/dev.sh bench     regenerate the benchmark results in docs/
#   bash scripts/dev.sh setup     only set up .venv
# torch is pinned through constraints.txt (the CPU build of 2.13.0 here), so no dependency can
# replace it with a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  command -v apt-get >/dev/null || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { as_root apt-get update -q >/dev/null 2>&1 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1; }
}

setup() {
  command -v "$PYTHON" >/dev/null || { echo "need $PYTHON (3.10 or newer)" >&2; exit 1; }
  if [ ! -x "$PY" ]; then
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
      echo "python3 -m venv failed; installing python3-venv" >&2
      apt_install python3-venv || { echo "install python3-venv (apt-get install python3-venv) and rerun" >&2; exit 1; }
      rm -rf "$VENV"; "$PYTHON" -m venv "$VENV"
    fi
  fi
  local stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt requirements-nodeps.txt | cksum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    echo "installing valfree and its dependencies into $VENV (torch pinned by constraints.txt)"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -c constraints.txt -e '.[all,test,bench]'
    # BackPACK and curvlinops declare torchvision, which has no CPU build matching this torch and,
    # once installed, breaks Lightning's imports; neither needs it for what valfree uses.
    "$PY" -m pip install -q -c constraints.txt --no-deps -r requirements-nodeps.txt
    rm -f "$VENV"/.installed-*; touch "$stamp"
  fi
  if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    apt_install dataset-fashion-mnist || echo "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); the demo uses scikit-learn digits" >&2
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/valfree" demo "$@" ;;
  test) setup; exec "$PY" -m pytest tests -p no:cacheprovider --durations=15 "$@" ;;
  bench) setup; for b in benchmarks/probe_speed.py; do "$PY" "$b"; done ;;
  *) echo "usage: bash scripts/dev.sh {setup|demo|test|bench}" >&2; exit 2 ;;
esac
