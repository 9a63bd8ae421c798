"""Benchmark of offline batch captioning against the bare CNN forward over the same images.

The baseline is only the encoder's forward pass over images decoded and resized beforehand, at the
same batch size, in the same process: what remains is the cost that reading and decoding images,
the decoder (greedy or beam search) and writing the records add on top of the CNN.

    .venv/bin/python scripts/bench_batch.py                       # resnet50 at 224 px, 256 images
    .venv/bin/python scripts/bench_batch.py --model runs/shapes/model.pt

Without --model a small model is trained first (in a temporary folder, in about a minute), with
the encoder given; its weights are random, which does not change the time a forward pass takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_service import bench_images, train_small_model  # noqa: E402 (scripts/ is on the path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model.pt to benchmark (default: train a small one first)")
    parser.add_argument("--encoder", default="resnet50", help="encoder of the model trained without --model")
    parser.add_argument("--image-size", type=int, default=224, help="its input size in pixels")
    parser.add_argument("--images", type=int, default=256, help="images captioned per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers decoding images")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per configuration; the best counts")
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
    from captioner.batch import run_batch_job

    output = folder / f"bench-{time.monotonic_ns()}.jsonl"
    started = time.perf_counter()
    run_batch_job(model, paths, options, output, batch_size=args.batch_size, num_workers=args.num_workers)
    elapsed = time.perf_counter() - started
    assert len(output.read_text().splitlines()) == len(paths)
    return len(paths) / elapsed


def main(argv=None) -> int:
    import torch

    from captioner.models.captioner import Captioner
    from captioner.options import DecodeOptions

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_path = Path(args.model) if args.model else train_small_model(folder, args.encoder, args.image_size)
        model = Captioner.load(model_path, "cuda" if torch.cuda.is_available() else "cpu")
        paths = bench_images(folder, args.images)
        batch_job(model, paths[: args.batch_size], DecodeOptions(), args, folder)  # warm-up, workers included
        results = {
            "model": str(model_path.name if args.model else f"{args.encoder} at {args.image_size} px"),
            "device": str(model.device),
            "images": len(paths),
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "torch_threads": torch.get_num_threads(),
        }
        # Interleaved, so a slow spell of the machine hits every configuration alike.
        runs = {"bare_cnn": [], "greedy": [], "beam3": []}
        for _ in range(args.repeats):
            runs["bare_cnn"].append(bare_cnn(model, paths, args.batch_size))
            runs["greedy"].append(batch_job(model, paths, DecodeOptions(), args, folder))
            runs["beam3"].append(batch_job(model, paths, DecodeOptions(mode="beam", beam_size=3), args, folder))
        best = {name: max(values) for name, values in runs.items()}
        results |= {f"{name}_images_per_s": round(value, 1) for name, value in best.items()}
        results["greedy_ratio"] = round(best["greedy"] / best["bare_cnn"], 3)
        results["beam3_ratio"] = round(best["beam3"] / best["bare_cnn"], 3)
    print(
        f"{results['model']} on {results['device']}, batch {args.batch_size}, {args.num_workers} decoding worker(s):\n"
        f"  bare CNN   {best['bare_cnn']:8.1f} img/s\n"
        f"  greedy     {best['greedy']:8.1f} img/s  ratio {results['greedy_ratio']:.2f}\n"
        f"  beam 3     {best['beam3']:8.1f} img/s  ratio {results['beam3_ratio']:.2f}"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
