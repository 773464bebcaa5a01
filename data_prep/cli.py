"""`omni-prep`: the data preparation command line.

    omni-prep build SOURCE OUTPUT_DIR [key=value ...]   conversations -> shards (see data_prep/build.py)
    omni-prep build ... part=I/N                         part I of N (OUTPUT_DIR/part-I-of-N/)
    omni-prep build ... launcher=local|slurm launcher.array=N [--dry-run] [--wait]
                                                         all N parts, here or as a SLURM job array, then the merge
    omni-prep merge OUTPUT_DIR                           the N finished parts -> one shard set (data_prep/parts.py)
    omni-prep sample OUTPUT_DIR                          write the sample corpus (see data_prep/sample.py)

SOURCE is a JSONL manifest, a .json file (an array of records), a `datasets` directory (`save_to_disk`) or a
.parquet file; its records are in the `messages`, `sharegpt` or `alpaca` format (`format=`, told from the first
records by default; see data_prep/formats.py) or built from columns by `hf.*` mappings. Overrides set fields of
`data_prep.config.PrepConfig` (e.g. `workers=8 vision.fps=1 format=sharegpt`).
"""

from __future__ import annotations

import argparse
import sys

from omni_train.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omni-prep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="prepare conversations into webdataset shards")
    b.add_argument("source", help="a .jsonl manifest, a .json array, a datasets directory or a .parquet file")
    b.add_argument("output_dir")
    b.add_argument("overrides", nargs="*",
                   help="key=value settings of PrepConfig (data_prep/config.py), e.g. workers=8 format=sharegpt "
                        "(messages, sharegpt, alpaca; auto, the default, tells it from the first records)")
    b.add_argument("--tokenizer", default=None, help="a checkpoint directory whose tokenizer to use")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--dry-run", action="store_true",
                   help="with launcher=: print the parts' commands (or the sbatch scripts), run nothing")
    b.add_argument("--wait", action="store_true", help="with launcher=slurm: wait for the merge job's end")
    m = sub.add_parser("merge", help="join the N finished parts of a build (part=I/N) into one shard set",
                       description="Check that OUTPUT_DIR/part-I-of-N/ holds all N parts, finished and built alike, "
                                   "and write OUTPUT_DIR/index.json over them (data_prep/parts.py).")
    m.add_argument("output_dir", help="the OUTPUT_DIR the parts were built into")
    s = sub.add_parser("sample", help="write the sample corpus (manifest.jsonl + media)")
    s.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "sample":
            from data_prep.sample import write_sample_corpus

            print(write_sample_corpus(args.output_dir))
            return
        if args.command == "merge":
            from data_prep.parts import merge

            merge(args.output_dir)
            return
        from data_prep.build import build
        from data_prep.config import from_overrides

        cfg = from_overrides(args.overrides)
        if cfg.launcher.name != "none":
            from data_prep.parts import run_parts

            sys.exit(run_parts(args.source, args.output_dir, cfg, args.overrides, args.tokenizer, args.dry_run,
                               args.wait))
        build(args.source, args.output_dir, cfg, args.tokenizer, progress=not args.no_progress)
    except ConfigError as e:
        print(f"omni-prep: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
