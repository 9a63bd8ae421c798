"""Caption generation from image features: greedy, sampling (temperature, top-k, top-p), beam search.

All three work on a batch of images at once. Every caption carries its log-probability under the
model (sum over its words and ``<end>``) and its perplexity ``exp(-log_prob / length)``.
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
    """Temperature, then top-k, then top-p (nucleus) filtering of (N, V) logits, in float64.

    A temperature or top_p below about 1e-45 is 0 in float32 and turned every logit into NaN. In
    float64 with the top logit moved to 0 first, the top word stays at 0 for any temperature > 0
    and the others fall towards -inf, so a temperature near 0 is greedy decoding, as it should be.
    """
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / options.temperature
    if 0 < options.top_k < logits.size(-1):
        kth = logits.topk(options.top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a word when the words before it already cover top_p; the top word always stays.
        drop = probs.cumsum(dim=-1) - probs >= options.top_p
        drop[:, 0] = False  # even for a top_p that is 0 in floating point
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def _decode_rows(decoder, features, options, ids, generators):
    """Greedy (``generators`` None) or sampled decoding, one caption per row of (N, F) features.

    With generators (one per image, each serving ``num_captions`` consecutive rows), the next word
    is drawn by inverse-CDF sampling from per-image uniform numbers. A row that has said ``<end>``
    leaves the batch: the steps after it cost only the captions still being written.
    """
    n_rows, device = features.size(0), features.device
    memory, state = decoder.start_stepwise(features)
    tokens = torch.full((n_rows,), ids.start, dtype=torch.long, device=device)
    words = torch.full((n_rows, options.max_length), ids.pad, dtype=torch.long, device=device)
    log_prob = torch.zeros(n_rows, device=device)
    active = torch.arange(n_rows, device=device)  # the rows still writing, in order
    for t in range(options.max_length):
        logits, state = decoder.step(tokens, state, memory)
        logp = F.log_softmax(logits.float(), dim=-1)  # (A, V)
        if generators is None:
            word = logp.argmax(dim=-1)
        else:
            # Every image draws at every step, finished or not: its samples never depend on others'.
            per_image = options.num_captions
            uniform = torch.cat([torch.rand(per_image, generator=g) for g in generators]).to(device)[active]
            cdf = _filter_logits(logp, options).softmax(dim=-1).cumsum(dim=-1)  # (A, V)
            word = torch.searchsorted(cdf, uniform.unsqueeze(1).to(cdf.dtype)).squeeze(1).clamp_(max=logp.size(-1) - 1)
        log_prob[active] += logp.gather(1, word.unsqueeze(1)).squeeze(1)
        words[active, t] = word
        writing = word != ids.end
        if not writing.all():
            if not writing.any():
                break
            active, word, memory = active[writing], word[writing], memory.rows(writing)
            state = tuple(s[:, writing] for s in state)
        tokens = word
    rows = words.tolist()
    return [Hypothesis(_trim(row, ids.end), float(lp)) for row, lp in zip(rows, log_prob.tolist())]


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
    memory, state = decoder.start_stepwise(features)  # tensors of (layers, B, H)
    # Row r of the beams always belongs to image r // k, so the memory is only ever reordered
    # when a finished image leaves the batch.
    memory = memory.rows(torch.arange(batch, device=device).repeat_interleave(k))  # B*k rows
    state = tuple(s.repeat_interleave(k, dim=1) for s in state)  # (layers, B*k, H)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so they do not duplicate each other
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, device=device)
    sequences = torch.empty(batch, k, 0, dtype=torch.long, device=device)
    tokens = torch.full((batch * k,), ids.start, dtype=torch.long, device=device)
    searching = torch.arange(batch, device=device)  # the images whose beams are not all finished
    done: dict[int, tuple] = {}  # image -> its final scores, lengths and sequences
    for _ in range(options.max_length):
        logits, state = decoder.step(tokens, state, memory)
        logp = F.log_softmax(logits.float(), dim=-1).view(len(searching), k, -1)  # (B, k, V)
        vocab = logp.size(-1)
        candidates = scores.unsqueeze(-1) + logp  # (B, k, V)
        # A finished beam has one continuation, <pad>, which keeps its score.
        frozen = torch.full_like(candidates, float("-inf"))
        frozen[..., ids.pad] = scores
        candidates = torch.where(finished.unsqueeze(-1), frozen, candidates)
        new_lengths = lengths + (~finished).float()  # (B, k)
        normalised = candidates / new_lengths.clamp(min=1).unsqueeze(-1)  # (B, k, V)
        _, flat = normalised.view(len(searching), -1).topk(k, dim=-1)  # (B, k)
        beam, word = flat // vocab, flat % vocab
        scores = candidates.view(len(searching), -1).gather(1, flat)
        lengths = new_lengths.gather(1, beam)
        was_finished = finished.gather(1, beam)
        word = word.masked_fill(was_finished, ids.pad)
        sequences = torch.cat([sequences.gather(1, beam.unsqueeze(-1).expand_as(sequences)), word.unsqueeze(-1)], -1)
        finished = was_finished | (word == ids.end)
        rows = beam + (torch.arange(len(searching), device=device) * k).unsqueeze(1)  # (B, k) state each beam continues
        going = ~finished.all(dim=1)  # (B,)
        if not going.all():  # images with every beam finished leave the batch
            for i in (~going).nonzero().flatten().tolist():
                done[int(searching[i])] = (scores[i], lengths[i], sequences[i])
            if not going.any():
                break
            searching, scores, lengths, finished = searching[going], scores[going], lengths[going], finished[going]
            sequences, rows, word = sequences[going], rows[going], word[going]
            memory = memory.rows(going.repeat_interleave(k))
        state = tuple(s[:, rows.view(-1)] for s in state)
        tokens = word.view(-1)
    for i, image in enumerate(searching.tolist()):
        done.setdefault(image, (scores[i], lengths[i], sequences[i]))
    return [_best_beams(*done[b], options.num_captions) for b in range(batch)]


def _best_beams(scores: torch.Tensor, lengths: torch.Tensor, sequences: torch.Tensor, n: int) -> list[Hypothesis]:
    """An image's (k,) beam scores and lengths and (k, T) words -> its ``n`` best hypotheses."""
    hyps = []
    for j in (scores / lengths.clamp(min=1)).argsort(descending=True).tolist():
        if math.isfinite(scores[j].item()):
            hyps.append(Hypothesis(sequences[j, : int(lengths[j].item())].tolist(), scores[j].item()))
    return hyps[:n]
