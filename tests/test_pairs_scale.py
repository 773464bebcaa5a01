"""`omni-train pairs` split over ranks: N ranks (torchrun, or srun's variables) write the triplets one process writes,
a rank killed mid-part resumes without repeating a prompt, and the merge and resume refuse what does not fit, in one
line. Real processes, on the CPU, on an untrained tiny full model (conftest's eos_prone_export), scored by the
pause/duration check (no ASR)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

# On the CPU wherever the tests run (of two ranks on a one-GPU machine, only one would have a GPU).
OPTIONS = ["--samples", "2", "--max-codes", "24", "--scorer", "pauses", "--progress-every", "0", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # every run alike: torchrun gives each of its ranks one thread


@pytest.fixture(scope="module")
def prompts(sample_corpus, tmp_path_factory) -> Path:
    """Eight text conversations and, fifth, one without an assistant turn (set aside): 9 prompts, 5 for rank 0 of 2
    and 4 for rank 1."""
    lines = sample_corpus.with_name("text.jsonl").read_text().splitlines()[4:12]
    lines.insert(4, json.dumps({"id": "no-reply", "messages": [{"role": "user", "content": "Hello?"}]}))
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(*args: str) -> list[str]:
    return [sys.executable, "-m", "omni_train.train", "pairs", *args]


def _run(cmd: list[str], env: dict = ENV) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one_process(eos_prone_export, prompts, tmp_path_factory) -> tuple[Path, dict]:
    """The reference: one process, seed 0. Its OUT and printed report."""
    out = tmp_path_factory.mktemp("one") / "pairs.jsonl"
    done = _run(_pairs(str(eos_prone_export), str(prompts), str(out), *OPTIONS))
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["triplets"] >= 3, report  # enough preferences for the comparisons below to mean something
    assert {"id": "no-reply", "reason": "conversation has no assistant turn: nothing to learn from"} in \
        report["set_aside"]
    return out, report


def _triplets(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def _assert_same_triplets(got: Path, want: Path) -> None:
    got, want = _triplets(got), _triplets(want)
    assert [t["id"] for t in got] == [t["id"] for t in want]
    for g, w in zip(got, want):
        assert g["speech"]["chosen"] == w["speech"]["chosen"] and g["speech"]["rejected"] == w["speech"]["rejected"]
        assert g["speech"]["ref_logps"] == pytest.approx(w["speech"]["ref_logps"], abs=1e-6)
        assert g["scores"] == w["scores"] and g["messages"] == w["messages"]


def test_two_torchrun_ranks_write_the_triplets_one_process_writes(eos_prone_export, prompts, one_process, tmp_path):
    out = tmp_path / "pairs.jsonl"
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                 "omni_train.train", "pairs", str(eos_prone_export), str(prompts), str(out), *OPTIONS])
    _assert_same_triplets(out, one_process[0])
    parts = [[json.loads(line) for line in (tmp_path / f"pairs.jsonl.part-{r}-of-2").read_text().splitlines()]
             for r in range(2)]
    assert [[r["index"] for r in part[1:]] for part in parts] == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    assert [part[0]["header"]["expected"] for part in parts] == [5, 4]
    assert all(part[0]["header"]["device"] == "cpu" and part[0]["header"]["precision"] == "fp32" for part in parts)
    report = json.loads(done.stdout[done.stdout.index("{"):])  # printed once, by the rank that merged
    assert report["set_aside"] == one_process[1]["set_aside"] and report["prompts"] == 9
    assert "rank 0 of 2: 5 of 5 prompts" in done.stderr and "rank 1 of 2: 4 of 4 prompts" in done.stderr
    assert "prompts/s, about 0 s left" in done.stderr


def test_a_rank_killed_mid_part_resumes_and_the_merge_equals_one_process(eos_prone_export, prompts, one_process,
                                                                           tmp_path):
    """Ranks 0 (torchrun's variables) and 1 (srun's) start together; rank 1 is killed once its part holds a prompt,
    and rank 0 finishes its part and names the unfinished one. Rerun, rank 1 drops a line cut short by the kill,
    skips what its part holds and, finishing last, merges."""
    out = tmp_path / "pairs.jsonl"
    part = tmp_path / "pairs.jsonl.part-1-of-2"
    cmd = _pairs(str(eos_prone_export), str(prompts), str(out), *OPTIONS)
    rank1_env = dict(ENV, SLURM_PROCID="1", SLURM_NTASKS="2")
    rank0, rank1 = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True) for env in (dict(ENV, RANK="0", WORLD_SIZE="2"), rank1_env))
    deadline = time.time() + 300
    while not (part.exists() and len(part.read_text().splitlines()) >= 2):
        assert rank1.poll() is None, rank1.stderr.read()[-3000:]
        assert time.time() < deadline, "rank 1 wrote no prompt in time"
        time.sleep(0.02)
    rank1.send_signal(signal.SIGKILL)
    rank1.wait()
    kept = part.read_text().splitlines()
    assert 2 <= len(kept) < 5, "killed before its part was complete"
    with open(part, "a") as f:
        f.write('{"index": 7, "triplet": {"id": "cut sh')  # as a kill in the middle of a write leaves it
    assert rank0.wait(timeout=300) == 0
    assert "pairs.jsonl.part-1-of-2 is unfinished" in rank0.stderr.read() and not out.exists()

    resumed = _run(cmd, env=rank1_env)
    assert f"resuming {part}: {len(kept) - 1} of 4 prompts done" in resumed.stderr
    lines = part.read_text().splitlines()
    assert lines[:len(kept)] == kept  # the prompts done before the kill are kept, not redone
    assert [json.loads(line)["index"] for line in lines[1:]] == [1, 3, 5, 7]
    report = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    ids = [t["id"] for t in _triplets(out)]
    assert len(ids) == len(set(ids)) == report["triplets"]
    _assert_same_triplets(out, one_process[0])


def _in_process(capsys, *argv: str) -> tuple[int, str, str]:
    from omni_train.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pairs", *argv])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_a_rerun_of_a_finished_run_rewrites_the_same_output_without_the_model(eos_prone_export, prompts, one_process,
                                                                              tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    shutil.copy(one_process[0].with_name("pairs.jsonl.part-0-of-1"), tmp_path)
    started = time.perf_counter()
    code, stdout, _ = _in_process(capsys, str(eos_prone_export), str(prompts), str(out), *OPTIONS, "--shards",
                                  str(tmp_path / "shards"))
    assert code == 0 and time.perf_counter() - started < 10  # every prompt is in the part: nothing sampled
    assert out.read_bytes() == one_process[0].read_bytes()
    assert json.loads(stdout)["set_aside"] == one_process[1]["set_aside"]
    # --shards: the merged triplets prepared for talker_dpo, as omni-prep build prepares them
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["totals"]["samples"] == json.loads(stdout)["triplets"]
    assert index["totals"]["modalities"].get("speech_pair") == index["totals"]["samples"]


def test_a_resume_with_another_seed_or_rank_count_is_refused_in_one_line(eos_prone_export, prompts, one_process,
                                                                         capsys, monkeypatch):
    out = one_process[0]
    before = out.with_name("pairs.jsonl.part-0-of-1").read_bytes()
    code, _, err = _in_process(capsys, str(eos_prone_export), str(prompts), str(out), *OPTIONS, "--seed", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pairs.jsonl.part-0-of-1 was made with seed=0 (this run: seed=1)" in err
    code, _, err = _in_process(capsys, str(eos_prone_export), str(prompts), str(out), *OPTIONS, "--precision", "bf16")
    assert code == 2 and "was made with precision=fp32 (this run: precision=bf16)" in err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _in_process(capsys, str(eos_prone_export), str(prompts), str(out), *OPTIONS)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pairs.jsonl.part-0-of-1 is a part of a 1-rank run: run with 1 ranks" in err
    assert out.with_name("pairs.jsonl.part-0-of-1").read_bytes() == before


def test_the_merge_names_a_missing_or_unfinished_part_in_one_line(one_process, tmp_path, capsys):
    whole = one_process[0].with_name("pairs.jsonl.part-0-of-1").read_text().splitlines(keepends=True)
    (tmp_path / "cut.jsonl.part-0-of-1").write_text("".join(whole[:-1]))
    code, _, err = _in_process(capsys, "--merge", str(tmp_path / "cut.jsonl"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cut.jsonl.part-0-of-1 is unfinished (8 of 9 prompts)" in err
    (tmp_path / "half.jsonl.part-1-of-2").write_text(whole[0])
    code, _, err = _in_process(capsys, "--merge", str(tmp_path / "half.jsonl"))
    assert code == 2 and "half.jsonl.part-0-of-2 is missing" in err and not (tmp_path / "half.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_pairing_on_cuda_without_a_gpu_is_refused_in_one_line(eos_prone_export, prompts, tmp_path, capsys):
    code, _, err = _in_process(capsys, str(eos_prone_export), str(prompts), str(tmp_path / "pairs.jsonl"), "--device",
                               "cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device cuda: this process sees no CUDA GPU" in err and not list(tmp_path.iterdir())
