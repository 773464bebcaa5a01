"""GPU checks of the spine: the code users run on GPUs must have run on one. Skipped without CUDA.

bf16 ZeRO-3 training over NCCL on one GPU, with flash-attention 2 when it is installed; the packed attention core's
varlen kernel against the per-sample loop it replaced; the encoders' varlen attention against transformers' per-chunk
sdpa loop; the pair builder on the GPU against the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math

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
                        f"model.attn_implementation={attn}", "trainer.max_steps=20",
                        "trainer.lr=3e-3")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 1.0
    assert "precision: bf16" in (run_dir / "config.yaml").read_text()  # trainer.precision=auto on a GPU


def test_the_varlen_core_equals_the_per_sample_loop_in_bf16():
    """Two packed rows (samples of many lengths, a length-1 one, padding; 16 query / 2 key-value heads of 128, the
    3B's shape) through the core's one varlen kernel call and through the per-sample loop it replaced: outputs and
    gradients agree to bf16 precision."""
    from omni_train.data.batch import sample_bounds
    from omni_train.model.kernels.attention import _flash_takes, packed_attention, varlen_kwargs
    from tests.helpers.attention_reference import per_sample_attention

    torch.manual_seed(0)
    rows = [[700, 1, 300, 1000, 47], [2048]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows]).cuda()
    cu_seq_lens, max_length = sample_bounds(sum(rows, []))

    def heads(h):
        return torch.randn(2, 2048, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = heads(16), heads(2), heads(2)
    assert _flash_takes(q, 0.0)
    results = []
    for core, kwargs in ((packed_attention, varlen_kwargs(cu_seq_lens.cuda(), max_length)),
                         (per_sample_attention, {"position_ids": positions})):
        out, _ = core(None, q, k, v, None, scaling=128 ** -0.5, **kwargs)
        results.append((out, torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))))
    (ours, our_grads), (want, want_grads) = results
    torch.testing.assert_close(ours.float(), want.float(), rtol=2e-2, atol=2e-2)
    for got, expected in zip(our_grads, want_grads):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_the_encoder_varlen_attention_equals_transformers_per_chunk_sdpa_in_bf16():
    """The encoders' boundaries at the 7B's head shapes, bidirectional: the audio tower's 100-position chunks of 20
    clips of 1 to 30 s (20 heads of 64), the vision encoder's 8 x 8-patch windows (smaller at the bottom and right
    edges) and whole frames (16 heads of 80) of a 420 x 756 video of 8 temporal patches. One varlen kernel call
    (encoder_attention) against transformers' own `sdpa` function called chunk by chunk, as its encoders' loop calls
    it: outputs and gradients agree to bf16 precision."""
    from transformers import AttentionInterface

    from omni_train.data.batch import sample_bounds
    from omni_train.model.kernels.attention import _flash_takes, encoder_attention

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups = False, 1

    seconds = [1 + (7 * i) % 30 for i in range(20)]
    chunks = [n for s in seconds for n in [100] * (s // 2) + ([50] if s % 2 else [])]
    h, w = 30, 54  # patches per frame
    windows = [min(8, h - i) * min(8, w - j) for _ in range(8) for i in range(0, h, 8) for j in range(0, w, 8)]
    frames = [h * w] * 8
    sdpa = AttentionInterface._global_mapping["sdpa"]
    torch.manual_seed(0)
    for lengths, heads, dim in ((chunks, 20, 64), (windows, 16, 80), (frames, 16, 80)):
        cu_seq_lens, max_length = sample_bounds(lengths)
        q, k, v = (torch.randn(1, sum(lengths), heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   .requires_grad_() for _ in range(3))
        assert _flash_takes(q, 0.0)
        boundaries = {"cu_seq_lens_q": cu_seq_lens.cuda(), "cu_seq_lens_k": cu_seq_lens.cuda(),
                      "max_length_q": max_length, "max_length_k": max_length}
        ours, _ = encoder_attention(Layer(), q, k, v, None, scaling=dim ** -0.5, is_causal=False, **boundaries)
        theirs = torch.cat([sdpa(Layer(), *chunk, None, scaling=dim ** -0.5, is_causal=False)[0]
                            for chunk in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))], dim=1)
        results = [(out, torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))) for out in (ours, theirs)]
        (ours, our_grads), (want, want_grads) = results
        assert ours.shape == (1, sum(lengths), heads, dim)
        torch.testing.assert_close(ours.float(), want.float(), rtol=2e-2, atol=2e-2)
        for got, expected in zip(our_grads, want_grads):
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2,
                                       atol=2e-2 * float(expected.abs().max()))


def test_the_tiny_encoders_with_the_encoder_attention_agree_with_transformers_sdpa_in_bf16():
    """The tiny preset's real audio tower and vision encoder in bf16 on CUDA (the clips and grids of
    tests/test_attention_core.py): the encoder attention (one varlen call per layer) and transformers' `sdpa` loop give
    the same outputs and parameter gradients to bf16 precision."""
    from omni_train.model.build import build_thinker
    from omni_train.model.kernels.attention import ENCODER, use_encoder_attention
    from tests.helpers.models import tiny_model_config
    from tests.test_attention_core import _encode, _media

    torch.manual_seed(0)
    thinker = build_thinker(tiny_model_config(), None).to("cuda", torch.bfloat16)
    use_encoder_attention(thinker)
    for encoder, run in _media(thinker, "cuda").values():
        (ours, our_grads), (want, want_grads) = (_encode(encoder, run, name) for name in (ENCODER, "sdpa"))
        torch.testing.assert_close(ours.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max()))
        assert our_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(our_grads[name].float(), grad.float(), rtol=5e-2,
                                       atol=5e-2 * float(grad.abs().max()), msg=name)


def test_packed_core_and_flash_attention_varlen_agree_on_a_packed_row():
    """The same packed row (three samples and padding) through our core and through flash-attention 2's varlen path
    in transformers, both reading the collator's boundaries from the same keyword arguments."""
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from transformers import AttentionInterface

    from omni_train.data.batch import sample_bounds
    from omni_train.model.kernels.attention import packed_attention, varlen_kwargs

    torch.manual_seed(0)
    lengths = [700, 300, 1000, 48]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    cu_seq_lens, max_length = sample_bounds(lengths)
    varlen = varlen_kwargs(cu_seq_lens.cuda(), max_length)
    q = torch.randn(1, 4, sum(lengths), 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    class Layer(torch.nn.Module):
        is_causal, training, num_key_value_groups = True, False, 2

    ours, _ = packed_attention(Layer(), q, k, v, None, scaling=0.125, **varlen)
    theirs, _ = AttentionInterface._global_mapping["flash_attention_2"](Layer(), q, k, v, None, scaling=0.125,
                                                                          position_ids=positions, **varlen)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sequence parallelism on GPU needs 2 GPUs")
def test_sequence_parallel_bf16_nccl_training_loss_falls(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_launch(f"run_dir={run_dir}", *data_args(sample_shards, workers=1), "data.max_len=2048",
                        "launcher.nproc_per_node=2", "trainer.sequence_parallel=2", "trainer.precision=bf16",
                        "trainer.max_steps=20", "trainer.lr=3e-3")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sequence_parallel"] == 2 and summary["last_loss"] < summary["first_loss"] - 0.5


def test_offloaded_checkpointing_and_tiled_mlp_keep_the_loss_and_lower_cuda_memory(sample_shards):
    """On CUDA the checkpointed layer inputs really move to pinned host memory: the step's peak allocation falls,
    and the loss is the plain step's."""
    import copy

    from omni_train.config.compose import compose
    from omni_train.model.kernels import activations
    from tests.helpers.sp_step import fixed_batch
    from tests.test_packing import _module

    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fixed_batch(str(sample_shards)).items()}
    results = {}
    for name, overrides in {"plain": [], "offload": ["trainer.checkpointing=full", "trainer.offload_activations=true",
                                                     "trainer.mlp_chunk=256"]}.items():
        module = copy.deepcopy(_module()).cuda().train()
        activations.apply(module.thinker, compose(overrides).trainer)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, _ = module(**batch)
        loss.backward()
        results[name] = (loss.item(), torch.cuda.max_memory_allocated() - before)
        del module
        torch.cuda.empty_cache()
    assert results["offload"][0] == pytest.approx(results["plain"][0], rel=1e-5)
    assert results["offload"][1] < results["plain"][1]


def test_talker_dpo_bf16_on_gpu_starts_at_ln2(sample_corpus, tmp_path):
    """talker_sft then talker_dpo in bf16 on one GPU (NCCL), from a random tiny model: DPO's first loss is ln 2."""
    from data_prep.build import build
    from data_prep.config import from_overrides

    shards = tmp_path / "triplets"
    build(str(sample_corpus.parent / "triplets.jsonl"), str(shards), from_overrides(["workers=1"]), progress=False)
    common = [f"data.sources=[{{name:t,path:{shards}}}]", "data.max_len=512", "data.workers=1",
              "launcher.nproc_per_node=1", "trainer.precision=bf16", "trainer.max_steps=4", "trainer.warmup_steps=0"]
    sft = tmp_path / "sft"
    result = run_launch("stage=talker_sft", f"run_dir={sft}", *common)
    assert result.returncode == 0, result.stderr[-4000:]
    dpo = tmp_path / "dpo"
    result = run_launch("stage=talker_dpo", f"run_dir={dpo}", f"model.path={sft / 'export'}", *common)
    assert result.returncode == 0, result.stderr[-4000:]
    first = json.loads((dpo / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["dpo/loss"] - math.log(2.0)) < 1e-3  # bf16 log-probs of policy and reference are identical


def test_the_run_state_restores_the_cuda_generator():
    """Dropout and sampling on the GPU draw from the CUDA generator: a resumed run continues its stream."""
    from omni_train.train.checkpoint import restore_rng, rng_state

    torch.cuda.manual_seed(11)
    saved = json.loads(json.dumps(rng_state()))
    assert "cuda_rng" in saved
    expected = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed(12)
    assert torch.rand(4, device="cuda").tolist() != expected
    restore_rng(saved)
    assert torch.rand(4, device="cuda").tolist() == expected


def _cpu_reference_logps(export, triplets: list[dict], base) -> list[list[float]]:
    """Each triplet's log p(chosen), log p(rejected) as the pair builder computes them on the CPU in fp32 (media
    relative to `base`)."""
    from omni_train.config.schema import Objective
    from omni_train.tokenizer import load_tokenizer
    from omni_train.tools.conversation import prepare_sample
    from omni_train.tools.pairs import _reference_logps, load_speaker, spoken_reply

    model, objective, speaker = load_speaker(str(export), None, Objective.talker_dpo, "cpu", torch.float32)
    tokenizer = load_tokenizer(str(export))
    bos = int(model.speaker_map[speaker]["bos_token"])
    out = []
    for t in triplets:
        record = {"messages": t["messages"], "use_audio_in_video": t["use_audio_in_video"]}
        batch, *_ = spoken_reply(objective, prepare_sample(record, base, tokenizer).sample, bos, tokenizer)
        out.append(_reference_logps(objective, model, batch, torch.tensor(t["speech"]["chosen"]),
                                    torch.tensor(t["speech"]["rejected"])))
    return out


@pytest.mark.parametrize("precision, options, rel", [
    ("bf16", ["--scorer", "wer", "--asr", "thinker"], 2e-3),  # the default on a GPU; the Thinker transcribes there
    ("fp32", ["--precision", "fp32", "--scorer", "pauses"], 1e-5),
])
def test_pairs_built_on_the_gpu_record_the_log_probs_the_cpu_computes(precision, options, rel, eos_prone_export,
                                                                      sample_corpus, tmp_path):
    """`omni-train pairs --device cuda` samples, renders and scores on the GPU. The codes cannot equal the CPU's
    (another generator draws them), so each triplet is checked well-formed, and its recorded reference log-probs
    against the CPU's fp32 ones for the same codes: to bf16's precision in bf16, closely in fp32 (where a wrong
    layout or a missed device move would show)."""
    import subprocess
    import sys

    from data_prep.build import CODEC_IDS
    from tests.conftest import REPO

    lines = sample_corpus.with_name("text.jsonl").read_text().splitlines()[4:12]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([sys.executable, "-m", "omni_train.train", "pairs", str(eos_prone_export), str(prompts),
                           str(out), "--samples", "4", "--max-codes", "24", "--device", "cuda", *options],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    header = json.loads((tmp_path / "pairs.jsonl.part-0-of-1").read_text().splitlines()[0])["header"]
    assert (header["device"], header["precision"]) == ("cuda", precision)
    triplets = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(triplets) >= 2, done.stdout
    for t in triplets:
        speech = t["speech"]
        for codes in (speech["chosen"], speech["rejected"]):
            assert 1 <= len(codes) <= 24 and all(0 <= c < CODEC_IDS for c in codes)
        assert speech["chosen"] != speech["rejected"] and t["scores"]["chosen"] < t["scores"]["rejected"]
        assert len(speech["ref_logps"]) == 2 and all(math.isfinite(x) and x < 0 for x in speech["ref_logps"])
    for t, want in zip(triplets, _cpu_reference_logps(eos_prone_export, triplets, tmp_path)):
        assert t["speech"]["ref_logps"] == pytest.approx(want, rel=rel), t["id"]
