"""Qwen2.5-Omni's special token ids and the label that the loss ignores: the one home of these numbers.

Base layer: imported by data_prep, the tokenizer, the loader and the model; imports nothing.
"""

# In id order: the BPE ranks end at 151642, so adding these in this order gives each its released id.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|vision_pad|>": 151654,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
}
PAD = SPECIAL_TOKENS["<|endoftext|>"]
IM_START = SPECIAL_TOKENS["<|im_start|>"]
IM_END = SPECIAL_TOKENS["<|im_end|>"]
AUDIO = SPECIAL_TOKENS["<|AUDIO|>"]
AUDIO_BOS = SPECIAL_TOKENS["<|audio_bos|>"]
AUDIO_EOS = SPECIAL_TOKENS["<|audio_eos|>"]
VISION_BOS = SPECIAL_TOKENS["<|vision_bos|>"]
VISION_EOS = SPECIAL_TOKENS["<|vision_eos|>"]
IMAGE = SPECIAL_TOKENS["<|IMAGE|>"]
VIDEO = SPECIAL_TOKENS["<|VIDEO|>"]
MEDIA = (AUDIO, IMAGE, VIDEO)

# One placeholder per media item in ChatML text, as Qwen2.5-Omni's chat template writes them; data_prep.layout (and
# transformers' processor) expand the middle token into the item's run.
PLACEHOLDERS = {
    "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>",
    "image": "<|vision_bos|><|IMAGE|><|vision_eos|>",
    "video": "<|vision_bos|><|VIDEO|><|vision_eos|>",
}
# The attribute names under which transformers' Qwen2_5OmniProcessor reads these tokens from its tokenizer.
NAMED_TOKENS = {"audio_token": "<|AUDIO|>", "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
                "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>"}

# The label of a position that the loss skips (torch's cross_entropy ignore_index default, transformers' too).
IGNORE = -100
