"""Shared test settings: deterministic, single-threaded torch unless a test says otherwise."""
import os

import pytest
import torch

os.environ.setdefault("QGNN_TEST", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
