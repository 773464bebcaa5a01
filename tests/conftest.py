"""Shared fixtures: the sample corpus and a helper that runs `omni-launch` as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory) -> Path:
    """The sample text conversations prepared into shards: the spine's training data."""
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_text_corpus

    corpus = write_text_corpus(tmp_path_factory.mktemp("text"))
    out = tmp_path_factory.mktemp("text_shards")
    build(str(corpus), str(out), from_overrides(["workers=1"]), progress=False)
    return out


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> Path:
    from data_prep.sample import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def text_shards_many(sample_corpus, tmp_path_factory) -> Path:
    """The sample corpus's text conversations in ~16 small shards (cheap to decode; more shards than slots)."""
    from data_prep.build import build
    from data_prep.config import from_overrides

    out = tmp_path_factory.mktemp("text_many")
    build(str(sample_corpus.with_name("text.jsonl")), str(out), from_overrides(["shard_bytes=60000", "workers=1"]),
          progress=False)
    return out


@pytest.fixture(scope="session")
def sample_shards(sample_corpus, tmp_path_factory) -> Path:
    """The sample corpus prepared into several shards (2 workers, 2 MB bound)."""
    from data_prep.build import build
    from data_prep.config import from_overrides

    out = tmp_path_factory.mktemp("shards")
    build(str(sample_corpus), str(out), from_overrides(["workers=2", "shard_bytes=2000000"]), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A randomly initialised tiny Thinker (seed 0), exported as training exports it."""
    import torch

    from omni_train.model.build import build_thinker
    from omni_train.model.keymap import hub_name
    from omni_train.tokenizer import load_tokenizer
    from omni_train.train.export import export_pretrained
    from tests.helpers.models import tiny_model_config

    torch.manual_seed(0)
    thinker = build_thinker(tiny_model_config(), None)
    return export_pretrained(thinker, tmp_path_factory.mktemp("tiny") / "model", load_tokenizer(), rename=hub_name)


@pytest.fixture(scope="session")
def tiny_full_export(tmp_path_factory) -> Path:
    """A randomly initialised tiny full model (Thinker, Talker, Token2Wav, one seeded random voice; seed 0), exported
    as the Talker stages export it: what transformers' Qwen2_5OmniForConditionalGeneration loads, untrained."""
    import torch

    from omni_train.model.build import build_talker, build_thinker, build_token2wav, load_speakers, omni_config
    from omni_train.tokenizer import load_tokenizer
    from omni_train.train.export import export_omni
    from tests.helpers.models import tiny_model_config

    cfg = tiny_model_config()
    torch.manual_seed(0)
    thinker, (talker, _), token2wav = build_thinker(cfg, None), build_talker(cfg, None), build_token2wav(cfg)
    return export_omni(thinker, talker, token2wav, omni_config(cfg), load_speakers(cfg, "Chelsie"),
                       tmp_path_factory.mktemp("tiny_full") / "export", load_tokenizer())


@pytest.fixture(scope="session")
def eos_prone_export(tiny_full_export, tmp_path_factory) -> Path:
    """The tiny full model with a Talker that often stops early: its codec head scaled by 0.1 except the eos and pad
    rows (scaled by 3), so an untrained model's samples differ in length, which the pause/duration check ranks (the
    untrained Token2Wav's waveform has no pauses: equal lengths score alike and carry no preference)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("eos_prone") / "export"
    shutil.copytree(tiny_full_export, out)
    state = load_file(tiny_full_export / "model.safetensors")
    talker = json.loads((tiny_full_export / "config.json").read_text())["talker_config"]
    ends = [talker["tts_codec_end_token_id"], talker["tts_codec_pad_token_id"]]
    head = state["talker.codec_head.weight"]
    scaled = head * 0.1
    scaled[ends] = head[ends] * 3.0
    state["talker.codec_head.weight"] = scaled.contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def data_args(shards: Path, workers: int = 0) -> list[str]:
    """Overrides that train on one shard directory, decoding in the training process unless told otherwise."""
    return [f"data.sources=[{{name:data,path:{shards}}}]", "data.max_len=256", "data.chunk_samples=32",
            f"data.workers={workers}"]


def free_port() -> int:
    """A TCP port nothing on the loopback listens on now (for rendezvous, stores and daemons the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "logging.wandb_mode=disabled", "logging.progress_bar=false",
            *overrides]


def run_launch(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(launch_cmd(*overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def launch_in_process(monkeypatch, capsys, *overrides: str) -> tuple[int, str]:
    """`omni-launch` in this process, for what it refuses before starting any: (exit code, stderr)."""
    from launch.cli import main

    monkeypatch.setattr(sys, "argv", ["omni-launch", "logging.wandb_mode=disabled", *overrides])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def start_launch(*overrides: str) -> subprocess.Popen:
    """`omni-launch` started in its own session (stderr piped), for tests that kill it."""
    return subprocess.Popen(launch_cmd(*overrides), cwd=REPO, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_job_when(proc: subprocess.Popen, marker: Path, what: str, timeout: float = 400) -> None:
    """Once `marker` exists, SIGKILL the whole job at once, as when a node is lost: the launcher, torchrun and every
    worker. Fails when the job ends first or `what` (the marker) does not come within `timeout` seconds."""
    import time

    import psutil

    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"run ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.02)
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in job:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(job, timeout=30)
    proc.wait()
