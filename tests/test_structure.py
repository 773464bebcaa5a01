"""The folder tree is the architecture: each layer imports only from upstream of it, and nothing imports in a
circle. Checked two ways: each package imported alone in a fresh interpreter (what it pulls in at import time),
and every import statement of the project (top-level and inside functions) as a graph."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("omni_train", "data_prep", "launch")
BASE = ("omni_train", "omni_train.errors", "omni_train.files", "omni_train.tokens", "omni_train.tokenizer",
        "omni_train.slurm")


def _loaded(*modules: str) -> set[str]:
    """Every module in sys.modules after importing `modules` in a fresh interpreter."""
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in modules) + "print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout))


def _project(loaded: set[str], prefix: str = "omni_train") -> set[str]:
    return {m for m in loaded if m == prefix or m.startswith(prefix + ".")}


def _external(loaded: set[str], *names: str) -> set[str]:
    return {m for m in loaded if any(m == n or m.startswith(n + ".") for n in names)}


@pytest.fixture(scope="module")
def data_prep_modules():
    return _loaded("data_prep.build", "data_prep.cli", "data_prep.sample", "data_prep.config")


def test_data_prep_uses_only_the_base_of_omni_train_and_no_training_stack(data_prep_modules):
    assert _project(data_prep_modules) <= set(BASE), _project(data_prep_modules) - set(BASE)
    assert not _external(data_prep_modules, "hydra", "deepspeed", "transformers.models.qwen2_5_omni")


def test_the_data_layer_imports_no_model_and_no_engine():
    loaded = _loaded("omni_train.data.loader", "omni_train.data.batch", "omni_train.data.features")
    assert not _project(loaded, "omni_train.model") and not _project(loaded, "omni_train.train")
    assert not _external(loaded, "deepspeed", "transformers.models.qwen2_5_omni")


def test_the_model_imports_no_training_code():
    loaded = _loaded(*(f"omni_train.model.{m}" for m in ("build", "keymap", "media", "thinker", "talker")),
                     *(f"omni_train.model.kernels.{m}" for m in ("attention", "head_loss", "activations")))
    assert not _project(loaded, "omni_train.train") and not _project(loaded, "omni_train.tools")


def test_the_launcher_starts_without_torch_or_the_model():
    loaded = _loaded("launch.cli")
    assert not _external(loaded, "torch", "deepspeed", "transformers")
    assert not _project(loaded, "omni_train.model") and not _project(loaded, "omni_train.train")


def test_the_config_schema_is_a_leaf():
    loaded = _loaded("omni_train.config.schema")
    assert _project(loaded) == {"omni_train", "omni_train.config", "omni_train.config.schema", "omni_train.slurm",
                                "omni_train.errors"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` imports anywhere in its source (an `from a import b` counts as a.b when
    that is a module, else as a)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_project_imports_in_a_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["omni_train.train.loop"], "the graph sees imports (the loop imports checkpoint)"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


# The layers of docs/ARCHITECTURE.md, upstream first. A module belongs to the layer of its longest listed prefix.
LAYERS = [
    ["omni_train", "omni_train.errors", "omni_train.tokens", "omni_train.files", "omni_train.dist",
     "omni_train.progress", "omni_train.slurm", "omni_train.tokenizer"],
    ["omni_train.config", "omni_train.config.schema", "omni_train.config.compose"],
    ["data_prep"],
    ["omni_train.data"],
    ["omni_train.model"],
    ["omni_train.config.validate"],
    ["omni_train.train"],
    ["launch"],
    ["omni_train.tools"],
    ["omni_train.cli"],
]


def _layer(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} is in no layer of docs/ARCHITECTURE.md"
    return found


def test_every_import_goes_upstream():
    """Each module imports only from its own layer or the layers above it; `python -m` entry shims
    (`__main__`) start the command line and are not part of a layer."""
    modules = _modules()
    wrong = [f"{name} -> {target}" for name, path in modules.items() if not name.endswith("__main__")
             for target in _imports(name, path, modules) if _layer(target) > _layer(name)]
    assert not wrong, wrong
