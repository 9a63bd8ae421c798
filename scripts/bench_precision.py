"""Benchmark of the decoder's training steps in bfloat16 (``--precision bfloat16``) against float32.

Both run the same steps of ``training.train_one_epoch`` (length-bucketed batches, clipping, Adam)
in the same process, in turns, on a decoder of the photo model's sizes (``scripts/photos.sh``:
attention over a 7 x 7 grid of 1280 channels, hidden size 512, 128-d word vectors, a vocabulary of
2,540 words), random features and captions of Flickr8k's lengths. The weights do not change the
time a step takes.

    .venv/bin/python scripts/bench_precision.py                   # 40 batches of 64, 3 rounds
    .venv/bin/python scripts/bench_precision.py --hidden-size 256 --cells 9
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioner.evaluation import CaptionTensors  # noqa: E402
from captioner.models.decoder import DecoderConfig, AttentionDecoder  # noqa: E402
from captioner.options import TrainConfig  # noqa: E402
from captioner.training import Run, train_one_epoch  # noqa: E402

PAD, START, END = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="turns of float32 and bfloat16; the median counts")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--cells", type=int, default=49, help="cells of the grid attended over (a square)")
    parser.add_argument("--channels", type=int, default=1280, help="CNN channels per cell")
    parser.add_argument("--vocab-size", type=int, default=2540)
    parser.add_argument("--output", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if min(args.batches, args.batch_size, args.rounds, args.hidden_size, args.channels) < 1 or args.vocab_size < 4:
        parser.error("--batches, --batch-size, --rounds, --hidden-size and --channels must be 1 or more, --vocab-size 4 or more")
    if args.cells < 1 or round(args.cells**0.5) ** 2 != args.cells:
        parser.error(f"--cells must be a square number (the grid is square), not {args.cells}")
    return args


def captions(count: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, T) <start> words <end> <pad>..., 6 to 20 words as Flickr8k's captions mostly have."""
    lengths = torch.randint(6, 21, (count,), generator=generator)
    ids = torch.full((count, int(lengths.max()) + 2), PAD)
    for row, length in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, length + 1] = START, END
        ids[row, 1 : length + 1] = torch.randint(3, vocab_size, (length,), generator=generator)
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = DecoderConfig(
        feature_dim=args.channels * args.cells, vocab_size=args.vocab_size, embed_dim=128, cells=args.cells,
        hidden_size=args.hidden_size, dropout=0.5,
    )  # fmt: skip
    decoder = AttentionDecoder(config, torch.randn(args.vocab_size, 128), pad_id=PAD)
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-4)
    count = args.batches * args.batch_size
    features = torch.rand(count // 5 + 1, config.feature_dim)
    data = CaptionTensors(ids=captions(count, args.vocab_size, generator), image_index=torch.arange(count) // 5)

    def epoch(amp) -> float:
        started = time.perf_counter()
        config = TrainConfig(data="unused", out="unused", batch_size=args.batch_size, clip_norm=5.0, progress=False)
        run = Run.alone(config, optimizer, features, data, amp=amp)
        train_one_epoch(decoder, features, data, run, pad=PAD, generator=torch.Generator().manual_seed(1))
        return (time.perf_counter() - started) / args.batches

    epoch(None), epoch(torch.bfloat16)  # warm-up: oneDNN builds its kernels for each precision once
    seconds = {"float32": [], "bfloat16": []}
    for _ in range(args.rounds):
        seconds["float32"].append(epoch(None))
        seconds["bfloat16"].append(epoch(torch.bfloat16))
    median = {name: sorted(times)[len(times) // 2] for name, times in seconds.items()}
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "seconds_per_step": seconds,
        "bfloat16_speedup": median["float32"] / median["bfloat16"],
    }
    print(
        f"{args.batches} steps of {args.batch_size} captions, {torch.get_num_threads()} threads "
        f"({result['cpu_capability']}): float32 {median['float32']:.3f} s a step, bfloat16 "
        f"{median['bfloat16']:.3f} s: {result['bfloat16_speedup']:.2f}x as fast "
        f"(rounds: {' '.join(f'{a / b:.2f}' for a, b in zip(seconds['float32'], seconds['bfloat16']))})"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
