"""`omni-train report RUN_DIR [RUN_DIR ...]`: the curves of one or several runs, as PNGs and a markdown page.

Reads each run's `metrics.jsonl` (and `summary.json` when it is there) and draws, the runs one after another on one
step axis (the stages of a pipeline in order; each run's steps offset by the steps before it, a dotted line where
a run begins):
- loss.png: training loss and held-out loss (`eval/loss`, one marker per evaluation);
- lr.png, throughput.png (tokens/s), packing.png (packing efficiency);
- conditions.png: the Thinker's training loss by condition (text, audio, image, video samples);
- dpo.png: talker_dpo's reward accuracy and margin (when a run has them).
`report.md` in the output directory embeds every figure drawn and tabulates each run's summary (first and last
training loss, first and last eval loss, best eval step). Figures without data are not drawn. Arguments that are
not run directories (no metrics.jsonl: data, exports, files) are passed over, so `omni-train report outputs/demo/*`
works; the runs are put in the order they were last written (a pipeline's stage order) unless `--as-given`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from omni_train.files import write_text_atomic

PANELS = {
    # file stem: (title, y label, [(metric, label, line style)])
    "loss": ("Loss", "loss per unit", [("loss", "train", "-"), ("eval/loss", "held-out", "o--")]),
    "lr": ("Learning rate", "lr", [("lr", "lr", "-")]),
    "throughput": ("Throughput", "tokens/s", [("tokens_per_s", "tokens/s", "-")]),
    "packing": ("Packing efficiency", "real tokens / capacity", [("packing_efficiency", "packing", "-")]),
    "conditions": ("Training loss by condition", "loss per label token",
                   [(f"loss/{c}", c, "-") for c in ("text", "audio", "image", "video")]),
    "dpo": ("Talker DPO", "accuracy / margin", [("dpo/reward_accuracy", "reward accuracy", "-"),
                                                ("dpo/margin", "margin", "-")]),
}


BY_RUN = ("loss", "lr", "throughput", "packing")


def read_run(run_dir: Path) -> dict:
    """A run's records (metrics.jsonl lines, in order) and summary."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: give a run directory (run_dir of a stage)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = run_dir / "summary.json"
    return {"name": run_dir.name, "records": records,
            "summary": json.loads(summary.read_text()) if summary.is_file() else {}}


def _series(runs: list[dict], key: str) -> list[tuple[list[float], list[float], int]]:
    """Per run: (steps on the common axis, values, the run's offset) of `key`, finite values only."""
    out, offset = [], 0
    for run in runs:
        points = [(r["step"] + offset, r[key]) for r in run["records"]
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        out.append(([s for s, _ in points], [v for _, v in points], offset))
        offset += max((r["step"] for r in run["records"]), default=0)
    return out


def figures(runs: list[dict]) -> dict:
    """matplotlib Figures by file stem, for the panels that have data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    for stem, (title, ylabel, lines) in PANELS.items():
        if not any(values for key, _, _ in lines for _, values, _ in _series(runs, key)):
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        by_run = stem in BY_RUN  # one colour per run (its lines told apart by style), else one per line
        for j, (key, label, style) in enumerate(lines):
            labelled = False
            for i, (run, (steps, values, _)) in enumerate(zip(runs, _series(runs, key))):
                if not values:
                    continue
                name = f"{run['name']}: {label}" if by_run and len(runs) > 1 else None if labelled else label
                ax.plot(steps, values, style, color=f"C{i if by_run else j}", label=name, markersize=3)
                labelled = True
        for _, _, offset in _series(runs, "loss")[1:]:
            ax.axvline(offset, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step" if len(runs) == 1 else "step (runs in order)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        drawn[stem] = fig
    return drawn


def _row(run: dict) -> str:
    s, records = run["summary"], run["records"]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]

    def fmt(x):
        return "" if x is None else f"{x:.4g}"

    return (f"| {run['name']} | {s.get('objective', '')} | {s.get('steps', '')} | {fmt(s.get('first_loss'))} | "
            f"{fmt(s.get('last_loss'))} | {fmt(evals[0] if evals else None)} | {fmt(evals[-1] if evals else None)} | "
            f"{s.get('best_eval', {}).get('step', '') if s.get('best_eval') else ''} |")


def write(run_dirs: list[Path], out: Path) -> Path:
    """Draw the figures into `out` and write `out/report.md`; returns the markdown's path."""
    runs = [read_run(d) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures(runs)
    for stem, fig in drawn.items():
        tmp = out / f".{stem}.png.tmp"
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(out / f"{stem}.png")
    lines = ["# Training report", "", f"Runs, in order: {', '.join(r['name'] for r in runs)}.", "",
             "| run | objective | steps | first loss | last loss | first eval loss | last eval loss | best eval step |",
             "|---|---|---|---|---|---|---|---|", *(_row(r) for r in runs), ""]
    for stem in drawn:
        lines += [f"## {PANELS[stem][0]}", "", f"![{PANELS[stem][0]}]({stem}.png)", ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="omni-train report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (others are passed over)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: report/ beside the "
                                                                "first run)")
    parser.add_argument("--as-given", action="store_true", help="keep the runs in the order given (default: the "
                                                                 "order their metrics were last written)")
    args = parser.parse_intermixed_args(argv)
    runs = [r for r in args.runs if (r / "metrics.jsonl").is_file()]
    if not runs:
        print(f"omni-train report: error: none of {[str(r) for r in args.runs][:5]} is a run directory (with "
              "metrics.jsonl)", file=sys.stderr)
        return 2
    if not args.as_given:
        runs.sort(key=lambda r: (r / "metrics.jsonl").stat().st_mtime)
    path = write(runs, args.out or runs[0].parent / "report")
    print(f"omni-train report: {path}")
    return 0
