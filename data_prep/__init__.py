"""Data preparation: conversations (JSONL manifests, Hugging Face datasets) -> model-ready token layouts."""
