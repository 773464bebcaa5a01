"""The packed attention core against the per-sample loop it replaced, on CPU: forward and backward of one layer's
attention over a packed row.

    .venv/bin/python benchmarks/attention_core.py [--len 8192] [--samples 100,4] [--repeats 5] [--json FILE]

Per row of --len tokens holding N samples (lengths cut at random, seed 0, so short and long samples and a length-1
one are in the mix) and per head shape (the tiny preset's 4 query / 2 key-value heads of 16, the small preset's
14 / 2 of 64), fp32: the median over --repeats (after one warm-up round; the two alternate) of forward + backward through
- `loop`: the core as it was (tests/helpers/attention_reference.py): sample boundaries read back from the text
  positions in every call, SDPA on a slice of the row per sample;
- `core`: omni_train.model.kernels.attention.packed_attention on the collator's cu_seq_lens: on CPU SDPA per
  sample on a split of the row (one concatenation in the backward instead of a row-sized zero gradient per
  sample); on CUDA one varlen kernel call (not measured here: no GPU).
FlexAttention is not a candidate on CPU: torch 2.13 refuses its backward there ("FlexAttention does not support
backward on CPU"). Goal (issue 15): `core` no slower than `loop` with 100 samples (ratio core/loop <= 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import REPO, add_json_option, write_figures

sys.path.insert(0, str(REPO))  # the reference loop lives with the tests

SHAPES = {"tiny": (4, 2, 16), "small": (14, 2, 64)}


def sample_lengths(length: int, samples: int) -> list[int]:
    """`samples` lengths summing to `length`, cut at random (seed 0), the first sample one token long."""
    generator = torch.Generator().manual_seed(0)
    cuts = (torch.randperm(length - 2, generator=generator)[:samples - 2] + 2).sort().values.tolist()
    bounds = [0, 1, *cuts, length]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def step_seconds(core, query, key, value, kwargs: dict) -> float:
    """Seconds of one forward + backward (loss: the sum of the output)."""
    for t in (query, key, value):
        t.grad = None
    start = time.perf_counter()
    out, _ = core(None, query, key, value, None, scaling=query.shape[-1] ** -0.5, **kwargs)
    out.sum().backward()
    return time.perf_counter() - start


def measure(length: int, samples: int, shape: tuple[int, int, int], repeats: int) -> dict:
    from omni_train.data.batch import sample_bounds
    from omni_train.model.kernels.attention import packed_attention, varlen_kwargs
    from tests.helpers.attention_reference import per_sample_attention

    heads, kv_heads, dim = shape
    lengths = sample_lengths(length, samples)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]

    def projected(h):  # (1, h, L, D) over a (1, L, h, D) tensor, as transformers' attention layers hand them over
        return torch.randn(1, length, h, dim).transpose(1, 2).requires_grad_()

    torch.manual_seed(0)
    query, key, value = projected(heads), projected(kv_heads), projected(kv_heads)
    runs = {"loop": (per_sample_attention, {"position_ids": positions}),
            "core": (packed_attention, varlen_kwargs(*sample_bounds(lengths)))}
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):  # alternating, so a change in the machine's load hits both alike
        for name, (core, kwargs) in runs.items():
            times[name].append(step_seconds(core, query, key, value, kwargs))
    loop, core = (statistics.median(times[name][1:]) for name in runs)  # the first round warms up
    return {"loop_s": round(loop, 4), "core_s": round(core, 4), "ratio": round(core / loop, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--len", type=int, default=8192)
    parser.add_argument("--samples", default="100,4", help="samples per row, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    add_json_option(parser)
    args = parser.parse_args()
    result = {}
    print(f"{'row':>22} {'heads':>10} {'loop s':>8} {'core s':>8} {'core/loop':>9}")
    for samples in (int(n) for n in args.samples.split(",")):
        for name, shape in SHAPES.items():
            figures = measure(args.len, samples, shape, args.repeats)
            result[f"{name}.{samples}_samples"] = figures
            print(f"{args.len} tokens, {samples:>3} samples {name:>10} {figures['loop_s']:>8.3f} "
                  f"{figures['core_s']:>8.3f} {figures['ratio']:>9.3f}", flush=True)
    write_figures(args.json, "attention_core", result)


if __name__ == "__main__":
    main()
