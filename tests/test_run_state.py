"""The run state a checkpoint keeps per rank holds every random generator the run may draw from, as JSON: after a
restore, torch's, Python's and numpy's generators continue exactly where they were saved (the CUDA generator's
turn is in tests/gpu)."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from omni_train.train.checkpoint import restore_rng, rng_state


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_every_generator_continues_from_the_saved_state():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    saved = json.loads(json.dumps(rng_state()))  # what run_state_rank{R}.json holds
    expected = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # a restarted process starts elsewhere
    assert _draws() != expected
    restore_rng(saved)
    assert _draws() == expected


def test_a_run_state_without_python_and_numpy_generators_still_restores_torch():
    """Checkpoints written before the Python and numpy generators were saved hold torch's alone."""
    torch.manual_seed(4)
    saved = {"torch_rng": rng_state()["torch_rng"]}
    expected = torch.rand(2).tolist()
    torch.manual_seed(5)
    restore_rng(saved)
    assert torch.rand(2).tolist() == expected
