#!/usr/bin/env bash
# Set up a virtual environment and run the demo or the tests.
#
#   bash scripts/dev.sh demo [demo args]    set up, then `qgnn-deploy demo`
#   bash scripts/dev.sh test [pytest args]  set up, then the test suite (slow cases excluded)
#   bash scripts/dev.sh setup               set up only
#
# Needs Python >= 3.10 and a C++17 compiler. Environment:
#   VENV           where the environment lives (default: .venv in the repository)
#   PYTHON         interpreter that creates it (default: python3)
#   TORCH_SPEC     the torch requirement (default: torch==2.13.0, a CPU build; set e.g.
#                  TORCH_SPEC=torch to take the registry's default build with CUDA)
#   TEST_WORKERS   pytest-xdist workers (default: 2)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  "$py" -m pip install -q --upgrade pip setuptools wheel pybind11
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$py" -m pip install -q "$TORCH_SPEC"
  echo "== building qgnn-deploy (C++ kernels) into $VENV"
  "$py" -m pip install -q --no-build-isolation -e ".[test,serve]"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/qgnn-deploy" demo "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh {demo|test|setup} [args]" >&2
    exit 2
    ;;
esac
