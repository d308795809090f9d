"""Tests marked ``@pytest.mark.gpu`` need a CUDA device: without one they are skipped before their fixtures run.
Tests marked ``@pytest.mark.newest_only`` (the longest end-to-end runs) run on the newest stack only, to keep CI
within its time: the floor stack runs the shorter end-to-end runs of the same code paths."""

import sys

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with `pytest -m gpu` on a GPU machine: scripts/gpu_check.sh)")
    if item.get_closest_marker("newest_only") is not None and sys.version_info < (3, 12):
        pytest.skip("a long end-to-end run: on the newest stack only (CI time)")
