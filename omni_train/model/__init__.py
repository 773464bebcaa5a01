"""The model: transformers' Qwen2.5-Omni classes built and loaded (build.py, keymap.py), the training objectives
on them (media.py shared, thinker.py, talker.py) and their kernels (kernels/: attention, head loss, activations).
Imports no training code."""
