"""Trust: how well a caption describes a photograph, judged from what the model keeps.

Nothing here reads a human caption of the photograph being judged: only the model's weights, its
caption memory (its training photographs' pooled features and captions, ``consensus.py``) and its
classifier's concepts. Five signals, each for one caption of one image:

- ``log_prob``: the caption's mean log-probability per word (``<end>`` included) under the model,
  one teacher-forced pass (for a generated caption, decoding's own, at no cost);
- ``contrast``: the same minus its mean log-probability under a blind image (a grid of zeros, a
  classifier undecided between its classes), a pointwise mutual information per word: what this
  photograph adds to the caption's probability beyond the words people say of any photograph;
- ``consensus``: its mean CIDEr-D against the captions of the memory's nearest training
  photographs (what re-ranking reads);
- ``concepts``: the share of the ImageNet classifier's probability on the caption's words;
- ``familiarity``: the photograph's greatest cosine similarity to any training photograph
  (pooled grid features, as the memory keeps them).

Two logistic regressions of them (``Head``: a weight per standardised signal and a bias), fitted
by ``captioner calibrate-trust`` on a dev split (``evaluation.calibrate_trust``), make the
``TrustCalibration`` a checkpoint carries: the ``score`` of a given caption (the chance that it is
the photograph's own reference rather than another's) and the ``confidence`` of a generated one
(the chance that it does as well as a person's caption, by CIDEr-D). They read different signals
because they were chosen by measurement: contrast tells own references from others' best, but
says almost nothing of which generated captions are good, and its pass costs what greedy decoding
does. A photograph whose familiarity is below the calibration's ``threshold`` (about 2% of dev
photographs fall below it) is ``unfamiliar``, and both are capped at ``UNFAMILIAR_SCORE``: nothing
they were fitted on was like it. docs/trust.md has the numbers behind each choice.

The fitting and measuring helpers (``fit_logistic``, ``auc``, ``kendall_tau``, ``reliability``,
``dev_pairs``) are plain numpy, so that a calibration is a few numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from captioner.consensus import CaptionMemory, pooled
from captioner.data.vocab import Vocabulary, tokenize
from captioner.decoding import SpecialIds, next_word_log_probs
from captioner.errors import CaptionerError
from captioner.options import SCORED_WORDS

SIGNALS = ("log_prob", "contrast", "consensus", "concepts", "familiarity")
MAX_WORDS = SCORED_WORDS  # a given caption is scored on its first MAX_WORDS words
UNFAMILIAR_SCORE = 0.1  # the most an unfamiliar photograph's caption scores
ROWS = 128  # captions per teacher-forced pass: (ROWS, T, V) log-probabilities at once


@dataclass(frozen=True)
class Head:
    """One logistic regression of signals: sigmoid(bias + sum_s weight_s * (signal_s - mean_s) / scale_s).

    Args:
        signals: the signals it reads, of ``SIGNALS``.
        weights, mean, scale: per signal.
        bias: the intercept.
    """

    signals: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self):
        for name in ("signals", "weights", "mean", "scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.signals or set(self.signals) - set(SIGNALS) or len(set(self.signals)) != len(self.signals):
            raise CaptionerError(f"a trust calibration reads some of {', '.join(SIGNALS)}, each once")
        if not len(self.weights) == len(self.mean) == len(self.scale) == len(self.signals):
            raise CaptionerError("a trust calibration needs a weight, mean and scale per signal")
        if not all(math.isfinite(x) for x in (*self.weights, *self.mean, *self.scale, self.bias)) or min(self.scale) <= 0:
            raise CaptionerError("a trust calibration's numbers must be finite, its scales positive")

    @classmethod
    def fit(cls, signals: Sequence[str], values: np.ndarray, labels: np.ndarray) -> Head:
        """Fitted to (N, S) ``values`` of ``signals`` and (N,) labels in [0, 1] (``fit_logistic``)."""
        weights, bias, mean, scale = fit_logistic(values, labels)
        return cls(tuple(signals), tuple(weights.tolist()), bias, tuple(mean.tolist()), tuple(scale.tolist()))

    def to_dict(self) -> dict:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    def probability(self, values: np.ndarray) -> np.ndarray:
        """(N, S) signal values, in ``signals``' order -> (N,) probabilities."""
        z = (values - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(self.bias + z @ np.asarray(self.weights))


@dataclass(frozen=True)
class TrustCalibration:
    """How captions are scored and photographs judged unfamiliar, as plain data a checkpoint carries.

    Args:
        score: a given caption's ``score``: the chance that it is one of the photograph's own
            references rather than another dev photograph's (of a balanced pair of the two).
        confidence: a generated caption's ``confidence``: the chance that it does as well, by
            CIDEr-D against people's captions of the photograph, as one of those people's own
            caption does against the others (``evaluation.parity``); None: not fitted.
        threshold: a photograph less similar than this to every training photograph is
            unfamiliar (None: no threshold, for a model without a caption memory).
        encoder: the encoder whose features the threshold is for.
        fitted_on: what it was fitted on (data set, split, photographs, pairs, model version).
        quality: what it scored on the held-out half of the dev split.
    """

    score: Head
    confidence: Head | None
    threshold: float | None
    encoder: str
    fitted_on: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise CaptionerError("a trust calibration's threshold must be a finite number")

    def to_dict(self) -> dict:
        return {
            "score": self.score.to_dict(),
            "confidence": self.confidence.to_dict() if self.confidence else None,
            "threshold": self.threshold,
            "encoder": self.encoder,
            "fitted_on": self.fitted_on,
            "quality": self.quality,
        }

    @classmethod
    def from_dict(cls, state: dict) -> TrustCalibration:
        try:
            confidence = Head(**state["confidence"]) if state.get("confidence") else None
            return cls(Head(**state["score"]), confidence, **{k: v for k, v in state.items() if k not in ("score", "confidence")})
        except (TypeError, KeyError) as exc:
            raise CaptionerError(f"a trust calibration does not fit this captioner ({type(exc).__name__}: {exc})") from None


# What a photo model that was never calibrated scores with (its records say so): fitted by
# ``captioner calibrate-trust`` on Flickr8k's dev split with the novel-objects photo model
# (docs/trust.md), rounded to 6 digits. It applies only to a model with the same encoder and every
# signal it reads (a caption memory and concepts); the threshold is for that encoder's features.
DEFAULT_CALIBRATION: dict | None = {
    "score": {
        "signals": ["log_prob", "contrast", "consensus", "concepts"],
        "weights": [0.229364, 1.07077, -0.0372395, 0.297609],
        "bias": -0.0159833,
        "mean": [-3.14551, 0.570712, 0.1072, 0.15573],
        "scale": [1.13009, 0.7607, 0.130671, 0.30784],
    },
    "confidence": {
        "signals": ["log_prob", "consensus", "concepts", "familiarity"],
        "weights": [0.28214, 0.428233, -0.086802, 0.108783],
        "bias": -0.859018,
        "mean": [-0.907348, 0.36095, 0.190038, 0.637405],
        "scale": [0.203652, 0.25027, 0.333438, 0.0610124],
    },
    "threshold": 0.509927,
    "encoder": "efficientnet_lite0",
    "fitted_on": {
        "images": 1000, "pairs": 10000, "generated": 2000, "fitted_images": 500, "seed": 0, "data": "flickr8k",
        "split": "val", "model": "runs/novel-objects-v1/model.pt (1e6f95c4adbb)",
    },
    "quality": {
        "score_auc": 0.766334, "score_auc_near": 0.659835, "score_auc_far": 0.926083, "score_calibration_error": 0.0427894,
        "confidence_kendall_tau_with_cider": 0.375606, "confidence_calibration_error": 0.0224279,
    },
}  # fmt: skip


@functools.cache
def _default_calibration() -> TrustCalibration | None:
    return TrustCalibration.from_dict(DEFAULT_CALIBRATION) if DEFAULT_CALIBRATION else None


def calibration_for(calibration: TrustCalibration | None, encoder: str, available: Sequence[str]) -> tuple[TrustCalibration | None, str | None]:
    """The calibration a model's scores use, and a note when it is not its own.

    Args:
        calibration: the model's own (from its checkpoint), if any.
        encoder: the model's encoder name.
        available: the signals the model can compute.

    Returns:
        ``(calibration, None)`` for its own; ``(DEFAULT_CALIBRATION, note)`` where that fits; else
        ``(None, note)``: the model cannot score.
    """
    if calibration is not None:
        if calibration.encoder != encoder:
            return None, "its trust calibration is of another encoder's features: run captioner calibrate-trust again"
        return calibration, None
    default = _default_calibration()
    if default is not None and default.encoder == encoder and set(default.score.signals) <= set(available):
        return default, "uncalibrated: scored with a Flickr8k photo model's calibration (captioner calibrate-trust fits this model's own)"
    return None, "uncalibrated: this model cannot score captions until captioner calibrate-trust fits its calibration"


# --- a caption as the model reads it --------------------------------------------------------


@dataclass(frozen=True)
class CaptionTokens:
    """A given caption as the model reads it.

    Attributes:
        words: its words (tokenised, cut at ``max_words``), as given.
        ids: their vocabulary ids (``<unk>`` for unknown words), then ``<end>`` unless cut.
        unknown: the words the vocabulary lacks, in order.
        truncated: it had more than ``max_words`` words.
    """

    words: list[str]
    ids: list[int]
    unknown: list[str]
    truncated: bool


def caption_tokens(text: str, vocab: Vocabulary, max_words: int = MAX_WORDS) -> CaptionTokens:
    """``text`` tokenised as the training captions were, cut at ``max_words`` words."""
    words = tokenize(text)
    truncated = len(words) > max_words
    words = words[:max_words]
    ids = [vocab.index.get(w, vocab.unk) for w in words] + ([] if truncated else [vocab.end])
    return CaptionTokens(words, ids, [w for w in words if w not in vocab.index], truncated)


@torch.inference_mode()
def token_log_probs(decoder, features: torch.Tensor, rows: Sequence[Sequence[int]], ids: SpecialIds, image_of: Sequence[int] | None = None) -> list[list[float]]:
    """Each caption's log-probability of each of its tokens under teacher forcing.

    Known words get the probability generation gives them (``<unk>`` excluded, as decoding never
    says it: ``decoding.next_word_log_probs``); an ``<unk>`` gets the model's own probability of
    ``<unk>``, of some word too rare for its vocabulary, so that an unknown word is neither free nor
    impossible.

    Args:
        decoder: an ``AttentionDecoder``.
        features: (B, F) image features.
        rows: per caption, its ids after ``<start>`` (words, then ``<end>`` unless cut).
        image_of: per caption, its row of ``features`` (default: caption i, row i).

    Returns:
        Per caption, one log-probability per id of its row.
    """
    image_of = list(range(len(rows))) if image_of is None else list(image_of)
    device = features.device
    said: list[list[float]] = []
    for start in range(0, len(rows), ROWS):
        chunk, images = rows[start : start + ROWS], image_of[start : start + ROWS]
        width = max(1, *(len(r) for r in chunk))
        targets = torch.full((len(chunk), width), ids.pad, dtype=torch.long)
        for i, row in enumerate(chunk):
            targets[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        targets = targets.to(device)
        inputs = torch.cat([torch.full_like(targets[:, :1], ids.start), targets[:, :-1]], dim=1)  # (R, T)
        unique, inverse = torch.tensor(images).unique(return_inverse=True)
        memory, state = decoder.start(features[unique.to(device)])
        inverse = inverse.to(device)
        logits, _ = decoder.run(inputs, state.rows(inverse), memory.rows(inverse))  # (R, T, V)
        picked = next_word_log_probs(logits, ids).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (R, T)
        if ids.unk is not None:
            raw = logits.float().log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            picked = torch.where(targets == ids.unk, raw, picked)
        said += [values[: len(row)] for values, row in zip(picked.tolist(), chunk)]
    return said


def blind_features(decoder_config, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, F) an image the decoder reads as nothing in particular: a grid of zeros and, with
    concepts, a classifier undecided between its classes (each 1/1000).

    Measured on Flickr8k's dev pairs (docs/trust.md), the score with the contrast under it ranks own
    references above others' with AUC 0.773, against 0.711 under a classifier that gives every
    class 0 (whose concept words then weigh nothing), 0.771 under the mean dev photograph, which a
    checkpoint would have to carry, and 0.768 under four random dev photographs (four passes)."""
    features = torch.zeros(1, decoder_config.feature_dim, device=device)
    if decoder_config.concept_ids:
        features[:, decoder_config.grid_dim :] = 1.0 / len(decoder_config.concept_ids)
    return features


# --- the signals and the verdict ------------------------------------------------------------


@dataclass
class Verdict:
    """What trust says of one caption of one image.

    Attributes:
        score: in [0, 1], the chance that the caption is the photograph's own reference rather than
            another's (``TrustCalibration.score``; None: no calibration, or no ``contrast`` computed).
        confidence: in [0, 1], the chance that it does as well as a person's caption
            (``TrustCalibration.confidence``; None: not fitted).
        unfamiliar: the photograph is far from every training photograph (None: cannot tell).
        familiarity: its greatest cosine similarity to a training photograph (None: no memory).
        signals: each signal's value (those the model can compute).
        note: why ``score`` or ``unfamiliar`` is None, or that the calibration is not the model's own.
    """

    score: float | None
    confidence: float | None
    unfamiliar: bool | None
    familiarity: float | None
    signals: dict[str, float]
    note: str | None = None


class Judge:
    """Computes the signals of captions and scores them with a calibration.

    Args:
        decoder: the captioner's ``AttentionDecoder``.
        vocab: its vocabulary.
        ids: its special ids.
        memory: its caption memory (None: no consensus, no familiarity).
        calibration: its own calibration, if any (``calibration_for`` picks what scores).
        encoder: its encoder's name.
    """

    def __init__(self, decoder, vocab: Vocabulary, ids: SpecialIds, memory: CaptionMemory | None, calibration: TrustCalibration | None, encoder: str):
        self.decoder, self.vocab, self.ids, self.memory = decoder, vocab, ids, memory
        self.available = [s for s in SIGNALS if self._can(s)]
        self.calibration, self.note = calibration_for(calibration, encoder, self.available)

    @property
    def confidence_reads_contrast(self) -> bool:
        """Whether a generated caption's confidence needs the blind pass (``signals(contrast=True)``)."""
        head = self.calibration.confidence if self.calibration else None
        return head is not None and "contrast" in head.signals

    def _can(self, signal: str) -> bool:
        if signal in ("consensus", "familiarity"):
            return self.memory is not None
        if signal == "concepts":
            return self.decoder.concepts is not None
        return True

    def signals(
        self, features: torch.Tensor, image_of: Sequence[int], rows: Sequence[Sequence[int]], words: Sequence[Sequence[str]],
        log_probs: Sequence[float], contrast: bool = True,
    ) -> list[dict[str, float]]:  # fmt: skip
        """Each caption's signals.

        Args:
            features: (B, F) the images' features.
            image_of: per caption, its image's row of ``features``.
            rows: per caption, its ids (words, then ``<end>`` unless cut).
            words: per caption, its words (for consensus: an unknown word is still a word).
            log_probs: per caption, the sum of its ids' log-probabilities under its image.
            contrast: compute ``contrast``, a second teacher-forced pass (under the blind image),
                which costs about what greedy decoding does; without it, no ``contrast``.
        """
        config = self.decoder.config
        values = [{"log_prob": lp / max(len(row), 1)} for row, lp in zip(rows, log_probs)]
        if contrast:
            blind = token_log_probs(self.decoder, blind_features(config, features.device), rows, self.ids, [0] * len(rows))
            for value, row, lp, nothing in zip(values, rows, log_probs, blind):
                value["contrast"] = (lp - sum(nothing)) / max(len(row), 1)
        used = sorted(set(image_of))  # the images the captions are of: each read once
        row_of = {image: row for row, image in enumerate(used)}
        image_of = [row_of[i] for i in image_of]
        features = features if used == list(range(len(features))) else features[used]
        grid, classes = features.split([config.grid_dim, len(config.concept_ids)], dim=1)
        if self.memory is not None:
            familiarity, nearest = self.nearest(grid)
            for value, i, said in zip(values, image_of, words):
                value["consensus"] = self.memory.cider.mean_score(nearest[i], said)
                value["familiarity"] = familiarity[i]
        if self.decoder.concepts is not None:
            mass = self.decoder.concepts.mass(classes.float()).cpu()  # (B, V)
            for value, i, row in zip(values, image_of, rows):
                seen = sorted({t for t in row if t not in (self.ids.end, self.ids.unk)})
                value["concepts"] = float(mass[i, seen].sum()) if seen else 0.0
        return values

    def nearest(self, grid: torch.Tensor) -> tuple[list[float], list[list[int]]]:
        """(B, C * cells) grid features -> each image's familiarity and its nearest training photographs."""
        query = F.normalize(pooled(grid, self.decoder.config.cells).float(), dim=1).cpu()
        if query.size(1) != self.memory.features.size(1):
            raise CaptionerError("the caption memory's features do not match this encoder's")
        similarity = query @ self.memory.features_float.T  # (B, N)
        top = similarity.topk(self.memory.neighbours, dim=1)
        return top.values[:, 0].tolist(), top.indices.tolist()

    def verdicts(self, values: Sequence[dict[str, float]]) -> list[Verdict]:
        """Each caption's verdict from its signals: its score and confidence where the signals
        their heads read were computed, and whether its image is unfamiliar."""
        calibration = self.calibration
        heads = {"score": calibration.score, "confidence": calibration.confidence} if calibration else {}
        probabilities = {name: _apply(head, values) for name, head in heads.items()}
        verdicts = []
        for k, value in enumerate(values):
            familiarity = value.get("familiarity")
            notes = [self.note] if self.note else []
            if calibration is not None and calibration.confidence is None:
                notes.append("its calibration has no confidence of generated captions: run captioner calibrate-trust again")
            found = {name: (p[k] if p is not None else None) for name, p in probabilities.items()}
            score, confidence = found.get("score"), found.get("confidence")
            if familiarity is None:
                unfamiliar = None
                notes.append("this model keeps no training photographs to compare with: it cannot tell whether this one is unfamiliar")
            elif calibration is None or calibration.threshold is None:
                unfamiliar = None
            else:
                unfamiliar = familiarity < calibration.threshold
                if unfamiliar:  # nothing the heads were fitted on was like it
                    score = None if score is None else min(score, UNFAMILIAR_SCORE)
                    confidence = None if confidence is None else min(confidence, UNFAMILIAR_SCORE)
            verdicts.append(Verdict(score, confidence, unfamiliar, familiarity, dict(value), "; ".join(notes) or None))
        return verdicts


def _apply(head: Head | None, values: Sequence[dict[str, float]]) -> list[float] | None:
    """A head's probability of each caption, or None if it has none or they lack a signal it reads."""
    if head is None or not values or any(s not in values[0] for s in head.signals):
        return None
    return head.probability(np.array([[v[s] for s in head.signals] for v in values], dtype=np.float64)).tolist()


# --- fitting and measuring, on the dev split ---------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for any z


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 50) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """A logistic regression by Newton's method on standardised columns.

    Args:
        x: (N, S) signals.
        y: (N,) labels in [0, 1].
        l2: ridge on the weights (not the bias), per example.

    Returns:
        ``(weights, bias, mean, scale)``: ``sigmoid(bias + ((x - mean) / scale) @ weights)``.
    """
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    theta = np.zeros(z.shape[1])
    ridge = np.diag([l2 * len(x)] * (z.shape[1] - 1) + [0.0])
    for _ in range(iterations):
        p = _sigmoid(z @ theta)
        gradient = z.T @ (p - y) + ridge @ theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + ridge + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[:-1], float(theta[-1]), mean, scale


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the ROC curve: the chance that a positive outranks a negative (ties half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks of ties (1-based), as the Mann-Whitney U statistic counts them.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    positives, negatives = labels.sum(), (~labels).sum()
    if not positives or not negatives:
        return float("nan")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (O(n^2): for a few thousand values)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    concordant = (da * db).sum() / 2
    ties_a, ties_b = (da != 0).sum() / 2, (db != 0).sum() / 2
    return float(concordant / math.sqrt(ties_a * ties_b)) if ties_a and ties_b else float("nan")


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict]:
    """Predicted score bins against the observed share of positives in each.

    Returns:
        Per non-empty bin of equal width: ``{"low", "high", "pairs", "predicted", "observed"}``.
    """
    probabilities, labels = np.asarray(probabilities), np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    table = []
    for k in range(bins):
        inside = which == k
        if inside.any():
            table.append({
                "low": float(edges[k]), "high": float(edges[k + 1]), "pairs": int(inside.sum()),
                "predicted": float(probabilities[inside].mean()), "observed": float(labels[inside].mean()),
            })  # fmt: skip
    return table


def expected_calibration_error(table: Sequence[dict]) -> float:
    """The pairs-weighted mean gap between predicted and observed over ``reliability``'s bins."""
    total = sum(row["pairs"] for row in table)
    return sum(row["pairs"] * abs(row["predicted"] - row["observed"]) for row in table) / max(total, 1)


@dataclass(frozen=True)
class Pair:
    """A caption of one dev photograph put to another (or the same) photograph.

    Attributes:
        image: the photograph scored (an index into the split's photographs).
        source: the photograph whose reference the caption is.
        caption: which of its references.
        kind: ``own``, ``near`` (one of the photograph's nearest dev photographs) or ``far`` (random).
    """

    image: int
    source: int
    caption: int
    kind: str

    @property
    def label(self) -> int:
        return int(self.kind == "own")


def dev_pairs(similarity: torch.Tensor, references: Sequence[int], near: int = 3, far: int = 2, nearest: int = 5, seed: int = 0) -> list[Pair]:
    """Pairs to fit and measure the score on: each photograph with each of its own references
    (positives) and ``near`` + ``far`` other photographs' (negatives): a random reference of one
    of its ``nearest`` most similar photographs each, and of random photographs.

    Args:
        similarity: (N, N) the photographs' cosine similarities to each other.
        references: how many references each photograph has.
    """
    n = len(references)
    if n < max(nearest, far) + 2:
        raise CaptionerError(f"{n} photographs are too few to make pairs of (at least {max(nearest, far) + 2})")
    generator = np.random.default_rng(seed)
    others = similarity.clone().fill_diagonal_(-math.inf).topk(nearest, dim=1).indices.tolist()
    pairs = []
    for i in range(n):
        pairs += [Pair(i, i, k, "own") for k in range(references[i])]
        for j in generator.choice(others[i], size=min(near, nearest), replace=False).tolist():
            pairs.append(Pair(i, j, int(generator.integers(references[j])), "near"))
        for _ in range(far):
            j = int(generator.integers(n - 1))
            j += j >= i  # anyone but itself
            pairs.append(Pair(i, j, int(generator.integers(references[j])), "far"))
    return pairs
