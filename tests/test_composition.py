"""Stage-1 initialisation by composition: a Qwen2.5 LLM, a Whisper encoder and a Qwen2.5-VL vision tower (tiny,
random, written locally by transformers' own classes) become the Thinker by the mapping in omni_train/model/keymap.py,
checked against the source models' own forwards and by hand-picked keys; bad sources fail with lists; under ZeRO-3
stage 1 starts from the composition and leaves the LLM bit-identical to the Qwen2.5 checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omni_train.config.schema import ComposeConfig, ModelConfig
from omni_train.errors import ConfigError
from omni_train.model.build import build_thinker
from omni_train.tools.tiny_sources import write_tiny_sources
from tests.conftest import REPO, data_args, run_launch


def _tiny(**compose) -> ModelConfig:
    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    return ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config),
                       compose=ComposeConfig(**compose))


def write_sources(root, vision_depth: int | None = None) -> dict[str, str]:
    return write_tiny_sources(root, _tiny(), vision_depth)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def composed(sources):
    torch.manual_seed(0)
    return build_thinker(_tiny(**sources), ds_config=None)


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_the_llm_is_the_qwen2_checkpoint(composed, sources):
    from transformers import Qwen2ForCausalLM

    llm = Qwen2ForCausalLM.from_pretrained(sources["llm"], attn_implementation="sdpa").eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198]])
    positions = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)  # text only: TMRoPE = 1-D RoPE
    with torch.no_grad():
        hidden = composed.model.language_model(input_ids=ids, position_ids=positions).last_hidden_state
        torch.testing.assert_close(composed.lm_head(hidden), llm(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_vision_tower_is_qwen2_5_vl_with_q_k_v_split(composed, sources):
    from transformers import Qwen2_5_VLForConditionalGeneration

    vl = Qwen2_5_VLForConditionalGeneration.from_pretrained(sources["vision"]).eval()
    # The merger starts fresh in the Thinker; give it the VL merger here to compare the whole tower.
    merger = {k: v.clone() for k, v in composed.model.visual.merger.state_dict().items()}
    composed.model.visual.merger.load_state_dict(vl.model.visual.merger.state_dict())
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, 3 * 2 * 14 * 14)
    try:
        with torch.no_grad():
            ours = composed.model.visual(pixels, grid_thw=grid).pooler_output
            theirs = vl.model.visual(pixels, grid_thw=grid).pooler_output
    finally:
        composed.model.visual.merger.load_state_dict(merger)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_hand_picked_keys_and_fresh_adapters(composed, sources):
    whisper, vl = _tensors(sources["audio"]), _tensors(sources["vision"])
    own = dict(composed.named_parameters())
    pairs = {
        "model.audio_tower.conv1.weight": whisper["encoder.conv1.weight"],
        "model.audio_tower.layers.1.self_attn.k_proj.weight": whisper["encoder.layers.1.self_attn.k_proj.weight"],
        "model.audio_tower.layers.0.final_layer_norm.bias": whisper["encoder.layers.0.final_layer_norm.bias"],
        "model.audio_tower.ln_post.weight": whisper["encoder.layer_norm.weight"],
        "model.visual.blocks.1.attn.k.weight": vl["visual.blocks.1.attn.qkv.weight"].chunk(3)[1],
        "model.visual.blocks.0.attn.v.bias": vl["visual.blocks.0.attn.qkv.bias"].chunk(3)[2],
        "model.visual.patch_embed.proj.weight": vl["visual.patch_embed.proj.weight"],
    }
    for name, want in pairs.items():
        assert torch.equal(own[name], want), name
    torch.manual_seed(0)
    fresh = dict(build_thinker(_tiny(), ds_config=None).named_parameters())  # same seed, nothing loaded
    adapters = [n for n in own if n.startswith(("model.audio_tower.proj.", "model.audio_tower.audio_bos_eos_token.",
                                                "model.visual.merger."))]
    assert len(adapters) == 8  # bos/eos embedding, projection weight + bias, merger ln_q + two linear layers
    for name in adapters:
        assert torch.equal(own[name], fresh[name]), name
    assert not torch.equal(own["model.visual.merger.mlp.0.weight"], vl["visual.merger.mlp.0.weight"])


def test_unknown_and_missing_source_keys_fail_listing_them(sources, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(sources["audio"], audio)
    tensors = load_file(audio / "model.safetensors")
    del tensors["encoder.layers.1.fc1.weight"]
    tensors["encoder.adapter.weight"] = torch.zeros(2)
    save_file(tensors, audio / "model.safetensors")
    with pytest.raises(ConfigError) as error:
        build_thinker(_tiny(**{**sources, "audio": str(audio)}), ds_config=None)
    message = str(error.value)
    assert "missing ['model.audio_tower.layers.1.fc1.weight']" in message
    assert "unexpected ['audio: encoder.adapter.weight']" in message


def test_a_source_of_another_architecture_is_refused(sources, tmp_path):
    deeper = write_sources(tmp_path, vision_depth=3)
    with pytest.raises(ConfigError, match=r"model.compose.vision=.* depth=3 \(the Thinker has 2\)"):
        build_thinker(_tiny(**{**sources, "vision": deeper["vision"]}), ds_config=None)


def test_stage1_under_zero3_starts_from_the_composition_and_leaves_the_llm_bit_identical(sources, sample_shards,
                                                                                        tmp_path):
    run_dir = tmp_path / "stage1"
    result = run_launch(f"run_dir={run_dir}", "stage=stage1_align", *data_args(sample_shards), "data.max_len=1024",
                        *(f"model.compose.{k}={v}" for k, v in sources.items()), "trainer.max_steps=3",
                        "trainer.warmup_steps=0")
    assert result.returncode == 0, result.stderr[-4000:]
    llm, whisper = _tensors(sources["llm"]), _tensors(sources["audio"])
    after = _tensors(run_dir / "export")
    assert all(torch.equal(llm[k], after[k]) for k in llm)  # the export's hub layout names the LLM as Qwen2 does
    assert not torch.equal(after["audio_tower.layers.0.fc1.weight"], whisper["encoder.layers.0.fc1.weight"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_params"] < summary["total_params"] / 10
