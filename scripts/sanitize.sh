#!/usr/bin/env bash
# Build the C++ extension with AddressSanitizer + UndefinedBehaviorSanitizer in a private
# copy of the tree (build/sanitize/tree, so the in-place qgnn_deploy/_C*.so others use is
# untouched) and run the kernel tests against it.
#
#   scripts/sanitize.sh                 # build + run the default kernel tests
#   scripts/sanitize.sh tests/x.py ...  # build + run these tests instead
#   SANITIZE_SKIP_BUILD=1 scripts/...   # reuse the last build
#
# Env: SANITIZE_DIR (default build/sanitize), PYTHON (default .venv/bin/python or python3), QGNN_SANITIZE (default
# address,undefined). Exit status: pytest's; any ASan/UBSan report aborts the process
# (halt_on_error / -fno-sanitize-recover), so a clean exit means a clean run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
OUT="${SANITIZE_DIR:-$ROOT/build/sanitize}"
TREE="$OUT/tree"
SAN="${QGNN_SANITIZE:-address,undefined}"
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_cpu_kernels.py tests/test_amx.py tests/test_fuzz_kernels.py tests/test_plan.py tests/test_node_bits.py
         "tests/test_concurrency.py::test_thread_pool_runs_every_task_once"
         "tests/test_concurrency.py::test_thread_pool_concurrent_callers_run_every_task_once")
fi

# fresh copy of the sources every time (no build outputs, no in-place extension)
rm -rf "$TREE" && mkdir -p "$TREE"
for d in setup.py pyproject.toml setup.cfg csrc qgnn_deploy kernels export tests; do
  [ -e "$ROOT/$d" ] && cp -a "$ROOT/$d" "$TREE/"
done
find "$TREE" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
if [ "${SANITIZE_SKIP_BUILD:-0}" != "1" ] || ! ls "$OUT"/_C*.so >/dev/null 2>&1; then
  rm -f "$OUT"/_C*.so
  (cd "$TREE" && QGNN_SANITIZE="$SAN" "$PY" setup.py -q build_ext --inplace \
       --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1) || { tail -50 "$OUT/build.log"; exit 1; }
  cp "$TREE"/qgnn_deploy/_C*.so "$OUT/"
else
  cp "$OUT"/_C*.so "$TREE/qgnn_deploy/"
fi

CXX_LIB() { "${CXX:-g++}" -print-file-name="$1"; }
PRELOAD="$(CXX_LIB libasan.so)"
case "$SAN" in *undefined*) PRELOAD="$PRELOAD:$(CXX_LIB libubsan.so)";; esac
# torch itself is not instrumented: leak checking would report its allocations, and
# its allocator uses patterns ASan cannot follow across the boundary.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:${UBSAN_OPTIONS:-}"
export QGNN_SANITIZED=1
cd "$TREE"
echo "sanitize: $SAN; preload $PRELOAD; tests ${TESTS[*]}"
LD_PRELOAD="$PRELOAD" "$PY" -c "import qgnn_deploy._C as c, os; print('extension', c.__file__, c.active_isa())"
# every ISA path this CPU runs, one process each (the cpu_isa test fixture follows QGNN_CPU_ISA)
ISAS=$(LD_PRELOAD="$PRELOAD" "$PY" -c "from qgnn_deploy.backends import cpu; print(' '.join(cpu.available_isas()))")
for isa in $ISAS; do
  echo "== QGNN_CPU_ISA=$isa"
  QGNN_CPU_ISA="$isa" LD_PRELOAD="$PRELOAD" "$PY" -m pytest -q -x -p no:cacheprovider \
      -m "not slow" "${TESTS[@]}"
done
echo "sanitize: clean"
