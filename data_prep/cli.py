"""`omni-prep`: the data preparation command line.

    omni-prep build SOURCE OUTPUT_DIR [key=value ...]   conversations -> shards (see data_prep/build.py)
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
    s = sub.add_parser("sample", help="write the sample corpus (manifest.jsonl + media)")
    s.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "sample":
            from data_prep.sample import write_sample_corpus

            print(write_sample_corpus(args.output_dir))
            return
        from data_prep.build import build
        from data_prep.config import from_overrides

        build(args.source, args.output_dir, from_overrides(args.overrides), args.tokenizer,
              progress=not args.no_progress)
    except ConfigError as e:
        print(f"omni-prep: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
