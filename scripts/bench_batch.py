"""Benchmark of offline batch captioning against the bare CNN forward over the same images.

The baseline is only the encoder's forward pass over images decoded and resized beforehand, at the
same batch size, in the same process: what remains is the cost that reading and decoding images,
the decoder (greedy or beam search) and writing the records add on top of the CNN.

    .venv/bin/python scripts/bench_batch.py                       # resnet50 at 224 px, 256 images
    .venv/bin/python scripts/bench_batch.py --model runs/shapes/model.pt
    .venv/bin/python scripts/bench_batch.py --cnn eager int8      # the int8 CNN against fp32, side by side

Without --model a small model is trained first (in a temporary folder, in about a minute), with
the encoder given; its weights are random, which does not change the time a forward pass takes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_service import add_model_arguments, bench_images, train_small_model  # noqa: E402 (scripts/ is on the path)


def add_cnn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cnn", nargs="+", default=["eager"], choices=["eager", "int8"],
        help="CNN arithmetic(s) to measure; int8 is calibrated on other images first if the model has no calibration",
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, "benchmark")
    parser.add_argument("--images", type=int, default=256, help="images captioned per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers", type=int, help="DataLoader workers decoding images (default: as captioner caption picks)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="measurements per configuration; the best counts")
    add_cnn_argument(parser)
    parser.add_argument("--output", help="also write the figures here as JSON")
    return parser.parse_args(argv)


def bare_cnn(model, paths: list[Path], batch_size: int) -> float:
    """Images per second of the encoder alone, over tensors prepared in advance."""
    import torch

    from captioner.data.images import decode_image

    batches = [model.images_to_batch([decode_image(p).image for p in paths[i : i + batch_size]]) for i in range(0, len(paths), batch_size)]
    model.encode(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        model.encode(batch)
    if batch.device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - started)


def batch_job(model, paths: list[Path], options, args, folder: Path) -> float:
    """Images per second of run_batch_job: read, decode, encode, decode captions, write JSONL."""
    import torch

    from captioner.batch import run_batch_job

    output = folder / f"bench-{time.monotonic_ns()}.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.caption_threads)  # as captioner caption sets them beside its decoding workers
    try:
        started = time.perf_counter()
        run_batch_job(model, paths, options, output, batch_size=args.batch_size, num_workers=args.num_workers)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    assert len(output.read_text().splitlines()) == len(paths)
    return len(paths) / elapsed


def int8_model(model, folder: Path, args):
    """The same model with its CNN in int8 (switched on, in eval mode), calibrated on images other
    than the measured ones if need be."""
    import copy

    from captioner.features import image_batches

    quantized = copy.deepcopy(model)
    if not quantized.encoder.int8_calibration:
        others = bench_images(folder / "calibration", 2 * args.batch_size, seed=3)
        quantized.encoder.calibrate(image_batches(others, quantized.transform, args.batch_size))
    quantized.eval().encoder.use_int8()
    return quantized


def measure(model, paths: list[Path], args, folder: Path) -> dict[str, float]:
    """Images per second of the bare CNN, greedy and beam 3 captioning, each the best of --repeats,
    interleaved so that a slow spell of the machine hits every configuration alike."""
    from captioner.options import DecodeOptions

    runs = {"bare_cnn": [], "greedy": [], "beam3": []}
    for _ in range(args.repeats):
        runs["bare_cnn"].append(bare_cnn(model, paths, args.batch_size))
        runs["greedy"].append(batch_job(model, paths, DecodeOptions(), args, folder))
        runs["beam3"].append(batch_job(model, paths, DecodeOptions(mode="beam", beam_size=3), args, folder))
    return {name: max(values) for name, values in runs.items()}


def main(argv=None) -> int:
    import torch

    from captioner.evaluation import int8_agreement
    from captioner.models.captioner import Captioner
    from captioner.options import DecodeOptions
    from captioner.runtime import decoding_workers, torch_threads

    args = parse_args(argv)
    # Captioning runs as the command does: its decoding workers, and a CPU left to each of them;
    # the bare CNN has the whole machine, torch's default.
    args.num_workers = decoding_workers() if args.num_workers is None else args.num_workers
    explicit = bool(os.environ.get("OMP_NUM_THREADS"))
    args.caption_threads = torch.get_num_threads() if explicit else torch_threads(reserved=1 + args.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_path = Path(args.model) if args.model else train_small_model(folder, args.encoder, args.image_size)
        model = Captioner.load(model_path, "cuda" if torch.cuda.is_available() and "int8" not in args.cnn else "cpu")
        paths = bench_images(folder, args.images)
        models = {"eager": model}
        if "int8" in args.cnn:
            models["int8"] = int8_model(model, folder, args)
        batch_job(model, paths[: args.batch_size], DecodeOptions(), args, folder)  # warm-up, workers included
        results = {
            "model": str(model_path.name if args.model else f"{args.encoder} at {args.image_size} px"),
            "device": str(model.device),
            "images": len(paths),
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "torch_threads_bare_cnn": torch.get_num_threads(),
            "torch_threads_captioning": args.caption_threads,
        }
        for cnn in args.cnn:
            best = measure(models[cnn], paths, args, folder)
            prefix = "" if cnn == "eager" else f"{cnn}_"
            results |= {f"{prefix}{name}_images_per_s": round(value, 1) for name, value in best.items()}
            results[f"{prefix}greedy_ratio"] = round(best["greedy"] / best["bare_cnn"], 3)
            results[f"{prefix}beam3_ratio"] = round(best["beam3"] / best["bare_cnn"], 3)
            print(
                f"{results['model']} on {results['device']}, CNN {cnn}, batch {args.batch_size}, "
                f"{args.num_workers} decoding worker(s), torch threads {torch.get_num_threads()} (bare CNN) and "
                f"{args.caption_threads} (captioning):\n"
                f"  bare CNN   {best['bare_cnn']:8.1f} img/s\n"
                f"  greedy     {best['greedy']:8.1f} img/s  ratio {best['greedy'] / best['bare_cnn']:.2f}\n"
                f"  beam 3     {best['beam3']:8.1f} img/s  ratio {best['beam3'] / best['bare_cnn']:.2f}"
            )
        if {"eager", "int8"} <= set(args.cnn):
            results["int8_speedup_greedy"] = round(results["int8_greedy_images_per_s"] / results["greedy_images_per_s"], 3)
            results["int8_speedup_bare_cnn"] = round(results["int8_bare_cnn_images_per_s"] / results["bare_cnn_images_per_s"], 3)
            models["int8"].encoder.use_int8(False)
            agreement = int8_agreement(models["int8"], paths, batch_size=args.batch_size)
            results |= {f"int8_{key}": round(value, 4) for key, value in agreement.items()}
            print(
                f"int8 against fp32: greedy captioning {results['int8_speedup_greedy']:.2f}x, bare CNN "
                f"{results['int8_speedup_bare_cnn']:.2f}x; feature cosine {agreement['mean_cosine']:.4f} "
                f"(lowest {agreement['min_cosine']:.4f}); same greedy caption on {agreement['same_caption']:.1%}"
            )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
