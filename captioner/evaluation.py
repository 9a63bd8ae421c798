"""Evaluation of a trained captioner on a split: caption metrics, perplexity and, on the shapes
world, whether the captions are true of their scenes (GTD: grammaticality, truthfulness, diversity)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captioner.data.datasets import Dataset, ImageRecord
from captioner.shapes import Scene, check_caption, parse_holdout
from captioner.data.vocab import tokenize
from captioner.options import DecodeOptions
from captioner.features import compute_features
from captioner.metrics import caption_metrics, java_available
from captioner.models.captioner import Captioner
from captioner.training import encode_captions, evaluate_loss


def shapes_report(
    captions: dict[str, str], records: Sequence[ImageRecord], held_out: frozenset[tuple[str, str]] = frozenset()
) -> dict:
    """Truth of generated captions against the shapes-world scenes.

    Args:
        captions: generated caption by image id.
        records: the images, with their scenes.
        held_out: (colour, shape) pairs withheld from training; if given, how often a caption
            names the held-out pair its scene shows is reported too.

    Returns:
        grammaticality and truthfulness (shares of captions), per-attribute accuracy (share of
        stated shapes/colours/sizes that match the object they describe), diversity and, with
        ``held_out``, ``held_out_named``.
    """
    scenes = [Scene.from_dict(r.scene) for r in records]
    checks = [check_caption(captions[r.image_id], scene) for r, scene in zip(records, scenes)]
    attributes: dict[str, list[bool]] = {}
    for check in checks:
        for name, correct in check.attributes:
            attributes.setdefault(name, []).append(correct)
    texts = list(captions.values())
    report = {
        "grammaticality": sum(c.grammatical for c in checks) / len(checks),
        "truthfulness": sum(c.truthful for c in checks) / len(checks),
        "attribute_accuracy": {k: sum(v) / len(v) for k, v in sorted(attributes.items())},
        "distinct_captions": len(set(texts)) / len(texts),
        "vocabulary_used": len({w for t in texts for w in tokenize(t)}),
    }
    # Naming a never-seen combination is the compositional test: "green triangle" when the
    # decoder only ever saw green things and triangles apart.
    named = [
        bool(set(check.mentions) & held_out)
        for check, scene in zip(checks, scenes)
        if {(o.colour, o.shape) for o in scene.objects} & held_out
    ]
    if named:
        report["held_out_named"] = sum(named) / len(named)
    return report


@torch.inference_mode()
def evaluate(
    model: Captioner,
    records: Sequence[ImageRecord],
    *,
    options: DecodeOptions | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    held_out: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[dict, dict[str, str]]:
    """Scores ``model``'s captions of ``records`` against their references.

    Args:
        model: the captioner.
        records: the images with their reference captions.
        options: decoding options (default: greedy).
        batch_size: images per batch.
        num_workers: DataLoader workers decoding images.
        progress: show a progress bar.
        held_out: the shapes world's held-out (colour, shape) pairs, for ``held_out_named``.

    Returns:
        The report (``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider``, ``perplexity`` of the
        references, and for the shapes world its truth report) and the generated captions by image id.
    """
    model.eval()
    options = options or DecodeOptions()
    features = torch.cat(
        list(
            compute_features(
                model.encoder,
                [r.path for r in records],
                device=model.device,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
            )
        )
    )
    captions = {}
    for start in range(0, len(records), batch_size):
        hyps = model.generate(features[start : start + batch_size], options)
        for record, best in zip(records[start : start + batch_size], hyps):
            captions[record.image_id] = model.vocab.decode(best[0].tokens)
    references = {r.image_id: list(r.captions) for r in records}
    tokenizer = "ptb" if java_available() else "simple"
    report = {"images": len(records), "tokenizer": tokenizer}
    report |= caption_metrics(captions, references, tokenizer=tokenizer)
    refs = encode_captions(list(records), model.vocab, max_length=1000)
    loss = evaluate_loss(model.decoder, features, refs, pad=model.vocab.pad, batch_size=512, device=model.device)
    report["perplexity"] = loss["perplexity"]
    if all(r.scene for r in records):
        report |= shapes_report(captions, records, held_out)
    return report, captions


def evaluate_split(model: Captioner, dataset: Dataset, split: str, **kwargs) -> tuple[dict, dict[str, str]]:
    """:func:`evaluate` on one split; for a shapes world with held-out combinations, the
    ``holdout`` split is scored too and reported apart, under ``"holdout"``.

    Returns:
        The report (``{"split", ...}``) and the captions of ``split`` by image id.
    """
    held_out = parse_holdout(dataset.meta.get("shapes_world", {}).get("holdout", []))
    report, captions = evaluate(model, dataset.split(split), held_out=held_out, **kwargs)
    report = {"split": split, **report}
    if held_out and split != "holdout" and any(r.split == "holdout" for r in dataset.records):
        held_report, _ = evaluate(model, dataset.split("holdout"), held_out=held_out, **kwargs)
        report["holdout"] = {"pairs": sorted(f"{c}:{s}" for c, s in held_out), **held_report}
    return report, captions


def coco_results(captions: dict[str, str]) -> list[dict]:
    """Captions in the COCO results format, ``[{"image_id", "caption"}]``, that the COCO
    caption evaluation (and pycocoevalcap's ``loadRes``) reads; numeric ids become integers."""
    return [
        {"image_id": int(image_id) if image_id.isdigit() else image_id, "caption": caption}
        for image_id, caption in captions.items()
    ]


def summary_table(report: dict) -> str:
    """A few lines for people: the main scores of a report and of its held-out part."""
    columns = ["bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "perplexity", "truthfulness", "held_out_named"]
    columns = [c for c in columns if c in report]
    rows = [(report["split"], report)] + ([("holdout", report["holdout"])] if "holdout" in report else [])
    widths = [max(len(c), 6) for c in columns]
    lines = ["  ".join([f"{'split':<8} {'images':>6}"] + [f"{c:>{w}}" for c, w in zip(columns, widths)])]
    for name, part in rows:
        values = [part.get(c) for c in columns]
        cells = [f"{'n/a' if v is None else format(v, '.3f'):>{w}}" for v, w in zip(values, widths)]
        lines.append("  ".join([f"{name:<8} {part['images']:>6}"] + cells))
    return "\n".join(lines)
