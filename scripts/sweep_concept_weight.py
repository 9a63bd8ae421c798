"""How readily a model with concepts should say what the CNN's classifier sees: a beam decoded once
per dev photograph for each concept boost (added to the copy gate), re-ranked with each concept
weight, scored by pycocoevalcap and the F1 of mentioning the novel objects (docs/concepts.md).

    .venv/bin/python scripts/sweep_concept_weight.py runs/novel-objects/model.pt \
        --data ../shared/flickr8k/Flickr8k.token.txt --split val --boosts 0 1 --weights 0 1 2 --output sweep.json

The CNN's features are computed once, the beam once per boost; the re-ranking differs between rows.
Each split of the photographs into halves (--halves) is scored apart too, to see whether a choice
holds on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from captioner import consensus  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.decoding import beam_search  # noqa: E402
from captioner.evaluation import photo_report  # noqa: E402
from captioner.features import compute_features  # noqa: E402
from captioner.metrics import caption_metrics  # noqa: E402
from captioner.models.captioner import Captioner  # noqa: E402
from captioner.options import DecodeOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--beam-size", type=int, default=16)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--boosts", type=float, nargs="+", default=[0.0], help="concept_boost values (a beam each)")
    parser.add_argument("--halves", action="store_true", help="also score each half of the split")
    parser.add_argument("--output", help="JSON file for the table")
    args = parser.parse_args()
    model = Captioner.load(args.model)
    records = load_dataset(args.data, skip_missing=True).split(args.split)
    started = time.monotonic()
    features = torch.cat(list(compute_features(model.encoder, [r.path for r in records], device=model.device, progress=True)))
    references = {r.image_id: list(r.captions) for r in records}
    rows = []
    for boost in args.boosts:
        options = DecodeOptions(mode="beam", beam_size=args.beam_size, concept_boost=boost)
        beams = []
        for start in range(0, len(records), 64):
            beams += beam_search(model.decoder, features[start : start + 64], options, model.ids, keep=args.beam_size)
        print(f"features and beams: {time.monotonic() - started:.0f} s", file=sys.stderr)
        rows += rerank_rows(model, records, features, beams, references, args, boost)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


def rerank_rows(model, records, features, beams, references, args, boost) -> list[dict]:
    """The beams re-ranked with each concept weight, scored: one row per weight and part."""
    rows = []
    for weight in args.weights:
        consensus.CONCEPT_WEIGHT = weight
        captions = {}
        for start in range(0, len(records), 64):
            chunk = features[start : start + 64]
            grid, classes = chunk.split([model.decoder.config.grid_dim, len(model.decoder.config.concept_ids)], dim=1)
            seen = model.decoder.concepts.mass(classes.float()) if model.decoder.concepts is not None else None
            ranked = model.memory.rerank(
                grid, model.decoder.config.cells, beams[start : start + 64], model.vocab.words, model.ids.end,
                model.memory.neighbours, seen,
            )  # fmt: skip
            for record, hyps in zip(records[start : start + 64], ranked):
                captions[record.image_id] = model.vocab.decode(hyps[0].tokens)
        parts = {"all": list(captions)}
        if args.halves:
            ids = list(captions)
            parts |= {"first half": ids[: len(ids) // 2], "second half": ids[len(ids) // 2 :]}
        for part, ids in parts.items():
            chosen = {i: captions[i] for i in ids}
            scores = caption_metrics(chosen, {i: references[i] for i in ids}, tokenizer="ptb", meteor=True)
            index = [k for k, r in enumerate(records) if r.image_id in chosen]
            report = photo_report(model, features[index], chosen, {i: references[i] for i in ids})
            row = {"concept_boost": boost, "concept_weight": weight, "part": part, **{k: scores[k] for k in ("bleu_4", "meteor", "cider")}}
            row |= {k: report[k] for k in ("mention_f1_mean", "distinct_words", "distinct_captions", "concept_share") if k in report}
            row["f1"] = {word: round(m["f1"], 3) for word, m in report["mentions"].items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
