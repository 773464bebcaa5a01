"""Held-out evaluation (omni_train/train/evaluate.py, omni_train/data/heldout.py) through `omni-train eval` in real
processes: the same loss for 1 and 2 ranks and for 0 and 2 decoding workers, equal to the loss computed sample by
sample; ranks whose shares differ in size and modality finish together with the right totals; the speech scorer
discriminates; the report draws the curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

MAX_LEN = 2048


def _eval(model: Path, shards: Path, out: Path, ranks: int = 1, *overrides: str) -> dict:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    cmd = [*launcher, "-m", "omni_train.train", "eval", str(model), f"--out={out}",
           f"eval.sources=[{{name:held,path:{shards}}}]", f"data.max_len={MAX_LEN}", "logging.wandb_mode=disabled",
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _same(got: dict, want: dict) -> None:
    """The same figures (to fp32 summation order) under the same names."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


def _samples(shards: Path) -> list:
    import webdataset as wds

    from omni_train.data.batch import decode_sample

    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    return [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]


def _subset(sample_corpus: Path, out: Path, picks: dict[str, int]) -> Path:
    """Shards of the first `n` conversations of the sample corpus whose id starts with each prefix, in that order."""
    from data_prep.build import build
    from data_prep.config import from_overrides

    lines = sample_corpus.read_text().splitlines()
    chosen = [line for prefix, n in picks.items()
              for line in [x for x in lines if json.loads(x)["id"].startswith(prefix)][:n]]
    manifest = sample_corpus.with_name(f"{out.name}.jsonl")
    manifest.write_text("".join(line + "\n" for line in chosen))
    build(str(manifest), str(out), from_overrides(["workers=1"]), progress=False)
    return out


def _oracle(model: Path, shards: Path, max_len: int) -> tuple[float, float, int]:
    """(loss per label token, label tokens, samples) of every sample of `shards` up to `max_len` tokens, each
    alone, in this process, without DeepSpeed or packing."""
    from omni_train.data.batch import collate_packed
    from omni_train.model.build import build_thinker
    from omni_train.model.kernels.attention import use_packed_attention
    from omni_train.model.thinker import ThinkerLM
    from omni_train.tokens import PAD
    from tests.helpers.models import tiny_model_config

    thinker = build_thinker(tiny_model_config(path=str(model)), None).eval()
    use_packed_attention(thinker.model.language_model)
    module = ThinkerLM(thinker)
    loss_sum = units = 0.0
    kept = [s for s in _samples(shards) if len(s) <= max_len]
    with torch.no_grad():
        for sample in kept:
            batch = collate_packed([[sample]], len(sample), PAD)
            loss, _ = module(**batch)
            loss_sum, units = loss_sum + float(loss), units + module.units(batch)
    return loss_sum / units, units, len(kept)


def test_eval_loss_is_the_same_for_any_ranks_and_workers_and_equals_sample_by_sample(tiny_export, sample_corpus,
                                                                                     tmp_path):
    """Every kind of sample (speech, images, video with and without its audio, text); one rank decoding in its own
    process, and two ranks with two decoding workers each, give the loss of each sample alone."""
    shards = _subset(sample_corpus, tmp_path / "mixed",
                     {"speech-": 4, "image-": 4, "video-000": 2, "video-001": 2, "mixed-": 2, "text-": 6})
    one = _eval(tiny_export, shards, tmp_path / "one.json")
    two = _eval(tiny_export, shards, tmp_path / "two.json", 2, "eval.workers=2")
    loss, units, samples = _oracle(tiny_export, shards, MAX_LEN)
    assert one["eval/held/samples"] == samples >= 15 and one["eval/held/label_tokens"] == units
    assert one["eval/held/loss"] == pytest.approx(loss, rel=1e-5)
    _same(two, one)
    conditions = {k: v for k, v in one.items() if k.startswith("eval/held/label_tokens/")}
    assert len(conditions) == 4 and all(conditions.values()), conditions


def test_ranks_with_shares_of_different_size_and_modality_finish_together(tiny_export, sample_corpus, tmp_path):
    """Three held-out samples on two ranks: rank 0 evaluates speech and an image (two micro-batches of one row),
    rank 1 one text (one micro-batch, then a weight-0 filler): no hang, and the totals of each sample alone."""
    shards = _subset(sample_corpus, tmp_path / "three", {"speech-": 1, "text-": 1, "image-": 1})
    lengths = [len(s) for s in _samples(shards)]
    row = -(-max(lengths) // 64) * 64
    assert [s.id.split("-")[0] for s in _samples(shards)] == ["speech", "text", "image"]
    assert lengths[0] + lengths[2] > row, "speech and image must not share a row"
    shared = _eval(tiny_export, shards, tmp_path / "two.json", 2, f"data.max_len={row}", "trainer.micro_batch_size=1")
    loss, units, samples = _oracle(tiny_export, shards, row)
    assert shared["eval/held/samples"] == samples == 3 and not any("set_aside" in k for k in shared)
    assert shared["eval/held/label_tokens"] == units and shared["eval/held/loss"] == pytest.approx(loss, rel=1e-5)


def test_an_eval_without_sources_is_one_line(tiny_export, tmp_path):
    done = subprocess.run([sys.executable, "-m", "omni_train.train", "eval", str(tiny_export)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "eval.sources is empty" in done.stderr and "Traceback" not in done.stderr


def test_answers_are_what_the_trained_forward_predicts_and_score_zero_against_themselves(tiny_export, sample_corpus,
                                                                                        tmp_path):
    """`omni-train eval --answers`: transformers' greedy generate from our data path's inputs (speech, an image,
    video with and without its audio, speech with an image over two turns, text). Each answer token is the argmax of
    the forward training runs (our media embedding and our TMRoPE positions, the answer continuing as text) on the
    prompt and the answer so far, and those logits are transformers' forward's on the same inputs (its own
    positions); a random model scores badly against the references, and perfectly against its own answers put in
    their place."""
    from omni_train.model.build import build_thinker
    from omni_train.model.media import MediaEmbedder
    from omni_train.data.batch import response_span
    from omni_train.tokenizer import load_tokenizer
    from omni_train.tools.answers import answers_task, load_thinker
    from omni_train.tools.conversation import prepare_sample, sample_inputs
    from tests.helpers.models import tiny_model_config

    picks = ["speech-000", "image-000", "video-000", "video-001", "mixed-000", "text-00000"]
    records = {json.loads(line)["id"]: json.loads(line) for line in sample_corpus.read_text().splitlines()}
    manifest = sample_corpus.with_name("answers.jsonl")
    manifest.write_text("".join(json.dumps(records[p]) + "\n" for p in picks))
    done = subprocess.run([sys.executable, "-m", "omni_train.train", "eval", str(tiny_export), "--answers",
                           str(manifest), "--max-new-tokens=6", f"--out={tmp_path / 'eval.json'}"], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    first = json.loads((tmp_path / "eval.json").read_text())["answers"]
    assert first["samples"] == len(picks) and not first["set_aside"]
    assert set(first["by_modality"]) == {"audio", "image", "video+video_audio", "video", "audio+image", "text"}
    assert first["wer"] > 0.5 and first["exact_match"] == 0.0

    thinker = build_thinker(tiny_model_config(path=str(tiny_export)), None).eval()
    embed, tokenizer, served = MediaEmbedder(thinker), load_tokenizer(), load_thinker(str(tiny_export))
    for detail in first["details"]:
        prepared = prepare_sample(records[detail["id"]], sample_corpus.parent, tokenizer)
        sample = prepared.sample
        start, _ = response_span(sample.labels)
        answer = torch.tensor(detail["answer_tokens"])
        ids = torch.cat([sample.input_ids[:start], answer[:-1]])
        text = sample.positions[:, :start].max() + 1 + torch.arange(len(answer) - 1)
        positions = torch.cat([sample.positions[:, :start], text.expand(3, -1)], dim=1)
        media = {}
        if sample.audio:
            media |= {"audio_features": torch.cat(sample.audio, dim=1),
                      "audio_lengths": torch.tensor([a.shape[1] for a in sample.audio])}
        if sample.vision:
            media |= {"pixel_values": torch.cat(sample.vision), "grid_thw": torch.tensor(sample.grids)}
        with torch.no_grad():
            hidden = thinker.model.language_model(
                inputs_embeds=embed(ids[None], **media),
                position_ids=torch.cat([torch.arange(len(ids))[None], positions])[:, None]).last_hidden_state
            logits = thinker.lm_head(hidden[0, start - 1:])
            theirs = served(**sample_inputs(prepared, ids)).logits[0, start - 1:]
        assert logits.argmax(dim=-1).tolist() == answer.tolist(), detail["id"]
        torch.testing.assert_close(theirs, logits, rtol=1e-4, atol=1e-4, msg=detail["id"])

    for p in picks:  # each conversation's reference replaced by the model's own answer
        records[p]["messages"][-1]["content"] = next(d["answer"] for d in first["details"] if d["id"] == p)
    manifest.write_text("".join(json.dumps(records[p]) + "\n" for p in picks))
    again = answers_task(str(tiny_export), str(manifest), max_new_tokens=6)
    assert again["samples"] == len(picks) and again["wer"] == 0.0 and again["exact_match"] == 1.0


def test_the_recogniser_scores_the_right_text_better_than_shuffled_or_other_words(tmp_path):
    """pocketsphinx on espeak-ng speech (US English, 140 words a minute) of known sentences: the word error rate
    against the spoken text is below the rate against the same words shuffled (order counts) and well below the
    rate against another sentence (content counts). A discriminating scorer, not a fixed number: on synthetic
    speech this recogniser gets about a quarter of the words right."""
    import random
    import shutil

    from data_prep.media import load_audio
    from omni_train.tools.scorers import PocketsphinxAsr, word_error_rate

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (launch/setup.sh installs it)")
    sentences = ["the quick brown fox jumps over the lazy dog", "please tell me a story about a small cat",
                 "i would like to order a cup of coffee with milk", "what is the capital of france",
                 "we will meet at the station tomorrow morning"]
    asr = PocketsphinxAsr()
    right = shuffled = other = 0.0
    for i, text in enumerate(sentences):
        wav = tmp_path / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav), text], check=True)
        transcript = asr(load_audio(str(wav), 60), rate=16_000)
        words = text.split()
        random.Random(i).shuffle(words)
        right += word_error_rate(text, transcript) / len(sentences)
        shuffled += word_error_rate(" ".join(words), transcript) / len(sentences)
        other += word_error_rate(sentences[i - 1], transcript) / len(sentences)
    assert right < shuffled - 0.05 and right < other - 0.15, (right, shuffled, other)


def test_the_report_draws_each_curve_and_embeds_it(tmp_path):
    from omni_train.tools.report import figures, read_run, write

    runs = []
    for n, name in enumerate(("stage_a", "stage_b")):
        run = tmp_path / name
        run.mkdir()
        records = [{"step": s, "loss": 5.0 - s / 10 - n, "lr": 1e-3, "tokens_per_s": 100.0 + s,
                    "packing_efficiency": 0.9, "loss/text": 4.0, "loss/audio": 5.0} for s in range(1, 11)]
        records += [{"step": s, "eval/loss": 5.5 - s / 20 - n} for s in (0, 5, 10)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    drawn = figures([read_run(r) for r in runs])
    assert set(drawn) == {"loss", "lr", "throughput", "packing", "conditions"}  # no DPO figures without DPO data
    loss = drawn["loss"].axes[0]
    assert loss.get_xlabel() == "step (runs in order)" and loss.get_ylabel() == "loss per unit"
    train_b = next(line for line in loss.get_lines() if line.get_label() == "stage_b: train")
    assert list(train_b.get_xdata()) == list(range(11, 21)), "the second run follows the first on the step axis"
    held_a = next(line for line in loss.get_lines() if line.get_label() == "stage_a: held-out")
    assert list(held_a.get_ydata()) == [5.5, 5.25, 5.0]
    page = write(runs, tmp_path / "report")
    text = page.read_text()
    for stem in drawn:
        assert f"({stem}.png)" in text and (tmp_path / "report" / f"{stem}.png").stat().st_size > 1000
    assert "| stage_b |" in text
    # The command line passes over what is not a run and orders the runs by when they were last written.
    import os

    from omni_train.tools.report import main

    os.utime(runs[0] / "metrics.jsonl", (1_000, 1_000))
    os.utime(runs[1] / "metrics.jsonl", (2_000, 2_000))
    assert main([str(runs[1]), str(tmp_path / "report"), str(runs[0]), "--out", str(tmp_path / "again")]) == 0
    assert "Runs, in order: stage_a, stage_b." in (tmp_path / "again" / "report.md").read_text()
    assert main([str(tmp_path / "report"), "--out", str(tmp_path / "none")]) == 2
