"""Record formats -> the conversation record the build reads.

Owns: the formats a source's records may come in, recognising them (`format=auto`), and converting one record into
the canonical record (`messages` in Qwen2.5-Omni's message format; every other top-level key, such as `id`,
`use_audio_in_video` or `speech`, kept as it is):
- `messages`: Qwen2.5-Omni's / OpenAI's `messages` list, passed through unchanged;
- `sharegpt`: a `conversations` list of `{"from", "value"}` turns (`human`/`user`, `gpt`/`assistant`, `system`)
  and an optional top-level `system` string;
- `alpaca`: `instruction`, optional `input` (appended to the instruction after a newline, as alpaca and
  LLaMA-Factory do), `output`, optional `system`, optional `history` (earlier [user, assistant] pairs).
In the last two, as in LLaMA-Factory, `<audio>`, `<image>` and `<video>` tags in the text refer, in order over the
whole conversation, to the top-level lists `audios`, `images`, `videos` (paths relative to the source, or bytes).
A tag becomes a media part where it stands; the text on either side is kept exactly as written (LLaMA-Factory
replaces the tag in place and touches no whitespace, so "<image>\\nWhat is it?" keeps its newline), and only empty
text pieces are dropped. A turn without tags keeps its text as a plain string.

A record that does not fit raises FormatError, whose message is the reason the build records for it.
"""

from __future__ import annotations

import re
from collections import Counter

FORMATS = ("auto", "messages", "sharegpt", "alpaca")
MEDIA_LISTS = {"audio": "audios", "image": "images", "video": "videos"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The fields the converted formats read; `messages` replaces them in the canonical record.
OWN_FIELDS = {
    "sharegpt": ("conversations", "system", *MEDIA_LISTS.values()),
    "alpaca": ("instruction", "input", "output", "system", "history", *MEDIA_LISTS.values()),
}
_TAG = re.compile(r"<(audio|image|video)>")


class FormatError(ValueError):
    """A record that does not fit its format; the message is the reason recorded for it."""


def detect(record: dict) -> str | None:
    """The format a record's keys show, or None. A key holding None counts as absent: a table's row holds None
    in the columns its record lacks."""
    def has(key):
        return record.get(key) is not None

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and has("output"):
        return "alpaca"
    return None


def media_value(value):
    """A media reference as the build reads it: a path or bytes; a `datasets` Audio/Image cell is
    {"bytes", "path"}."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def to_canonical(record: dict, fmt: str) -> dict:
    """The record in the `messages` format, converted from `fmt` (one of FORMATS but `auto`)."""
    if fmt == "messages":
        _field(record, "messages", list, fmt)
        return record
    turns = _sharegpt_turns(record) if fmt == "sharegpt" else _alpaca_turns(record)
    messages = _with_media(turns, record, fmt)
    return {**{k: v for k, v in record.items() if k not in OWN_FIELDS[fmt]}, "messages": messages}


def _field(record: dict, key: str, kind: type, fmt: str, required: bool = True):
    value = record.get(key)
    if value is None:
        if required:
            raise FormatError(f"missing '{key}' (format={fmt})")
        return None
    if not isinstance(value, kind):
        raise FormatError(f"'{key}' is not a {kind.__name__} (format={fmt})")
    return value


def _sharegpt_turns(record: dict) -> list[tuple[str, str]]:
    system = _field(record, "system", str, "sharegpt", required=False)
    turns = [("system", system)] if system else []
    for turn in _field(record, "conversations", list, "sharegpt"):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise FormatError(f"a sharegpt turn needs 'from' and 'value' strings: {turn!r}"[:200])
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise FormatError(f"sharegpt role unknown: {turn['from']!r} (expected one of {list(SHAREGPT_ROLES)})")
        turns.append((role, turn["value"]))
    return turns


def _alpaca_turns(record: dict) -> list[tuple[str, str]]:
    instruction = _field(record, "instruction", str, "alpaca")
    output = _field(record, "output", str, "alpaca")
    query = _field(record, "input", str, "alpaca", required=False)
    system = _field(record, "system", str, "alpaca", required=False)
    history = _field(record, "history", list, "alpaca", required=False) or []
    if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
               for pair in history):
        raise FormatError("alpaca 'history' must be a list of [user, assistant] string pairs")
    turns = [("system", system)] if system else []
    for user, assistant in history:
        turns += [("user", user), ("assistant", assistant)]
    # As alpaca and LLaMA-Factory: an empty instruction or input adds no newline.
    turns += [("user", "\n".join(t for t in (instruction, query) if t)), ("assistant", output)]
    return turns


def _with_media(turns: list[tuple[str, str]], record: dict, fmt: str) -> list[dict]:
    lists = {kind: _field(record, key, list, fmt, required=False) or [] for kind, key in MEDIA_LISTS.items()}
    tags = Counter(kind for _, text in turns for kind in _TAG.findall(text))
    for kind, key in MEDIA_LISTS.items():
        if tags[kind] != len(lists[kind]):
            raise FormatError(f"<{kind}> tags do not match the '{key}' list: {tags[kind]} tags, "
                              f"{len(lists[kind])} {key}")
    used = dict.fromkeys(MEDIA_LISTS, 0)
    messages = []
    for role, text in turns:
        if not _TAG.search(text):
            messages.append({"role": role, "content": text})
            continue
        content = []
        # re.split with one group alternates text and tag kind: [text, kind, text, kind, ..., text]
        for i, piece in enumerate(_TAG.split(text)):
            if i % 2:
                content.append({"type": piece, piece: media_value(lists[piece][used[piece]])})
                used[piece] += 1
            elif piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages
