"""The answer task: how well a Thinker answers conversations it did not train on, in its own greedy words.

Owns `answers_task(model_dir, manifest, ...)`. For each conversation of a JSONL manifest (Qwen2.5-Omni's message
format, media paths relative to the file; the last assistant turn is the reference), the conversation up to that
turn goes through our data path (the same tokens and media features as training,
omni_train/tools/conversation.py), transformers' Thinker `generate`s greedily (it computes its own TMRoPE
positions) up to <|im_end|> or `max_new_tokens`, and the answer is compared with the reference over normalised words
(lower case, punctuation as a break; omni_train/tools/scorers.py):
- `wer`: the corpus word error rate, all word edits over all reference words (the figure for transcripts, e.g.
  "Transcribe the audio." prompts, and for long answers);
- `exact_match`: the share of answers whose words equal the reference's (the figure for short answers);
both overall and per modality set (`by_modality`, named as index.json counts them: `audio`, `image`, `text`,
`video+video_audio`, ...), with every sample's answer, reference and scores. A record that training would set aside
(an unreadable medium, no assistant turn, too long) is set aside here with its reason, never scored.
`omni-train eval MODEL --answers MANIFEST` runs it; so does the demo on its held-out conversations. `answer` (the
greedy answer in place of a conversation's last assistant turn) is also what `omni-train chat` replies with.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_thinker(model_dir: str):
    """transformers' Thinker of an export: a Thinker export as it is, a full export's `.thinker`."""
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    if "Qwen2_5OmniForConditionalGeneration" in architectures:
        return Qwen2_5OmniForConditionalGeneration.from_pretrained(model_dir).thinker.eval()
    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_dir).eval()


def answers_task(model_dir: str, manifest: str, max_new_tokens: int = 64, limit: int = 0) -> dict:
    from data_prep.chatml import SampleError
    from omni_train.data.batch import response_span
    from omni_train.tokenizer import load_tokenizer
    from omni_train.tools.conversation import prepare_sample
    from omni_train.tools.scorers import normal_words, word_edits

    thinker = load_thinker(model_dir)
    tokenizer = load_tokenizer(model_dir)
    base = Path(manifest).resolve().parent
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    results, set_aside = [], []
    for n, record in enumerate(records[:limit] if limit else records):
        rid = record.get("id", f"sample-{n}")
        try:
            prepared = prepare_sample(record, base, tokenizer)
            start, length = response_span(prepared.sample.labels)
        except (SampleError, ValueError) as e:
            set_aside.append({"id": rid, "reason": str(e)})
            continue
        reference = tokenizer.decode(prepared.sample.input_ids[start:start + length])
        text, tokens = answer(thinker, tokenizer, prepared, max_new_tokens)
        edits, words = word_edits(reference, text)
        results.append({"id": rid, "modality": "+".join(prepared.modalities), "reference": reference,
                        "answer": text, "answer_tokens": tokens.tolist(), "word_edits": edits,
                        "reference_words": words, "exact": normal_words(text) == normal_words(reference)})
    by_modality = {}
    for modality in sorted({r["modality"] for r in results}):
        by_modality[modality] = _scores([r for r in results if r["modality"] == modality])
    return {**_scores(results), "set_aside": set_aside, "max_new_tokens": max_new_tokens,
            "by_modality": by_modality, "details": results}


def answer(thinker, tokenizer, prepared, max_new_tokens: int):
    """The Thinker's greedy answer in place of the last assistant turn of a prepared conversation
    (omni_train/tools/conversation.py): its text and its tokens (the stop token included). Raises ValueError when
    the conversation has no assistant turn."""
    from omni_train.data.batch import response_span
    from omni_train.tools.conversation import greedy_answer, sample_inputs

    start, _ = response_span(prepared.sample.labels)
    return greedy_answer(thinker, tokenizer, sample_inputs(prepared, prepared.sample.input_ids[:start]), max_new_tokens)


def _scores(results: list[dict]) -> dict:
    return {"samples": len(results),
            "wer": sum(r["word_edits"] for r in results) / max(sum(r["reference_words"] for r in results), 1),
            "exact_match": sum(r["exact"] for r in results) / max(len(results), 1)}
