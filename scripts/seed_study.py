"""Compositional captions over seeds: the demo's settings trained with several seeds under each
protocol, every model scored on the test split and the held-out split, and one table of the mean
and the minimum of each figure.

    .venv/bin/python scripts/seed_study.py [--seeds 0 1 2] [--protocols novel-captions novel-scenes]
        [--out runs/study] [--jobs 1] [--threads 2] [-- EXTRA TRAIN OPTIONS]

The data set is the demo's (green triangles and red stars held out of the captions). Runs go to
OUT/PROTOCOL-seedS[-TAG]/ (model.pt, report.json; the log beside it); a run already finished is not trained
again, and an interrupted one resumes. ``--jobs`` runs that many trainings at once, each with
``--threads`` torch threads. The table goes to standard output and OUT/study[-TAG].md, the
numbers to OUT/study[-TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOLDOUT = ("green:triangle", "red:star")
# (label, path into a report, as a percentage)
FIGURES = (
    ("test truthful", ("truthfulness",), True),
    ("test grammatical", ("grammaticality",), True),
    ("holdout truthful", ("holdout", "truthfulness"), True),
    ("held-out pair named", ("holdout", "held_out_named"), True),
    ("CNN reads held-out objects (shape and colour)", ("holdout", "cnn_reads_held_out", "both"), True),
    ("CNN reads held-out shape", ("holdout", "cnn_reads_held_out", "shape"), True),
    ("CNN reads held-out colour", ("holdout", "cnn_reads_held_out", "colour"), True),
    ("test BLEU-4", ("bleu_4",), False),
    ("test CIDEr", ("cider",), False),
    ("test perplexity", ("perplexity",), False),
)


def captioner(*args: str) -> list[str]:
    return [sys.executable, "-m", "captioner", *args]


def run_one(data: Path, out: Path, name: str, protocol: str, seed: int, extra: list[str], threads: int) -> dict:
    """Trains (or resumes) one model into OUT/NAME and scores it; returns its report."""
    run = out / name
    report_path = run / "report.json"
    if report_path.exists():
        return json.loads(report_path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    with open(out / f"{name}.log", "a") as log:
        resume = ["--resume"] if (run / "last.pt").exists() else []  # a finished run resumes to its end at once
        train = captioner(
            "train", "--data", str(data), "--out", str(run), "--protocol", protocol, "--seed", str(seed),
            "--feature-cache", str(out / "cache"), "--no-progress", *resume, *extra,
        )  # fmt: skip
        subprocess.run(train, check=True, stdout=log, stderr=log, env=env)
        evaluate = captioner("evaluate", str(run / "model.pt"), "--data", str(data), "--output", str(report_path))
        subprocess.run(evaluate, check=True, stdout=subprocess.DEVNULL, stderr=log, env=env)
    report = json.loads(report_path.read_text())
    print(f"{run.name}: {_summary(report)} ({time.monotonic() - started:.0f} s)", flush=True)
    return report


def _value(report: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def _summary(report: dict) -> str:
    parts = []
    for label, path, percent in FIGURES[:5]:
        value = _value(report, path)
        parts.append(f"{label} {'n/a' if value is None else f'{100 * value:.1f}%' if percent else f'{value:.3f}'}")
    return ", ".join(parts)


def table(reports: dict[str, list[dict]], seeds: list[int]) -> str:
    """Markdown: a row per figure, mean and minimum over seeds for each protocol."""
    head = "| figure | " + " | ".join(f"{p}: mean | {p}: min" for p in reports) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(reports))]
    for label, path, percent in FIGURES:
        cells = []
        for runs in reports.values():
            values = [v for v in (_value(r, path) for r in runs) if v is not None]
            if not values:
                cells += ["—", "—"]
                continue
            worst = max(values) if path == ("perplexity",) else min(values)
            shown = [statistics.mean(values), worst]
            cells += [f"{100 * v:.1f}%" if percent else f"{v:.3f}" for v in shown]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSeeds {', '.join(map(str, seeds))}; the minimum is the worst seed (the maximum for perplexity).\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--protocols", nargs="+", default=["novel-captions", "novel-scenes"])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--threads", type=int, help="torch threads per training (default: the CPUs shared out)")
    parser.add_argument("--tag", default="", help="names these runs apart, e.g. for other train options")
    parser.add_argument("extra", nargs="*", help="more `captioner train` options, after --")
    args = parser.parse_args()
    args.threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    subprocess.run(captioner("synth", str(data), "--holdout", *HOLDOUT), check=True, stdout=subprocess.DEVNULL)
    data = data / "dataset.json"
    jobs = [(p, s) for p in args.protocols for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            (p, s): pool.submit(run_one, data, args.out, f"{p}-seed{s}{args.tag and '-' + args.tag}", p, s, args.extra, args.threads)
            for p, s in jobs
        }
        reports = {p: [futures[(p, s)].result() for s in args.seeds] for p in args.protocols}
    text = table(reports, args.seeds)
    name = f"study{args.tag and '-' + args.tag}"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps({p: r for p, r in reports.items()}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
