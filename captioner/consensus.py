"""Consensus re-ranking: beam search's captions re-ranked by how well they agree with what people
said of the training photographs most like this one (Devlin et al. 2015, "Language Models for Image
Captioning: The Quirks and What Works"; "Exploring Nearest Neighbor Approaches for Image Captioning").

Beam search ranks its captions by the decoder's own probability, which favours safe, generic
sentences; the references a caption is judged against are five people's words. A model trained on
Flickr8k keeps a memory of its training photographs: each one's CNN feature averaged over the grid
(unit length, float16) and its five captions. For a new photograph, the ``neighbours`` training
photographs with the most similar features are found (cosine), and each of the beam's captions is
scored by its mean CIDEr-D against their captions (``metrics.CiderD``, document frequencies
of the training captions), plus ``LOG_PROB_WEIGHT`` times its mean log-probability per word. The
caption that the neighbours' people would most nearly have written comes first.

Chosen and measured on Flickr8k's dev split (docs/photos.md): one model's beam of 8 re-ranked by
20 neighbours scored CIDEr 0.560, BLEU-4 0.222 and METEOR 0.204, against 0.534 / 0.213 / 0.200
ranked by probability (and 0.522 / 0.208 / 0.197 with a beam of 3). The chosen settings scored
alike on either half of the split. Wider beams give it more to choose from: a beam of 16 scored
at or above one of 8 on two models (``scripts/photos.sh`` decodes with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F

from captioner.decoding import Hypothesis
from captioner.errors import CaptionerError
from captioner.metrics import CiderD

LOG_PROB_WEIGHT = 0.5  # chosen on half of Flickr8k's dev split, checked on the other half (docs/photos.md)
# Per unit of the classifier's probability on a caption's words: chosen on Flickr8k's dev split with
# the novel-object model (docs/concepts.md), where it held on both halves.
CONCEPT_WEIGHT = 2.0


class CaptionMemory:
    """The training photographs' pooled features and their captions, and the re-ranking by them.

    Args:
        features: (N, C) each training image's feature averaged over the encoder's cells.
        captions: each image's captions, tokenised (lists of words).
        neighbours: how many of the most similar images re-rank by default.
    """

    def __init__(self, features: torch.Tensor, captions: Sequence[Sequence[Sequence[str]]], neighbours: int):
        if features.dim() != 2 or len(features) != len(captions) or not captions:
            raise CaptionerError("a caption memory needs one feature and one list of captions per training image")
        if not torch.isfinite(features).all():
            raise CaptionerError("a caption memory's features must be finite numbers")
        if not 1 <= neighbours <= len(captions):
            raise CaptionerError(f"a caption memory of {len(captions)} images cannot re-rank by {neighbours} neighbours")
        self.features = F.normalize(features.float(), dim=1).half()
        self.captions = [[list(words) for words in image] for image in captions]
        self.neighbours = neighbours

    @classmethod
    def from_features(
        cls, features: torch.Tensor, cells: int, captions: Sequence[Sequence[Sequence[str]]], neighbours: int
    ) -> CaptionMemory:
        """From (N, C * cells) channel-major encoder features, as the decoder reads them."""
        return cls(pooled(features, cells), captions, neighbours)

    def extended(self, features: torch.Tensor, cells: int, captions: Sequence[Sequence[Sequence[str]]]) -> CaptionMemory:
        """This memory with more training images (their (N, C * cells) features and captions) after its own."""
        more = F.normalize(pooled(features, cells).float(), dim=1).half()
        if more.size(1) != self.features.size(1):
            raise CaptionerError("the new images' features are not those of the caption memory's encoder")
        return CaptionMemory(torch.cat([self.features, more]), self.captions + [list(map(list, c)) for c in captions], self.neighbours)

    @property
    def summary(self) -> tuple[int, int]:
        """(default neighbours, images kept), what ``neighbours_for`` reads."""
        return self.neighbours, len(self.captions)

    def to_dict(self) -> dict:
        captions = [[" ".join(words) for words in image] for image in self.captions]
        return {"features": self.features, "captions": captions, "neighbours": self.neighbours}

    @classmethod
    def from_dict(cls, state: dict) -> CaptionMemory:
        return cls(state["features"], [[c.split() for c in image] for image in state["captions"]], state["neighbours"])

    @cached_property
    def features_float(self) -> torch.Tensor:
        """(N, C) the features as float32, converted once: a float16 product is slow on a CPU, and
        converting them for every batch cost 2 to 3 ms."""
        return self.features.float()

    @cached_property
    def cider(self) -> CiderD:
        """CIDEr-D against each training image's captions: built once, at the first re-ranking."""
        return CiderD(self.captions)

    def rerank(
        self, features: torch.Tensor, cells: int, hypotheses: list[list[Hypothesis]], words: Sequence[str], end: int,
        neighbours: int, concepts: torch.Tensor | None = None,
    ) -> list[list[Hypothesis]]:  # fmt: skip
        """Each image's hypotheses, best first by consensus with its ``neighbours`` nearest training images.

        Args:
            features: (B, C * cells) the images' encoder features.
            hypotheses: per image, beam search's captions.
            words: the vocabulary's words by id.
            end: the ``<end>`` id.
            concepts: (B, V) with concepts, each word's share of the classifier's probabilities
                (``_Concepts.mass``): a caption that says what the classifier sees gains
                ``CONCEPT_WEIGHT`` times the share of each such word, since the neighbours' captions
                cannot say an object none of the training photographs was captioned with.
        """
        query = pooled(features, cells)
        if query.size(1) != self.features.size(1):
            raise CaptionerError("the caption memory's features do not match this encoder's")
        query = F.normalize(query.float(), dim=1).cpu()
        nearest = (query @ self.features_float.T).topk(neighbours, dim=1).indices.tolist()  # (B, K)
        seen = concepts.float().cpu() if concepts is not None else None
        ranked = []
        for i, (images, hyps) in enumerate(zip(nearest, hypotheses)):
            def score(h: Hypothesis) -> float:
                agreement = self.cider.mean_score(images, [words[t] for t in h.tokens if t != end])
                said = seen[i, sorted(set(h.tokens))].sum().item() if seen is not None else 0.0
                return agreement + LOG_PROB_WEIGHT * h.log_prob / max(len(h.tokens), 1) + CONCEPT_WEIGHT * said

            ranked.append(sorted(hyps, key=score, reverse=True))
        return ranked


def neighbours_for(mode: str, rerank: int | None, memory: tuple[int, int] | None) -> int:
    """How many training images' captions re-rank a caption (0: none): the one rule for every entry point.

    Args:
        mode, rerank: the decoding options' (``rerank`` None: the model's default).
        memory: the model's caption memory as (its default neighbours, its images); None without one.

    Raises:
        CaptionerError: re-ranking asked of a model that keeps no training captions, or by more
            images than it keeps.
    """
    if mode != "beam" or rerank == 0:
        return 0
    if memory is None:
        if rerank is None:
            return 0
        raise CaptionerError("this model keeps no training captions to re-rank by: leave rerank out")
    default, images = memory
    if rerank is not None and rerank > images:
        raise CaptionerError(f"rerank must be at most {images}, the training images this model keeps")
    return default if rerank is None else rerank


def pooled(features: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, C * cells) channel-major features -> (B, C), averaged over the cells."""
    return features.view(features.size(0), -1, cells).mean(dim=2)
