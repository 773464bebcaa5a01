#!/usr/bin/env bash
# Set up a fresh machine for omni-train: a virtual environment in .venv with the package and its test tools.
# Idempotent: a second run only checks. On a CPU-only machine torch is pinned to the 2.13.0 CPU build (a bare
# `torch` would pull a multi-GB CUDA build); on a GPU machine the CUDA build of the same release is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Real speech for the sample corpus: espeak-ng (Debian/Ubuntu). Without it the corpus uses synthetic voiced audio.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null \
      || echo "omni-train: could not install espeak-ng; the sample corpus will use synthetic speech" >&2
  else
    echo "omni-train: espeak-ng not found (sudo apt-get install espeak-ng); the sample corpus will use synthetic speech" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Test oracle only: its frame-sampling and resize rules are read from source (it imports torchvision, which does
# not import beside the CPU torch), so it is installed without its dependencies.
.venv/bin/python -m pip install -q --no-deps "qwen-omni-utils==0.0.9"
echo "omni-train: environment ready in .venv"
