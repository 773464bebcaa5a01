"""The Talker's training forward against transformers' own generation loop, and the DPO loss against TRL's.

Equality: a tiny random Qwen2_5OmniForConditionalGeneration generates (Thinker text, then Talker codes) for a
left-padded batch of two prompts, one with a speech clip (so the attention mask reaches the Talker and it takes the
design's path: codec pad/bos embeddings, TMRoPE positions). We record the codec logits its loop computes at every
step and the codes it fed back; our teacher-forced forward on the same conversation, response and codes must give
the same logits at every step.

The forward on the collator's host-side places (`Spoken`) against the former one, which found them on the device
(tests/helpers/talker_reference.py): the same losses, gradients and stats bit for bit, and no read-back left.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_prep.chatml import encode
from data_prep.layout import Media
from omni_train.model.kernels.attention import use_packed_attention
from omni_train.config.schema import ModelConfig
from omni_train.data.batch import ModelSample, Speech, Spoken, response_span, sample_bounds
from omni_train.data.features import log_mel
from omni_train.model.build import omni_config
from omni_train.model.talker import TalkerLM, dpo_sigmoid_loss
from omni_train.tokenizer import load_tokenizer
from omni_train.tokens import IGNORE
from tests.conftest import REPO

SPEAKER_BOS = 151860
IM_END, NEWLINE = 151645, 198


@functools.cache
def _full_model():
    from transformers import Qwen2_5OmniForConditionalGeneration

    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    config = omni_config(ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config)))
    torch.manual_seed(0)
    model = Qwen2_5OmniForConditionalGeneration._from_config(config).eval()
    model.speaker_map = {"Chelsie": {"bos_token": SPEAKER_BOS, "cond": torch.randn(1, 16),
                                     "ref_mel": torch.randn(1, 60, 80)}}
    return model


GRID = (1, 4, 6)  # one image of 56 x 84 pixels: 6 tokens whose TMRoPE height/width ids differ from plain text's


def _prompt(with_media: bool):
    """Prompt ids, TMRoPE positions, log-mel features and pixel rows of a one-turn conversation (a speech clip and
    an image when `with_media`), laid out by our data path."""
    rng = np.random.default_rng(3)
    wave = (0.1 * np.sin(np.arange(20800) * 0.07) + 0.01 * rng.standard_normal(20800)).astype(np.float32)
    content = [{"type": "audio", "audio": "clip.wav"}, {"type": "image", "image": "photo.jpg"},
               {"type": "text", "text": "Say it back."}] if with_media else "Tell me something nice."
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]
    media = [Media("audio", audio_samples=wave.size), Media("image", grid_thw=GRID)] if with_media else []
    enc = encode(messages, load_tokenizer(), media)
    p, _ = response_span(torch.from_numpy(enc["labels"]))
    if not with_media:
        return torch.from_numpy(enc["input_ids"][:p]), torch.from_numpy(enc["position_ids"][:, :p]), None, None
    pixels = torch.from_numpy(rng.standard_normal((GRID[1] * GRID[2], 1176)).astype(np.float32))
    return (torch.from_numpy(enc["input_ids"][:p]), torch.from_numpy(enc["position_ids"][:, :p]), log_mel(wave),
            pixels)


def _generate(model, prompts):
    """transformers' generate on a left-padded batch; per row: generated text, codes fed back, step logits."""
    width = max(len(p[0]) for p in prompts)
    ids = torch.full((len(prompts), width), 151643)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, (p, *_) in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    feats = [f for _, _, f, _ in prompts if f is not None]
    pixels = torch.cat([x for *_, x in prompts if x is not None])
    frames = max(f.shape[1] for f in feats)
    features = torch.stack([F.pad(f, (0, frames - f.shape[1])) for f in feats])
    feature_mask = torch.stack([(torch.arange(frames) < f.shape[1]).long() for f in feats])
    logits, fed = [], []
    talker = model.talker
    hooks = [talker.codec_head.register_forward_hook(lambda m, i, o: logits.append(o.detach().float())),
             talker.register_forward_pre_hook(lambda m, a, k: fed.append(k.get("input_ids")), with_kwargs=True)]
    try:
        torch.manual_seed(0)
        sequences, _ = model.generate(input_ids=ids, attention_mask=mask, input_features=features,
                                      feature_attention_mask=feature_mask, pixel_values=pixels,
                                      image_grid_thw=torch.tensor([GRID]), talker_pixel_values=None,
                                      thinker_max_new_tokens=6,
                                      thinker_do_sample=False, talker_max_new_tokens=10, talker_do_sample=False,
                                      speaker="Chelsie")
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for b in range(len(prompts)):
        step_logits = [logits[0][b, -1]] + [x[b, -1] for x in logits[1:]]
        codes = [int(x[b, 0]) for x in fed[1:]]  # the code fed back at decode step j is c_{j-1}
        stop = next((j for j, c in enumerate(codes) if c in (8292, 8294)), len(codes))
        rows.append((sequences[b, width:], torch.tensor(codes[:stop]), torch.stack(step_logits[:stop + 1])))
    return rows


def _batch(prompt_ids, prompt_pos, features, pixels, reply, codes):
    """Our packed batch for one sample: prompt + response tokens + <|im_end|> + newline, labels on the response."""
    ids = torch.cat([prompt_ids, reply, torch.tensor([IM_END, NEWLINE])])
    p, n = len(prompt_ids), len(ids)
    labels = torch.full((n,), IGNORE)
    labels[p:p + len(reply) + 1] = ids[p:p + len(reply) + 1]
    after = prompt_pos.max() + 1 + torch.arange(n - p)
    pos = torch.cat([prompt_pos, after.expand(3, -1)], dim=1)
    cu_seq_lens, max_length = sample_bounds([n])
    batch = {"input_ids": ids[None], "labels": labels[None],
             "position_ids": torch.cat([torch.arange(n)[None], pos])[:, None], "cu_seq_lens": cu_seq_lens,
             "max_length": max_length,
             "conditions": torch.zeros(1, n, dtype=torch.uint8), "codes": codes,
             "spoken": [Spoken(0, 0, p, len(reply), len(codes), 0)], "speaker_bos": [SPEAKER_BOS]}
    if features is not None:
        batch.update(audio_features=features, audio_lengths=torch.tensor([features.shape[1]]), pixel_values=pixels,
                     grid_thw=torch.tensor([GRID]))
    return batch


def test_training_logits_equal_transformers_generation_step_by_step():
    model = copy.deepcopy(_full_model())
    prompts = [_prompt(with_media=False), _prompt(with_media=True)]
    assert not torch.equal(prompts[1][1][1], prompts[1][1][0]), "the image gives height ids unlike the time ids"
    generated = _generate(model, prompts)
    use_packed_attention(model.thinker.model.language_model)
    use_packed_attention(model.talker.model)
    objective = TalkerLM(model.thinker, model.talker, "talker_sft", {"Chelsie": SPEAKER_BOS}, "Chelsie").eval()
    compared = 0
    for (prompt_ids, prompt_pos, features, pixels), (text, codes, want) in zip(prompts, generated):
        assert len(codes) >= 3, "the loop stopped too early to compare anything"
        # transformers speaks the text up to the Thinker's last generated token, exclusive (see omni_train.model.talker)
        batch = _batch(prompt_ids, prompt_pos, features, pixels, text[:-1], codes)
        with torch.no_grad():
            row = objective.sequences(batch)
            got = objective.codec_logits(model.talker, row)
        assert got.shape == (len(codes) + 1, 8448) and want.shape == got.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
        compared += len(codes) + 1
        if features is not None:  # control: plain positions (what an unpadded batch gets at inference) differ
            plain = row.positions.clone()
            plain[1:] = torch.arange(plain.shape[-1])
            with torch.no_grad():
                off = objective.codec_logits(model.talker, row._replace(positions=plain))
            assert (off - want).abs().max() > 1e-5
    assert compared >= 8


def test_response_span_finds_the_last_assistant_turn():
    labels = torch.tensor([IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, 9, IM_END, IGNORE])
    assert response_span(labels) == (5, 3)
    with pytest.raises(ValueError, match="no labelled token"):
        response_span(torch.full((4,), IGNORE))


def _spoken_sample(prompt: int, reply: int, chosen: int, ref_logps) -> ModelSample:
    n = prompt + reply + 2  # the reply, <|im_end|> and a newline after the prompt
    labels = torch.full((n,), IGNORE)
    labels[prompt:prompt + reply + 1] = 7
    return ModelSample("s", torch.arange(n), labels, torch.arange(n).expand(3, -1), [], [], [], [],
                       Speech(torch.arange(chosen), torch.arange(3), None, ref_logps))


def test_the_collator_places_each_spoken_reply_and_keeps_reference_log_probs_only_when_every_sample_has_them():
    from omni_train.data.batch import collate_packed

    rows = [[_spoken_sample(5, 3, 4, (-1.0, -2.0)), _spoken_sample(2, 6, 1, (-3.0, -4.0))],
            [_spoken_sample(9, 1, 2, (-5.0, -6.0))]]
    batch = collate_packed(rows, 24, 0)
    assert batch["spoken"] == [Spoken(0, 0, 5, 3, 4, 3), Spoken(0, 10, 2, 6, 1, 3), Spoken(1, 0, 9, 1, 2, 3)]
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]
    rows[1][0].speech.ref_logps = None
    assert "ref_logps" not in collate_packed(rows, 24, 0)  # so talker.reference=precomputed refuses the batch


def test_dpo_loss_is_ln2_and_rewards_zero_when_policy_equals_reference():
    torch.manual_seed(0)
    policy_w, policy_l = -torch.rand(6) * 50, -torch.rand(6) * 50
    loss, reward_w, reward_l = dpo_sigmoid_loss(policy_w, policy_l, policy_w.clone(), policy_l.clone(), beta=0.1)
    torch.testing.assert_close(loss, torch.full((6,), math.log(2.0)), rtol=0, atol=1e-7)
    assert (reward_w == 0).all() and (reward_l == 0).all()


class _Accelerator:
    """What TRL's loss code asks of accelerate on one process: a device and identity gathers."""

    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _trl_loss(policy_tokens: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float, sft_weight: float):
    """TRL 1.16's DPOTrainer._compute_loss (sigmoid, plus its "sft" loss type when sft_weight > 0) on fixed per-token
    log-probs: the model it calls returns them as they are (rows: chosen sequences, then rejected)."""
    from types import SimpleNamespace

    from trl import DPOTrainer

    rows, length = policy_tokens.shape
    zeros = torch.zeros(rows, length)
    outputs = SimpleNamespace(log_probs=policy_tokens, entropy=zeros, mean_logits=zeros,
                              is_top1=torch.zeros(rows, length, dtype=torch.bool))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", beta=beta,
        loss_types=["sigmoid", "sft"] if sft_weight else ["sigmoid"], loss_weights=[1.0, sft_weight] if sft_weight
        else [1.0], use_weighting=False, label_smoothing=0.0, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": __import__("collections").defaultdict(list)})
    inputs = {"input_ids": torch.zeros(rows, length + 1, dtype=torch.long),
              "completion_mask": torch.ones(rows, length + 1, dtype=torch.long),
              "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
              "ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l}
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_dpo_loss_and_rewards_equal_trls_on_fixed_log_probs(sft_weight):
    torch.manual_seed(1)
    triplets, length, beta = 5, 7, 0.3
    tokens = -torch.rand(2 * triplets, length) * 4  # per-token log-probs: chosen rows, then rejected rows
    ref_w, ref_l = -torch.rand(triplets) * 20 - 5, -torch.rand(triplets) * 20 - 5
    want, metrics = _trl_loss(tokens, ref_w, ref_l, beta, sft_weight)
    policy = tokens.sum(dim=1)
    dpo, reward_w, reward_l = dpo_sigmoid_loss(policy[:triplets], policy[triplets:], ref_w, ref_l, beta)
    ours = (dpo + sft_weight * (-policy[:triplets] / length)).mean()  # equal lengths: TRL's token mean = ours
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-7)
    assert metrics["rewards/chosen"] == pytest.approx(reward_w.mean().item(), rel=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(reward_l.mean().item(), rel=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx((reward_w > reward_l).float().mean().item())
    assert metrics["rewards/margins"] == pytest.approx((reward_w - reward_l).mean().item(), rel=1e-6)
    assert 0.0 < metrics["rewards/accuracies"] < 1.0, "a mix of right and wrong preferences, or the check is weak"


def test_sampled_codes_logits_equal_the_teacher_forced_forward():
    """The pair builder samples with a KV cache, step by step; the training forward reads the whole sequence at
    once: on the sampled codes both give the same logits (so ref_logps and sampling see the same model)."""
    from omni_train.tools.pairs import sample_codes

    model = copy.deepcopy(_full_model())
    prompt_ids, prompt_pos, features, pixels = _prompt(with_media=True)
    objective = TalkerLM(model.thinker, model.talker, "talker_sft", {"Chelsie": SPEAKER_BOS}, "Chelsie").eval()
    reply = torch.tensor([785, 4226, 374, 220, 22, 13])
    batch = _batch(prompt_ids, prompt_pos, features, pixels, reply, torch.zeros(1, dtype=torch.long))
    torch.manual_seed(0)
    with torch.no_grad():
        (prompt,), pad_embed = objective.prompts(batch)
        sampled, raw = sample_codes(model.talker, prompt, pad_embed, 3, 12, 40, 0.8, 0.9, objective.ids)
    use_packed_attention(model.thinker.model.language_model)
    use_packed_attention(model.talker.model)
    checked = 0
    for k, codes in enumerate(sampled):
        if len(codes) == 0:
            continue
        batch.update(codes=codes, spoken=[batch["spoken"][0]._replace(chosen=len(codes))])
        with torch.no_grad():
            got = objective.codec_logits(model.talker, objective.sequences(batch))
        steps = min(len(codes) + 1, raw.shape[1])
        torch.testing.assert_close(got[:steps], raw[k, :steps], rtol=1e-5, atol=2e-6)
        checked += steps
    assert checked >= 6


@pytest.fixture(scope="module")
def triplet_batch(sample_corpus, tmp_path_factory) -> dict:
    """The sample corpus's first four speech triplets (omni-prep's shards), collated as the loader collates them:
    two packed rows of two samples."""
    import webdataset as wds

    from data_prep.build import build
    from data_prep.config import from_overrides
    from omni_train.data.batch import collate_packed, decode_sample

    out = tmp_path_factory.mktemp("triplets")
    build(str(sample_corpus.parent / "triplets.jsonl"), str(out), from_overrides(["workers=1"]), progress=False)
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    samples = [decode_sample(s) for _, s in zip(range(4), wds.WebDataset(urls, shardshuffle=False).decode())]
    return collate_packed([samples[:2], samples[2:]], 256, 151643)


def _objective(objective: str, chunk: int = 0, reference: str = "model") -> TalkerLM:
    """The Talker objective on a fresh copy of the tiny model, packed attention as training sets it; for DPO a
    reference copy whose codec head differs from the policy's (so the rewards are not all zero), or none."""
    model = copy.deepcopy(_full_model())
    use_packed_attention(model.thinker.model.language_model)
    use_packed_attention(model.talker.model)
    copied = None
    if objective == "talker_dpo" and reference == "model":
        copied = copy.deepcopy(model.talker)
        with torch.no_grad():
            copied.codec_head.weight.mul_(1.1)
    return TalkerLM(model.thinker, model.talker, objective, {"Chelsie": SPEAKER_BOS}, "Chelsie", copied, beta=0.1,
                    sft_weight=0.3, logits_chunk=chunk)


def _loss_stats_grads(objective: TalkerLM, forward, batch: dict):
    objective.talker.zero_grad(set_to_none=True)
    loss, stats = forward(batch)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in objective.talker.named_parameters()}


@pytest.mark.parametrize("objective, chunk, reference", [("talker_sft", 0, None), ("talker_sft", 16, None),
                                                         ("talker_dpo", 0, "model"), ("talker_dpo", 16, "model"),
                                                         ("talker_dpo", 0, "precomputed")])
def test_the_talker_forward_gives_its_former_losses_gradients_and_stats_bit_for_bit(triplet_batch, objective,
                                                                                    chunk, reference):
    """The samples' places from the collator and the stats built on the device change no number: loss, every
    gradient of the Talker and the stats vector equal the former forward's (tests/helpers/talker_reference.py,
    which found the samples in the positions and read every stat back) exactly, on the same modules."""
    from tests.helpers.talker_reference import reference_forward

    batch = dict(triplet_batch)
    if reference == "precomputed":  # recorded log-probs that differ from the policy's, as after some training
        batch["ref_logps"] = -torch.rand(len(batch["spoken"]), 2, generator=torch.Generator().manual_seed(0),
                                         dtype=torch.float64) * 50 - 100
    module = _objective(objective, chunk, reference)
    new = _loss_stats_grads(module, lambda b: module(**b), batch)
    old = _loss_stats_grads(module, lambda b: reference_forward(module, b), batch)
    assert new[1].dtype == torch.float64 and new[1].shape == old[1].shape
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), (new[:2], old[:2])
    assert new[1].abs().sum() > 0 and (objective == "talker_sft" or new[1][6] != 0)  # a margin, not all zero
    for name, want in old[2].items():
        assert torch.equal(new[2][name], want), name


def test_a_precomputed_reference_is_refused_for_a_batch_without_recorded_log_probs(triplet_batch):
    assert "ref_logps" not in triplet_batch  # the sample corpus's triplets record none
    with pytest.raises(ValueError, match="talker.reference=precomputed, but a sample of this batch has no reference"):
        _objective("talker_dpo", reference="precomputed")(**triplet_batch)


def test_tiled_codec_head_gives_the_plain_dpo_loss_and_gradients(triplet_batch):
    """trainer.logits_chunk tiles the Talker's codec head too: same loss and gradients, with the reference."""
    results = []
    for chunk in (0, 16):
        objective = _objective("talker_dpo", chunk)
        results.append(_loss_stats_grads(objective, lambda b: objective(**b), triplet_batch))
    (plain, plain_stats, plain_grads), (tiled, tiled_stats, tiled_grads) = results
    torch.testing.assert_close(tiled, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled_stats, plain_stats, rtol=1e-5, atol=1e-5)
    assert plain_stats.abs().sum() > 0
    for name, want in plain_grads.items():
        torch.testing.assert_close(tiled_grads[name], want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-9,
                                   msg=name)


# Torch calls that make the host wait for the device when their tensors are there: a value read back, a selection
# whose size is a count on the device, a tensor made from host values there (a copy from pageable memory).
READ_BACKS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
              "new_tensor"}


class _HostWaits(torch.overrides.TorchFunctionMode):
    """Records the torch calls in READ_BACKS (and mask selections, host data sent to a device) made by the lines of
    the source file `path` (torch's own frames in between are skipped)."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.found = path, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import os
        import sys

        kwargs = kwargs or {}
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(os.path.dirname(torch.__file__)):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename == self.path:
            name = getattr(func, "__name__", str(func))
            indices = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else ()
            masks = [i for i in (indices if isinstance(indices, tuple) else (indices,))
                     if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
            to_device = (name in ("tensor", "as_tensor") and "device" in kwargs) or (
                name == "to" and any(isinstance(a, (torch.device, str)) for a in (*args[1:], *kwargs.values())))
            if name in READ_BACKS or masks or to_device:
                self.found.append(f"{name} (line {frame.f_lineno})")
        return func(*args, **kwargs)


@pytest.mark.parametrize("objective", ["talker_sft", "talker_dpo"])
def test_the_talker_forward_reads_nothing_back_from_the_device(triplet_batch, objective):
    """Nothing in the Talker objective's own code waits for the device (on the CPU here, where the calls can be
    watched): no value read back, no selection by a mask, no host data copied to the device but through the batch's
    pinned path. The control: the same watch over the former forward finds its reads."""
    from omni_train.model import talker
    from tests.helpers import talker_reference

    module = _objective(objective)
    with _HostWaits(talker.__file__) as ours:
        loss, _ = module(**triplet_batch)
        loss.backward()
    assert ours.found == []
    with _HostWaits(talker_reference.__file__) as former:
        talker_reference.reference_forward(module, triplet_batch)
    names = {f.split(" ")[0] for f in former.found}
    assert {"item", "tolist", "nonzero", "__getitem__", "tensor"} <= names, former.found
