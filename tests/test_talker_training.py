"""The Talker stages end to end: 2 processes under DeepSpeed ZeRO-3 on the sample corpus's speech triplets (prepared
by omni-prep), talker_sft from a Thinker export, then talker_dpo from its export; the DPO export (Thinker + Talker +
Token2Wav + spk_dict.pt) loads into transformers' full Qwen2_5OmniForConditionalGeneration, which speaks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from omni_train.config.schema import ModelConfig
from tests.conftest import REPO, run_launch


@pytest.fixture(scope="module")
def triplet_shards(sample_corpus, tmp_path_factory) -> Path:
    from data_prep.build import build
    from data_prep.config import from_overrides

    out = tmp_path_factory.mktemp("triplet_shards")
    build(str(sample_corpus.parent / "triplets.jsonl"), str(out), from_overrides(["workers=1"]), progress=False)
    return out


@pytest.fixture(scope="module")
def thinker_export(tmp_path_factory) -> Path:
    from omni_train.train.export import export_pretrained
    from omni_train.model.keymap import hub_name
    from omni_train.model.build import build_thinker

    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    torch.manual_seed(0)
    thinker = build_thinker(ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config)), None)
    return export_pretrained(thinker, tmp_path_factory.mktemp("thinker") / "export", rename=hub_name)


def _run(stage: str, model: Path, shards: Path, run_dir: Path, steps: int, *extra: str) -> dict:
    result = run_launch(f"stage={stage}", f"model.path={model}", f"run_dir={run_dir}",
                        f"data.sources=[{{name:triplets,path:{shards}}}]", "data.max_len=512", "data.chunk_samples=32",
                        "data.workers=0", f"trainer.max_steps={steps}", "trainer.warmup_steps=0",
                        "trainer.save_every=100", *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(export: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = load_file(export / "model.safetensors")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def sft(thinker_export, triplet_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("talker_sft") / "run"
    _run("talker_sft", thinker_export, triplet_shards, run_dir, 8, "trainer.lr=3e-3")
    return run_dir


@pytest.fixture(scope="module")
def dpo(sft, triplet_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("talker_dpo") / "run"
    _run("talker_dpo", sft / "export", triplet_shards, run_dir, 8, "trainer.lr=1e-3", "talker.beta=0.1")
    return run_dir


@pytest.fixture(scope="module")
def lora_dpo(sft, triplet_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("talker_dpo_lora") / "run"
    _run("talker_dpo", sft / "export", triplet_shards, run_dir, 4, "trainer.lr=1e-3", "stage.lora.enabled=true",
         "stage.lora.r=4")
    return run_dir


def test_talker_sft_learns_the_codes_and_leaves_the_thinker_alone(sft, thinker_export):
    rows = _metrics(sft)
    assert rows[-1]["sft/loss"] < rows[0]["sft/loss"] - 0.5, [r["sft/loss"] for r in rows]
    assert all(r["codec_tokens"] > 0 for r in rows)
    source = {k: v for k, v in load_file(thinker_export / "model.safetensors").items()}
    trained = _weights(sft / "export", "thinker.")
    assert trained.keys() == source.keys()
    assert all(torch.equal(trained[k], source[k]) for k in source), "a Thinker weight moved"
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["trainable_params"] == sum(v.numel() for v in _weights(sft / "export", "talker.").values())


def test_dpo_starts_at_ln2_and_its_reward_accuracy_rises(dpo, sft):
    rows = _metrics(dpo)
    assert abs(rows[0]["loss"] - math.log(2.0)) < 1e-6 and abs(rows[0]["dpo/loss"] - math.log(2.0)) < 1e-6
    assert rows[0]["dpo/reward_accuracy"] == 0.0 and rows[0]["dpo/margin"] == 0.0  # policy == reference
    summary = json.loads((dpo / "summary.json").read_text())
    assert summary["last_reward_accuracy"] > 0.9 and summary["last_margin"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    before, after = _weights(sft / "export", "talker."), _weights(dpo / "export", "talker.")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the Talker did not train"
    thinker_before, thinker_after = _weights(sft / "export", "thinker."), _weights(dpo / "export", "thinker.")
    assert all(torch.equal(thinker_before[k], thinker_after[k]) for k in thinker_before), "a Thinker weight moved"
    t2w_before, t2w_after = _weights(sft / "export", "token2wav."), _weights(dpo / "export", "token2wav.")
    assert t2w_before and all(torch.equal(t2w_before[k], t2w_after[k]) for k in t2w_before)


def test_talker_lora_dpo_starts_at_ln2_without_a_reference_copy_and_merges_exactly(lora_dpo, sft):
    """LoRA on the Talker under ZeRO-3: the reference is the Talker with its adapters off (no copy: the module holds
    the Thinker, the Talker and the adapters only), the loss starts at ln 2, the adapters get gradient, and the merged
    full export is the base plus PEFT's delta of the adapter directory, which loads onto transformers' full model."""
    from peft import PeftModel
    from transformers import Qwen2_5OmniForConditionalGeneration

    from tests.helpers.lora import check_merged_export, weights

    rows = _metrics(lora_dpo)
    assert abs(rows[0]["dpo/loss"] - math.log(2.0)) < 1e-6 and rows[0]["dpo/margin"] == 0.0, rows[0]
    assert all(r["grad_norm"] > 0 for r in rows), [r["grad_norm"] for r in rows]
    assert rows[-1]["dpo/margin"] > 0
    summary = json.loads((lora_dpo / "summary.json").read_text())
    base = weights(sft / "export")
    size = sum(v.numel() for k, v in base.items() if k.startswith(("thinker.", "talker.")))
    assert summary["total_params"] == size + summary["trainable_params"]  # no reference copy
    model = PeftModel.from_pretrained(Qwen2_5OmniForConditionalGeneration.from_pretrained(sft / "export"),
                                      lora_dpo / "adapter").eval()
    assert check_merged_export(base, weights(lora_dpo / "export"), model, lambda name: name, fully=set()) == 2 * 7
    merged = Qwen2_5OmniForConditionalGeneration.from_pretrained(lora_dpo / "export").eval()
    x = torch.randn(1, 24, merged.talker.config.embedding_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(3, 1, 24)

    def codec_logits(talker):
        hidden = talker.model(inputs_embeds=talker.thinker_to_talker_proj(x), position_ids=positions,
                              use_cache=False).last_hidden_state
        return talker.codec_head(hidden)

    with torch.no_grad():
        torch.testing.assert_close(codec_logits(model.base_model.model.talker), codec_logits(merged.talker),
                                   rtol=1e-5, atol=1e-5)


def test_the_dpo_export_loads_into_the_full_model_and_speaks(dpo):
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_train.model.build import SPEAKERS_FILE

    export = dpo / "export"
    speakers = torch.load(export / SPEAKERS_FILE, weights_only=True)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(export).eval()
    assert set(model.speaker_map) == set(speakers) == {"Chelsie"}
    talker = _weights(export, "talker.")
    assert all(torch.equal(dict(model.talker.named_parameters())[k], v) for k, v in talker.items())
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 18, 5519, 220, 19, 30, 151645, 198, 151644, 77091, 198]])
    torch.manual_seed(0)
    sequences, wave = model.generate(input_ids=ids, thinker_max_new_tokens=6, talker_max_new_tokens=24,
                                     speaker="Chelsie")
    assert sequences.shape[1] > ids.shape[1]
    assert wave.dim() == 1 and wave.dtype == torch.float32 and wave.numel() > 0 and wave.numel() % 480 == 0
    assert torch.isfinite(wave).all()


def test_on_policy_pairs_train_with_their_recorded_reference(dpo, sample_corpus, tmp_path):
    """omni-train pairs samples from the DPO export, scores with its own Thinker as ASR, and records the reference
    log-probs; those shards train talker_dpo with talker.reference=precomputed (no reference copy) from that same
    export: the first loss is ln 2, so the recorded log-probs are the ones training computes under ZeRO-3."""
    import subprocess
    import sys

    from data_prep.build import build
    from data_prep.config import from_overrides

    prompts = tmp_path / "prompts.jsonl"
    lines = (sample_corpus.parent / "triplets.jsonl").read_text().splitlines()[:6]
    prompts.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "speech"}) + "\n"
                               for line in lines))
    (tmp_path / "media").symlink_to(sample_corpus.parent / "media")
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([sys.executable, "-m", "omni_train.train", "pairs", str(dpo / "export"), str(prompts),
                           str(out), "--samples", "3", "--max-codes", "40", "--asr", "thinker"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    triplets = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(triplets) >= 2
    for t in triplets:
        assert t["scores"]["chosen"] < t["scores"]["rejected"]
        assert t["speech"]["chosen"] != t["speech"]["rejected"] and len(t["speech"]["ref_logps"]) == 2
    shards = tmp_path / "shards"
    build(str(out), str(shards), from_overrides(["workers=1"]), progress=False)
    run_dir = tmp_path / "run"
    _run("talker_dpo", dpo / "export", shards, run_dir, 2, "talker.reference=precomputed", "trainer.lr=1e-3")
    first = _metrics(run_dir)[0]
    assert abs(first["dpo/loss"] - math.log(2.0)) < 1e-5, first


def test_a_talker_stage_on_data_without_speech_is_refused_before_it_starts(text_shards, tmp_path):
    result = run_launch("stage=talker_sft", f"run_dir={tmp_path / 'run'}",
                        f"data.sources=[{{name:chat,path:{text_shards}}}]")
    assert result.returncode == 2
    assert "data source chat" in result.stderr and "has no samples with speech codes" in result.stderr
