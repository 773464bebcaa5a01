"""The fused, tiled LM-head loss equals the plain one (full logits, then cross-entropy) in loss and gradients, alone
and inside the Thinker on a packed multimodal batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omni_train.model.kernels.head_loss import chunked_cross_entropy


@pytest.mark.parametrize("rows, chunk", [(300, 64), (300, 300), (300, 1000), (0, 64)])
def test_chunked_cross_entropy_equals_the_plain_path(rows, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(rows, 64, requires_grad=True)
    weight = torch.randn(1000, 64, requires_grad=True)
    targets = torch.randint(0, 1000, (rows,))
    incoming = torch.rand(rows)  # a per-token weighting, as a loss scale or a masked mean would give

    plain = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    (plain * incoming).sum().backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    tiled = chunked_cross_entropy(hidden, weight, targets, chunk)
    (tiled * incoming).sum().backward()
    torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-5, atol=1e-6)


def test_the_thinker_loss_and_gradients_are_the_same_tiled_or_plain(sample_shards):
    import webdataset as wds

    from omni_train.data.batch import collate_packed, decode_sample
    from omni_train.model.thinker import ThinkerLM
    from tests.test_packing import _module

    urls = [str(p) for p in sorted(sample_shards.glob("shard-*.tar"))]
    samples = [decode_sample(s) for _, s in zip(range(12), wds.WebDataset(urls, shardshuffle=False).decode())]
    batch = collate_packed([samples[:6], samples[6:]], 2048, pad_id=151643)
    thinker = _module().thinker
    results = []
    for chunk in (0, 128):
        module = ThinkerLM(thinker, logits_chunk=chunk)
        module.zero_grad()
        loss, stats = module(**batch)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (plain_loss, plain_stats, plain_grads), (tiled_loss, tiled_stats, tiled_grads) = results
    torch.testing.assert_close(tiled_loss, plain_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(tiled_stats, plain_stats, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == tiled_grads.keys() and "thinker.lm_head.weight" in plain_grads
    for name, want in plain_grads.items():
        scale = float(want.abs().max())
        torch.testing.assert_close(tiled_grads[name], want, rtol=0, atol=1e-5 * scale + 1e-9, msg=name)
