"""Every user-facing command answers --help (and -h) with its own usage, exit 0, and no side effect: nothing is
written, deleted or started (omni-demo's --help once deleted outputs/demo and ran the pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

COMMANDS = {  # the entry point (pyproject's [project.scripts] and the documented modules) -> argv before --help
    "omni-train": ("omni_train.cli", []), "omni-train train": ("omni_train.cli", ["train"]),
    "omni-train plan": ("omni_train.cli", ["plan"]), "omni-train pairs": ("omni_train.cli", ["pairs"]),
    "omni-train eval": ("omni_train.cli", ["eval"]), "omni-train report": ("omni_train.cli", ["report"]),
    "omni-train chat": ("omni_train.cli", ["chat"]), "omni-launch": ("launch.cli", []),
    "omni-demo": ("omni_train.tools.demo", []), "omni-prep": ("data_prep.cli", []),
    "omni-prep build": ("data_prep.cli", ["build"]), "omni-prep merge": ("data_prep.cli", ["merge"]),
    "omni-prep sample": ("data_prep.cli", ["sample"]), "config_doc": ("omni_train.tools.config_doc", []),
}

# One interpreter runs every command's main() in turn (a process start each would cost seconds), in an empty
# directory with an outputs/demo inside, and reports each exit code and output, then what the directory holds.
PROBE = r"""
import contextlib, importlib, io, json, os, sys
os.makedirs("outputs/demo", exist_ok=True)
open("outputs/demo/keep", "w").close()
report = {}
for name, (module, argv) in json.loads(sys.argv[1]).items():
    for flag in ("--help", "-h"):
        out = io.StringIO()
        sys.argv = [name.split()[0], *argv, flag]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                main = importlib.import_module(module).main
                main() if module != "omni_train.cli" and module != "data_prep.cli" else main([*argv, flag])
            except SystemExit as e:
                code = e.code or 0
        report[f"{name} {flag}"] = [code, out.getvalue()]
report["files"] = sorted(os.path.join(d, f) for d, _, fs in os.walk(".") for f in fs)
print(json.dumps(report))
"""


def test_every_command_answers_help_with_its_usage_and_touches_nothing(tmp_path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(COMMANDS)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("files") == ["./outputs/demo/keep"]
    for command, (code, text) in report.items():
        assert code == 0, (command, text[-2000:])
        assert "usage" in text.lower() or "== Configuration groups ==" in text, (command, text[:500])
        assert "Traceback" not in text, (command, text[-2000:])
    train = report["omni-train train --help"][1]  # Hydra's help: the header, the groups and the config
    assert train.startswith("omni-train [train] OVERRIDES") and "== Configuration groups ==" in train, train[:500]
    for sub in ("plan", "pairs", "eval", "report", "chat"):
        assert f"omni-train {sub}" in report[f"omni-train {sub} --help"][1], sub
