"""Trainer checkpoint pieces that need no model: the RNG state file, read without unpickling code."""

import pickle
import random

import numpy as np
import pytest
import torch

from megatron_bpd.train.checkpoint import load_rng, save_rng


def draws():
    return random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(2).tolist()


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(3), random.gauss(0, 1)  # Python caches the second gaussian of a pair
    np.random.seed(5), np.random.randn()  # and so does NumPy's legacy generator
    torch.manual_seed(7)
    save_rng(tmp_path / "rng.pt")
    expected = draws()
    draws()
    load_rng(tmp_path / "rng.pt")
    assert draws() == expected
    torch.load(tmp_path / "rng.pt", weights_only=True)  # tensors and plain numbers only


def test_a_pickled_rng_file_is_refused(tmp_path):
    """The old format (NumPy arrays inside a pickle) is not loaded: weights_only refuses arbitrary objects."""
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    # weights_only refuses the NumPy objects, unless a library (megatron's dist-checkpointing) has allowlisted them
    # in this process: then the format check names the old file
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        load_rng(tmp_path / "old.pt")
