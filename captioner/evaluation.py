"""Evaluation of a trained captioner on a split: caption metrics, perplexity and, on the shapes
world, whether the captions are true of their scenes (GTD: grammaticality, truthfulness, diversity)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captioner.data.datasets import ImageRecord
from captioner.data.synth import Scene, check_caption
from captioner.data.vocab import tokenize
from captioner.decoding import DecodeOptions
from captioner.features import compute_features
from captioner.metrics import caption_metrics, java_available
from captioner.models.captioner import Captioner
from captioner.training import encode_captions, evaluate_loss


def shapes_report(captions: dict[str, str], records: Sequence[ImageRecord]) -> dict:
    """Truth of generated captions against the shapes-world scenes.

    Returns:
        grammaticality and truthfulness (shares of captions), per-attribute accuracy (share of
        stated shapes/colours/sizes that match the object they describe), and diversity.
    """
    checks = [check_caption(captions[r.image_id], Scene.from_dict(r.scene)) for r in records]
    attributes: dict[str, list[bool]] = {}
    for check in checks:
        for name, correct in check.attributes:
            attributes.setdefault(name, []).append(correct)
    texts = list(captions.values())
    return {
        "grammaticality": sum(c.grammatical for c in checks) / len(checks),
        "truthfulness": sum(c.truthful for c in checks) / len(checks),
        "attribute_accuracy": {k: sum(v) / len(v) for k, v in sorted(attributes.items())},
        "distinct_captions": len(set(texts)) / len(texts),
        "vocabulary_used": len({w for t in texts for w in tokenize(t)}),
    }


@torch.inference_mode()
def evaluate(
    model: Captioner,
    records: Sequence[ImageRecord],
    *,
    options: DecodeOptions | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[dict, dict[str, str]]:
    """Scores ``model``'s captions of ``records`` against their references.

    Args:
        model: the captioner.
        records: the images with their reference captions.
        options: decoding options (default: greedy).
        batch_size: images per batch.
        num_workers: DataLoader workers decoding images.
        progress: show a progress bar.

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
        report |= shapes_report(captions, records)
    return report, captions
