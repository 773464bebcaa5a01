"""The offline Qwen2.5 tokenizer has the real vocabulary and the Omni special tokens at their released ids."""

from omni_train.tokenizer import SPECIAL_TOKENS, load_tokenizer


def test_bpe_ids_match_qwen2_5_vocabulary():
    tok = load_tokenizer()
    assert tok("Hello").input_ids == [9707]
    assert tok("user").input_ids == [872]
    # Qwen2 splits digits one by one.
    assert tok("2024").input_ids == [tok("2").input_ids[0], tok("0").input_ids[0], tok("2").input_ids[0],
                                     tok("4").input_ids[0]]


def test_omni_special_tokens_have_released_ids():
    tok = load_tokenizer()
    for token, token_id in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
        assert tok(token, add_special_tokens=False).input_ids == [token_id], token
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645


def test_chatml_round_trip():
    tok = load_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "Grüße, 世界!"}], tokenize=True)["input_ids"]
    assert ids[:3] == [151644, 872, 198]  # <|im_start|> user \n
    assert ids[-2:] == [151645, 198]
    assert tok.decode(ids) == "<|im_start|>user\nGrüße, 世界!<|im_end|>\n"
