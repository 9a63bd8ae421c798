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


def _pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed, none assumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, output: str | Path, dpi: int) -> Path:
    """Writes the figure as a 256-colour PNG (a third of the size, the same to the eye) and closes it."""
    import io

    from PIL import Image

    from captioner.io import atomic_write

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    figure.clf()
    _pyplot().close(figure)
    with Image.open(buffer) as image, atomic_write(output, "wb") as f:
        image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(f, format="PNG")
    return Path(output)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draws loss, perplexity, gradient norm and validation BLEU-4/CIDEr per epoch.

    Args:
        run_dir: a run folder of ``captioner train``.
        output: the PNG to write (default: ``RUN_DIR/curves.png``).

    Returns:
        The path of the PNG.
    """
    plt = _pyplot()
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
        if title.startswith("gradient norm"):
            _clip_rate(ax, rows)
    figure.suptitle(f"training curves: {Path(run_dir).resolve().name}")
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def _clip_rate(ax, rows: list[dict]) -> None:
    """The share of steps whose gradient was clipped, as bars on a second axis (runs that log it)."""
    points = [(r["epoch"], r["clip_rate"]) for r in rows if isinstance(r.get("clip_rate"), (int, float))]
    if not points:
        return
    share = ax.twinx()
    share.bar(*zip(*points), width=0.5, alpha=0.25, color="tab:red", label="steps clipped (right axis)")
    share.set_ylim(0, 1)
    share.set_ylabel("share of steps clipped")
    share.legend(loc="upper right")


# The inspection's figures (``captioner inspect``), drawn from the plain numbers it writes to JSON.
GATE_HEATMAPS = {"input": "viridis", "forget": "viridis", "output": "viridis", "reset": "viridis", "update": "viridis"}
COLUMNS = 8  # word panels per row


def draw_words(inspected: dict, image, output: str | Path, dpi: int = 60) -> Path:
    """The Show-Attend-Tell figure with the LSTM's insides: per word, the image with its attention
    overlaid (models with attention), the word's probability and likeliest alternatives, and the
    language layer's gates and cell state as unit-by-word heatmaps.

    Args:
        inspected: ``inspection.inspect_caption``'s record.
        image: the RGB PIL image.
        output: the PNG to write.
    """
    plt = _pyplot()
    words = inspected["words"]
    attended = words[0]["attention"] is not None
    rows = math.ceil(len(words) / COLUMNS) if attended else 0
    heights = ([1.75 * rows] if attended else []) + [2.2, 3.0]
    # Fixed margins, not a layout engine: constrained layout of 30-odd axes took most of the time.
    figure = plt.figure(figsize=(1.45 * COLUMNS, sum(heights) + 0.4))
    parts = figure.subfigures(len(heights) + 1, 1, height_ratios=[0.4, *heights])
    parts[0].text(0.5, 0.4, f'"{inspected["caption"]}"', ha="center", va="center", fontsize=11, wrap=True)
    if attended:
        _attention_panels(parts[1], words, image, rows)
    _probability_bars(parts[-2].subplots(gridspec_kw=dict(left=0.06, right=0.98, top=0.85, bottom=0.3)), words)
    _state_heatmaps(parts[-1], inspected)
    return _save(figure, output, dpi)


def _attention_panels(subfigure, words: list[dict], image, rows: int) -> None:
    """One panel per word: the image, the attention over its cells upsampled and overlaid."""
    margins = dict(left=0.01, right=0.99, top=1 - 0.6 / (1.75 * rows), bottom=0.02, wspace=0.08, hspace=0.45)
    axes = subfigure.subplots(rows, COLUMNS, squeeze=False, gridspec_kw=margins)
    width, height = image.size
    for ax, word in zip(axes.flat, words):
        ax.imshow(image)
        ax.imshow(word["attention"], cmap="gray", alpha=0.6, vmin=0, vmax=1, interpolation="bilinear",
                  extent=(0, width, height, 0))  # fmt: skip
        ax.set_title(f"{word['word']} {word['probability']:.2f}", fontsize=9)
        if word["alternatives"]:
            alternative = word["alternatives"][0]
            ax.set_xlabel(f"next: {alternative['word']} {alternative['probability']:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    subfigure.suptitle("attention over the image per word (bright: attended); word, its probability; the likeliest other word", fontsize=9)


def _probability_bars(ax, words: list[dict]) -> None:
    """Each word's probability, and the probabilities of its likeliest alternatives stacked above."""
    positions = range(len(words))
    ax.bar(positions, [w["probability"] for w in words], color="tab:blue", label="the word said")
    for rank in range(max(len(w["alternatives"]) for w in words)):
        chosen = [w["alternatives"][rank]["probability"] if rank < len(w["alternatives"]) else 0.0 for w in words]
        ax.scatter(positions, chosen, marker="_", s=80, color=f"C{rank + 1}", label=f"alternative {rank + 1}")
        for x, (p, w) in enumerate(zip(chosen, words)):
            if p >= 0.02 and rank < len(w["alternatives"]):
                ax.annotate(w["alternatives"][rank]["word"], (x, p), fontsize=6, xytext=(4, 0), textcoords="offset points")
    ax.set_xticks(list(positions), [w["word"] for w in words], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("probability")
    ax.set_title("each word's probability and its likeliest alternatives (named where above 0.02)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left", ncols=4)


def _state_heatmaps(subfigure, inspected: dict) -> None:
    """Gates (0 to 1) and the cell state (diverging around 0) of the language layer, unit by word."""
    names = [*inspected["gates"], "cell"]
    margins = dict(left=0.05, right=0.97, top=0.84, bottom=0.2, wspace=0.45)
    axes = subfigure.subplots(1, len(names), squeeze=False, gridspec_kw=margins)[0]
    labels = [w["word"] for w in inspected["words"]]
    for ax, name in zip(axes, names):
        if name == "cell":
            values = [w["cell"] for w in inspected["words"]]
            bound = max(max(abs(v) for v in row) for row in values) or 1.0
            image = ax.imshow(list(zip(*values)), aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
            title = "cell state c" if inspected["cell"] == "lstm" else "hidden state h"
        else:
            values = [w["gates"][name] for w in inspected["words"]]
            image = ax.imshow(list(zip(*values)), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            title = f"{name} gate"
        subfigure.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("unit", fontsize=8)
    subfigure.suptitle(f"the language {inspected['cell'].upper()} at each word (units x words)", fontsize=9)


def draw_cells(shown: list[dict], output: str | Path, dpi: int = 80) -> Path:
    """Karpathy et al.'s coloured text: per unit, captions with each word's background coloured by
    the unit's cell state after reading it (blue negative, red positive, scaled to its largest)."""
    plt = _pyplot()
    from matplotlib import colormaps

    cmap, width = colormaps["coolwarm"], 110  # characters per line
    height = sum(1.6 + sum(len(_wrap(c["words"], width)) for c in unit["captions"]) for unit in shown)
    inches = 0.22 * height + 0.6
    figure = plt.figure(figsize=(width * 0.075, inches))
    ax = figure.add_axes((0.01, 0.01, 0.98, 0.98 - 0.4 / inches))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    y = 0.0
    for unit in shown:
        ax.text(0, y + 0.6, f"unit {unit['unit']}: r = {unit['r']:+.2f} with {unit['property']!r}", fontsize=9, weight="bold")
        y += 1.6
        bound = max(abs(a) for c in unit["captions"] for a in c["activation"]) or 1.0
        for caption in unit["captions"]:
            for line in _wrap(list(zip(caption["words"], caption["activation"])), width):
                x = 0
                for word, value in line:
                    ax.text(x, y + 0.5, word, family="monospace", fontsize=9, va="center",
                            bbox=dict(boxstyle="square,pad=0.15", fc=cmap(0.5 + 0.5 * value / bound), ec="none"))  # fmt: skip
                    x += len(word) + 1
                y += 1
    figure.suptitle("cells that track caption properties: each word coloured by the unit's cell state after reading it", fontsize=10)
    return _save(figure, output, dpi)


def _wrap(words: list, width: int) -> list[list]:
    """Words (or (word, value) pairs) into lines of at most ``width`` characters."""
    lines, line, used = [], [], 0
    for item in words:
        size = len(item[0] if isinstance(item, tuple) else item) + 1
        if line and used + size > width:
            lines.append(line)
            line, used = [], 0
        line.append(item)
        used += size
    return lines + [line] if line else lines


def draw_saturation(saturation: dict, cell: str, output: str | Path, dpi: int = 80) -> Path | None:
    """Karpathy et al.'s scatter: per gate unit, the share of steps left- (< 0.1) against
    right-saturated (> 0.9). None for a cell without gates (a plain RNN)."""
    if not saturation:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(saturation), figsize=(3.6 * len(saturation), 3.8), layout="constrained", squeeze=False)
    for ax, (name, shares) in zip(axes[0], saturation.items()):
        ax.plot([0, 1], [1, 0], color="grey", lw=0.8, ls="--", label="always saturated")
        ax.scatter(shares["left"], shares["right"], s=12, alpha=0.7, color="tab:blue", label="one unit")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_title(f"{name} gate")
        ax.set_xlabel("share of steps left-saturated (< 0.1)")
        ax.set_ylabel("share of steps right-saturated (> 0.9)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"gate saturation of the language {cell.upper()} over reference captions")
    return _save(figure, output, dpi)


def draw_gradients(curves: dict[str, dict], history: list[dict], clip_norm: float | None, output: str | Path, dpi: int = 80) -> Path:
    """Left: the mean ||dL_t/dh_k|| against t - k, one curve per model (log scale). Right: the
    per-epoch gradient norm before clipping of training, and the share of steps clipped (when the
    run logged it). ``history`` empty: the left panel alone."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2 if history else 1, figsize=(11 if history else 6, 4), layout="constrained", squeeze=False)
    ax = axes[0][0]
    for label, curve in curves.items():
        ax.plot(curve["distance"], curve["mean_norm"], marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("distance t - k (words)")
    ax.set_ylabel("mean ||dL_t / dh_k||")
    ax.set_title("gradients through time (reference captions)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if history:
        ax = axes[0][1]
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["grad_norm"] for r in history], marker="o", markersize=3, label="mean per epoch")
        ax.plot(epochs, [r["grad_norm_max"] for r in history], marker="o", markersize=3, label="max per epoch")
        if clip_norm:
            ax.axhline(clip_norm, color="tab:red", ls="--", lw=1, label=f"clip norm {clip_norm:g}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("gradient norm before clipping")
        ax.set_title("training: gradient norm and clipping")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left")
        _clip_rate(ax, history)
        if not any("clip_rate" in r for r in history):
            ax.text(0.98, 0.02, "share clipped: not logged by this run", transform=ax.transAxes, ha="right", fontsize=7)
    return _save(figure, output, dpi)


def draw_cell_comparison(curves: dict[str, dict], histories: dict[str, list[dict]], output: str | Path, dpi: int = 80) -> Path:
    """Cells side by side (``scripts/compare_cells.py``): the mean ||dL_t/dh_k|| against t - k of
    each, and the per-epoch gradient norm before clipping of each one's training (log scales)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for label, curve in curves.items():
        left.plot(curve["distance"], curve["mean_norm"], marker="o", markersize=3, label=label)
    for label, rows in histories.items():
        right.plot([r["epoch"] for r in rows], [r["grad_norm"] for r in rows], marker="o", markersize=3, label=label.split(":")[0])
    left.set_xlabel("distance t - k (words)")
    left.set_ylabel("mean ||dL_t / dh_k||")
    left.set_title("gradients through time, test reference captions")
    right.set_xlabel("epoch")
    right.set_ylabel("mean gradient norm before clipping")
    right.set_title("training")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(figure, output, dpi)
