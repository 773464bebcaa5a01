"""Talking to an export: transformers' Qwen2.5-Omni processor loads an export's processor files and prepares a
conversation into the ids our data path trains on, and `omni-train chat` answers (and speaks) as evaluation does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def mixed(sample_corpus) -> dict:
    """The sample corpus's first conversation with an image and a speech clip (a system turn, two user turns),
    media paths absolute."""
    from omni_train.tools.conversation import absolute_media

    record = next(json.loads(line) for line in sample_corpus.read_text().splitlines() if '"mixed-' in line)
    return {**record, "messages": absolute_media(record["messages"], sample_corpus.parent)}


def _processor(export: Path):
    """transformers' Qwen2_5OmniProcessor of an export, its parts loaded from the export by their from_pretrained.
    Not AutoProcessor: it builds Qwen2VLVideoProcessor, which needs torchvision (not installed here), and the
    processor checks every part's class, the video processor's too, which cannot be resolved without torchvision; so
    that check is skipped for the one part this conversation does not use (video: not testable here)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer, Qwen2_5OmniProcessor

    class WithoutVideo(Qwen2_5OmniProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    return WithoutVideo(image_processor=AutoImageProcessor.from_pretrained(export), video_processor=None,
                        feature_extractor=AutoFeatureExtractor.from_pretrained(export),
                        tokenizer=AutoTokenizer.from_pretrained(export),
                        chat_template=(export / "chat_template.jinja").read_text())


def test_transformers_processor_prepares_from_an_export_the_ids_training_sees_and_the_model_generates(tiny_export,
                                                                                                      mixed):
    from PIL import Image

    from data_prep.chatml import media_parts, render
    from data_prep.media import load_audio
    from omni_train.data.features import log_mel
    from omni_train.data.batch import response_span
    from omni_train.tokenizer import load_tokenizer
    from omni_train.tools.answers import load_thinker
    from omni_train.tools.conversation import prepare_sample

    settings = json.loads((tiny_export / "preprocessor_config.json").read_text())
    assert settings["processor_class"] == "Qwen2_5OmniProcessor" and settings["feature_size"] == 128
    processor = _processor(tiny_export)
    messages = mixed["messages"]
    prompt = processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    text, spans = render(messages)
    assert prompt == text[:spans[-1][0]]  # the template writes what training renders, up to the last reply
    parts = media_parts(messages)
    audio = [load_audio(p["audio"], 300.0) for p in parts if p["type"] == "audio"]
    images = [Image.open(p["image"]).convert("RGB") for p in parts if p["type"] == "image"]
    inputs = processor(text=[prompt], audio=audio, images=images, return_tensors="pt")

    prepared = prepare_sample(mixed, Path("/"), load_tokenizer())
    start, _ = response_span(prepared.sample.labels)
    assert inputs["input_ids"][0].tolist() == prepared.sample.input_ids[:start].tolist()
    assert inputs["image_grid_thw"].tolist() == [list(g) for g in prepared.sample.grids]
    frames = int(inputs["feature_attention_mask"].sum())
    ours = log_mel(audio[0])
    assert frames == ours.shape[1]
    torch.testing.assert_close(inputs["input_features"][0, :, :frames], ours, rtol=0, atol=2e-4)

    inputs.pop("num_audio_tokens", None)
    with torch.no_grad():
        out = load_thinker(str(tiny_export)).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def _chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni_train.train", "chat", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))


@pytest.fixture(scope="module")
def expected(tiny_full_export):
    """What `omni-train eval --answers` answers in place of a last (placeholder) assistant turn, with the full
    export's Thinker."""
    from omni_train.tokenizer import load_tokenizer
    from omni_train.tools.answers import answer, load_thinker
    from omni_train.tools.conversation import prepare_sample

    thinker, tokenizer = load_thinker(str(tiny_full_export)), load_tokenizer(str(tiny_full_export))

    def answer_to(messages: list[dict]) -> str:
        prepared = prepare_sample({"messages": [*messages, {"role": "assistant", "content": "x"}]}, Path("/"),
                                  tokenizer)
        return answer(thinker, tokenizer, prepared, MAX_NEW_TOKENS)[0]
    return answer_to


def test_chat_answers_a_spoken_and_pictured_question_as_eval_does_and_speaks_it_at_24_khz(tiny_full_export, mixed,
                                                                                         expected, tmp_path):
    import soundfile

    parts = {p["type"]: p[p["type"]] for p in mixed["messages"][1]["content"]}
    wav = tmp_path / "answer.wav"
    done = _chat(str(tiny_full_export), "--prompt", "What colour is it?", "--audio", parts["audio"], "--image",
                 parts["image"], "--max-new-tokens", str(MAX_NEW_TOKENS), "--wav", str(wav), "--max-codes", "30")
    assert done.returncode == 0, done.stderr[-3000:]
    question = {"role": "user", "content": [{"type": "audio", "audio": parts["audio"]},
                                            {"type": "image", "image": parts["image"]},
                                            {"type": "text", "text": "What colour is it?"}]}
    answer = expected([question])
    assert answer.strip() and done.stdout == answer + "\n"
    info = soundfile.info(wav)
    assert info.samplerate == 24_000 and info.frames > 0 and info.channels == 1
    assert (tiny_full_export / "preprocessor_config.json").is_file()  # a full export carries the processor files too


def test_interactive_chat_answers_each_line_with_the_earlier_turns_in_context(tiny_full_export, expected,
                                                                             monkeypatch, capsys):
    from omni_train.cli import main

    # In this process (the command line itself is exercised above): stdin holds the user's lines.
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 3 plus 4?\nAnd 5 plus 5?\n\nnot read\n"))
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(tiny_full_export), "--system", "Be brief.", "--max-new-tokens", str(MAX_NEW_TOKENS)])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    system = {"role": "system", "content": "Be brief."}
    first = expected([system, {"role": "user", "content": "What is 3 plus 4?"}])
    second = expected([system, {"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "And 5 plus 5?"}])
    # Without the first turn the model answers otherwise, so equality below shows the history was read.
    assert second != expected([system, {"role": "user", "content": "And 5 plus 5?"}])
    assert out == f"{first}\n{second}\n"


def test_speech_from_a_thinker_export_and_a_missing_export_are_one_line_and_exit_2(tiny_export, tmp_path, capsys):
    from omni_train.cli import main

    for argv, says in (([str(tiny_export), "--prompt", "Hi", "--wav", str(tmp_path / "a.wav")], "is a Thinker export"),
                       ([str(tmp_path / "nowhere"), "--prompt", "Hi"], "has no config.json")):
        with pytest.raises(SystemExit) as exit_:
            main(["chat", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.wav").exists()
