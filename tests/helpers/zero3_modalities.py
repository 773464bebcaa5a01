"""One rank of the ZeRO-3 modality test (started by torchrun from tests/test_zero3_modalities.py).

Every step each rank holds 2, 1 or 0 audio clips and as many images (the two ranks out of phase), plus text.
With `--objective ours` the ranks run what the Thinker recipe builds (ThinkerLM: encoders once per micro-batch,
dummies when absent) through the loop's train_step; with `--objective transformers` they call transformers' own
Thinker forward, which skips an absent modality's encoder:
the control that shows the test can fail. Writes OUT/rank{R}.json with the losses when it finishes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds


class TransformersForward(torch.nn.Module):
    """transformers' own merge: encoders run only for the modalities present in the micro-batch."""

    units_name = "label_tokens"

    def __init__(self, thinker):
        super().__init__()
        self.thinker = thinker

    def units(self, batch: dict) -> float:
        return float((batch["labels"][:, 1:] != -100).sum())

    def step_metrics(self, stats: torch.Tensor) -> dict:
        return {}

    def forward(self, input_ids, labels, position_ids, conditions, audio_features=None, audio_lengths=None,
                pixel_values=None, grid_thw=None):
        kwargs = {}
        if audio_features is not None:
            frames = int(audio_lengths.max())
            feats = torch.zeros(len(audio_lengths), audio_features.shape[0], frames)
            mask = torch.zeros(len(audio_lengths), frames, dtype=torch.long)
            start = 0
            for i, n in enumerate(audio_lengths.tolist()):
                feats[i, :, :n], mask[i, :n] = audio_features[:, start:start + n], 1
                start += n
            kwargs.update(input_features=feats, feature_attention_mask=mask)
        if pixel_values is not None:
            kwargs.update(pixel_values=pixel_values, image_grid_thw=grid_thw)
        out = self.thinker(input_ids=input_ids, position_ids=position_ids, **kwargs)
        keep = labels[:, 1:] != -100
        return (F.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep], reduction="sum"),
                torch.zeros(1, dtype=torch.float64))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--objective", choices=["ours", "transformers"], default="ours")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--timeout-min", type=float, default=1.0, help="how long a collective waits for a peer")
    args = parser.parse_args()

    from omni_train.config.compose import compose
    from omni_train.data.batch import collate_packed, decode_sample
    from omni_train.model.build import build_thinker
    from omni_train.tokens import PAD
    from omni_train.train.distributed import init_distributed, shutdown
    from omni_train.train.engine import deepspeed_config, initialize
    from omni_train.train.loop import train_step
    from omni_train.train.recipes import recipe

    cfg = compose(["model=tiny", "trainer.micro_batch_size=1", "trainer.warmup_steps=0", "trainer.lr=1e-3"])
    rank, world = init_distributed(timeout_min=args.timeout_min)
    torch.manual_seed(0)
    urls = [str(p) for p in sorted(Path(args.shards).glob("shard-*.tar"))]
    # Every rank reads every shard here (the test picks per-rank samples itself).
    reader = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda shards: shards).decode()
    samples = [decode_sample(s) for s in reader]
    speech = [s for s in samples if s.audio and not s.vision]
    images = [s for s in samples if s.vision_kinds == ["image"] and not s.audio]
    texts = [s for s in samples if not s.audio and not s.vision]
    if args.objective == "ours":
        trainee = recipe(cfg.stage.objective).build(cfg, world)  # what the training loop builds
        engine, module = trainee.engine, trainee.module
    else:
        ds_config = deepspeed_config(cfg, world)
        module = TransformersForward(build_thinker(cfg.model, ds_config))
        engine, _, _ = initialize(cfg, module, ds_config)
    losses = []
    for step in range(args.steps):
        # Each rank holds 2, 1 or 0 audio clips and as many images, out of phase with the other rank, plus text.
        n = (2, 1, 0)[(step + rank) % 3]
        row = [speech[(step * 2 + k) % len(speech)] for k in range(n)]
        row += [images[(step * 2 + k) % len(images)] for k in range(n)]
        row += [texts[(step + rank + k) % len(texts)] for k in range(2)]
        batch = collate_packed([row], length=2048, pad_id=PAD)
        losses.append(train_step(engine, module, [batch], world).loss)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"losses": losses}))
    shutdown()


if __name__ == "__main__":
    main()
