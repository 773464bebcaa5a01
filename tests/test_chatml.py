"""ChatML layout: labels cover exactly what the assistant says (and its <|im_end|>), nothing else."""

import numpy as np
import pytest

from data_prep.chatml import IGNORE, SampleError, encode
from omni_train.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": [{"type": "text", "text": "And 4 plus 4?"}]},
    {"role": "assistant", "content": "8."},
]


def test_input_ids_equal_the_chat_template_tokenization():
    tok = load_tokenizer()
    sample = encode(CONVERSATION, tok)
    assert sample["input_ids"].tolist() == tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]


def test_the_chat_template_writes_one_placeholder_per_media_part_as_render_does():
    from data_prep.chatml import render

    messages = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "image", "image": "b.png"},
                                             {"type": "video", "video": "c.mp4"}, {"type": "text", "text": "Why?"}]},
                {"role": "assistant", "content": "Because."}]
    text = load_tokenizer().apply_chat_template(messages, tokenize=False)
    assert text == render(messages)[0]
    assert "<|audio_bos|><|AUDIO|><|audio_eos|><|vision_bos|><|IMAGE|><|vision_eos|><|vision_bos|><|VIDEO|>" in text


def test_labels_only_on_assistant_content_and_im_end():
    tok = load_tokenizer()
    sample = encode(CONVERSATION, tok)
    labelled = sample["labels"] != IGNORE
    assert np.array_equal(sample["labels"][labelled], sample["input_ids"][labelled])
    assert tok.decode(sample["input_ids"][labelled]) == "5.<|im_end|>8.<|im_end|>"


def test_text_positions_are_the_same_running_index_on_all_three_axes():
    sample = encode(CONVERSATION, load_tokenizer())
    n = len(sample["input_ids"])
    assert sample["position_ids"].shape == (3, n)
    assert (sample["position_ids"] == np.arange(n)).all()


def test_conversation_without_assistant_turn_is_rejected_with_reason():
    with pytest.raises(SampleError, match="no assistant turn"):
        encode([{"role": "user", "content": "hi"}], load_tokenizer())
