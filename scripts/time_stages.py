"""Where the time goes per image: each stage of offline captioning timed alone, on one thread.

The stages are those every image passes through (``captioner.batch`` runs them in this order):
reading and decoding the file (``decode_image``, as ``ImageTransform.load`` calls it), resizing it
and normalising the batch, the CNN over the batch, then the caption decoder over the features of
``DECODE_IMAGES`` images at a time, as captioning gathers them (greedy and beam 3, each with
``describe`` turning ids into text). Then all of them at once, as
``caption_paths`` runs them without decoding workers: the CNN in a thread of its own beside the
main thread, which does the rest. Each stage runs over the same images in batches, the stages
taking turns --repeats times so that a slow spell of the machine falls on all of them alike; the
median pass counts. One torch thread: the pace of one core, which is what each of captioning's
two threads has.

    .venv/bin/python scripts/time_stages.py --model runs/shapes/model.pt
    .venv/bin/python scripts/time_stages.py --images 64      # ResNet-50 at 224 px, random weights

Without --model a small model is trained first, as scripts/bench_batch.py does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_batch import add_cnn_argument, int8_model  # noqa: E402 (scripts/ is on the path)
from bench_service import add_model_arguments, bench_images, train_small_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, "time")
    parser.add_argument("--images", type=int, default=256, help="images per pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="passes per stage; the median counts")
    add_cnn_argument(parser)
    parser.add_argument("--output", help="also write the figures here as JSON")
    return parser.parse_args(argv)


def time_stages(model, paths: list[Path], args) -> dict[str, float]:
    """Median milliseconds per image of each stage, over --repeats passes taken in turn."""
    import torch

    from captioner.batch import DECODE_IMAGES, caption_paths
    from captioner.data.images import decode_image
    from captioner.options import DecodeOptions

    transform, size, step = model.transform, model.transform.config.image_size, args.batch_size
    greedy, beam = DecodeOptions(), DecodeOptions(mode="beam", beam_size=3)

    def decode(features: list[torch.Tensor], options: DecodeOptions) -> list:
        return [model.describe(model.generate(f, options)) for f in torch.cat(features).split(DECODE_IMAGES)]

    # (stage, the stage whose output it takes, what it does with that)
    stages = [
        ("read and decode the file", None, lambda _: [decode_image(p, target_size=size).image for p in paths]),
        ("resize and normalise", "read and decode the file",  # each image resized, each batch normalised
         lambda images: [transform.normalize(torch.stack([transform.resize(im) for im in images[i : i + step]]))
                         for i in range(0, len(images), step)]),
        ("CNN", "resize and normalise", lambda batches: [model.encode(batch) for batch in batches]),
        ("decoder, greedy", "CNN", lambda features: decode(features, greedy)),
        ("decoder, beam 3", "CNN", lambda features: decode(features, beam)),
        # All of them as `captioner caption` runs them on two cores: the CNN's thread beside the main thread's.
        ("all at once, greedy", None, lambda _: list(caption_paths(model, paths, greedy, batch_size=step))),
        ("all at once, beam 3", None, lambda _: list(caption_paths(model, paths, beam, batch_size=step))),
    ]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in stages}
    for _ in range(args.repeats + 1):  # the first pass warms caches and is not counted
        outputs = {}
        for name, source, run in stages:
            started = time.perf_counter()
            outputs[name] = run(outputs.get(source))
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[1:]) * 1000 / len(paths) for name, values in seconds.items()}


def main(argv=None) -> int:
    import torch

    from captioner.models.captioner import Captioner

    args = parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_path = Path(args.model) if args.model else train_small_model(folder, args.encoder, args.image_size)
        model = Captioner.load(model_path)
        paths = bench_images(folder, args.images)
        name = model_path.name if args.model else f"{args.encoder} at {args.image_size} px"
        for cnn in args.cnn:
            timed = int8_model(model, folder, args) if cnn == "int8" else model
            per_image = time_stages(timed, paths, args)
            results[cnn] = per_image
            print(f"{name}, CNN {cnn}, {len(paths)} images in batches of {args.batch_size}, 1 torch thread, "
                  f"ms per image (median of {args.repeats}):")
            for stage, ms in per_image.items():
                print(f"  {stage:28s}{ms:8.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps({"model": name, "ms_per_image": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
