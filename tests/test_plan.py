"""`omni-train plan`: its model states equal DeepSpeed's own ZeRO-3 estimator, it answers for every preset at 8k and
32k, and tiling, sequence parallelism and checkpointing move the lines they should."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from omni_train.config.compose import compose
from omni_train.train.memory import GIB, estimate, model_states
from tests.conftest import REPO


def test_model_states_equal_deepspeeds_estimator_for_the_7b():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.model.build import omni_config

    cfg = compose(["model=qwen2_5_omni_7b"])
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(omni_config(cfg.model).thinker_config)
    total = sum(p.numel() for p in thinker.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in thinker.modules())
    ours = sum(model_states(total, total, largest, 16, 2, False, False).values())
    _, theirs, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8, num_nodes=2,
                                                          cpu_offload=False)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_plan_answers_for_each_preset_and_length():
    """The command once (7B at 32k), the same report in-process for every preset and length."""
    from omni_train.train.memory import report

    done = subprocess.run([sys.executable, "-m", "omni_train.train", "plan", "--gpu-gb", "80", "model=qwen2_5_omni_7b",
                           "data.max_len=32768", "launcher.nproc_per_node=8", "trainer.micro_batch_size=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "model=qwen2_5_omni_7b" in done.stdout and "1 x 32768 tokens" in done.stdout
    assert ("fits in 80 GiB" in done.stdout) == (done.returncode == 0)
    for preset in ("tiny", "qwen2_5_omni_3b", "qwen2_5_omni_7b"):
        for length in (8192, 32768):
            cfg = compose([f"model={preset}", f"data.max_len={length}", "launcher.nproc_per_node=8",
                           "trainer.micro_batch_size=1"])
            text, fits = report(cfg, 80)
            assert f"model={preset}" in text and f"1 x {length} tokens" in text
            assert ("fits in 80 GiB" in text) == fits
            if (preset, length) == ("qwen2_5_omni_7b", 32768):
                assert text == done.stdout.strip()


def test_tiling_sequence_parallel_and_checkpointing_move_their_lines():
    base = ["model=qwen2_5_omni_7b", "data.max_len=32768", "trainer.micro_batch_size=1", "launcher.nproc_per_node=8",
            "trainer.checkpointing=none"]
    plain = estimate(compose([*base, "trainer.logits_chunk=0"]))
    tiled = estimate(compose([*base, "trainer.logits_chunk=1024"]))
    logits = "logits (fp32, with softmax and gradient)"
    assert plain[logits] / GIB > 50 and tiled[logits] == plain[logits] * 1024 / 32768
    split = estimate(compose([*base, "trainer.sequence_parallel=4"]))
    acts = "activations (language model)"
    assert split[acts] == pytest.approx(tiled[acts] / 4)
    recomputed = estimate(compose([*base, "trainer.checkpointing=full"]))
    assert recomputed[acts] < tiled[acts] / 5
    selective = estimate(compose([*base, "trainer.checkpointing=selective", "trainer.checkpoint_every=2"]))
    assert recomputed[acts] < selective[acts] < tiled[acts]
    offloaded = estimate(compose([*base, "trainer.checkpointing=full", "trainer.offload_activations=true"]))
    assert offloaded[acts] < recomputed[acts]
    mlp = "largest MLP intermediate"
    mlp_tiled = estimate(compose([*base, "trainer.mlp_chunk=4096"]))
    assert mlp_tiled[mlp] == tiled[mlp] / 8 and mlp_tiled[acts] < tiled[acts]


def test_lora_and_the_talker_stages_count_what_they_train():
    from omni_train.model.build import omni_config

    base = ["model=qwen2_5_omni_7b", "launcher.nproc_per_node=1", "trainer.precision=bf16"]
    optimizer, params = "optimizer + gradients (shard)", "parameters (ZeRO-3 shard)"
    full = estimate(compose([*base, "stage=sft"]))
    lora = estimate(compose([*base, "stage=sft", "stage.lora.enabled=true", "stage.lora.r=8"]))
    text = omni_config(compose(base).model).thinker_config.text_config
    h, kv, inter = text.hidden_size, text.num_key_value_heads * text.hidden_size // text.num_attention_heads, \
        text.intermediate_size
    # r x (in + out) per adapted projection: q, k, v, o, gate, up, down of every layer; 16 bytes each in bf16
    per_layer = 8 * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + inter))
    assert lora[optimizer] == 16 * text.num_hidden_layers * per_layer
    assert lora[optimizer] < full[optimizer] / 100
    assert lora[params] == full[params] + 2 * text.num_hidden_layers * per_layer  # the adapters, in bf16
    sft, dpo = estimate(compose([*base, "stage=talker_sft"])), estimate(compose([*base, "stage=talker_dpo"]))
    dpo_lora = estimate(compose([*base, "stage=talker_dpo", "stage.lora.enabled=true"]))
    assert dpo[optimizer] == sft[optimizer] > 0 and dpo[params] > sft[params]  # the DPO reference copy
    assert dpo_lora[params] < sft[params] + (dpo[params] - sft[params]) / 50  # LoRA's reference is no copy
    assert "activations (Talker)" in sft and "activations (language model)" not in sft
