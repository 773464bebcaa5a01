"""GPU checks of the spine: the code users run on GPUs must have run on one. Skipped without CUDA.

bf16 ZeRO-3 training over NCCL on one GPU, with flash-attention 2 when it is installed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import data_args, run_launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_bf16_zero3_nccl_training_loss_falls(attn, text_shards, tmp_path):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    run_dir = tmp_path / "run"
    result = run_launch(f"run_dir={run_dir}", *data_args(text_shards, workers=2), "launcher.nproc_per_node=1",
                        "model.dtype=bfloat16", f"model.attn_implementation={attn}", "trainer.max_steps=20",
                        "trainer.lr=3e-3")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 1.0
