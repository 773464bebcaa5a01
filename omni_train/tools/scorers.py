"""Speech scorers: how intelligible a waveform is as a rendering of a text. Shared by `omni-train pairs` (ranking
sampled speech) and by evaluation (the speech-out task of `omni-train eval` and the demo).

Owns: the recognisers (`ASRS`: `pocketsphinx`, PyPI's offline English recogniser with its models in the wheel, the
default; `thinker`, the model's own Thinker asked to transcribe; a local Whisper checkpoint directory), the word
error rate (word-level Levenshtein distance over the reference's words, case and punctuation ignored) and the
pause/duration check (the longest silence beyond `max_pause` seconds and a speaking rate outside [0.04, 0.4] s per
character each add their excess in seconds; the paper ranks by word error rate and punctuation/pause errors).
Waveforms are Token2Wav's (24 kHz) unless a rate is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omni_train.tokens import IGNORE

SAMPLE_RATE = 24_000  # Token2Wav's output


@dataclass
class Score:
    value: float  # lower is better
    details: dict


def pause_check(wave: np.ndarray, text: str, max_pause: float) -> tuple[float, dict]:
    """Penalty (seconds beyond the bounds) for the longest silence and for the speaking rate of `wave`."""
    frame = SAMPLE_RATE // 50
    frames = wave[: len(wave) // frame * frame].reshape(-1, frame) if len(wave) >= frame else wave[None]
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    silent = rms < 0.01 * max(rms.max(), 1e-12)
    longest = run = 0
    for s in silent:
        run = run + 1 if s else 0
        longest = max(longest, run)
    pause = longest / 50.0
    seconds, chars = len(wave) / SAMPLE_RATE, max(len(text), 1)
    low, high = 0.04 * chars, 0.4 * chars
    penalty = max(0.0, pause - max_pause) + max(0.0, low - seconds) + max(0.0, seconds - high)
    return penalty, {"longest_pause_s": pause, "seconds": seconds}


def normal_words(text: str) -> list[str]:
    """The words of `text`, lower-cased, punctuation taken as a word break: what WER and exact match compare."""
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word-level Levenshtein distance, reference words), over `normal_words`."""
    ref, hyp = normal_words(reference), normal_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference words (case and punctuation ignored)."""
    edits, words = word_edits(reference, hypothesis)
    return edits / max(words, 1)


class ThinkerAsr:
    """Transcripts from the model's own Thinker: the clip (resampled to 16 kHz, log-mel as in training) and the
    instruction "Transcribe the audio.", greedy decoding."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    def __call__(self, wave: np.ndarray, rate: int = SAMPLE_RATE) -> str:
        from data_prep.chatml import encode
        from data_prep.layout import Media
        from omni_train.data.features import log_mel
        from omni_train.tools.conversation import greedy_answer, thinker_inputs

        audio = _resample(wave, rate, 16_000)
        messages = [{"role": "user", "content": [{"type": "audio", "audio": "clip"},
                                                 {"type": "text", "text": "Transcribe the audio."}]},
                    {"role": "assistant", "content": "x"}]
        enc = encode(messages, self.tokenizer, [Media("audio", audio_samples=audio.size)])
        prompt = int(np.nonzero(enc["labels"] != IGNORE)[0][0])
        inputs = thinker_inputs(torch.from_numpy(enc["input_ids"][:prompt]), [log_mel(audio)])
        return greedy_answer(self.model.thinker, self.tokenizer, inputs, self.max_new_tokens)[0]


class WhisperAsr:
    """Transcripts from a local Whisper checkpoint (model and processor files in one directory)."""

    def __init__(self, path: str):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path).eval()

    def __call__(self, wave: np.ndarray, rate: int = SAMPLE_RATE) -> str:
        audio = _resample(wave, rate, 16_000)
        features = self.processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.no_grad():
            out = self.model.generate(features)
        return self.processor.batch_decode(out, skip_special_tokens=True)[0]


def _resample(wave: np.ndarray, source: int, target: int) -> np.ndarray:
    n = round(len(wave) * target / source)
    return np.interp(np.linspace(0, len(wave) - 1, n), np.arange(len(wave)), wave).astype(np.float32)


class PocketsphinxAsr:
    """Transcripts from PocketSphinx's US English models (shipped inside the `pocketsphinx` wheel): offline, fast,
    imperfect (about half the words of espeak-ng's synthetic speech), and a real recogniser."""

    def __init__(self):
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=16_000, loglevel="FATAL")

    def __call__(self, wave: np.ndarray, rate: int = SAMPLE_RATE) -> str:
        audio = _resample(np.asarray(wave, dtype=np.float32), rate, 16_000)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def make_asr(name: str, model=None, tokenizer=None):
    """`pocketsphinx`, `thinker` (needs the full model and its tokenizer) or a Whisper checkpoint directory."""
    if name == "pocketsphinx":
        return PocketsphinxAsr()
    if name == "thinker":
        return ThinkerAsr(model, tokenizer)
    return WhisperAsr(name)


def intelligibility(asr, wave: np.ndarray, text: str, max_pause: float, rate: int = SAMPLE_RATE) -> Score:
    """Word error rate of `asr`'s transcript of `wave` against `text`, plus the pause/duration penalty."""
    if rate != SAMPLE_RATE:
        wave = _resample(wave, rate, SAMPLE_RATE)
    transcript = asr(wave)
    wer = word_error_rate(text, transcript)
    penalty, details = pause_check(wave, text, max_pause)
    return Score(wer + penalty, {"wer": wer, "transcript": transcript, "pause_penalty": penalty, **details})
