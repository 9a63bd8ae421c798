"""Benchmark of `captioner caption --engine ray` against the single-process command, side by side.

Both engines run the same command, ``python -m captioner caption``, over the same images, each as
a user runs it, in a fresh process that pays its own start-up (imports, the model's load; for Ray,
joining the cluster and starting its actors). The runs are interleaved (local, ray, local, ray,
...) so that a slow spell of a shared machine hits both alike, each started once the one before
has left the machine (its actor processes gone); the figure is the ratio of each
pair's throughputs, with its spread: over the whole run, and steady (from the first records
written to the last, start-up left out). Ray is started once, before the runs, as a cluster stands
before the jobs sent to it (the commands join it through RAY_ADDRESS); its start-up is reported
apart. The
first pair's records are compared image for image, and with ``--kill-actor`` one more Ray run has
a captioning actor killed by SIGKILL mid-run and is checked to hold every image exactly once.

    .venv/bin/python scripts/bench_ray.py runs/shapes/model.pt runs/shapes-data/images --repeats 5 --kill-actor

Run it without OMP_NUM_THREADS, as a user runs the command: the single process then uses a torch
thread per core, and each Ray actor as many as the CPUs it is given (--num-cpus).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
CLUSTER: list[str] = []  # the address of the Ray instance main() starts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model.pt")
    parser.add_argument("images", help="image folder (or any input of `captioner caption`)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (local, ray)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-actors", type=int, default=0, help="Ray actors (0: as many as fit)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Ray actor")
    parser.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--kill-actor", action="store_true", help="one more Ray run, an actor SIGKILLed mid-run")
    parser.add_argument("--decoding", nargs=argparse.REMAINDER, default=[], help="decoding options, e.g. --mode beam")
    parser.add_argument("--output", help="also write the figures here as JSON")
    return parser.parse_args(argv)


def timed_run(args, out: Path, engine: str) -> tuple[dict, list[dict]]:
    """Seconds the command took over the images, run as a user runs it (a fresh process), when its
    first records came (start-up: imports, model loaded, for Ray actors started and connected to
    the cluster, first batch through) and how many, and its records."""
    command = [sys.executable, "-m", "captioner", "caption", args.model, args.images]
    command += ["--batch-size", str(args.batch_size), "--output", str(out)]
    if engine == "ray":
        command += ["--engine", "ray", "--num-actors", str(args.num_actors), "--num-cpus", str(args.num_cpus)]
    out.unlink(missing_ok=True)
    settle()
    first, finished = [], threading.Event()

    def watch_for_the_first_records():
        while not first and not finished.is_set():
            if out.exists() and out.stat().st_size:
                first.append((time.perf_counter(), out.read_bytes().count(b"\n")))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_for_the_first_records)
    started = time.perf_counter()
    watcher.start()
    try:
        # The Ray command joins the cluster this script started (RAY_ADDRESS), as on a real cluster.
        if subprocess.run(command + args.decoding, env=os.environ | {"RAY_ADDRESS": CLUSTER[0]}).returncode != 0:
            raise SystemExit(f"the {engine} run failed")
    finally:
        ended = time.perf_counter()
        finished.set()
        watcher.join()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    (at, count) = first[0] if first else (ended, len(records))
    steady = (len(records) - count) / (ended - at) if ended > at else float("nan")
    return {"seconds": ended - started, "first_records_s": at - started, "steady_img_s": steady}, records


def settle(timeout: float = 20.0) -> None:
    """Waits for the last Ray run's actor processes to be gone, and a second more, so that no run
    starts while the one before is still being torn down on the same cores."""
    from captioner.batch_ray import local_actor_pids

    deadline = time.monotonic() + timeout
    while local_actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)


def compare(ray_records: list[dict], local_records: list[dict]) -> dict:
    """Image for image: the same images in the same order, the same caption texts, and how far the
    log-probabilities are apart (float rounding of other batch shapes)."""
    same_images = [r["image"] for r in ray_records] == [r["image"] for r in local_records]
    differ, worst = 0, 0.0
    for r, s in zip(ray_records, local_records):
        ours, theirs = r.get("captions", []), s.get("captions", [])
        if [c["text"] for c in ours] != [c["text"] for c in theirs] or r.get("error") != s.get("error"):
            differ += 1
        for a, b in zip(ours, theirs):
            worst = max(worst, abs(a["log_prob"] - b["log_prob"]) / max(abs(b["log_prob"]), 1e-12))
    return {"same_images_in_order": same_images, "images_with_other_captions": differ, "max_log_prob_rel_diff": worst}


def killed_run(args, out: Path, threshold: int) -> dict:
    """A Ray run with one captioning actor SIGKILLed once ``threshold`` records are written."""
    from captioner.batch_ray import local_actor_pids

    killed = []

    def kill_one():
        while not killed and not done.is_set():
            pids = local_actor_pids()
            if pids and out.exists() and out.read_bytes().count(b"\n") >= threshold:
                os.kill(min(pids), signal.SIGKILL)
                killed.append({"pid": min(pids), "records_written": out.read_bytes().count(b"\n")})
            time.sleep(0.05)

    done = threading.Event()
    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        timing, records = timed_run(args, out, "ray")
    finally:
        done.set()
        killer.join()
    images = [r["image"] for r in records]
    return {"killed": killed, "seconds": round(timing["seconds"], 1), "records": len(records), "distinct_images": len(set(images))}, records


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    CLUSTER.append(ray.get_runtime_context().gcs_address)
    results = {"ray_start_s": round(time.perf_counter() - started, 1), "cpus": os.cpu_count(), "repeats": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.repeats):
            local, local_records = timed_run(args, folder / "local.jsonl", "local")
            ray_run, ray_records = timed_run(args, folder / "ray.jsonl", "ray")
            n = len(local_records)
            pair = {
                "images": n,
                "local_img_s": round(n / local["seconds"], 1),
                "ray_img_s": round(n / ray_run["seconds"], 1),
                "ratio": round(local["seconds"] / ray_run["seconds"], 3),
                "local_first_records_s": round(local["first_records_s"], 1),
                "ray_first_records_s": round(ray_run["first_records_s"], 1),
                "local_steady_img_s": round(local["steady_img_s"], 1),
                "ray_steady_img_s": round(ray_run["steady_img_s"], 1),
                "steady_ratio": round(ray_run["steady_img_s"] / local["steady_img_s"], 3),
            }
            print(f"pair {i + 1}: {pair}", file=sys.stderr)
            results["repeats"].append(pair)
            if i == 0:
                results["comparison"] = compare(ray_records, local_records)
        if args.kill_actor:
            results["kill"], killed_records = killed_run(args, folder / "killed.jsonl", len(local_records) // 3)
            results["kill"] |= {"comparison": compare(killed_records, local_records)}
    ray.shutdown()
    for key in ("ratio", "steady_ratio"):
        ratios = [p[key] for p in results["repeats"]]
        results[f"{key}_median"], results[f"{key}_min"], results[f"{key}_max"] = statistics.median(ratios), min(ratios), max(ratios)
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
