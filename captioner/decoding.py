"""Caption generation from image features: greedy, sampling (temperature, top-k, top-p), beam search.

All three work on a batch of images at once. Every caption carries its log-probability under the
model (sum over its words and ``<end>``), its perplexity ``exp(-log_prob / length)`` and whether it
is finished (ends with ``<end>``) or was cut at ``max_length``. With ``explain``, each also carries,
per word, its log-probability and the attention over the image's cells when it was said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captioner.options import DecodeOptions

@dataclass
class Hypothesis:
    """One generated caption: word ids (ending with ``<end>`` unless cut at max_length) and score."""

    tokens: list[int]
    log_prob: float
    finished: bool = True  # False: cut at max_length before <end>
    # With explain: per token, its log-probability (T,) and the attention over the cells (T, N).
    word_log_probs: list[float] | None = None
    attention: list[list[float]] | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_prob / max(len(self.tokens), 1))


@dataclass(frozen=True)
class SpecialIds:
    start: int
    end: int
    pad: int


def _trim(row: list[int], end: int) -> list[int]:
    """Ids up to and including the first ``<end>``."""
    return row[: row.index(end) + 1] if end in row else row


@torch.inference_mode()
def generate(decoder, features: torch.Tensor, options: DecodeOptions, ids: SpecialIds, seeds=None):
    """Captions for a batch of image features.

    Args:
        decoder: an ``LSTMDecoder`` (``start`` and ``step``).
        features: (B, F) image features.
        options: how to decode.
        ids: the special token ids.
        seeds: for sampling, one seed (or None) per image, so an image's samples do not depend on
            the other images in the batch; defaults to ``options.seed`` for every image.

    Returns:
        For each image, ``options.num_captions`` hypotheses, best first for beam search.
    """
    results = _generate(decoder, features, options, ids, seeds)
    if options.explain:
        explain(decoder, features, results, ids)
    return results


def _generate(decoder, features, options, ids, seeds):
    if options.mode == "beam":
        return beam_search(decoder, features, options, ids)
    if options.mode == "greedy":
        return [[h] for h in _decode_rows(decoder, features, options, ids, None)]
    n = options.num_captions
    seeds = seeds if seeds is not None else [options.seed] * features.size(0)
    generators = []
    for seed in seeds:
        g = torch.Generator()
        g.manual_seed(seed if seed is not None else torch.seed())
        generators.append(g)
    rows = _decode_rows(decoder, features.repeat_interleave(n, dim=0), options, ids, generators)
    return [rows[i * n : (i + 1) * n] for i in range(features.size(0))]


def _filter_logits(logits: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of (N, V) logits."""
    logits = logits / options.temperature
    if 0 < options.top_k < logits.size(-1):
        kth = logits.topk(options.top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a word when the words before it already cover top_p; the top word always stays.
        drop = probs.cumsum(dim=-1) - probs >= options.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def _decode_rows(decoder, features, options, ids, generators):
    """Greedy (``generators`` None) or sampled decoding, one caption per row of (N, F) features.

    With generators (one per image, each serving ``num_captions`` consecutive rows), the next word
    is drawn by inverse-CDF sampling from per-image uniform numbers.
    """
    n_rows = features.size(0)
    memory, state = decoder.start(features)
    tokens = torch.full((n_rows,), ids.start, dtype=torch.long, device=features.device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=features.device)
    log_prob = torch.zeros(n_rows, device=features.device)
    steps = []
    for _ in range(options.max_length):
        logits, state = decoder.step(tokens, state, memory)
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        if generators is None:
            word = logp.argmax(dim=-1)
        else:
            per_image = options.num_captions
            uniform = torch.cat([torch.rand(per_image, generator=g) for g in generators]).to(features.device)
            cdf = _filter_logits(logp, options).softmax(dim=-1).cumsum(dim=-1)  # (N, V)
            word = torch.searchsorted(cdf, uniform.unsqueeze(1)).squeeze(1).clamp_(max=logp.size(-1) - 1)
        word = word.masked_fill(finished, ids.pad)
        chosen = logp.gather(1, word.unsqueeze(1)).squeeze(1)
        log_prob += chosen.masked_fill(finished, 0.0)
        steps.append(word)
        finished |= word == ids.end
        tokens = word
        if finished.all():
            break
    sequences = torch.stack(steps, dim=1).tolist()  # (N, T)
    return [
        Hypothesis(_trim(row, ids.end), float(lp), finished=ids.end in row)
        for row, lp in zip(sequences, log_prob.tolist())
    ]


def beam_search(decoder, features: torch.Tensor, options: DecodeOptions, ids: SpecialIds):
    """Beam search over a whole batch of images at once.

    Beams are ranked by length-normalised log-probability (mean per word, i.e. by perplexity).
    A beam that emits ``<end>`` stays in the beam, finished, with its score frozen; a beam still
    running at ``max_length`` is returned as it is, so a model that never emits ``<end>`` still gets
    captions. With beam_size 1 this is exactly greedy decoding.

    Args:
        decoder: an ``LSTMDecoder``.
        features: (B, F) image features.
        options: ``beam_size``, ``num_captions`` and ``max_length`` are used.
        ids: the special token ids.

    Returns:
        For each image, its ``num_captions`` best hypotheses, best first.
    """
    batch, k, device = features.size(0), options.beam_size, features.device
    memory, state = decoder.start(features)  # (B, N, H), tensors of (layers, B, H)
    # Row r of the beams always belongs to image r // k, so the memory is never reordered.
    memory = memory.repeat_interleave(k, dim=0)  # (B*k, N, H)
    state = tuple(s.repeat_interleave(k, dim=1) for s in state)  # (layers, B*k, H)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so they do not duplicate each other
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, device=device)
    sequences = torch.empty(batch, k, 0, dtype=torch.long, device=device)
    tokens = torch.full((batch * k,), ids.start, dtype=torch.long, device=device)
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)
    for _ in range(options.max_length):
        logits, state = decoder.step(tokens, state, memory)
        logp = F.log_softmax(logits.float(), dim=-1).view(batch, k, -1)  # (B, k, V)
        vocab = logp.size(-1)
        candidates = scores.unsqueeze(-1) + logp  # (B, k, V)
        # A finished beam has one continuation, <pad>, which keeps its score.
        frozen = torch.full_like(candidates, float("-inf"))
        frozen[..., ids.pad] = scores
        candidates = torch.where(finished.unsqueeze(-1), frozen, candidates)
        new_lengths = lengths + (~finished).float()  # (B, k)
        normalised = candidates / new_lengths.clamp(min=1).unsqueeze(-1)  # (B, k, V)
        _, flat = normalised.view(batch, -1).topk(k, dim=-1)  # (B, k)
        beam, word = flat // vocab, flat % vocab
        scores = candidates.view(batch, -1).gather(1, flat)
        lengths = new_lengths.gather(1, beam)
        was_finished = finished.gather(1, beam)
        word = word.masked_fill(was_finished, ids.pad)
        sequences = torch.cat([sequences.gather(1, beam.unsqueeze(-1).expand_as(sequences)), word.unsqueeze(-1)], -1)
        finished = was_finished | (word == ids.end)
        rows = (beam + offsets).view(-1)  # (B*k,) which state each new beam continues
        state = tuple(s[:, rows] for s in state)
        tokens = word.view(-1)
        if finished.all():
            break
    ranked = (scores / lengths.clamp(min=1)).argsort(dim=-1, descending=True)  # (B, k)
    results = []
    for b in range(batch):
        hyps = []
        for j in ranked[b].tolist():
            if math.isfinite(scores[b, j].item()):
                row = sequences[b, j, : int(lengths[b, j].item())].tolist()
                hyps.append(Hypothesis(row, scores[b, j].item(), finished=bool(finished[b, j])))
        results.append(hyps[: options.num_captions])
    return results


def explain(decoder, features: torch.Tensor, hypotheses: list[list[Hypothesis]], ids: SpecialIds) -> None:
    """Fills in each hypothesis's per-word log-probabilities and attention, in place.

    The captions are replayed through the decoder (teacher forcing, one step at a time): one more
    pass over the final captions, whatever the mode, so greedy, sampling and beam search keep
    their loops free of bookkeeping that only explanations need. A step's attention is what it
    added to the coverage (the attention each cell has had so far): the weights ``_Attention``
    computed, with no second path through the decoder.

    Args:
        decoder: an ``LSTMDecoder``.
        features: (B, F) image features.
        hypotheses: per image, its hypotheses (as ``generate`` returns them).
        ids: the special token ids.
    """
    for hyps in hypotheses:
        for h in hyps:
            h.word_log_probs, h.attention = [], []  # stays so for a caption without tokens
    rows = [(b, h) for b, hyps in enumerate(hypotheses) for h in hyps if h.tokens]
    if not rows:
        return
    index = torch.tensor([b for b, _ in rows], device=features.device)
    steps = max(len(h.tokens) for _, h in rows)
    tokens = torch.zeros(len(rows), steps, dtype=torch.long, device=features.device)  # (R, T)
    for r, (_, h) in enumerate(rows):
        tokens[r, : len(h.tokens)] = torch.tensor(h.tokens)
    memory, state = decoder.start(features[index])
    previous = torch.full((len(rows),), ids.start, dtype=torch.long, device=features.device)
    chosen, attention = [], []
    for t in range(steps):
        coverage = state[-1][0]  # (R, N) before this step
        logits, state = decoder.step(previous, state, memory)
        logp = F.log_softmax(logits.float(), dim=-1)  # (R, V)
        chosen.append(logp.gather(1, tokens[:, t : t + 1]).squeeze(1))
        attention.append(state[-1][0] - coverage)
        previous = tokens[:, t]
    chosen = torch.stack(chosen, dim=1).tolist()  # (R, T)
    attention = torch.stack(attention, dim=1).float().clamp_(min=0).tolist()  # (R, T, N)
    for r, (_, h) in enumerate(rows):
        h.word_log_probs = chosen[r][: len(h.tokens)]
        h.attention = attention[r][: len(h.tokens)]
