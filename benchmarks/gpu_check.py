"""The prepared GPU check: the GPU tests, then training throughput, MFU and peak memory of the 3B- and 7B-shape
Thinkers and of the Talker, on one GPU, against `omni-train plan`'s prediction.

    python benchmarks/gpu_check.py [--out benchmarks/gpu_results.json]      on a GPU machine (one command)
    .venv/bin/python benchmarks/gpu_check.py --smoke [--shards DIR]         on CPU, the tiny preset, in seconds

On a GPU machine without network (Python 3.12, torch and transformers preinstalled, no DeepSpeed, webdataset or
Hydra), it first installs the wheels of `.whl/` (benchmarks/gpu_wheels.py writes them; carry `.whl` with the
tree) into /tmp/site and restarts itself with them on its path. Then, each step in its own process so that one
failure leaves the others' figures:
1. `pytest tests/gpu` (bf16 ZeRO-3 over NCCL, the attention kernels against our core);
2. the encoders' attention (benchmarks/encoder_attention.py, the 7B's encoder widths with 2 layers, bf16): one
   varlen call per layer against transformers' per-chunk `sdpa` loop, forward and backward, on 32 clips of 1-10 s
   and a video of 8 x 36 x 64 patches (288 windows);
3. the sample corpus (speech, images, video with sound, text, Talker triplets) prepared into shards;
4. for each shape (the 3B and 7B presets' Thinkers, random weights, the real vocabulary, full depth; the 7B with
   as many of its 28 layers as its full ZeRO-3 state leaves room for on one card, said in the figures), training
   steps of one packed row of `--len` (8,192) tokens of the corpus's mixture, bf16, under ZeRO-3 on the one GPU,
   with the activation checkpointing `omni-train plan` needs to fit: tokens/s, step time, MFU, peak memory and
   the plan's prediction; and the Talker stage (talker_sft over the frozen 7B-shape Thinker) likewise.
MFU = model FLOPs / step time / peak: model FLOPs per step = 6 x N x T (N: the Thinker's parameters without its
input embeddings, T: the row's tokens; each token goes once through every weight forward and twice backward) +
6 x layers x hidden x sum over the row's samples of s^2 (causal attention's QK^T and AV, forward and backward, a
sample of s tokens attending to s/2 keys on average); recomputation under checkpointing is not counted (the model
FLOPs, not the hardware's). Peak: 989 TFLOP/s, the H100/H200 SXM's dense bf16.
Figures go to `--out` (and to $OUT when set, the device tool's folder) and stdout; `--smoke` runs the same steps
on CPU with the tiny preset, 2 steps, fp32, to keep this script working (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0
SITE = Path("/tmp/site")


def _ensure_packages() -> None:
    """On a machine without DeepSpeed: the carried wheels into /tmp/site, then this script again with them."""
    try:
        import deepspeed  # noqa: F401
        import hydra  # noqa: F401
        import webdataset  # noqa: F401
        return
    except ImportError:
        if os.environ.get("GPU_CHECK_INSTALLED"):
            raise
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        sys.exit("gpu_check: DeepSpeed, webdataset or Hydra is missing and .whl/ holds no wheels: run "
                 "benchmarks/gpu_wheels.py on a machine with network and carry .whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    env = dict(os.environ, GPU_CHECK_INSTALLED="1",
               PYTHONPATH=os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _corpus(root: Path) -> dict[str, Path]:
    """The sample corpus prepared into shards: the media+text mixture and the Talker's triplets."""
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_sample_corpus

    manifest = write_sample_corpus(root / "corpus")
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    out = {}
    for name, source in (("mixture", manifest), ("triplets", manifest.with_name("triplets.jsonl"))):
        out[name] = root / name
        build(str(source), str(out[name]), from_overrides([f"workers={workers}"]), progress=False)
    return out


def _row(shards: Path, length: int) -> tuple[dict, list[int]]:
    """One packed row of `length` tokens from the shards' samples, in order (best fit), and its samples' lengths."""
    import webdataset as wds

    from omni_train.data.batch import best_fit, collate_packed, decode_sample
    from omni_train.tokens import PAD

    index = json.loads((shards / "index.json").read_text())
    urls = [str(shards / s["name"]) for s in index["shards"]]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]
    samples = [s for s in samples if len(s) <= length]
    row = [samples[i] for i in best_fit([len(s) for s in samples], length)[0]]
    return collate_packed([row], length, pad_id=PAD), [len(s) for s in row]


def worker(args) -> None:
    """One measurement, as rank 0 of 1 (torchrun): build the stage's trainee, warm up, time the steps."""
    import torch

    from omni_train.config.compose import compose
    from omni_train.train.distributed import init_distributed, shutdown
    from omni_train.train.loop import train_step
    from omni_train.train.metrics import peak_memory_gb
    from omni_train.train.recipes import recipe

    cfg = compose(["trainer.micro_batch_size=1", f"data.max_len={args.len}", *args.override])
    _, world = init_distributed(timeout_min=30.0)
    started = time.perf_counter()
    trainee = recipe(cfg.stage.objective).build(cfg, world)
    built_s = time.perf_counter() - started
    trainee.engine.train()
    batch, lengths = _row(Path(args.shards), args.len)
    train_step(trainee.engine, trainee.module, [batch], world)  # warm-up: the optimizer state is allocated
    times = []
    for _ in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(trainee.engine, trainee.module, [batch], world)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    thinker = trainee.module.thinker
    text = thinker.config.text_config
    embed = text.vocab_size * text.hidden_size
    params = sum(getattr(p, "ds_numel", p.numel()) for p in thinker.parameters()) - embed
    step = sorted(times)[len(times) // 2]
    tokens = sum(lengths)
    flops = 6 * params * tokens + 6 * text.num_hidden_layers * text.hidden_size * sum(s * s for s in lengths)
    Path(args.out).write_text(json.dumps({
        "overrides": args.override, "layers": text.num_hidden_layers, "params_without_embeddings": params,
        "row_tokens": tokens, "row_samples": len(lengths), "step_s_median": round(step, 4),
        "tokens_per_s": round(tokens / step, 1),
        # The Talker stages run the Thinker forward only and train the Talker on the codes: the formula above is the
        # Thinker's training, so no MFU is given for them.
        "mfu": float(f"{flops / step / (PEAK_TFLOPS * 1e12):.3g}") if cfg.stage.objective == "thinker" else None,
        "peak_gb": round(peak_memory_gb(), 2), "build_s": round(built_s, 1)}))
    shutdown()


def _measure(name: str, overrides: list[str], shards: Path, args, root: Path) -> dict:
    out = root / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--worker", "--shards", str(shards), "--len", str(args.len), "--steps", str(args.steps), "--out", str(out),
           *(f"--override={o}" for o in overrides)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-3000:]}
    figures = json.loads(out.read_text())
    # The plan, here: its meta-device model cannot be built in a process where ZeRO-3 is active.
    from omni_train.config.compose import compose
    from omni_train.train.memory import estimate

    planned = sum(estimate(compose(["trainer.micro_batch_size=1", f"data.max_len={args.len}", *overrides,
                                    "launcher.nproc_per_node=1"])).values()) / 2**30
    return {**figures, "plan_gb": round(planned, 2), "peak_vs_plan": round(figures["peak_gb"] / planned, 3)}


def _encoders(smoke: bool, root: Path, timeout: int) -> dict:
    """benchmarks/encoder_attention.py's figures: on the GPU in bf16 (the 7B's encoder widths, 2 layers); with
    `smoke` on CPU, the tiny encoders, one round."""
    out = root / "encoders.json"
    media = (["--device", "cpu", "--shapes", "tiny", "--clips", "4", "--seconds", "1,2", "--repeats", "1"] if smoke else
             ["--device", "cuda", "--dtype", "bf16", "--shapes", "7b_2_layers", "--clips", "32", "--seconds", "1,10",
              "--video", "8,36,64", "--repeats", "10"])
    try:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "encoder_attention.py"), *media, "--json",
                               str(out)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
                                  str(REPO), os.environ.get("PYTHONPATH"))))})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}", "tail": (done.stdout + done.stderr)[-1500:]}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 2 steps: keeps the script working")
    parser.add_argument("--out", type=Path, help="where the figures go (default benchmarks/gpu_results.json; with "
                                                     "--smoke, nowhere but stdout)")
    parser.add_argument("--shards", type=Path, help="a prepared mixture (skips preparing the corpus; --smoke)")
    parser.add_argument("--len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=150, help="seconds per measurement")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.smoke:
        _ensure_packages()
    import torch

    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict = {"machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
                    f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                    "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "peak_tflops": PEAK_TFLOPS,
                    "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]])}
    if args.smoke:
        args.len, args.steps = min(args.len, 1024), 2
        shards = args.shards or _corpus(root)["mixture"]
        shapes = {"tiny": ["model=tiny"]}
        talker = None
    else:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/gpu"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        report["tests_gpu"] = {"exit": tests.returncode, "tail": tests.stdout[-1500:]}
        data = _corpus(root)
        shards, talker = data["mixture"], data["triplets"]
        bf16 = ["trainer.precision=bf16", "model.attn_implementation=sdpa"]
        # The 7B's full ZeRO-3 state (16 bytes a parameter, ~142 GB for 8.9B) does not fit one 141 GB card: half its
        # layers (the same layer shape) do.
        shapes = {"3b": ["model=qwen2_5_omni_3b", *bf16, "trainer.checkpointing=full"],
                  "7b_14_of_28_layers": ["model=qwen2_5_omni_7b", *bf16, "trainer.checkpointing=full",
                                         "model.hf_config.thinker_config.text_config.num_hidden_layers=14"]}
    report["encoders"] = _encoders(args.smoke, root, args.timeout)
    report["thinker"] = {name: _measure(name, overrides, shards, args, root) for name, overrides in shapes.items()}
    if talker is not None:
        report["talker"] = _measure("talker", ["stage=talker_sft", *shapes["7b_14_of_28_layers"]], talker, args, root)
    report["seconds"] = round(time.time() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or (None if args.smoke else REPO / "benchmarks" / "gpu_results.json")
    if out is not None:
        out.write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_results.json").write_text(text + "\n")
    failed = [k for k, v in {**report["thinker"], "talker": report.get("talker", {}),
                             "encoders": report["encoders"]}.items() if "error" in v]
    if failed or report.get("tests_gpu", {}).get("exit", 0) not in (0, 5):
        sys.exit(f"gpu_check: failed: {failed or 'tests/gpu'} (the figures above say why)")


if __name__ == "__main__":
    main()
