"""A handful of a model's captions beside a human one, good and bad: the images of a split whose
captions score best and worst by CIDEr-D, and some from the middle, as a Markdown table.

    .venv/bin/python scripts/dev_examples.py runs/flickr8k/dev-captions.json \
        --data ../shared/flickr8k/Flickr8k.token.txt --split val

The captions file is what ``captioner evaluate --save-captions`` writes (COCO results format).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycocoevalcap.cider.cider import Cider  # noqa: E402

from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.metrics import simple_tokenize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", help="the model's captions, COCO results JSON")
    parser.add_argument("--data", required=True, help="the data set with the reference captions")
    parser.add_argument("--split", default="val")
    parser.add_argument("--each", type=int, default=3, help="images from the top, the middle and the bottom")
    args = parser.parse_args()
    records = {r.image_id: r for r in load_dataset(args.data, skip_missing=True).split(args.split)}
    model = {str(c["image_id"]): c["caption"] for c in json.loads(Path(args.captions).read_text())}
    ids = [i for i in model if i in records]
    gts = {i: [simple_tokenize(c) for c in records[i].captions] for i in ids}
    res = {i: [simple_tokenize(model[i])] for i in ids}
    _, scores = Cider().compute_score(gts, res)
    ranked = sorted(zip(scores, ids), reverse=True)
    middle = len(ranked) // 2 - args.each // 2
    chosen = ranked[: args.each] + ranked[middle : middle + args.each] + ranked[-args.each :]
    print("| image | CIDEr-D | the model's caption | a human's (the first of five) |")
    print("|---|---|---|---|")
    for score, image_id in chosen:
        print(f"| {Path(records[image_id].path).name} | {score:.2f} | {model[image_id]} | {records[image_id].captions[0]} |")


if __name__ == "__main__":
    main()
