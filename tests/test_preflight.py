"""Everything checkable is checked by `omni-launch` before any process starts: a data or eval source that is not a
finished build with samples, a `model.path` whose config or weights are unreadable or of another shape, a Talker
preset that does not fit the Thinker it starts from. Each is one line and exit 2, no trace, no run directory.
A build that keeps no sample fails."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import data_args
from tests.conftest import launch_in_process as _launch


def _prep(capsys, source, out) -> tuple[int, str]:
    from data_prep.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["build", str(source), str(out), "workers=1", "--no-progress"])
    return exit_.value.code, capsys.readouterr().err


def test_bad_sources_and_checkpoints_are_one_line_before_any_process(monkeypatch, capsys, text_shards, tiny_export,
                                                                     tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "_progress.jsonl").write_text("")
    torn = tmp_path / "torn"
    shutil.copytree(text_shards, torn)
    next(torn.glob("shard-*.tar")).unlink()
    garbage_config = tmp_path / "garbage_config"
    shutil.copytree(tiny_export, garbage_config)
    (garbage_config / "config.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_export, truncated)
    (truncated / "model.safetensors").write_bytes((tiny_export / "model.safetensors").read_bytes()[:100])
    reshaped = tmp_path / "reshaped"  # its config says one size, its weights hold another
    shutil.copytree(tiny_export, reshaped)
    config = json.loads((reshaped / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (reshaped / "config.json").write_text(json.dumps(config))

    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("")
    code, err = _prep(capsys, manifest, tmp_path / "no_samples")
    assert code == 2 and "gave no sample: it holds no record" in err and "Traceback" not in err
    sharegpt = tmp_path / "sharegpt.jsonl"  # a conversation without an assistant turn: its one record is set aside
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    code, err = _prep(capsys, sharegpt, tmp_path / "all_rejected")
    assert code == 2 and "all 1 records were set aside" in err and "Traceback" not in err

    data = data_args(text_shards)
    cases = [
        ([f"data.sources=[{{name:d,path:{empty_dir}}}]"], "data.sources d (" + str(empty_dir) + ") has no index.json"),
        ([f"data.sources=[{{name:d,path:{unfinished}}}]"], "an unfinished build"),
        ([f"data.sources=[{{name:d,path:{tmp_path / 'no_samples'}}}]"], "holds no sample"),
        ([f"data.sources=[{{name:d,path:{torn}}}]"], "lacks 1 shard(s) its index.json lists"),
        ([f"data.sources=[{{name:d,path:{tmp_path}/nothing-*.tar}}]"], "neither a build directory nor a pattern"),
        ([*data, f"eval.sources=[{{name:held,path:{empty_dir}}}]", "trainer.eval_every=5"],
         "eval.sources held (" + str(empty_dir) + ") has no index.json"),
        ([*data, f"model.path={garbage_config}"], "its config.json cannot be read"),
        ([*data, f"model.path={truncated}"], "its weights cannot be read"),
        ([*data, f"model.path={reshaped}"], "does not match the model: missing [], unexpected [], wrong shapes"),
        ([*data, f"model.path={tiny_export}", "model=small", "stage=talker_sft"],
         "is a Thinker of hidden size 64 but model=small's Talker reads states of size 896"),
    ]
    for overrides, message in cases:
        run_dir = tmp_path / "run"
        overrides = [*data[1:], *overrides] if overrides[0].startswith("data.sources") else overrides
        code, err = _launch(monkeypatch, capsys, *overrides, f"run_dir={run_dir}")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("omni-launch: error:"), (overrides, err)
        assert message in lines[0], (message, lines[0])
        assert not run_dir.exists(), "nothing starts, nothing is written"
