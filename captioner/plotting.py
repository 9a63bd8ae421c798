"""Training curves of a run, drawn from its metrics.jsonl with matplotlib."""

from __future__ import annotations

import json
import math
from pathlib import Path

from captioner.errors import CaptionerError

# (title, [(metrics.jsonl key, legend label)], log scale) per panel.
PANELS = (
    ("loss (cross-entropy per word)", [("train_loss", "train"), ("val_loss", "validation")], False),
    ("perplexity", [("train_perplexity", "train"), ("val_perplexity", "validation")], True),
    ("gradient norm before clipping", [("grad_norm", "mean"), ("grad_norm_max", "max")], True),
    (
        "validation captions (greedy)",
        [("val_bleu_4", "BLEU-4"), ("val_cider", "CIDEr"), ("val_truthfulness", "truthful (shapes world)")],
        False,
    ),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The epochs of ``RUN_DIR/metrics.jsonl``, in order.

    Raises:
        CaptionerError: if the file is missing, empty or not one JSON object per line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CaptionerError(f"no metrics.jsonl in {run_dir}: is it a run folder of captioner train?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise CaptionerError(f"metrics.jsonl line {number} is not an epoch's JSON object")
        rows.append(row)
    if not rows:
        raise CaptionerError(f"metrics.jsonl in {run_dir} has no epochs yet")
    return rows


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draws loss, perplexity, gradient norm and validation BLEU-4/CIDEr per epoch.

    Args:
        run_dir: a run folder of ``captioner train``.
        output: the PNG to write (default: ``RUN_DIR/curves.png``).

    Returns:
        The path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none assumed
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "curves.png"
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    for ax, (title, series, log_scale) in zip(axes.flat, PANELS):
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    figure.suptitle(f"training curves: {Path(run_dir).resolve().name}")
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
