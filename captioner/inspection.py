"""Looking inside the decoder: where it looked for each word, what its gates and cells do, and
how gradients flow back through time.

Everything is measured by replaying the decoder on a caption with a trace (``AttentionDecoder.run``'s
``trace``): the language layer then runs unrolled by its equations (``models.recurrent.unroll``),
so its gates, cell states and every step's hidden state are there to read and to differentiate.
Training and captioning never pay for it.

- ``inspect_caption``: per word of a generated caption, its probability and the likeliest
  alternatives, the attention over the image's cells, the language layer's gates and cell state
  (the Show-Attend-Tell figure, with the LSTM's insides beside it).
- ``split_statistics``: over the reference captions of a split, the units whose cell state
  correlates most with properties of the words (position, clause, relation, colour next), and
  how often each gate unit is saturated (Karpathy, Johnson & Fei-Fei 2015).
- ``gradients_through_time``: the mean of ||dL_t/dh_k|| over reference captions against the
  distance t - k (the product of Jacobians of Pascanu et al. 2013, measured).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from captioner.checkpoint import read_checkpoint
from captioner.data.datasets import Dataset
from captioner.data.images import decode_image
from captioner.decoding import Hypothesis
from captioner.evaluation import encode_captions
from captioner.features import cached_features, default_cache_dir
from captioner.io import atomic_write
from captioner.models.captioner import Captioner
from captioner.options import DecodeOptions
from captioner.plotting import (
    draw_cells,
    draw_gradients,
    draw_saturation,
    draw_words,
    read_metrics,
)
from captioner.shapes import COLOURS, SHAPES

SATURATED = (0.1, 0.9)  # a gate below the first is left-saturated, above the second right-saturated
TOP_ALTERNATIVES = 3
# Spatial relation words: the shapes world's, and the common ones of photo captions.
RELATION_WORDS = frozenset({"left", "right", "above", "below", "under", "behind", "beside", "near", "next"})
COLOUR_WORDS = frozenset(COLOURS) | {"black", "brown", "orange", "pink", "grey", "gray"}
SHAPE_WORDS = frozenset(SHAPES)


def trace(model: Captioner, features: torch.Tensor, ids: torch.Tensor) -> dict:
    """The decoder replayed on captions, looked inside.

    Args:
        model: the captioner (in eval mode: no dropout).
        features: (B, F) image features.
        ids: (B, T) ``<start> w_1 ... <end> <pad>...``.

    Returns:
        ``log_probs`` (B, T-1, V) of each next word, ``attention`` (B, T-1, N), the language
        layer's ``gates`` ({name: (B, T-1, H)}), ``cell`` (B, T-1, H) and ``hidden`` (T-1 tensors
        (B, H), graph nodes when gradients are on); step t reads ids[:, t] and predicts ids[:, t+1].
    """
    decoder = model.decoder
    memory, state = decoder.start(features)
    record: dict = {}
    logits, _ = decoder.run(ids[:, :-1], state, memory, trace=record)
    record["log_probs"] = logits.float().log_softmax(dim=-1)
    return record


def _round(values, digits: int = 4):
    """Plain nested lists of rounded floats, for JSON."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return round(float(values), digits)


@torch.no_grad()
def inspect_caption(model: Captioner, feature: torch.Tensor, hypothesis: Hypothesis) -> dict:
    """One caption's words looked inside.

    Args:
        model: the captioner.
        feature: (F,) the image's feature.
        hypothesis: a caption generated for it (any decoding mode).

    Returns:
        ``{"caption", "cell", "gates": [names], "words": [{"word", "probability", "alternatives":
        [{"word", "probability"}], "attention": G x G or None, "gates": {name: [H]}, "cell": [H]}]}``;
        the gates and cell are the language layer's last layer at the step that chose the word.
    """
    vocab, tokens = model.vocab, hypothesis.tokens
    ids = torch.tensor([[model.ids.start, *tokens]], device=model.device)
    record = trace(model, feature.unsqueeze(0).to(model.device), ids)
    probs = record["log_probs"][0].exp()  # (T, V)
    cells = model.decoder.config.cells
    side = round(cells**0.5)
    words = []
    for t, token in enumerate(tokens):
        top = probs[t].topk(TOP_ALTERNATIVES + 1)
        alternatives = [
            {"word": vocab.words[i], "probability": round(p, 4)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
            if i != token
        ][:TOP_ALTERNATIVES]
        words.append(
            {
                "word": vocab.words[token],
                "probability": round(probs[t, token].item(), 4),
                "alternatives": alternatives,
                "attention": _round(record["attention"][0, t].view(side, side)) if cells > 1 else None,
                "gates": {name: _round(g[0, t]) for name, g in record["gates"].items() if name != "candidate"},
                "cell": _round(record["cell"][0, t]),
            }
        )
    gates = [name for name in record["gates"] if name != "candidate"]
    return {"caption": vocab.decode(tokens), "cell": model.decoder.config.cell, "gates": gates, "words": words}


# Properties of the word just read, computed from the words alone: name -> f(words, t) for the
# t-th word (0-based) of a caption.
def _relation_object(words: list[str], t: int) -> float:
    """1 from a relation word up to the shape that ends its object ("left of a small blue [square]")."""
    inside = False
    for i, word in enumerate(words[: t + 1]):
        if word in RELATION_WORDS:
            inside = True
        elif word in SHAPE_WORDS and i < t:  # the shape itself is still inside, the word after it not
            inside = False
    return float(inside)


PROPERTIES = {
    "position in the caption (words read)": lambda words, t: float(t + 1),
    "words left to the end": lambda words, t: float(len(words) - t - 1),
    "inside the second clause (after 'and')": lambda words, t: float("and" in words[: t + 1]),
    "after a relation word, up to its object's shape": _relation_object,
    "the next word is a colour": lambda words, t: float(t + 1 < len(words) and words[t + 1] in COLOUR_WORDS),
    "the word read is a shape": lambda words, t: float(words[t] in SHAPE_WORDS),
}


def word_properties(words: Sequence[str]) -> dict[str, list[float]]:
    """Each property's value at every word of a caption."""
    words = list(words)
    return {name: [f(words, t) for t in range(len(words))] for name, f in PROPERTIES.items()}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(S, K) and (S, H) -> (K, H) correlations of every column of x with every column of y (0 where
    one is constant)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    scale = x.norm(dim=0).unsqueeze(1) * y.norm(dim=0).unsqueeze(0)  # (K, H)
    return torch.where(scale > 0, (x.T @ y) / scale.clamp_min(1e-12), torch.zeros_like(scale))


@torch.no_grad()
def _traced_steps(model: Captioner, features: torch.Tensor, ids: torch.Tensor, image_index: torch.Tensor, batch_size: int):
    """Per caption, its words and the (n, H) cell state after reading each; and every gate's (S, H)
    values at all steps that predict a word (the ``<start>`` step included)."""
    vocab, pad = model.vocab, model.vocab.pad
    captions, gates = [], {}
    for rows in torch.arange(len(ids)).split(batch_size):
        batch = ids[rows].to(model.device)
        batch = batch[:, : int((batch != pad).sum(1).max())]  # (B, T), common padding trimmed
        record = trace(model, features[image_index[rows]].to(model.device), batch)
        valid = batch[:, 1:] != pad  # (B, T-1): steps that predict a word
        for name, values in record["gates"].items():
            gates.setdefault(name, []).append(values[valid].cpu())
        for b in range(batch.size(0)):
            n = int(valid[b].sum()) - 1  # words read after <start>; the last prediction is <end>
            words = [vocab.words[i] for i in batch[b, 1 : n + 1].tolist()]
            captions.append((words, record["cell"][b, 1 : n + 1].cpu()))
    return captions, {name: torch.cat(v) for name, v in gates.items()}


def split_statistics(model: Captioner, features: torch.Tensor, ids: torch.Tensor, image_index: torch.Tensor,
                     *, examples: int = 6, units: int = 4, batch_size: int = 256) -> dict:
    """Interpretable cells and gate saturation over reference captions.

    Args:
        model: the captioner.
        features: (N, F) features of the split's images.
        ids: (C, T) its reference captions (``encode_captions``); image_index: (C,) their images.
        examples: captions shown per unit in the coloured-text figure.
        units: units shown (the best of each property, strongest first, each unit once).

    Returns:
        ``{"captions", "words", "properties": {name: [{"unit", "r"}] best three}, "shown": [{"unit",
        "property", "r", "captions": [{"words", "activation"}]}], "saturation": {gate: {"left",
        "right"}}}``: per gate unit, the share of steps below 0.1 and above 0.9.
    """
    captions, gates = _traced_steps(model, features, ids, image_index, batch_size)
    cells = torch.cat([c for _, c in captions])  # (S, H) over every word read
    values = torch.cat(
        [torch.tensor(list(word_properties(words).values())).view(len(PROPERTIES), -1).T for words, _ in captions]
    )  # (S, K)
    r = _pearson(values.view(-1, len(PROPERTIES)), cells)  # (K, H)
    best = {}
    for k, name in enumerate(PROPERTIES):
        order = r[k].abs().argsort(descending=True)[:3].tolist()
        best[name] = [{"unit": u, "r": round(r[k, u].item(), 3)} for u in order]
    ranked = sorted(((abs(v[0]["r"]), name, v[0]) for name, v in best.items()), key=lambda x: x[0], reverse=True)
    chosen, shown = set(), []
    for _, name, top in ranked:
        if top["unit"] in chosen or len(shown) == units:
            continue
        chosen.add(top["unit"])
        samples = _varied(captions, examples)
        shown.append({**top, "property": name, "captions": [
            {"words": words, "activation": _round(cell[:, top["unit"]])} for words, cell in samples
        ]})  # fmt: skip
    low, high = SATURATED
    saturation = {
        name: {"left": _round((v < low).float().mean(0)), "right": _round((v > high).float().mean(0))}
        for name, v in gates.items() if name != "candidate"
    }  # fmt: skip
    return {"captions": len(captions), "words": len(cells), "properties": best, "shown": shown, "saturation": saturation}


def _varied(captions: list, n: int) -> list:
    """``n`` captions of different lengths, the longest first: a long caption shows most."""
    by_length = sorted(captions, key=lambda c: -len(c[0]))
    step = max(len(by_length) // n, 1)
    return by_length[::step][:n]


def gradient_norms(losses: torch.Tensor, states: Sequence[torch.Tensor]) -> torch.Tensor:
    """||dL_t/dh_k|| for every t and every k <= t, per row.

    Args:
        losses: (B, T) each row's loss at each step, in the graph of ``states``.
        states: T tensors (B, H), the hidden state of each step, graph nodes; row b's loss depends
            only on row b's states (true of the decoder: no batch statistics).

    Returns:
        (B, T, T) norms; entries with k > t are 0 (the future does not reach the past).
    """
    batch, steps = losses.shape
    norms = losses.new_zeros(batch, steps, steps)
    for t in range(steps):
        grads = torch.autograd.grad(losses[:, t].sum(), list(states[: t + 1]), retain_graph=True, allow_unused=True)
        for k, grad in enumerate(grads):
            if grad is not None:
                norms[:, t, k] = grad.flatten(1).norm(dim=1)
    return norms


def by_distance(norms: torch.Tensor, valid: torch.Tensor, min_pairs: int = 10) -> dict:
    """(B, T, T) norms and (B, T) valid steps -> the mean norm at each distance t - k.

    Returns:
        ``{"distance", "mean_norm", "pairs"}``, distances with fewer than ``min_pairs`` pairs left out.
    """
    steps = norms.size(1)
    t, k = torch.meshgrid(torch.arange(steps), torch.arange(steps), indexing="ij")
    distance = (t - k).to(norms.device)  # (T, T)
    result = {"distance": [], "mean_norm": [], "pairs": []}
    for d in range(steps):
        mask = valid.unsqueeze(2) & (distance == d)  # (B, T, T): valid t, k = t - d
        pairs = int(mask.sum())
        if pairs >= min_pairs:
            result["distance"].append(d)
            result["mean_norm"].append(float(norms[mask].mean()))
            result["pairs"].append(pairs)
    return result


def gradients_through_time(model: Captioner, features: torch.Tensor, ids: torch.Tensor) -> dict:
    """The mean ||dL_t/dh_k|| of the language layer's last hidden state against t - k.

    Args:
        model: the captioner (its decoder in eval mode: no dropout).
        features: (B, F) image features; ids: (B, T) a reference caption of each.

    Returns:
        As ``by_distance``, with ``captions``: L_t is the cross-entropy of word t + 1.
    """
    features = features.clone()  # a plain tensor: features made under inference mode cannot enter autograd
    with torch.enable_grad():
        record = trace(model, features.to(model.device), ids.to(model.device))
        targets = ids[:, 1:].to(model.device)  # (B, T-1)
        losses = -record["log_probs"].gather(2, targets.unsqueeze(2)).squeeze(2)  # (B, T-1)
        norms = gradient_norms(losses, record["hidden"])
    # Only distances with as many pairs as half the captions: the few longest captions alone are noise.
    curve = by_distance(norms.detach(), targets != model.vocab.pad, min_pairs=max(len(ids) // 2, 1))
    return {**curve, "captions": len(ids)}


def _write_json(path: Path, value) -> None:
    with atomic_write(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def inspect_images(model: Captioner, paths: Sequence[Path], options: DecodeOptions, out: Path) -> list[Path]:
    """Per image, its caption (the best of ``options``) looked inside: ``words-NAME.png`` and ``.json``.

    Returns:
        The files written.
    """
    written = []
    for index, path in enumerate(paths):
        image = decode_image(path).image.convert("RGB")
        features = model.encode(model.images_to_batch([image]))
        hypothesis = model.generate(features, options, seeds=[options.seed])[0][0]
        inspected = {"image": str(path), **inspect_caption(model, features[0], hypothesis)}
        stem = out / f"words-{index + 1:02d}-{Path(path).stem}"
        _write_json(stem.with_suffix(".json"), inspected)
        written += [stem.with_suffix(".json"), draw_words(inspected, image, stem.with_suffix(".png"))]
    return written


def training_history(model_path: Path) -> tuple[list[dict], float | None]:
    """The per-epoch rows of the model's training run and its clip norm: ``metrics.jsonl`` beside the
    model when there is one (every epoch), else the history the checkpoint keeps (up to its epoch)."""
    state = read_checkpoint(model_path)
    training = state.get("training") or {}
    clip_norm = (training.get("config") or {}).get("clip_norm")
    if (model_path.parent / "metrics.jsonl").is_file():
        return read_metrics(model_path.parent), clip_norm
    return list(training.get("history") or []), clip_norm


def reference_captions(model: Captioner, dataset: Dataset, split: str, max_captions: int):
    """A split's features (N, F) (from the feature cache), and up to ``max_captions`` of its reference
    captions as (C, T) ids with their (C,) image rows: every image's first caption before any
    image's second, so a cap still spreads over the split."""
    records = dataset.split(split)
    features = cached_features(model.encoder, [r.path for r in records], cache_dir=default_cache_dir(), device=model.device)
    captions = encode_captions(records, model.vocab, max_length=30)
    seen: dict[int, int] = {}
    ranks = [seen.__setitem__(i, seen.get(i, -1) + 1) or seen[i] for i in captions.image_index.tolist()]
    chosen = torch.tensor(sorted(range(len(ranks)), key=lambda i: (ranks[i], i))[:max_captions])
    return features, captions.ids[chosen], captions.image_index[chosen]


def inspect_split(model: Captioner, dataset: Dataset, split: str, out: Path, *, max_captions: int,
                  gradient_captions: int, history: tuple[list[dict], float | None]) -> list[Path]:
    """Interpretable cells, gate saturation and gradients through time over a split's reference
    captions: ``cells.png``, ``saturation.png`` (gated cells), ``gradients.png`` and ``split.json``."""
    features, ids, image_index = reference_captions(model, dataset, split, max_captions)
    with torch.no_grad():
        statistics = split_statistics(model, features, ids, image_index)
    sample = slice(0, gradient_captions)
    batch = ids[sample][:, : int((ids[sample] != model.vocab.pad).sum(1).max())]
    gradients = gradients_through_time(model, features[image_index[sample]], batch)
    rows, clip_norm = history
    training = [{k: r.get(k) for k in ("epoch", "grad_norm", "grad_norm_max", "clip_rate") if k in r} for r in rows]
    _write_json(out / "split.json", {"split": split, "cell": model.decoder.config.cell, **statistics,
                                     "gradients": gradients, "training": training, "clip_norm": clip_norm})  # fmt: skip
    written = [out / "split.json", draw_cells(statistics["shown"], out / "cells.png")]
    saturation = draw_saturation(statistics["saturation"], model.decoder.config.cell, out / "saturation.png")
    written += [saturation] if saturation else []
    curves = {f"{model.decoder.config.cell}, {gradients['captions']} captions": gradients}
    return written + [draw_gradients(curves, training, clip_norm, out / "gradients.png")]
