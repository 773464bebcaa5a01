"""Training: the one loop (loop.py), one recipe per objective (recipes/), the DeepSpeed engine (engine.py), the
process group and its timeouts (distributed.py, liveness.py), checkpoints, exports, metrics, and the `omni-train`
command (cli.py)."""
