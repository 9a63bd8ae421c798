"""How far the caption score can be trusted, measured on the dev split (docs/trust.md).

Reads a model calibrated by ``captioner calibrate-trust`` and the JSON report that command wrote
(``--report``: the AUC of each signal and of the score, the Kendall tau of each signal and of the
confidence with generated captions' CIDEr-D, on the held-out half of the dev split), and:

1. draws the reliability figure from the report into a PNG (no photograph in it): the score's
   predicted bins against the observed share of own references among the held-out dev pairs, and
   the confidence's against the observed parity of the held-out generated captions;
2. scores pictures that are no photograph (noise, blank images, a page of text, shapes-world
   scenes), and captions them: their familiarity, whether they are flagged, the score of a caption
   given to each and the confidence of the model's own;
3. times what the confidence adds to captioning: the CNN, decoding and ``describe`` with and without
   it, one image at a time as the service sees them and in batches as ``captioner caption`` does;
4. with ``--contrasts``, compares blind images for the contrast signal on the held-out half's pairs:
   the AUC of own references against others' of the contrast under each.

    captioner calibrate-trust runs/flickr8k-concepts/model.pt --data ../shared/flickr8k/Flickr8k.token.txt \\
        --skip-missing --report /tmp/trust-report.json
    OMP_NUM_THREADS=1 python scripts/trust_study.py runs/flickr8k-concepts/model.pt \\
        --data ../shared/flickr8k/Flickr8k.token.txt --report /tmp/trust-report.json \\
        --figure docs/trust-reliability.png --output /tmp/trust-study.json

Uses the dev split only (``val``); never test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from captioner.data.datasets import load_dataset
from captioner.features import cached_features, default_cache_dir
from captioner.models.captioner import Captioner
from captioner.options import DecodeOptions
from captioner.trust import Head, auc, blind_features, caption_tokens, dev_pairs, token_log_probs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model calibrated by captioner calibrate-trust")
    parser.add_argument("--data", required=True, help="the data set (Flickr8k's token file)")
    parser.add_argument("--images", default=None, help="image folder (default: beside the data set)")
    parser.add_argument("--split", default="val", help="the dev split (never test)")
    parser.add_argument("--report", required=True, help="the JSON report captioner calibrate-trust --report wrote")
    parser.add_argument("--figure", default=None, help="the reliability figure (PNG) to write")
    parser.add_argument("--output", default=None, help="write every number here as JSON")
    parser.add_argument("--contrasts", action="store_true", help="compare blind images for the contrast (minutes)")
    parser.add_argument("--feature-cache", default=None, help="feature cache for --contrasts (default: captioner's)")
    parser.add_argument("--seed", type=int, default=0, help="calibrate-trust's seed (its pairs and halves)")
    parser.add_argument("--name", default=None, help="the model's name in the figure (default: its run folder's)")
    parser.add_argument("--timing", type=int, default=64, help="dev photographs to time captioning on (0: none)")
    parser.add_argument("--beam-size", type=int, default=16, help="beam search's width (scripts/photos.sh: 16)")
    args = parser.parse_args(argv)
    if args.split == "test":
        parser.error("the test split is held back: use the dev split")
    return args


MIN_BIN = 10  # a reliability bin with fewer pairs is counted below but not drawn: its share is noise


def reliability_figure(report: dict, path: Path, model_name: str) -> None:
    """Predicted against observed, per bin of width 0.1, for the score and the confidence, with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("score", "score of a given caption", "observed share of own references", "pairs",
         f"own vs other references: {report['score']['held_out']['pairs']} pairs, "
         f"AUC {report['score']['held_out']['auc']['score']:.3f}"),
        ("confidence", "confidence of a generated caption", "observed parity with people's captions", "captions",
         f"generated captions: {report['confidence']['held_out']['captions']}, "
         f"Kendall tau with CIDEr-D {report['confidence']['held_out']['kendall_tau_with_cider']['confidence']:.3f}"),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for column, (key, xlabel, ylabel, unit, title) in enumerate(panels):
        held_out = report[key]["held_out"]
        bins = held_out["reliability"]
        shown = [b for b in bins if b["pairs"] >= MIN_BIN]
        top, bottom = axes[0, column], axes[1, column]
        top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
        label = f"{key} (bins of {MIN_BIN} or more)"
        top.plot([b["predicted"] for b in shown], [b["observed"] for b in shown], marker="o", color=f"C{column}", label=label)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel=ylabel)
        top.set_title(f"{title}\nexpected calibration error {held_out['expected_calibration_error']:.3f}", fontsize=9)
        top.legend(loc="upper left", fontsize=8)
        top.grid(alpha=0.3)
        bottom.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["pairs"] for b in bins], width=0.09, color=f"C{column}", alpha=0.6)
        bottom.set(xlabel=f"{xlabel} (bin of width 0.1)", ylabel=unit)
        bottom.grid(alpha=0.3)
    fig.suptitle(f"{model_name}: the held-out half of Flickr8k's dev split ({report['score']['held_out']['images']} photographs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contrast_study(model: Captioner, records, features: torch.Tensor, seed: int) -> dict:
    """Blind images for the contrast, on calibrate-trust's pairs and halves: the AUC (all, near, far)
    on the held-out half of the contrast alone, and of the score fitted on the other half with it."""
    config = model.decoder.config
    grid = features[:, : config.grid_dim]
    pooled = torch.nn.functional.normalize(grid.view(len(grid), -1, config.cells).mean(dim=2), dim=1)
    pairs = dev_pairs(pooled @ pooled.T, [len(r.captions) for r in records], seed=seed)  # calibrate-trust's
    fitted = np.random.default_rng(seed).permutation(len(records)) < len(records) // 2
    tokens = [caption_tokens(records[p.source].captions[p.caption], model.vocab) for p in pairs]
    rows = [t.ids for t in tokens]
    lengths = np.array([len(r) for r in rows])

    def under(blind: torch.Tensor, images: list[int]) -> np.ndarray:
        return np.array([sum(x) for x in token_log_probs(model.decoder, blind, rows, model.ids, images)])

    own = under(features, [p.image for p in pairs])
    others = model.judge().signals(features, [p.image for p in pairs], rows, [t.words for t in tokens], own.tolist(), contrast=False)
    rest = np.array([[v[s] for s in ("log_prob", "consensus", "concepts")] for v in others])
    mean = features[torch.from_numpy(np.flatnonzero(fitted))].mean(dim=0, keepdim=True)  # the fitting half's mean photograph
    generator = np.random.default_rng(seed + 1)
    blinds = {
        "zero grid, classifier giving no class anything": lambda: under(torch.zeros(1, config.feature_dim), [0] * len(rows)),
        "zero grid, classifier undecided (chosen)": lambda: under(blind_features(config), [0] * len(rows)),
        "the mean dev photograph (fitting half)": lambda: under(mean, [0] * len(rows)),
        "4 random dev photographs, mean": lambda: sum(under(features, generator.integers(len(records), size=len(rows)).tolist()) for _ in range(4)) / 4,
    }  # fmt: skip
    labels = np.array([p.label for p in pairs])
    kinds = np.array([p.kind for p in pairs])
    fit, held = fitted[[p.image for p in pairs]], ~fitted[[p.image for p in pairs]]

    def aucs(column: np.ndarray) -> dict:
        found = {"auc": auc(column[held], labels[held])}
        for kind in ("near", "far"):
            keep = held & ((kinds == "own") | (kinds == kind))
            found[f"auc_{kind}"] = auc(column[keep], labels[keep])
        return found

    alone, combined = {"none (log_prob per word)": aucs(own / lengths)}, {}
    for name, blind in blinds.items():
        contrast = (own - blind()) / lengths
        alone[name] = aucs(contrast)
        values = np.column_stack([rest[:, :1], contrast, rest[:, 1:]])  # log_prob, contrast, consensus, concepts
        combined[name] = aucs(Head.fit(("log_prob", "contrast", "consensus", "concepts"), values[fit], labels[fit]).probability(values))
    return {"pairs_held_out": int(held.sum()), "contrast_alone": alone, "score_with_it": combined}


def strange_pictures(shapes_dir: Path) -> dict[str, Image.Image]:
    """Pictures no Flickr8k photograph is like."""
    generator = np.random.default_rng(0)
    page = Image.new("RGB", (224, 300), "white")
    draw = ImageDraw.Draw(page)
    for row, y in enumerate(range(6, 290, 12)):
        draw.text((6, y), f"{row:02d} the quick brown fox jumps over the lazy dog", fill="black")
    pictures = {
        "noise": Image.fromarray(generator.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
        "white": Image.new("RGB", (224, 224), (255, 255, 255)),
        "black": Image.new("RGB", (224, 224), (0, 0, 0)),
        "grey": Image.new("RGB", (224, 224), (128, 128, 128)),
        "page of text": page,
    }
    from captioner.shapes import write_shapes_dataset

    dataset = write_shapes_dataset(shapes_dir, num_images=20, seed=0, image_size=96)
    for i, path in enumerate(sorted((dataset.parent / "images").iterdir())[:5]):
        pictures[f"shapes scene {i}"] = Image.open(path).convert("RGB")
    return pictures


def timing(model: Captioner, paths, options: DecodeOptions, batch: int) -> dict:
    """Seconds an image for the CNN, decoding, and describe without and with the confidence."""
    times = {"cnn": 0.0, "decode": 0.0, "describe": 0.0, "describe_with_confidence": 0.0}
    pictures = [Image.open(p).convert("RGB") for p in paths]
    model.caption(pictures[:batch], **options.to_dict())  # warm up
    for start in range(0, len(pictures), batch):
        chunk = pictures[start : start + batch]
        t0 = time.perf_counter()
        features = model.encode(model.images_to_batch(chunk))
        t1 = time.perf_counter()
        hypotheses = model.generate(features, options)
        t2 = time.perf_counter()
        model.describe(hypotheses)
        t3 = time.perf_counter()
        model.describe(hypotheses, features)
        t4 = time.perf_counter()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name] += seconds
    per_image = {f"{name}_ms": 1000 * seconds / len(pictures) for name, seconds in times.items()}
    without = per_image["cnn_ms"] + per_image["decode_ms"] + per_image["describe_ms"]
    added = per_image["describe_with_confidence_ms"] - per_image["describe_ms"]
    return {"images": len(pictures), "batch": batch, **per_image, "added_share": added / without}


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    model = Captioner.load(args.model)
    if model.trust is None:
        sys.exit(f"{args.model} has no trust calibration: run captioner calibrate-trust first")
    report = json.loads(Path(args.report).read_text())
    study: dict = {"model": args.model, "version": model.version, "calibration": model.trust.to_dict()}
    if args.figure:
        reliability_figure(report, Path(args.figure), args.name or Path(args.model).parent.name)
        study["figure"] = args.figure
    records = load_dataset(args.data, images=args.images, skip_missing=True).split(args.split)
    study["score"] = {k: report["score"]["held_out"][k] for k in ("auc", "auc_near", "auc_far", "expected_calibration_error")}
    study["confidence"] = {k: v for k, v in report["confidence"]["held_out"].items() if k != "reliability"}
    if args.contrasts:
        cache = Path(args.feature_cache) if args.feature_cache else default_cache_dir()
        features = cached_features(model.encoder, [r.path for r in records], cache_dir=cache, device=model.device, progress=True)
        study["contrasts"] = contrast_study(model, records, features, args.seed)
        print(json.dumps(study["contrasts"], indent=1), flush=True)
    pictures = strange_pictures(Path(tempfile.mkdtemp(prefix="trust-study-shapes-")))
    scored = model.score(list(pictures.values()), ["a dog runs through the grass"] * len(pictures))
    captions = model.caption(list(pictures.values()))  # greedy: the confidence of the model's own caption
    study["strange"] = {
        name: {**{k: s[k] for k in ("familiarity", "unfamiliar", "score")}, "caption": c[0]["text"], "confidence": c[0]["confidence"]}
        for name, s, c in zip(pictures, scored, captions)
    }
    study["threshold"] = model.trust.threshold
    print(json.dumps(study["strange"], indent=1), flush=True)
    if args.timing:
        paths = [r.path for r in records[: args.timing]]
        study["timing"] = {
            f"{mode}_batch{batch}": timing(model, paths, opts, batch)
            for mode, opts in (("beam", DecodeOptions(mode="beam", beam_size=args.beam_size)), ("greedy", DecodeOptions()))
            for batch in (1, 32)
        }
        print(json.dumps(study["timing"], indent=1), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(study, indent=1) + "\n")
    return study


if __name__ == "__main__":
    main(parse_args())
