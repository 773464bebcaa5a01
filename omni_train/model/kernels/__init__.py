"""What a training step computes beyond transformers' modules: packed and sequence-parallel attention
(attention.py), the fused tiled LM head + cross-entropy (head_loss.py), checkpointing and tiled MLPs
(activations.py)."""
