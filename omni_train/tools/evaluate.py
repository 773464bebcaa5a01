"""`omni-train eval MODEL [OVERRIDES] [--answers MANIFEST] [--speech MANIFEST]`: measure a saved model, write
`eval.json`.

MODEL is an export or a training checkpoint (RUN_DIR/checkpoints/step_N). With `eval.sources`, the held-out loss
of the objective of `stage` (omni_train/train/evaluate.py: per source and condition, the same for any number of
ranks); with `--answers` (an export), the Thinker answers the conversations of a manifest greedily and its answers
are scored against the last assistant turns (omni_train/tools/answers.py: word error rate, exact match, per
modality); with `--speech` (a full export), the model speaks the last replies of a manifest and a recogniser
scores them (omni_train/tools/speech.py: word error rate, pause penalty). One process by default; under torchrun
every rank takes its share of the held-out loss, and the first rank alone runs the tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omni_train.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="omni-train eval", description=__doc__.split("\n\n")[0],
        epilog="Example: omni-train eval outputs/demo/sft/export 'eval.sources=[{name:held,path:data/held}]'")
    parser.add_argument("model", help="an export or a training checkpoint (RUN_DIR/checkpoints/step_N)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (stage=..., eval.sources=..., data.max_len=...)")
    parser.add_argument("--out", default="eval.json", help="where to write the metrics (default: eval.json)")
    parser.add_argument("--answers", metavar="MANIFEST", help="the Thinker answers the conversations of this JSONL "
                        "manifest greedily; WER and exact match against their last replies (omni_train/tools/answers.py)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer at most (default: 64)")
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
        if not cfg.eval.sources and not args.speech and not args.answers:
            raise ConfigError("eval.sources is empty: name the held-out shard sets, e.g. "
                              "'eval.sources=[{name:held,path:DIR}]' (or give --answers or --speech MANIFEST)")
        for manifest in (args.answers, args.speech):
            if manifest and not Path(manifest).is_file():
                raise ConfigError(f"{manifest}: no such manifest (a JSONL file of conversations)")
        if (args.answers or args.speech) and not (Path(args.model) / "config.json").is_file():
            raise ConfigError(f"{args.model} has no config.json: --answers and --speech read an export "
                              "(RUN_DIR/export), not a training checkpoint")
        if args.answers and first:
            from omni_train.tools.answers import answers_task

            metrics["answers"] = answers_task(args.model, args.answers, args.max_new_tokens)
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
        print(json.dumps(headline(metrics), indent=2))
    from omni_train.train.distributed import shutdown

    shutdown()
    return 0


def headline(metrics: dict) -> dict:
    """The figures to print: the held-out losses, and each task's summary without its per-sample details."""
    out = {k: v for k, v in metrics.items() if k not in ("answers", "speech")}
    if "answers" in metrics:
        out.update({f"answers/{k}": metrics["answers"][k] for k in ("samples", "wer", "exact_match")})
    if "speech" in metrics:
        out.update({f"speech/{k}": metrics["speech"][k] for k in ("samples", "wer", "pause_penalty")})
    return out
