"""Writing a shapes-world data set: rendered images and reference captions in Karpathy's split format."""

from __future__ import annotations

import json
import os
import pathlib
import random
from typing import Any, Sequence

from tqdm import tqdm

from captioner.errors import CaptionerError
from captioner.io import atomic_write
from captioner.shapes.grammar import MAX_CAPTIONS, describe_scene
from captioner.shapes.render import MIN_IMAGE_SIZE, render_scene
from captioner.shapes.world import COLOURS, GRID, SHAPES, SIZES, Scene, parse_holdout, sample_scene

_DATASET_VERSION = 1


def write_shapes_dataset(
    out_dir: str | os.PathLike[str],
    *,
    num_images: int = 4000,
    seed: int = 0,
    image_size: int = 96,
    holdout: Sequence[str] = (),
    captions_per_image: int = 5,
    progress: bool = False,
) -> pathlib.Path:
    """Writes a shapes-world data set in Karpathy's split format.

    Images go to ``out_dir/images/NNNNNN.png``; ``out_dir/dataset.json`` is written last
    and atomically, so its presence means the data set is complete. ``num_images`` are
    split 80/10/10 into train/val/test, none showing a held-out pair; with a holdout an
    extra "holdout" split of max(10%, 20) images each shows at least one held-out pair.
    The same arguments always give byte-identical files.

    Args:
        out_dir: directory to write into (created if missing).
        num_images: train + val + test images, at least 10.
        seed: seeds everything.
        image_size: image width and height in pixels.
        holdout: held-out pairs as "colour:shape" specs.
        captions_per_image: reference captions per image, 1 to 8.
        progress: show a progress bar.

    Returns:
        The path of dataset.json.

    Raises:
        CaptionerError: on bad arguments, or if ``out_dir`` already holds a data set made
            with other parameters.
    """
    if type(num_images) is not int or num_images < 10:
        raise CaptionerError(f"need at least 10 images, got {num_images}")
    if image_size < MIN_IMAGE_SIZE:
        raise CaptionerError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 1 <= captions_per_image <= MAX_CAPTIONS:
        raise CaptionerError(f"captions per image must be 1 to {MAX_CAPTIONS}, got {captions_per_image}")
    held_out = parse_holdout(holdout)
    out = pathlib.Path(out_dir)
    dataset_path = out / "dataset.json"
    params = {
        "version": _DATASET_VERSION,
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
        "holdout": [f"{c}:{s}" for c, s in sorted(held_out)],
        "captions_per_image": captions_per_image,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "grid": GRID,
    }
    if dataset_path.exists():
        _check_existing(dataset_path, params)
        return dataset_path

    n_val = n_test = num_images // 10
    splits = ["train"] * (num_images - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    if held_out:
        splits += ["holdout"] * max(num_images // 10, 20)
    (out / "images").mkdir(parents=True, exist_ok=True)
    master = random.Random(seed)
    images = []
    for imgid, split in enumerate(tqdm(splits, desc="shapes world", unit="img", disable=not progress)):
        # One generator per image: an image depends only on the seed and its index.
        rng = random.Random(master.getrandbits(64))
        scene = sample_scene(rng, holdout=held_out, require_holdout=split == "holdout")
        images.append(_write_image(out, imgid, split, scene, rng, image_size, captions_per_image))
    with atomic_write(dataset_path, "w") as f:
        f.write(json.dumps({"dataset": "shapes", "shapes_world": params, "images": images}))
    return dataset_path


def _write_image(
    out: pathlib.Path, imgid: int, split: str, scene: Scene, rng: random.Random, image_size: int, captions: int
) -> dict[str, Any]:
    """Renders ``scene`` to ``out/images/`` and returns its entry of dataset.json, captions included."""
    filename = f"{imgid:06d}.png"
    render_scene(scene, image_size, rng).save(out / "images" / filename, format="PNG")
    first_sentid = imgid * captions
    sentences = [
        {"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": first_sentid + k}
        for k, raw in enumerate(describe_scene(scene, rng, captions))
    ]
    return {
        "filepath": "images",
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": [s["sentid"] for s in sentences],
        "sentences": sentences,
        "scene": scene.to_dict(),
    }


def _check_existing(dataset_path: pathlib.Path, params: dict[str, Any]) -> None:
    try:
        existing = json.loads(dataset_path.read_text()).get("shapes_world")
    except (OSError, ValueError, AttributeError) as exc:
        raise CaptionerError(f"cannot read existing {dataset_path} ({exc}); pick another directory") from exc
    if existing != params:
        raise CaptionerError(
            f"{dataset_path.parent} already holds a shapes data set made with other parameters; "
            "pick another directory"
        )
