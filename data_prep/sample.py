"""The sample corpus: small, deterministic, built on the spot for the demo and the tests.

Owns: writing `text.jsonl` (single- and multi-turn ChatML chat in Qwen2.5-Omni's message format) under an output
directory. The tasks are learnable by a tiny model (arithmetic, word reversal, counting), so a falling loss means
the pipeline trains.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from omni_train.files import write_text_atomic

WORDS = (
    "apple river stone cloud music garden silver window yellow forest candle market "
    "bridge planet winter summer orange ticket rocket pencil"
).split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _conversation(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        turns = [("user", f"What is {a} plus {b}?"), ("assistant", f"{a} plus {b} is {a + b}.")]
    elif kind == 1:
        w = rng.choice(WORDS)
        turns = [("user", f"Spell '{w}' backwards."), ("assistant", f"'{w}' backwards is '{w[::-1]}'.")]
    elif kind == 2:
        n = rng.randrange(1, 11)
        turns = [("user", f"Write the number {n} in words."), ("assistant", f"{n} is written '{NUMBER_WORDS[n]}'.")]
    else:
        w1, w2 = rng.sample(WORDS, 2)
        turns = [
            ("system", "You are a helpful assistant."),
            ("user", f"Name a word that starts with '{w1[0]}'."),
            ("assistant", f"'{w1}' starts with '{w1[0]}'."),
            ("user", f"And one that starts with '{w2[0]}'?"),
            ("assistant", f"'{w2}' starts with '{w2[0]}'."),
        ]
    return {"messages": [{"role": r, "content": c} for r, c in turns], "use_audio_in_video": False}


def write_text_corpus(out_dir: str | os.PathLike, n: int = 256, seed: int = 0) -> Path:
    """Write `n` conversations to OUT_DIR/text.jsonl (atomically) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path = out / "text.jsonl"
    lines = (json.dumps({"id": f"text-{i:05d}", **_conversation(rng)}) + "\n" for i in range(n))
    return write_text_atomic(path, "".join(lines))
