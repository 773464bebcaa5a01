"""The packed attention core on the collator's sample boundaries equals the per-sample loop it replaced
(tests/helpers/attention_reference.py, boundaries read from the text positions), in outputs and gradients: on
random heads over rows of documents of many lengths, and through the tiny Thinker's loss on a batch of every sample
kind. The collator's boundaries are the text positions' own."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface

from omni_train.data.batch import ModelSample, collate_packed, sample_bounds
from omni_train.model.kernels.attention import packed_attention, varlen_kwargs
from tests.helpers.attention_reference import per_sample_attention
from tests.helpers.sp_step import fixed_batch

ROWS = [[1, 17, 5, 40, 1], [44, 1, 12, 1, 6]]  # two rows of 64 tokens; length-1 documents at row edges too


def _heads(rows: int, length: int, heads: int, dim: int) -> torch.Tensor:
    """(rows, heads, length, dim) over a (rows, length, heads, dim) tensor, as transformers' attention layers pass
    them."""
    return torch.randn(rows, length, heads, dim, dtype=torch.float32).transpose(1, 2).requires_grad_()


def _attend(core, q, k, v, kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out, _ = core(None, q, k, v, None, scaling=0.3, **kwargs)
    return out, torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum(), (q, k, v))


def test_the_core_equals_the_per_sample_loop_in_outputs_and_gradients_with_gqa():
    torch.manual_seed(0)
    q, k, v = _heads(2, 64, 4, 16), _heads(2, 64, 2, 16), _heads(2, 64, 2, 16)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    ours, our_grads = _attend(packed_attention, q, k, v, varlen_kwargs(*sample_bounds(sum(ROWS, []))))
    want, want_grads = _attend(per_sample_attention, q, k, v, {"position_ids": positions})
    assert ours.shape == (2, 64, 4, 16)
    assert torch.allclose(ours, want, rtol=1e-6, atol=1e-7)
    for got, expected in zip(our_grads, want_grads):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    # control: the same heads with each row one document differ, so the boundaries are what the core follows
    whole, _ = _attend(packed_attention, q, k, v, varlen_kwargs(*sample_bounds([64, 64])))
    assert not torch.allclose(whole, want, rtol=1e-3, atol=1e-3)


def test_the_core_without_sample_boundaries_says_what_it_needs():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="sample boundaries"):
        packed_attention(None, q, q, q, None, position_ids=torch.arange(8)[None])


def test_the_collated_boundaries_are_where_the_text_positions_restart_padding_included():
    def sample(n: int) -> ModelSample:
        ids = torch.arange(n)
        return ModelSample(f"s{n}", ids, ids, torch.arange(n).expand(3, -1), [], [], [], [])

    batch = collate_packed([[sample(3), sample(1), sample(7)], [sample(16)], [sample(1), sample(9)]], 16, pad_id=0)
    text_positions = batch["position_ids"][0].flatten()
    starts = (text_positions == 0).nonzero().flatten()
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["cu_seq_lens"].tolist() == [*starts.tolist(), 48]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 11, 16, 32, 33, 42, 48]  # rows 0 and 2 end in padding
    assert batch["max_length"] == 16 and isinstance(batch["max_length"], int)


def test_the_tiny_thinker_gives_the_per_sample_loops_loss_and_gradients(sample_shards):
    """Every sample kind packed into 2 rows with padding: the loss and every gradient through the new core equal
    those through the per-sample loop registered as the language model's attention."""
    from tests.test_packing import _module

    batch = fixed_batch(str(sample_shards))
    AttentionInterface.register("omni_reference_per_sample", per_sample_attention)
    results = []
    for core in (None, "omni_reference_per_sample"):  # None: the packed core the module was built with
        module = copy.deepcopy(_module())
        if core is not None:
            module.thinker.model.language_model.config._attn_implementation_internal = core
        loss, _ = module(**batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (ours, our_grads), (want, want_grads) = results
    assert torch.allclose(ours, want, rtol=1e-6, atol=0)
    assert our_grads.keys() == want_grads.keys() and len(our_grads) > 20
    for name, grad in want_grads.items():
        assert torch.allclose(our_grads[name], grad, rtol=1e-5, atol=1e-7 * float(grad.abs().max())), name


def test_the_varlen_kernel_call_fits_this_torchs_signature():
    """The CUDA path's call, on meta tensors (torch's shape-only kernel of varlen_attn): its arguments bind, GQA
    included, and it returns (tokens, heads, D). Its numerics are tests/gpu's."""
    from omni_train.model.kernels.attention import _varlen

    q = torch.empty(10, 4, 16, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(10, 2, 16, device="meta", dtype=torch.bfloat16)
    cu_seq_lens, max_length = sample_bounds([3, 1, 6])
    assert _varlen(q, kv, kv, cu_seq_lens.to("meta"), max_length, 0.25).shape == (10, 4, 16)
