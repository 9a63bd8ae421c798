"""torch threads per process: the default rule (captioner.runtime.torch_threads), one thread, and
the old default (every CPU of the machine), with and without a competing CPU load, in one run so
the ratios compare like with like.

    python scripts/bench_threads.py runs/shapes/model.pt --requests 40 --load 1

Each "request" is what the service does per image at batch size 1: encode one image and decode a
greedy caption. ``--load N`` starts N processes that spin on the CPU meanwhile (another program on
the same machine). Prints one line per (load, threads) with the median and 90th percentile.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch
from PIL import Image

from captioner.models.captioner import Captioner
from captioner.options import DecodeOptions
from captioner.runtime import torch_threads, usable_cpus


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def timings(model: Captioner, threads: int, requests: int) -> list[float]:
    torch.set_num_threads(threads)
    image = Image.new("RGB", (96, 96), (200, 40, 40))
    seconds = []
    for i in range(requests + 3):
        started = time.perf_counter()
        with torch.inference_mode():
            features = model.encode(torch.stack([model.transform(image)]))  # (1, F)
            model.generate(features, DecodeOptions(max_length=12), [None])
        if i >= 3:  # the first calls warm caches and the thread pool
            seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 1], help="competing spinning processes")
    args = parser.parse_args()
    model = Captioner.load(args.model, torch.device("cpu"))
    rule, machine = torch_threads(1), os.cpu_count() or 1
    print(f"usable CPUs {usable_cpus():g} of {machine}; rule: {rule} thread(s) for one worker (old default: {machine})")
    for load in args.load:
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(load)]
        for process in spinners:
            process.start()
        try:
            results = {threads: timings(model, threads, args.requests) for threads in sorted({rule, 1, machine})}
        finally:
            stop.set()
            for process in spinners:
                process.join()
        one = statistics.median(results[1])
        for threads, seconds in results.items():
            median, p90 = statistics.median(seconds), statistics.quantiles(seconds, n=10)[-1]
            print(
                f"load {load}: {threads:>2} thread(s) median {median * 1000:7.1f} ms, p90 {p90 * 1000:7.1f} ms, "
                f"{median / one:.2f}x one thread"
            )


if __name__ == "__main__":
    main()
