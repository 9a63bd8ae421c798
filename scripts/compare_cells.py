"""LSTM, GRU and a plain tanh RNN as the decoder's cell, trained alike on the shapes world: how far
back gradients reach (||dL_t/dh_k|| against t - k), and what each makes of the test split.

    .venv/bin/python scripts/compare_cells.py [--cells lstm gru rnn] [--out runs/cells] [--data DATASET]
        [--encoder-pretrained FILE] [--threads 2] [-- EXTRA TRAIN OPTIONS]

The data set is the demo's (made in OUT/data unless --data names one), the settings the demo's
(``captioner train`` defaults) unless EXTRA TRAIN OPTIONS change them, so every cell has the same
budget. The CNN is pretrained once: the first run pretrains it (or --encoder-pretrained gives one,
such as the demo's runs/shapes/encoder-pretrained.pt) and the others start from a copy, so they
share its cached features too. Runs go to OUT/CELL/ (model.pt, report.json; the log beside it);
a finished run is not trained again, an interrupted one resumes. The table goes to standard
output and OUT/cells.md, the numbers to OUT/cells.json, the figure to OUT/cells.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner.data.datasets import load_dataset
from captioner.inspection import gradients_through_time, reference_captions
from captioner.models.captioner import Captioner
from captioner.plotting import draw_cell_comparison, read_metrics

HOLDOUT = ("green:triangle", "red:star")
GRADIENT_CAPTIONS = 64


def captioner(*args: str) -> list[str]:
    return [sys.executable, "-m", "captioner", *args]


def run_one(data: Path, out: Path, cell: str, encoder: Path | None, extra: list[str], threads: int) -> dict:
    """Trains (or resumes) one cell into OUT/CELL and scores it on the test split; returns its report."""
    run = out / cell
    report_path = run / "report.json"
    if report_path.exists():
        return json.loads(report_path.read_text())
    run.mkdir(parents=True, exist_ok=True)
    if encoder and not (run / "encoder-pretrained.pt").exists():
        shutil.copy(encoder, run / "encoder-pretrained.pt")  # the same CNN: pretrained once, features cached once
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    with open(out / f"{cell}.log", "a") as log:
        resume = ["--resume"] if (run / "last.pt").exists() else []
        train = captioner("train", "--data", str(data), "--out", str(run), "--cell", cell, "--no-progress", *resume, *extra)
        subprocess.run(train, check=True, stdout=log, stderr=log, env=env)
        evaluate = captioner("evaluate", str(run / "model.pt"), "--data", str(data), "--split", "test", "--output", str(report_path))
        subprocess.run(evaluate, check=True, stdout=subprocess.DEVNULL, stderr=log, env=env)
    print(f"{cell}: trained and scored in {time.monotonic() - started:.0f} s", flush=True)
    return json.loads(report_path.read_text())


def gradient_curve(model_path: Path, data: Path) -> dict:
    """||dL_t/dh_k|| against t - k over the first reference caption of the first test images."""
    model = Captioner.load(model_path)
    features, ids, image_index = reference_captions(model, load_dataset(data), "test", GRADIENT_CAPTIONS)
    ids = ids[:, : int((ids != model.vocab.pad).sum(1).max())]
    return gradients_through_time(model, features[image_index], ids)


def table(results: dict[str, dict]) -> str:
    lines = ["| cell | test truthful | test perplexity | test CIDEr | ‖∂L_t/∂h_k‖ at t-k = 0 / 5 / 10 / 15 | clipped steps (last epoch) |",
             "|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for cell, r in results.items():
        norms = dict(zip(r["gradients"]["distance"], r["gradients"]["mean_norm"]))
        reach = " / ".join(f"{norms[d]:.1e}" if d in norms else "—" for d in (0, 5, 10, 15))
        lines.append(f"| {cell} | {100 * r['truthfulness']:.1f}% | {r['perplexity']:.3f} | {r['cider']:.2f} | {reach} | "
                     f"{100 * r['history'][-1].get('clip_rate', float('nan')):.0f}% |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    parser.add_argument("--out", type=Path, default=Path("runs/cells"))
    parser.add_argument("--data", type=Path, help="dataset.json (default: the demo's shapes world, made in OUT/data)")
    parser.add_argument("--encoder-pretrained", type=Path, help="a pretrained shapes-world CNN to share (encoder-pretrained.pt)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads per training")
    parser.add_argument("extra", nargs="*", help="more `captioner train` options, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        subprocess.run(captioner("synth", str(args.out / "data"), "--holdout", *HOLDOUT), check=True, stdout=subprocess.DEVNULL)
        data = args.out / "data" / "dataset.json"
    results, encoder = {}, args.encoder_pretrained
    for cell in args.cells:
        report = run_one(data, args.out, cell, encoder, args.extra, args.threads)
        encoder = encoder or args.out / cell / "encoder-pretrained.pt"
        torch.set_num_threads(args.threads)
        history = read_metrics(args.out / cell)
        results[cell] = {**report, "gradients": gradient_curve(args.out / cell / "model.pt", data), "history": history}
    curves = {f"{c}: truthful {100 * r['truthfulness']:.1f}%, perplexity {r['perplexity']:.3f}": r["gradients"] for c, r in results.items()}
    draw_cell_comparison(curves, {label: r["history"] for label, r in zip(curves, results.values())}, args.out / "cells.png")
    text = table(results)
    (args.out / "cells.md").write_text(text)
    (args.out / "cells.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
