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
