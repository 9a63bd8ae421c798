"""Generating and scoring captions, the one place it is done: loss and perplexity under teacher
forcing, the caption metrics of generated captions and, on the shapes world, whether they are true
of their scenes (GTD: grammaticality, truthfulness, diversity). ``captioner evaluate`` and the
validation of every training epoch both call ``score``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from captioner.data.datasets import Dataset, ImageRecord
from captioner.data.mentions import NOVEL_OBJECTS, mention_f1, parse_groups
from captioner.data.vocab import Vocabulary, tokenize
from captioner.decoding import Hypothesis
from captioner.features import compute_features
from captioner.metrics import CiderD, caption_metrics, java_available
from captioner.models.captioner import Captioner
from captioner.models.concepts import seen_words
from captioner.models.decoder import AttentionDecoder
from captioner.options import DecodeOptions
from captioner.shapes import COLOURS, GRID, SHAPES, Scene, check_caption, parse_holdout
from captioner.trust import (
    SIGNALS,
    UNFAMILIAR_SCORE,
    Head,
    TrustCalibration,
    auc,
    dev_pairs,
    expected_calibration_error,
    kendall_tau,
    reliability,
)


@dataclass
class CaptionTensors:
    """Every (image, caption) pair of a split as padded ids."""

    ids: torch.Tensor  # (N, T) <start> ... <end> <pad>...
    image_index: torch.Tensor  # (N,) row of the split's feature matrix


def encode_captions(records: Sequence[ImageRecord], vocab: Vocabulary, max_length: int) -> CaptionTensors:
    """Ids of every caption of ``records``, cut to ``max_length`` words."""
    rows, index = [], []
    for i, record in enumerate(records):
        for caption in record.captions:
            ids = vocab.encode(caption)
            rows.append(ids[: max_length + 1] + [vocab.end] if len(ids) > max_length + 2 else ids)
            index.append(i)
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), vocab.pad, dtype=torch.long)
    for r, ids in enumerate(rows):
        padded[r, : len(ids)] = torch.tensor(ids)
    return CaptionTensors(padded, torch.tensor(index))


def caption_loss(decoder: AttentionDecoder, features: torch.Tensor, ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of next-word prediction under teacher forcing, and the number of words.

    Padding is masked out, so a batch's loss does not depend on how it was padded.
    """
    logits = decoder(features, ids[:, :-1])  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad, reduction="sum")
    return loss, int((targets != pad).sum())


def cnn_readings(
    features: torch.Tensor,
    records: Sequence[ImageRecord],
    cell_classes: tuple[tuple[str, ...], ...],
    held_out: frozenset[tuple[str, str]] = frozenset(),
) -> dict:
    """How often the encoder's cell head reads an object's shape, colour, and both, right.

    Args:
        features: (N, F) features of an encoder with a cell head: per cell, every group's class
            probabilities, channel-major.
        records: the images, with their scenes.
        cell_classes: the head's groups of class names.
        held_out: the held-out pairs, whose objects are also counted apart (a CNN pretrained
            under the novel scenes protocol never saw them).

    Returns:
        ``{"cnn_reads": {"objects", "shape", "colour", "both"}}`` (shares of all objects), and
        ``"cnn_reads_held_out"`` alike for the objects that show a held-out pair, if any do.
    """
    names = [name for group in cell_classes for name in group]
    starts = [sum(map(len, cell_classes[:g])) for g in range(len(cell_classes))]
    cells = features.view(len(records), len(names), -1)  # (N, C, cells)
    read = {}
    for start, group in zip(starts, cell_classes):
        best = cells[:, start : start + len(group)].argmax(dim=1)  # (N, cells)
        read[group] = [[group[k] for k in row] for row in best.tolist()]
    shape_group = next(g for g in cell_classes if SHAPES[0] in g)
    colour_group = next(g for g in cell_classes if COLOURS[0] in g)
    right, right_held_out = [], []
    for i, record in enumerate(records):
        for o in Scene.from_dict(record.scene).objects:
            cell = o.row * GRID + o.col
            reading = (read[shape_group][i][cell] == o.shape, read[colour_group][i][cell] == o.colour)
            right.append(reading)
            if (o.colour, o.shape) in held_out:
                right_held_out.append(reading)
    report = {"cnn_reads": _reading_shares(right)}
    if right_held_out:
        report["cnn_reads_held_out"] = _reading_shares(right_held_out)
    return report


def _reading_shares(right: list[tuple[bool, bool]]) -> dict:
    n = max(len(right), 1)
    return {
        "objects": len(right),
        "shape": sum(s for s, _ in right) / n,
        "colour": sum(c for _, c in right) / n,
        "both": sum(s and c for s, c in right) / n,
    }


@torch.inference_mode()
def evaluate_loss(decoder, features, captions: CaptionTensors, *, pad: int, batch_size: int, device) -> dict:
    """Teacher-forced loss (per word) and perplexity of ``captions``."""
    decoder.eval()
    total_loss, total_words = 0.0, 0
    for batch in torch.arange(len(captions.ids)).split(batch_size):
        ids = captions.ids[batch].to(device)
        loss, words = caption_loss(decoder, features[captions.image_index[batch]].to(device), ids, pad)
        total_loss += loss.item()
        total_words += words
    mean = total_loss / max(total_words, 1)
    return {"loss": mean, "perplexity": math.exp(mean)}


@torch.inference_mode()
def generate_captions(
    model: Captioner, features: torch.Tensor, records: Sequence[ImageRecord], options: DecodeOptions, batch_size: int
) -> dict[str, str]:
    """The best caption of each image (``features`` row i is ``records[i]``), by image id."""
    model.eval()
    captions = {}
    for start in range(0, len(records), batch_size):
        hyps = model.generate(features[start : start + batch_size], options)
        for record, best in zip(records[start : start + batch_size], hyps):
            captions[record.image_id] = model.vocab.decode(best[0].tokens)
    return captions


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


def score(
    model: Captioner,
    features: torch.Tensor,
    records: Sequence[ImageRecord],
    *,
    options: DecodeOptions | None = None,
    batch_size: int = 64,
    held_out: frozenset[tuple[str, str]] = frozenset(),
    max_length: int = 1000,
    full: bool = True,
) -> tuple[dict, dict[str, str]]:
    """Generates captions from ``features`` (row i is ``records[i]``) and scores them.

    Args:
        model: the captioner.
        features: (N, F) features of the records' images.
        records: the images with their reference captions.
        options: decoding options (default: greedy).
        batch_size: images per batch.
        held_out: the shapes world's held-out (colour, shape) pairs, for ``held_out_named``.
        max_length: references are cut to this many words for the perplexity.
        full: PTB tokenisation (where Java is present) and METEOR, as papers report; off, the
            quick scores of a training epoch (simple tokenisation, no METEOR).

    Returns:
        The report (``images``, ``tokenizer``, ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``,
        ``cider``, ``loss`` and ``perplexity`` of the references, and for the shapes world its
        truth report) and the generated captions by image id.
    """
    captions = generate_captions(model, features, records, options or DecodeOptions(), batch_size)
    references = {r.image_id: list(r.captions) for r in records}
    tokenizer = "ptb" if full and java_available() else "simple"
    report = {"images": len(records), "tokenizer": tokenizer}
    report |= caption_metrics(captions, references, tokenizer=tokenizer, meteor=full)
    refs = encode_captions(records, model.vocab, max_length)
    report |= evaluate_loss(model.decoder, features, refs, pad=model.vocab.pad, batch_size=512, device=model.device)
    if not any(r.scene for r in records):
        report |= photo_report(model, features, captions, references)
    if all(r.scene for r in records):
        report |= shapes_report(captions, records, held_out)
        if model.encoder.config.cell_classes:
            report |= cnn_readings(features, records, model.encoder.config.cell_classes, held_out)
    return report, captions


def photo_report(model: Captioner, features: torch.Tensor, captions: dict[str, str], references: dict) -> dict:
    """What photographs' captions say beyond n-grams: the F1 of mentioning each novel object
    (the model's held-out words, else ``NOVEL_OBJECTS``) and their mean, the distinct words and
    captions, and with concepts the share of captions that say a word the classifier saw."""
    groups = [tuple(g) for g in model.data.get("held_out_words") or parse_groups(NOVEL_OBJECTS)]
    mentions = mention_f1(captions, references, groups)
    report = {
        "mentions": mentions,
        "mention_f1_mean": sum(m["f1"] for m in mentions.values()) / len(mentions),
        "distinct_words": len({w for c in captions.values() for w in tokenize(c)}),
        "distinct_captions": len(set(captions.values())),
    }
    if model.decoder.config.concept_ids:
        seen = [seen_words(c) for c in model.concepts(features)]
        said = [not seen_here.isdisjoint(tokenize(caption)) for seen_here, caption in zip(seen, captions.values())]
        report["concept_share"] = sum(said) / max(len(said), 1)
    return report


def evaluate(
    model: Captioner,
    records: Sequence[ImageRecord],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    **score_args,
) -> tuple[dict, dict[str, str]]:
    """Runs the encoder over ``records``' images, then :func:`score` (``score_args`` go to it)."""
    model.eval()
    paths = [r.path for r in records]
    args = dict(device=model.device, batch_size=batch_size, num_workers=num_workers, progress=progress)
    features = torch.cat(list(compute_features(model.encoder, paths, **args)))
    return score(model, features, records, batch_size=batch_size, **score_args)


def evaluate_split(model: Captioner, dataset: Dataset, split: str, **kwargs) -> tuple[dict, dict[str, str]]:
    """:func:`evaluate` on one split; for a shapes world with held-out combinations, the
    ``holdout`` split is scored too and reported apart, under ``"holdout"``.

    Returns:
        The report (``{"split", ...}``) and the captions of ``split`` by image id.
    """
    held_out = parse_holdout(dataset.meta.get("shapes_world", {}).get("holdout", []))
    report, captions = evaluate(model, dataset.split(split), held_out=held_out, **kwargs)
    report = {"split": split, **report}
    if model.encoder.pretraining.get("protocol") and held_out:
        report["protocol"] = model.encoder.pretraining["protocol"]
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
    """A few lines for people: the main scores of a report and of its held-out part. On the shapes
    world, ``cnn_reads`` is the share of objects whose shape and colour the CNN reads right (in the
    held-out part, of the objects that show a held-out pair)."""
    rows = [(report["split"], report)] + ([("holdout", report["holdout"])] if "holdout" in report else [])
    columns = ["bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "perplexity", "truthfulness", "held_out_named", "cnn_reads"]
    values = [{**part, "cnn_reads": _both(part)} for _, part in rows]
    columns = [c for c in columns if any(v.get(c) is not None for v in values)]
    widths = [max(len(c), 6) for c in columns]
    lines = ["  ".join([f"{'split':<8} {'images':>6}"] + [f"{c:>{w}}" for c, w in zip(columns, widths)])]
    for (name, part), value in zip(rows, values):
        cells = [f"{'n/a' if value.get(c) is None else format(value[c], '.3f'):>{w}}" for c, w in zip(columns, widths)]
        lines.append("  ".join([f"{name:<8} {part['images']:>6}"] + cells))
    return "\n".join(lines)


def _both(part: dict) -> float | None:
    reads = part.get("cnn_reads_held_out", part.get("cnn_reads"))
    return reads["both"] if reads else None


def int8_agreement(model: Captioner, paths: Sequence, batch_size: int = 64) -> dict:
    """How closely the int8 CNN follows fp32 on ``paths``: features' cosine similarity, same greedy captions.

    Returns:
        ``{"images", "mean_cosine", "min_cosine", "same_caption"}`` (the last a share of images).
    """
    features, captions = {}, {}
    for runtime in ("fp32", "int8"):
        model.encoder.use_int8(runtime == "int8")
        features[runtime] = torch.cat(list(compute_features(model.encoder, paths, device=model.device, batch_size=batch_size)))
        hyps = [h for start in range(0, len(paths), batch_size) for h in model.generate(features[runtime][start : start + batch_size], DecodeOptions())]
        captions[runtime] = [hyp[0].tokens for hyp in hyps]
    model.encoder.use_int8(False)
    cosine = F.cosine_similarity(features["fp32"], features["int8"], dim=1)  # (N,)
    same = sum(a == b for a, b in zip(captions["fp32"], captions["int8"]))
    return {
        "images": len(paths),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "same_caption": same / max(1, len(paths)),
    }


# The signals each head is fitted on. Familiarity is the same for every caption of a photograph, so
# own-against-other pairs cannot weigh it; the confidence of generated captions can. Contrast ranks
# generated captions' quality at Kendall tau 0.03 (docs/trust.md) and costs a second pass about
# as long as greedy decoding: the confidence, on every generated caption, reads the others.
SCORE_SIGNALS = ("log_prob", "contrast", "consensus", "concepts")
CONFIDENCE_SIGNALS = ("log_prob", "consensus", "concepts", "familiarity")


def trust_pairs(model: Captioner, records: Sequence[ImageRecord], features: torch.Tensor, seed: int = 0, batch_size: int = 512, progress: bool = False) -> tuple[list, list[dict]]:
    """A dev split's pairs (``trust.dev_pairs``: each photograph with its own references and
    others') and each pair's scored record (``Captioner.score_features``)."""
    grid = features[:, : model.decoder.config.grid_dim]
    pooled = F.normalize(grid.view(len(grid), -1, model.decoder.config.cells).mean(dim=2), dim=1)  # (N, C)
    pairs = dev_pairs(pooled @ pooled.T, [len(r.captions) for r in records], seed=seed)
    scored = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="pairs", unit="batch", disable=not progress, leave=False):
        chunk = pairs[start : start + batch_size]
        captions = [records[p.source].captions[p.caption] for p in chunk]
        scored += model.score_features(features, captions, [p.image for p in chunk])
    return pairs, scored


def parity(captions: Sequence[Sequence[str]], image_of: Sequence[int], references: Sequence[Sequence[Sequence[str]]]) -> list[float]:
    """Per caption (words) of image ``image_of[c]``, the share of that image's references it does as
    well as: leaving each reference out in turn, the caption's CIDEr-D against the others at least
    the left-out reference's own (document frequencies of the references left in)."""
    wins: list[list[float]] = [[] for _ in captions]
    for k in range(max(len(refs) for refs in references)):
        cider = CiderD([[ref for j, ref in enumerate(refs) if j != k] if len(refs) > 1 else refs for refs in references])
        for c, (words, i) in enumerate(zip(captions, image_of)):
            if k < len(references[i]) and len(references[i]) > 1:
                wins[c].append(float(cider.score(i, words) >= cider.score(i, references[i][k])))
    return [sum(w) / len(w) if w else 0.0 for w in wins]


def generated_for_trust(model: Captioner, features: torch.Tensor, beam_size: int, batch_size: int = 32, progress: bool = False) -> tuple[list[int], list[Hypothesis], list[dict]]:
    """Each photograph's greedy caption and its caption by the model's own decoding (its
    checkpoint's), or where that is greedy by a beam search of ``beam_size`` (re-ranked as the model
    does; 0 or 1: none): the captions a confidence is given to. Returns their images, their
    hypotheses and the decodings."""
    decodings = [model.decode_options(mode="greedy")]
    own = model.decode_options()
    if own.mode != "greedy":
        decodings.append(own)
    elif beam_size > 1:
        decodings.append(model.decode_options(mode="beam", beam_size=beam_size))
    image_of, hypotheses = [], []
    for options in decodings:
        for start in tqdm(range(0, len(features), batch_size), desc=f"{options.mode} captions", unit="batch", disable=not progress, leave=False):
            for i, hyps in enumerate(model.generate(features[start : start + batch_size], options), start=start):
                image_of.append(i)
                hypotheses.append(hyps[0])
    return image_of, hypotheses, [options.to_dict() for options in decodings]


def calibrate_trust(
    model: Captioner, records: Sequence[ImageRecord], features: torch.Tensor, *, flagged: float = 0.02, seed: int = 0,
    beam_size: int = 16, fitted_on: dict | None = None, progress: bool = False,
) -> tuple[TrustCalibration, dict]:  # fmt: skip
    """Fits the caption score, the confidence of generated captions and the unfamiliar threshold
    on a dev split, and measures them.

    The photographs are split in two halves (seeded). The score's logistic regression is fitted on
    the own-and-other reference pairs of one half and measured on the other's (the AUC of own
    references against others', near and random, for each signal alone and combined, and the
    reliability bins); the confidence's is fitted on one half's generated captions (greedy, and by
    the model's own decoding: ``generated_for_trust``), each labelled by its ``parity`` with people's captions, and
    measured on the other's (Kendall tau-b with its CIDEr-D, and the reliability bins). The
    threshold is the ``flagged`` quantile of every photograph's familiarity.

    Args:
        model: the captioner.
        records: the split's photographs with their references.
        features: (N, F) their features.
        flagged: the share of photographs the threshold flags.
        seed: of the pairs and the halves.
        beam_size: for a model whose own decoding is greedy, the width of a beam search whose
            captions join the greedy ones (0 or 1: greedy ones alone).
        fitted_on: recorded in the calibration beside the split's sizes.

    Returns:
        The calibration and the report.
    """
    fitted_half = np.random.default_rng(seed).permutation(len(records)) < len(records) // 2  # True: fitted on
    # The score: own references against other photographs'.
    pairs, scored = trust_pairs(model, records, features, seed, progress=progress)
    labels = np.array([p.label for p in pairs])
    kinds = np.array([p.kind for p in pairs])
    pair_images = [p.image for p in pairs]
    fit, held = fitted_half[pair_images], ~fitted_half[pair_images]
    signals = scored[0]["signals"]
    score_signals = [s for s in SCORE_SIGNALS if s in signals]
    values = np.array([[r["signals"][s] for s in score_signals] for r in scored], dtype=np.float64)
    score_head = Head.fit(score_signals, values[fit], labels[fit])
    of_image = {p.image: r["familiarity"] for p, r in zip(pairs, scored)}  # every photograph has pairs of its own
    by_image = np.array([np.nan if of_image[i] is None else of_image[i] for i in range(len(records))])
    threshold = None if np.isnan(by_image).any() else float(np.quantile(by_image, flagged))
    capped = np.zeros(len(records), dtype=bool) if threshold is None else by_image < threshold  # as ``Judge.verdicts`` has it
    score = score_head.probability(values)
    score = np.where(capped[pair_images], np.minimum(score, UNFAMILIAR_SCORE), score)

    def aucs(column: np.ndarray) -> dict:
        own = kinds == "own"
        return {
            "auc": auc(column[held], labels[held]),
            "auc_near": auc(column[held & (own | (kinds == "near"))], labels[held & (own | (kinds == "near"))]),
            "auc_far": auc(column[held & (own | (kinds == "far"))], labels[held & (own | (kinds == "far"))]),
        }

    columns = {s: np.array([r["signals"][s] for r in scored], dtype=np.float64) for s in SIGNALS if s in signals}
    per = {name: aucs(column) for name, column in {**columns, "score": score}.items()}
    bins = reliability(score[held], labels[held])
    report = {
        "score": {
            "signals": score_signals,
            "fit": {"images": int(fitted_half.sum()), "pairs": int(fit.sum())},
            "held_out": {
                "images": int((~fitted_half).sum()),
                "pairs": int(held.sum()),
                **{key: {name: per[name][key] for name in per} for key in ("auc", "auc_near", "auc_far")},
                "reliability": bins,
                "expected_calibration_error": expected_calibration_error(bins),
            },
        },
        "threshold": threshold,
        "flagged": flagged,
    }
    if threshold is not None:
        report["familiarity"] = {q: float(np.quantile(by_image, float(q))) for q in ("0", "0.01", "0.02", "0.05", "0.5", "1")}
        report["flagged_images"] = int(capped.sum())
    confidence_head, report["confidence"], generated_count = _fit_confidence(
        model, records, features, fitted_half, capped, (score_head, score_signals), beam_size, progress
    )
    summary = {
        "score_auc": per["score"]["auc"], "score_auc_near": per["score"]["auc_near"], "score_auc_far": per["score"]["auc_far"],
        "score_calibration_error": report["score"]["held_out"]["expected_calibration_error"],
        "confidence_kendall_tau_with_cider": report["confidence"]["held_out"]["kendall_tau_with_cider"]["confidence"],
        "confidence_calibration_error": report["confidence"]["held_out"]["expected_calibration_error"],
    }  # fmt: skip
    described = {
        "images": len(records), "pairs": len(pairs), "generated": generated_count, "fitted_images": int(fitted_half.sum()),
        "seed": seed, **(fitted_on or {}),
    }  # fmt: skip
    calibration = TrustCalibration(score_head, confidence_head, threshold, model.encoder.config.name, described, _no_nan(summary))
    return calibration, _no_nan(report)


def _fit_confidence(model, records, features, fitted_half, capped, score, beam_size, progress) -> tuple[Head, dict, int]:
    """``calibrate_trust``'s second half: the confidence of generated captions, fitted on the
    ``fitted_half`` photographs' captions by their parity with people's and measured on the others'
    (``score`` is the fitted score's head and signals, measured on the same captions beside it).
    Returns the head, its report and how many captions were generated."""
    score_head, score_signals = score
    image_of, hypotheses, decodings = generated_for_trust(model, features, beam_size, progress=progress)
    end = model.ids.end
    words = [[model.vocab.words[t] for t in h.tokens if t != end] for h in hypotheses]
    judge = model.judge()
    generated = judge.signals(features, image_of, [h.tokens for h in hypotheses], words, [h.log_prob for h in hypotheses])
    references = [[tokenize(c) for c in r.captions] for r in records]
    targets = np.array(parity(words, image_of, references))
    cider = CiderD(references)
    quality = np.array([cider.score(i, w) for i, w in zip(image_of, words)])
    confidence_signals = [s for s in CONFIDENCE_SIGNALS if s in generated[0]]
    gen_values = np.array([[v[s] for s in confidence_signals] for v in generated], dtype=np.float64)
    gen_fit = fitted_half[image_of]
    confidence_head = Head.fit(confidence_signals, gen_values[gen_fit], targets[gen_fit])
    confidence = confidence_head.probability(gen_values)
    confidence = np.where(capped[image_of], np.minimum(confidence, UNFAMILIAR_SCORE), confidence)
    gen_held = ~gen_fit
    score_of_generated = score_head.probability(np.array([[v[s] for s in score_signals] for v in generated], dtype=np.float64))
    taus = {name: kendall_tau(column[gen_held], quality[gen_held]) for name, column in {
        **{s: np.array([v[s] for v in generated]) for s in generated[0]}, "score": score_of_generated, "confidence": confidence,
    }.items()}  # fmt: skip
    gen_bins = reliability(confidence[gen_held], targets[gen_held])
    order = np.argsort(-confidence[gen_held])
    quarter = max(len(order) // 4, 1)
    report = {
        "signals": confidence_signals,
        "decodings": decodings,
        "fit": {"images": int(fitted_half.sum()), "captions": int(gen_fit.sum())},
        "held_out": {
            "images": int((~fitted_half).sum()),
            "captions": int(gen_held.sum()),
            "parity_mean": float(targets[gen_held].mean()),
            "cider_mean": float(quality[gen_held].mean()),
            "kendall_tau_with_cider": taus,
            "cider_of_most_confident_quarter": float(quality[gen_held][order[:quarter]].mean()),
            "cider_of_least_confident_quarter": float(quality[gen_held][order[-quarter:]].mean()),
            "reliability": gen_bins,
            "expected_calibration_error": expected_calibration_error(gen_bins),
        },
    }
    return confidence_head, report, len(hypotheses)


def _no_nan(value):
    """``value`` with every NaN (an AUC without negatives, a tau of constant values) as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
