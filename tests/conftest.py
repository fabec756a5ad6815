"""Shared test settings: deterministic, single-threaded torch unless a test says otherwise."""
import os

import pytest
import torch

os.environ.setdefault("QGNN_TEST", "1")
# Triton reads TRITON_INTERPRET when it is first imported: without a GPU every Triton
# kernel test runs in the interpreter, so set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    # one intra-op thread: fp32 reductions (and so rounding ties) do not depend on the
    # machine, and pytest-xdist workers do not oversubscribe the cores
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


def _cpu_isas():
    try:
        from qgnn_deploy.backends.cpu import ISAS
    except ImportError:  # pragma: no cover - a broken install fails elsewhere
        return ()
    return ISAS


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Each ISA path of the cpu kernels forced in turn; skipped, with the reason, where this
    CPU cannot run it, and where QGNN_CPU_ISA pins the process to another path
    (scripts/sanitize.sh runs one path per process)."""
    from qgnn_deploy.backends import cpu
    if not cpu.is_available():
        pytest.skip("qgnn_deploy._C not built (pip install -e .)")
    why = cpu.isa_blocker(request.param)
    if why:
        pytest.skip(f"{request.param}: {why}")
    pinned = os.environ.get("QGNN_CPU_ISA", "auto") or "auto"
    if pinned not in ("auto", request.param):
        pytest.skip(f"QGNN_CPU_ISA={pinned} pins this process to another path")
    cpu.force_isa(request.param)
    yield request.param
    cpu.force_isa(None)


@pytest.fixture(params=[1, 2], ids=["t1", "t2"])
def threads(request):
    """The cpu kernels on 1 and then 2 threads."""
    from qgnn_deploy.backends import cpu
    cpu.set_num_threads(request.param)
    yield request.param
    cpu.set_num_threads(None)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Exports and the QDQ quantization go to a private cache shared by one module's tests."""
    d = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGNN_CACHE_DIR", str(d))
        yield d
