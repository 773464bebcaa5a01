"""ChatML token layout of a conversation, as Qwen2.5-Omni's processor and chat template produce it.

Owns: rendering messages (Qwen2.5-Omni's message format: string content or text/audio/image/video parts) to
ChatML text with one placeholder per media item, tokenizing it in one pass (so BPE merges across turn boundaries
are exactly the reference tokenizer's), labelling only what the assistant says (each assistant turn's text and
its closing <|im_end|>; role headers, system and user turns, media tokens and the newline after <|im_end|> carry
-100), and handing the tokens to `data_prep.layout` for placeholder expansion and TMRoPE positions.
"""

from __future__ import annotations

import numpy as np

from data_prep.layout import Media, expand
from omni_train.tokens import IGNORE, MEDIA, PLACEHOLDERS

ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A conversation that cannot become a training sample; the message is the reason recorded for it."""


def _parts(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise SampleError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", *PLACEHOLDERS):
            raise SampleError(f"content part {part!r} is not text, audio, image or video")
    return content


def media_parts(messages: list[dict]) -> list[dict]:
    """The audio, image and video parts of a conversation, in order of appearance."""
    return [p for m in messages for p in _parts(m.get("content", "")) if p["type"] != "text"]


def render(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text (one placeholder per media item, as Qwen2.5-Omni's chat template writes them) and the
    character spans (start, end) that carry labels."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise SampleError("conversation has no assistant turn: nothing to learn from")
    text, spans = [], []
    pos = 0
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise SampleError(f"unknown role {role!r}: expected one of {ROLES}")
        head = f"<|im_start|>{role}\n"
        parts = _parts(m.get("content", ""))
        body = "".join(p["text"] if p["type"] == "text" else PLACEHOLDERS[p["type"]] for p in parts) + "<|im_end|>"
        if role == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        turn = head + body + "\n"
        text.append(turn)
        pos += len(turn)
    return "".join(text), spans


def encode(messages: list[dict], tokenizer, media: list[Media] = (), use_audio_in_video: bool = False
           ) -> dict[str, np.ndarray]:
    """input_ids, labels and 3 x L TMRoPE position_ids of a conversation whose media parts (in order) have the
    sizes given by `media`. Media tokens never carry labels."""
    text, spans = render(messages)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    labels = np.full_like(ids, IGNORE)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if any(s <= start and end <= e for s, e in spans):
            labels[i] = ids[i]
    labels[np.isin(ids, MEDIA)] = IGNORE
    try:
        input_ids, positions, source = expand(ids, list(media), use_audio_in_video)
    except ValueError as e:
        raise SampleError(str(e)) from None
    return {"input_ids": input_ids, "labels": labels[source], "position_ids": positions}
