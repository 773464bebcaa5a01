"""What several benchmarks share: the sample corpus, prepared into shards on the spot unless given."""

from __future__ import annotations

from pathlib import Path


def sample_corpus(root: Path, *build_overrides: str) -> tuple[Path, Path]:
    """Write the sample corpus under `root` and build it into shards: (manifest, shard directory)."""
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_sample_corpus

    manifest = write_sample_corpus(root / "corpus")
    build(str(manifest), str(root / "shards"), from_overrides(list(build_overrides)), progress=False)
    return manifest, root / "shards"


def sample_shards(shards: Path | None, root: Path) -> Path:
    """`shards` when given, else the sample corpus built under `root`."""
    return shards if shards is not None else sample_corpus(root)[1]
