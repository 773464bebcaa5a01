"""`omni-demo`: the whole pipeline that exists today, on the tiny model and the sample corpus, 2 CPU processes.

Owns: the order of the demo's stages and `outputs/demo/summary.json` ({"stages": {NAME: {...}}} in the order the
stages ran, plus a "data" entry for preparation). Each step is what a user would type (`omni-prep sample`,
`omni-prep build`, `omni-launch ...`); the demo adds nothing the command line cannot do. Today: sample corpus ->
shards -> Thinker SFT under ZeRO-3 on the packed multimodal stream -> export.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from launch.cli import launch
from omni_train.files import write_json_atomic

STAGES = [
    # (stage preset, overrides of its own)
    ("sft", ["trainer.max_steps=30", "trainer.lr=3e-3", "trainer.save_every=10"]),
]


def main(argv: list[str] | None = None) -> None:
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_sample_corpus

    out = Path("outputs/demo")
    shutil.rmtree(out, ignore_errors=True)  # the demo always starts from nothing
    manifest = write_sample_corpus(out / "sample")
    print(f"omni-demo: data: omni-prep build {manifest} {out / 'shards'}", flush=True)
    index = build(str(manifest), str(out / "shards"), from_overrides([]))
    summary: dict = {"data": {"manifest": str(manifest), "shards": str(out / "shards"),
                              "num_shards": len(index["shards"]), **index["totals"]}, "stages": {}}
    for stage, overrides in STAGES:
        run_dir = out / stage
        args = [f"stage={stage}", f"run_dir={run_dir}", f"data.sources=[{{name:sample,path:{out / 'shards'}}}]", *overrides,
                *(argv or sys.argv[1:])]
        print(f"omni-demo: stage {stage}: omni-launch {' '.join(args)}", flush=True)
        code = launch(args)
        if code != 0:
            sys.exit(f"omni-demo: stage {stage} failed with exit code {code}; its logs are in {run_dir}")
        summary["stages"][stage] = json.loads((run_dir / "summary.json").read_text())
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"omni-demo: done; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
