"""docs/CONFIG.md, generated from the schemas: every key with its type, default and meaning.

Owns the reference of `omni-train`/`omni-launch`'s keys (omni_train/config/schema.py: the defaults as the default
config groups compose them) and `omni-prep build`'s (data_prep/config.py), with the options of each config group
(conf/GROUP/*.yaml and their first comment line). A key's meaning is the comment above its field in the schema, so
the code and the page cannot drift: `python -m omni_train.tools.config_doc` rewrites the page, `--check` exits 1
when it is stale (tests/test_config.py checks it), and a field without a comment fails the generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import json
import re
import sys
import typing
from pathlib import Path


PAGE = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"
CONF = Path(__file__).resolve().parents[2] / "conf"
_FIELD = re.compile(r"^\s+(\w+): [^=]+?(?: = .*)?$")


def _comments(cls) -> dict[str, str]:
    """The `#` comment above each field of a dataclass; a field right below a commented one, without a comment of
    its own, shares it (the schema comments some fields as a group: "its hostfile ... and the first host's address
    and port")."""
    found, block, after_field = {}, [], False
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            block = block if not after_field else []
            block.append(text.lstrip("#").strip())
            after_field = False
            continue
        match = _FIELD.match(line)
        if match and not text.startswith(("def ", "return ", "@")):
            found[match[1]] = " ".join(block)
            after_field = True
        else:
            block, after_field = [], False
    return found


def _type(hint) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return _type(next(a for a in args if a is not type(None))) + " or null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in hint)
    if typing.get_origin(hint) in (list, dict):
        return getattr(typing.get_origin(hint), "__name__") + (
            f"[{', '.join(_type(a) for a in args)}]" if args else "")
    return getattr(hint, "__name__", str(hint))


def _default(value) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (dict, list)) and len(json.dumps(value, default=str)) > 60:
        return "(set by the config group's yaml)"
    if value is None:
        return "null"
    text = json.dumps(value, default=str) if isinstance(value, (dict, list, bool)) else str(value)
    return f"`{text}`" if text else '`""`'


def _rows(cls, value, prefix: str = "") -> list[str]:
    """One table row per leaf key of a dataclass, recursing into nested dataclasses (lists of them are leaves)."""
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        current = getattr(value, f.name)
        if dataclasses.is_dataclass(hint) and not isinstance(current, list):
            rows += _rows(hint, current, key + ".")
            continue
        meaning = comments.get(f.name, "")
        if not meaning and f.name != "name":
            raise TypeError(f"{cls.__name__}.{f.name} has no comment above it in its schema: say what it means")
        meaning = meaning or "the option's name (set by its yaml)"
        rows.append(f"| `{key}` | {_type(hint)} | {_default(current)} | {meaning.replace('|', '/')} |")
    return rows


def _groups() -> list[str]:
    lines = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
        options = []
        for yaml in sorted(group.glob("*.yaml")):
            lines = [line for line in yaml.read_text().splitlines() if "@package" not in line]
            first = " ".join(line.lstrip("# ").strip() for line in lines[:next(
                (i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])
            options.append(f"  - `{group.name}={yaml.stem}`: {first}")
        lines += [f"- `{group.name}`:", *options]
    return lines


def markdown() -> str:
    from data_prep.config import PrepConfig
    from omni_train.config.compose import compose
    from omni_train.config.schema import Config

    composed = compose([])
    header = ["# Configuration reference", "",
              "Generated from the schemas by `python -m omni_train.tools.config_doc` (do not edit by hand; "
              "tests/test_config.py checks it is current).", "",
              "## omni-train and omni-launch", "",
              "Hydra overrides on the command line: `key=value` for a key, `group=option` for a config group. "
              f"Defaults are those of the default groups (`model={composed.model.preset}`, "
              f"`deepspeed={composed.deepspeed.name}`, `data={composed.data.name}`, `stage={composed.stage.name}`, "
              f"`launcher={composed.launcher.name}`); another group's yaml changes some (`omni-launch --cfg job "
              "stage=NAME` prints them).",
              "", "Config groups (conf/):", "", *_groups(), "",
              "| key | type | default | meaning |", "|---|---|---|---|"]
    prep = ["", "## omni-prep build", "", "`key=value` after the source and output directory.", "",
            "| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join([*header, *_rows(Config, composed), *prep, *_rows(PrepConfig, PrepConfig())]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_train.tools.config_doc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is not current; write nothing")
    args = parser.parse_args(argv)
    text = markdown()
    if args.check:
        current = PAGE.is_file() and PAGE.read_text() == text
        print(f"{PAGE}: {'current' if current else 'stale: run python -m omni_train.tools.config_doc'}",
              file=sys.stderr)
        return 0 if current else 1
    from omni_train.files import write_text_atomic

    write_text_atomic(PAGE, text)
    print(f"wrote {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
