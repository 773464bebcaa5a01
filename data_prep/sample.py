"""The sample corpus: small, realistic, deterministic, built on the spot for the demo and the tests.

Owns: `text.jsonl` (single- and multi-turn chat), `media.jsonl` (the conversations with audio, images or video:
stage 1's audio-text and image-text data) and `manifest.jsonl` (everything), in Qwen2.5-Omni's message format with
media paths relative to them and the media under `media/`:
- speech: real speech from espeak-ng where it is installed (`apt-get install espeak-ng`), otherwise a synthetic
  voiced signal (harmonics under a syllable envelope); ASR items and spoken questions;
- images: coloured shapes, with questions about shape and colour;
- videos: real MP4 files (H.264 + AAC, written with PyAV) where a shape appears at a known time together with a
  tone, so that answering "when" needs the audio and the frames aligned in time; asked with and without
  `use_audio_in_video`;
- mixtures: an image and a spoken question in one turn, and a spoken turn followed by a text turn;
- `triplets.jsonl`: Talker preference triplets (conversation with the spoken reply's text, chosen and rejected
  codec id sequences). No codec encoder was released, so the codes are synthetic: the chosen sequence follows the
  reply's characters (two codes per character, a fixed map), the rejected one is the same with a share of its codes
  replaced at random, a learnable preference.
The tasks are learnable by a tiny model, so a falling loss means the pipeline trains.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np

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


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
TONES = {"red": 330.0, "green": 440.0, "blue": 550.0, "yellow": 660.0}


def _draw(shape: str, color: str, size: tuple[int, int], center: tuple[int, int], radius: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(image)
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=COLORS[color])
    return image


def _speech(text: str, path: Path, rng: random.Random) -> Path:
    """Speak `text` into a WAV file: espeak-ng when installed, else a synthetic voiced signal."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-s", str(rng.randrange(150, 190)), "-w", str(path), text], check=True,
                       capture_output=True)
        return path
    import soundfile

    rate, f0 = 16_000, rng.uniform(100, 180)
    syllables = max(2, len(text) // 4)
    t = np.arange(int(rate * 0.18 * syllables)) / rate
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
    envelope = np.abs(np.sin(np.pi * t / 0.18)) ** 0.5
    soundfile.write(path, (0.3 * voiced * envelope / 2).astype(np.float32), rate)
    return path


def _video(path: Path, shape: str, color: str, appear_s: float, seconds: float = 4.0, fps: int = 8) -> Path:
    """An MP4 with a grey background; at `appear_s` a shape appears, moves right, and a tone starts with it."""
    import av

    width, height, rate = 320, 240, 16_000
    with av.open(str(path), "w") as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"preset": "ultrafast", "crf": "23"}
        astream = container.add_stream("aac", rate=rate)
        astream.layout = "mono"
        for i in range(int(seconds * fps)):
            t = i / fps
            if t >= appear_s:
                cx = int(40 + (width - 80) * (t - appear_s) / max(seconds - appear_s, 1e-6))
                image = _draw(shape, color, (width, height), (cx, height // 2), 30)
            else:
                from PIL import Image

                image = Image.new("RGB", (width, height), (235, 235, 235))
            frame = av.VideoFrame.from_image(image)
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        t = np.arange(int(seconds * rate)) / rate
        # A faint hum before the shape (so the track is never silent), then the colour's tone.
        wave = 0.01 * np.sin(2 * np.pi * 120 * t) + 0.3 * np.sin(2 * np.pi * TONES[color] * t) * (t >= appear_s)
        wave = wave.astype(np.float32)[None, :]
        samples = astream.codec_context.frame_size or 1024
        for start in range(0, wave.shape[1], samples):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + samples]), format="flt",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            frame.time_base = Fraction(1, rate)
            container.mux(astream.encode(frame))
        container.mux(astream.encode(None))
    return path


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_sample_corpus(out_dir: str | os.PathLike, seed: int = 0, speech: int = 48, images: int = 40,
                        videos: int = 16, texts: int = 160) -> Path:
    """Write media, `manifest.jsonl`, `media.jsonl` and `text.jsonl` under `out_dir`; returns the manifest's path."""
    out = Path(out_dir)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict] = []

    for i in range(speech):
        a, b = rng.randrange(20), rng.randrange(20)
        if i % 2 == 0:
            sentence = f"The {rng.choice(WORDS)} is near the {rng.choice(WORDS)}."
            wav = _speech(sentence, media / f"speech_{i:03d}.wav", rng)
            messages = [_user({"type": "audio", "audio": f"media/{wav.name}"},
                              {"type": "text", "text": "Transcribe the audio."}), _assistant(sentence)]
        else:
            wav = _speech(f"What is {a} plus {b}?", media / f"speech_{i:03d}.wav", rng)
            messages = [_user({"type": "audio", "audio": f"media/{wav.name}"}), _assistant(f"{a} plus {b} is {a + b}.")]
        records.append({"id": f"speech-{i:03d}", "messages": messages})

    for i in range(images):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        size = (rng.randrange(120, 400), rng.randrange(120, 400))
        image = _draw(shape, color, size, (size[0] // 2, size[1] // 2), min(size) // 3)
        image.save(media / f"image_{i:03d}.png")
        records.append({"id": f"image-{i:03d}", "messages": [
            _user({"type": "image", "image": f"media/image_{i:03d}.png"},
                  {"type": "text", "text": "What shape is shown, and what colour is it?"}),
            _assistant(f"A {color} {shape}.")]})

    for i in range(videos):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        appear = rng.choice([0.5, 1.0, 1.5, 2.0, 2.5])
        path = _video(media / f"video_{i:03d}.mp4", shape, color, appear)
        with_audio = i % 2 == 0
        question = "When does the tone start, and what appears then?" if with_audio else "What moves across the screen?"
        answer = (f"The tone starts at {appear:.1f} seconds, when a {color} {shape} appears." if with_audio
                  else f"A {color} {shape} moves to the right.")
        records.append({"id": f"video-{i:03d}", "use_audio_in_video": with_audio, "messages": [
            _user({"type": "video", "video": f"media/{path.name}"}, {"type": "text", "text": question}),
            _assistant(answer)]})

    for i in range(4):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        image = _draw(shape, color, (224, 224), (112, 112), 70)
        image.save(media / f"mixed_{i:03d}.png")
        wav = _speech("What colour is the shape?", media / f"mixed_{i:03d}.wav", rng)
        records.append({"id": f"mixed-{i:03d}", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            _user({"type": "image", "image": f"media/mixed_{i:03d}.png"},
                  {"type": "audio", "audio": f"media/{wav.name}"}),
            _assistant(f"It is {color}."),
            _user({"type": "text", "text": "And its shape?"}),
            _assistant(f"It is a {shape}.")]})

    write_triplets(out, rng, media)
    write_text_atomic(out / "media.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    text_path = write_text_corpus(out, n=texts, seed=seed)
    records.extend(json.loads(line) for line in text_path.read_text().splitlines())
    manifest = out / "manifest.jsonl"
    return write_text_atomic(manifest, "".join(json.dumps(r) + "\n" for r in records))


CODEBOOK = 8192  # codec ids 0..8191 are codes; 8292.. are the Talker's special ids


def _codes(text: str) -> list[int]:
    return [(ord(c) * 37 + k * 1009) % CODEBOOK for c in text for k in range(2)]


def write_triplets(out_dir: Path, rng: random.Random, media: Path, n: int = 48) -> Path:
    """Talker DPO triplets: {id, messages (ending with the assistant's reply, the text that is spoken), speech:
    {chosen, rejected, speaker}}; every fourth question is itself spoken (an audio clip in the prompt)."""
    lines = []
    for i in range(n):
        a, b = rng.randrange(20), rng.randrange(20)
        question, reply = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        chosen = _codes(reply)
        rejected = [rng.randrange(CODEBOOK) if rng.random() < 0.3 else c for c in chosen]
        if i % 4 == 0:
            wav = _speech(question, media / f"triplet_{i:03d}.wav", rng)
            user = _user({"type": "audio", "audio": f"media/{wav.name}"})
        else:
            user = {"role": "user", "content": question}
        lines.append(json.dumps({"id": f"triplet-{i:03d}", "messages": [user, _assistant(reply)],
                                 "speech": {"chosen": chosen, "rejected": rejected, "speaker": "Chelsie"}}))
    return write_text_atomic(out_dir / "triplets.jsonl", "".join(line + "\n" for line in lines))
