"""Tests marked ``@pytest.mark.gpu`` need a CUDA device: without one they are skipped before their fixtures run."""

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with `pytest -m gpu` on a GPU machine: scripts/gpu_check.sh)")
