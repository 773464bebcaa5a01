"""Preparation settings: one structured schema, set from `key=value` overrides on the `omni-prep` command line.

Owns: the defaults (Qwen2.5-Omni's: 2 fps, 4..768 frames, the processor's pixel budgets, 300-s audio) and their
validation, so that a wrong key or value stops the build with one line before any file is read.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from data_prep.formats import FORMATS
from data_prep.media import VisionBudget
from omni_train.errors import ConfigError
from omni_train.slurm import SlurmConfig


@dataclass
class HFSource:
    """Column mapping for a Hugging Face `datasets` source (a `load_from_disk` directory, parquet or json)."""

    # Column holding the conversation in Qwen2.5-Omni's message format; or build one from the columns below.
    messages: str | None = None
    # Single-turn mapping: the user's text (or a fixed prompt), the assistant's text, and media columns.
    prompt: str | None = None
    # A fixed user prompt for every row (instead of a prompt column).
    prompt_text: str | None = None
    # Column holding the assistant's reply.
    response: str | None = None
    # Column holding the user's audio (a datasets Audio cell, bytes or a path).
    audio: str | None = None
    # Column holding the user's image (a datasets Image cell, bytes or a path).
    image: str | None = None
    # Column holding the sample id (null: the record's 'id' field, else its position).
    id: str | None = None
    # The split of a DatasetDict source.
    split: str = "train"

    def maps_columns(self) -> bool:
        """Whether records are built from the columns above rather than read in one of the record formats."""
        return any((self.messages, self.prompt, self.prompt_text, self.response, self.audio, self.image))


@dataclass
class PrepLauncher:
    """Running the parts of a build: `launcher=local` as processes here, `launcher=slurm` as a SLURM job array."""

    # none (one process, or the one part= names), local or slurm.
    name: str = "none"
    # Parts of the build: N parts, each its own process (local) or array task (slurm), then the merge.
    array: int = 1
    # The array's sbatch options (partition, time, cpus_per_task, ...), as omni-launch's launcher.slurm.
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class PrepConfig:
    # How a source's records are written: messages, sharegpt, alpaca, or auto (told by the first record that shows
    # one); see data_prep.formats.
    format: str = "auto"
    # Frame sampling and pixel budgets (`vision.fps=1`, `vision.video_max_pixels=...`); see data_prep.media.
    vision: VisionBudget = field(default_factory=VisionBudget)
    # An audio longer than this is rejected (Qwen2.5-Omni's limit: 300 s).
    max_audio_seconds: float = 300.0
    # A sample longer than this (after placeholder expansion) is rejected, never cut.
    max_len: int = 32768
    # A shard is closed once it holds this many bytes.
    shard_bytes: int = 512 * 1024 * 1024
    # Encoding processes (the shards' bytes do not depend on it).
    workers: int = 2
    # Stop when more than this fraction of the samples seen so far (after the first 20) is rejected.
    max_reject_fraction: float = 0.5
    # JPEG quality of the resized images and frames stored in the shards.
    jpeg_quality: int = 90
    hf: HFSource = field(default_factory=HFSource)
    # "I/N": build part I of N, the records whose index in the source is I modulo N, into OUTPUT_DIR/part-I-of-N/
    # (its own shards, index, rejects and resume); `omni-prep merge OUTPUT_DIR` joins the N parts. Empty: all.
    part: str = ""
    # How the parts are run (launcher=local or launcher=slurm with launcher.array=N; see data_prep/parts.py).
    launcher: PrepLauncher = field(default_factory=PrepLauncher)

    def parts(self) -> tuple[int, int] | None:
        """(I, N) of `part`, None for a whole build."""
        if not self.part:
            return None
        i, _, n = self.part.partition("/")
        return int(i), int(n)

    def validate(self) -> None:
        v = self.vision
        checks = [
            (self.format in FORMATS, f"format={self.format} is not one of {', '.join(FORMATS)}"),
            (self.format in ("auto", "messages") or not self.hf.maps_columns(),
             f"format={self.format} does not apply to hf.* column mappings (they build messages records)"),
            (v.fps > 0, f"vision.fps={v.fps} must be positive"),
            (2 <= v.min_frames <= v.max_frames, f"need 2 <= vision.min_frames={v.min_frames} <= vision.max_frames"),
            (0 < v.image_min_pixels <= v.image_max_pixels, "need 0 < vision.image_min_pixels <= image_max_pixels"),
            (0 < v.video_min_pixels <= v.video_max_pixels, "need 0 < vision.video_min_pixels <= video_max_pixels"),
            (self.max_audio_seconds > 0, f"max_audio_seconds={self.max_audio_seconds} must be positive"),
            (self.max_len > 0, f"max_len={self.max_len} must be positive"),
            (self.shard_bytes >= 1024, f"shard_bytes={self.shard_bytes} must be at least 1024"),
            (self.workers >= 1, f"workers={self.workers} must be at least 1"),
            (0 <= self.max_reject_fraction <= 1, "max_reject_fraction must lie in [0, 1]"),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality={self.jpeg_quality} must lie in [1, 100]"),
            (not self.part or bool(re.fullmatch(r"\d+/\d+", self.part)) and 0 <= int(self.part.split("/")[0])
             < int(self.part.split("/")[1]), f"part={self.part} must be I/N with 0 <= I < N (e.g. part=0/4)"),
            (self.launcher.name in ("none", "local", "slurm"),
             f"launcher={self.launcher.name} must be local or slurm (omni-prep runs its parts itself or as a SLURM "
             "job array)"),
            (self.launcher.array >= 1, f"launcher.array={self.launcher.array} must be at least 1"),
            (self.launcher.name == "none" or not self.part,
             "part= and launcher= exclude each other: the launcher runs every part itself"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def fingerprint(self) -> dict:
        """What determines the bytes of the shards (workers, the part and the launcher do not: the parts of one
        build share it)."""
        d = asdict(self)
        for key in ("workers", "part", "launcher"):
            d.pop(key)
        return d


def from_overrides(overrides: list[str]) -> PrepConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # `launcher=slurm` reads as the launcher's name, as it does for omni-launch's config group
    overrides = [f"launcher.name={o.split('=', 1)[1]}" if o.startswith("launcher=") else o for o in overrides]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepConfig), OmegaConf.from_dotlist(overrides))
        cfg: PrepConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    cfg.validate()
    return cfg
