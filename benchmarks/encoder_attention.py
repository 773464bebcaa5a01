"""The encoders' attention on CPU: transformers' per-chunk `sdpa` loop against omni-train's encoder attention,
forward and backward through the real audio tower and vision encoder.

    .venv/bin/python benchmarks/encoder_attention.py [--clips 20] [--seconds 1,10] [--repeats 5]
        [--shapes tiny,7b_2_layers] [--video T,H,W] [--device cpu|cuda] [--dtype fp32|bf16] [--json FILE]

Media, as MediaEmbedder hands them to the encoders (every item in one call): --clips audio clips of --seconds (the
shortest and longest, cut at random, seed 0; a clip is 100-position chunks plus a tail), and one video of 4
temporal patches at 224 x 392 pixels (16 x 28 patches a frame: 8 windows of up to 8 x 8 patches, then the whole
frame in a full-attention block). Encoders (fp32, random init): the tiny preset's (2 layers, 32 wide), and the 7B's
widths cut to 2 layers (audio: 1,280 wide, 20 heads of 64; vision: 1,280 wide, 16 heads of 80; one windowed block,
one full). The median over --repeats (after one warm-up round; the two alternate) of forward + backward of each
encoder with its config's attention
- `sdpa`: transformers' own path: a Python loop over `torch.split` chunks (or windows), one SDPA call each;
- `ours`: omni_train.model.kernels.attention.encoder_attention under its "flash" name: transformers calls it once
  per layer with every boundary; on CPU it runs SDPA per chunk on a split of the rows (the same calls: outputs and
  gradients are bit for bit transformers', tests/test_attention_core.py), on CUDA one varlen kernel (not measured
  here: no GPU).
`benchmarks/gpu_check.py` runs it on the GPU in bf16 (`--device cuda --dtype bf16`), where ours is one varlen
kernel call per layer against transformers' loop of a kernel per chunk and a read-back per layer.
Goal on CPU: no slower (ratio ours/sdpa <= 1, within the machine's noise; on a machine others share,
OMP_NUM_THREADS=1 gives steadier figures). The 7B widths take minutes a round with long clips: --seconds 1,3 keeps
them short.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

from common import REPO, add_json_option, write_figures

sys.path.insert(0, str(REPO))  # this checkout's omni_train

# The 7B's encoder widths (conf/model/qwen2_5_omni_7b.yaml) with 2 layers: one windowed and one full vision block.
SEVEN_B = {"audio_config": {"d_model": 1280, "encoder_layers": 2, "encoder_attention_heads": 20,
                            "encoder_ffn_dim": 5120, "num_mel_bins": 128, "n_window": 100, "output_dim": 64},
           "vision_config": {"depth": 2, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                             "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 112}}
VIDEO = (4, 16, 28)  # (t, h, w) patches
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def thinker_with(encoders: dict | None):
    """The tiny preset's Thinker (seed 0), its encoders replaced by `encoders` (Thinker config groups) when given."""
    from omegaconf import OmegaConf

    from omni_train.config.schema import ModelConfig
    from omni_train.model.build import build_thinker

    hf_config = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml").hf_config)
    hf_config["thinker_config"].update(encoders or {})
    torch.manual_seed(0)
    return build_thinker(ModelConfig(preset="tiny", hf_config=hf_config), None)


def clip_frames(clips: int, shortest: int, longest: int) -> list[int]:
    """Mel frames (100 a second) of `clips` clips of shortest..longest seconds, cut at random (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(shortest * 100, longest * 100 + 1, (clips,), generator=generator).tolist()


def step_seconds(encoder, run) -> float:
    """Seconds of one forward + backward (loss: the sum of the output), the device's queue drained on both sides."""
    encoder.zero_grad(set_to_none=True)
    _sync()
    start = time.perf_counter()
    run().float().sum().backward()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(encoders: dict | None, frames: list[int], repeats: int, video: tuple[int, int, int] = VIDEO,
            device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from omni_train.model.kernels.attention import ENCODER, use_encoder_attention
    from omni_train.model.media import _audio, _vision

    thinker = thinker_with(encoders).to(device, dtype)
    use_encoder_attention(thinker)  # registers ours
    tower, visual = thinker.model.audio_tower, thinker.model.visual
    c = visual.config
    features = torch.randn(tower.config.num_mel_bins, sum(frames), device=device)
    lengths = torch.tensor(frames, device=device)
    pixels = torch.randn(video[0] * video[1] * video[2], c.in_channels * c.temporal_patch_size * c.patch_size**2,
                         device=device)
    grid = torch.tensor([video], device=device)
    result = {}
    for kind, encoder, run in (("audio", tower, lambda: _audio(tower, features, lengths)),
                               ("video", visual, lambda: _vision(visual, pixels, grid))):
        times = {"sdpa": [], "ours": []}
        for _ in range(repeats + 1):  # alternating, so a change in the machine's load hits both alike
            for name, attention in (("sdpa", "sdpa"), ("ours", ENCODER)):
                encoder.config._attn_implementation_internal = attention
                times[name].append(step_seconds(encoder, run))
        sdpa, ours = (statistics.median(times[name][1:]) for name in ("sdpa", "ours"))  # the first round warms up
        result[kind] = {"sdpa_s": round(sdpa, 4), "ours_s": round(ours, 4), "ratio": round(ours / sdpa, 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", default="1,10", help="the shortest and longest clip, in seconds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="tiny,7b_2_layers", help="encoder shapes, comma-separated")
    parser.add_argument("--video", default=",".join(map(str, VIDEO)), help="the video's T,H,W patches")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check runs it there)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_json_option(parser)
    args = parser.parse_args()
    frames = clip_frames(args.clips, *(int(s) for s in args.seconds.split(",")))
    video = tuple(int(n) for n in args.video.split(","))
    chunks = sum(math.ceil(n / 200) for n in frames)
    windows = video[0] * math.ceil(video[1] / 8) * math.ceil(video[2] / 8)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"{where}, {args.dtype}, torch {torch.__version__}")
    print(f"audio: {args.clips} clips, {sum(frames) / 100:.0f} s, {chunks} chunks; video: {video} patches, "
          f"{windows} windows, {video[0]} frames")
    shapes = {"tiny": None, "7b_2_layers": SEVEN_B}
    result = {}
    print(f"{'encoders':>12} {'media':>6} {'sdpa s':>8} {'ours s':>8} {'ours/sdpa':>9}")
    for shape in args.shapes.split(","):
        result[shape] = measure(shapes[shape], frames, args.repeats, video, args.device, DTYPES[args.dtype])
        for kind, figures in result[shape].items():
            print(f"{shape:>12} {kind:>6} {figures['sdpa_s']:>8.3f} {figures['ours_s']:>8.3f} {figures['ratio']:>9.3f}",
                  flush=True)
    write_figures(args.json, "encoder_attention", result)


if __name__ == "__main__":
    main()
