"""Activation checkpointing (none / selective / full, offloaded or not) and the tiled MLP change what a step keeps,
never what it computes: the Thinker's loss and every gradient on a packed batch of every sample kind are those of
the plain step, alone and under ZeRO-3 across 2 processes sharing each row; and each mode really recomputes."""

from __future__ import annotations

import copy

import pytest
import torch

from omni_train.config.compose import compose
from omni_train.model.kernels import activations
from omni_train.config.validate import validate
from omni_train.errors import ConfigError
from tests.helpers.sp_step import fixed_batch


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _fresh():
    """A copy of the tiny Thinker objective the packing tests share (theirs must keep no grads and no patches)."""
    from tests.test_packing import _module

    module = copy.deepcopy(_module())
    module.zero_grad(set_to_none=True)
    return module


def _run(overrides: list[str], batch) -> tuple[torch.Tensor, dict, int]:
    """One forward + backward of the tiny Thinker configured by `overrides`; also how often layer 0's MLP ran."""
    module = _fresh()
    activations.apply(module.thinker, compose(overrides).trainer)
    module.train()
    calls = []
    mlp = module.thinker.model.language_model.layers[0].mlp
    mlp.gate_proj.register_forward_hook(lambda *_: calls.append(1))
    loss, _ = module(**batch)
    loss.backward()
    return loss.detach(), _grads(module), len(calls)


@pytest.fixture(scope="module")
def batch(sample_shards):
    return fixed_batch(str(sample_shards))


@pytest.fixture(scope="module")
def plain(batch):
    return _run([], batch)


@pytest.mark.parametrize("overrides, gate_calls", [
    (["trainer.checkpointing=full"], 2),  # the forward, then the recompute
    (["trainer.checkpointing=full", "trainer.offload_activations=true"], 2),
    (["trainer.mlp_chunk=256"], None),  # one per tile in the forward and again in the backward
    (["trainer.checkpointing=full", "trainer.mlp_chunk=256"], None),
])
def test_each_mode_gives_the_plain_loss_and_gradients(plain, batch, overrides, gate_calls):
    loss, grads, calls = _run(overrides, batch)
    torch.testing.assert_close(loss, plain[0], rtol=1e-6, atol=0)
    assert grads.keys() == plain[1].keys()
    for name, want in plain[1].items():
        scale = float(want.abs().max())
        torch.testing.assert_close(grads[name], want, rtol=0, atol=1e-5 * scale + 1e-9, msg=name)
    assert plain[2] == 1
    tiles = -(-batch["input_ids"].shape[1] // 256)
    checkpointed = "trainer.checkpointing=full" in overrides
    want_calls = gate_calls or tiles * (3 if checkpointed else 2)
    assert calls == want_calls, f"layer 0's MLP ran {calls} times, expected {want_calls}"


def test_selective_checkpoints_every_nth_layer(batch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    module = _fresh()
    activations.apply(module.thinker, compose(["trainer.checkpointing=selective",
                                               "trainer.checkpoint_every=2"]).trainer)
    flags = [m.gradient_checkpointing for m in module.thinker.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags[::2] == [True] * len(flags[::2]) and not any(flags[1::2])


@pytest.mark.parametrize("length, rows, chunk", [(2048, 4096, 256), (6, 6, 2), (10, 20, 4), (5, 5, 8)])
def test_tile_count_splits_sequence_and_flattened_batch_exactly(length, rows, chunk):
    tiles = activations._tiles(length, rows, chunk)
    assert 1 <= tiles <= -(-length // chunk)
    for n in (length, rows):
        assert len(torch.chunk(torch.empty(n), tiles)) == tiles


@pytest.mark.parametrize("overrides, message", [
    (["trainer.checkpointing=some"], r"trainer.checkpointing=some \(Invalid value 'some', expected one of \[none, selective, full\]"),
    (["trainer.offload_activations=true"], "offload_activations=true needs trainer.checkpointing"),
    (["trainer.checkpointing=selective", "trainer.checkpoint_every=1"], "checkpoint_every=1 must be >= 2"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))
