"""`omni-train eval MODEL [OVERRIDES] [--speech MANIFEST]`: measure a saved model, write `eval.json`.

MODEL is an export or a training checkpoint (RUN_DIR/checkpoints/step_N). With `eval.sources`, the held-out loss
of the objective of `stage` (omni_train/train/evaluate.py: per source and condition, the same for any number of
ranks); with `--speech`, a full model speaks the last replies of a manifest and a recogniser scores them
(omni_train/tools/speech.py: word error rate, pause penalty). One process by default; under torchrun every rank
takes its share of the held-out loss.
"""

from __future__ import annotations

import argparse
import json
import sys

from omni_train.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="omni-train eval", description=__doc__.split("\n\n")[0],
        epilog="Example: omni-train eval outputs/demo/sft/export 'eval.sources=[{name:held,path:data/held}]'")
    parser.add_argument("model", help="an export or a training checkpoint (RUN_DIR/checkpoints/step_N)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (stage=..., eval.sources=..., data.max_len=...)")
    parser.add_argument("--out", default="eval.json", help="where to write the metrics (default: eval.json)")
    parser.add_argument("--speech", metavar="MANIFEST", help="a full model (with its Talker) speaks the last replies "
                        "of this JSONL manifest; a recogniser scores them (omni_train/tools/speech.py)")
    parser.add_argument("--asr", default="pocketsphinx", help="pocketsphinx (default), thinker or a Whisper "
                        "checkpoint directory")
    parser.add_argument("--speaker", default=None, help="a key of the model's spk_dict.pt (default: its first)")
    args = parser.parse_intermixed_args(argv)
    from omni_train.config.compose import compose
    from omni_train.files import write_json_atomic

    import os

    metrics: dict = {}
    first = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = compose([*args.overrides, f"model.path={args.model}", "trainer.export=false"])
        if not cfg.eval.sources and not args.speech:
            raise ConfigError("eval.sources is empty: name the held-out shard sets, e.g. "
                              "'eval.sources=[{name:held,path:DIR}]' (or give --speech MANIFEST)")
        if args.speech and first:
            # Before any ZeRO-3 construction: once DeepSpeed's zero.Init has run in a process, transformers'
            # from_pretrained may come out partitioned.
            from omni_train.tools.speech import speech_task

            metrics["speech"] = speech_task(args.model, args.speech, args.asr, args.speaker)
        if cfg.eval.sources:
            cfg.data.sources = list(cfg.eval.sources)  # the training data is not read: check what is
            from omni_train.train.evaluate import run

            metrics.update(run(cfg))
    except ConfigError as e:
        print(f"omni-train eval: error: {e}", file=sys.stderr)
        return 2
    if first:
        write_json_atomic(args.out, {"model": args.model, "objective": str(cfg.stage.objective), **metrics})
        print(json.dumps({k: v for k, v in metrics.items() if k != "speech"} | (
            {"speech/wer": metrics["speech"]["wer"]} if "speech" in metrics else {}), indent=2))
    from omni_train.train.distributed import shutdown

    shutdown()
    return 0
