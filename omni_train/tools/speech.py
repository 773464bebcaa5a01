"""The speech-out task: how intelligibly a full model speaks given replies.

Owns `speech_task(model_dir, manifest, ...)`: for each conversation of a JSONL manifest (Qwen2.5-Omni's message
format, the last turn the assistant reply to speak), the Thinker reads the conversation through our data path, the
Talker samples one codec sequence in the training layout (omni_train/tools/pairs.py's sampler, seeded), Token2Wav
renders it, a recogniser (omni_train/tools/scorers.py, pocketsphinx by default) transcribes it, and the word error
rate against the reply text and the pause/duration penalty are recorded. The result: mean WER, mean pause penalty,
mean seconds, every sample's transcript, and the records set aside (with the reason training would give). `omni-train eval MODEL --speech MANIFEST` and the demo run it.
`speak` (one reply, spoken) is also what `omni-train chat --wav` speaks with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def speak(model, objective, speaker: str, sample, tokenizer, max_codes: int) -> tuple[str, np.ndarray]:
    """The last assistant turn of a prepared sample spoken by `speaker`: its text and Token2Wav's 24 kHz waveform of
    one codec sequence the Talker samples (omni_train/tools/pairs.py's sampler; empty when it stops at once)."""
    from omni_train.tools.pairs import render, sample_codes, spoken_reply

    voice = model.speaker_map[speaker]
    _, text, prompt, pad_embed = spoken_reply(objective, sample, int(voice["bos_token"]), tokenizer)
    with torch.no_grad():
        (codes,), _ = sample_codes(model.talker, prompt, pad_embed, 1, max_codes, 40, 0.8, 0.9, objective.ids)
    return text, render(model, codes, voice) if len(codes) else np.zeros(0, np.float32)


def speech_task(model_dir: str, manifest: str, asr: str = "pocketsphinx", speaker: str | None = None,
                max_codes: int = 600, max_pause: float = 0.6, seed: int = 0, limit: int = 0) -> dict:
    from data_prep.chatml import SampleError
    from omni_train.tokenizer import load_tokenizer
    from omni_train.tools.conversation import prepare_sample
    from omni_train.tools.pairs import load_speaker
    from omni_train.tools.scorers import SAMPLE_RATE, intelligibility, make_asr

    torch.manual_seed(seed)
    model, objective, speaker = load_speaker(model_dir, speaker)
    tokenizer = load_tokenizer(model_dir)
    recogniser = make_asr(asr, model, tokenizer)
    base = Path(manifest).resolve().parent
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    results, set_aside = [], []
    for n, record in enumerate(records[:limit] if limit else records):
        try:
            sample = prepare_sample(record, base, tokenizer).sample
        except (SampleError, ValueError) as e:
            set_aside.append({"id": record.get("id", f"sample-{n}"), "reason": str(e)})
            continue
        text, wave = speak(model, objective, speaker, sample, tokenizer, max_codes)
        if wave.size == 0:
            results.append({"id": record.get("id", f"sample-{n}"), "text": text, "wer": 1.0,
                            "pause_penalty": 0.0, "seconds": 0.0, "transcript": ""})
            continue
        score = intelligibility(recogniser, wave, text, max_pause, rate=SAMPLE_RATE)
        results.append({"id": record.get("id", f"sample-{n}"), "text": text, **score.details})
    count = max(len(results), 1)
    return {"asr": asr, "samples": len(results), "set_aside": set_aside,
            "wer": sum(r["wer"] for r in results) / count,
            "pause_penalty": sum(r["pause_penalty"] for r in results) / count,
            "seconds": sum(r["seconds"] for r in results) / count,
            "details": results}
