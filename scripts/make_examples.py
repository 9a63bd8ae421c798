"""Writes the web page's example images: a few shapes-world scenes, small PNGs under
service/static/examples/ (committed; run again only to change them).

    .venv/bin/python scripts/make_examples.py

Each is drawn the way ``captioner synth`` draws its images (96 px, the demo's size), from a fixed
seed, and named after what it shows; one shows a green triangle, a pair the demo holds out of its
training captions.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captioner.io import atomic_write  # noqa: E402
from captioner.shapes import describe_scene, render_scene, sample_scene  # noqa: E402

OUT = ROOT / "service" / "static" / "examples"
IMAGE_SIZE = 96
COUNT = 4
HELD_OUT = frozenset({("green", "triangle")})


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for i in range(COUNT):
        rng = random.Random(100 + i)
        scene = sample_scene(rng, holdout=HELD_OUT, require_holdout=i == COUNT - 1)
        image = render_scene(scene, IMAGE_SIZE, rng)
        name = f"shapes-{i + 1}.png"
        with atomic_write(OUT / name, "wb") as f:
            image.save(f, "PNG", optimize=True)
        index.append({"file": name, "caption": describe_scene(scene, rng, n=1)[0]})
    with atomic_write(OUT / "index.json", "w") as f:
        f.write(json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(index)} examples to {OUT}")


if __name__ == "__main__":
    main()
