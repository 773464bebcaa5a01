"""ChatML token layout of a conversation, as Qwen2.5-Omni's processor and chat template produce it.

Owns: rendering messages (Qwen2.5-Omni's message format) to ChatML text, tokenizing it in one pass (so BPE
merges across turn boundaries are exactly the reference tokenizer's), and labelling only what the assistant
says: each assistant turn's content and its closing <|im_end|>. Role headers, system and user turns, and the
newline after <|im_end|> carry the ignore label -100.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A conversation that cannot become a training sample; the message is the reason recorded for it."""


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise SampleError(f"content part of type {part.get('type')!r} is not supported by the text encoder")
        parts.append(part["text"])
    return "".join(parts)


def render(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the character spans (start, end) that carry labels."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise SampleError("conversation has no assistant turn: nothing to learn from")
    text, spans = [], []
    pos = 0
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise SampleError(f"unknown role {role!r}: expected one of {ROLES}")
        head = f"<|im_start|>{role}\n"
        body = _content_text(m.get("content", "")) + "<|im_end|>"
        if role == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        turn = head + body + "\n"
        text.append(turn)
        pos += len(turn)
    return "".join(text), spans


def encode(messages: list[dict], tokenizer) -> dict[str, np.ndarray]:
    """input_ids, labels (assistant content only) and 3 x L position ids of a text conversation."""
    text, spans = render(messages)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    labels = np.full_like(ids, IGNORE)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if any(s <= start and end <= e for s, e in spans):
            labels[i] = ids[i]
    # Text-only inputs take TMRoPE's 1-D path: the same running index on the t, h and w axes.
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids))).copy()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
