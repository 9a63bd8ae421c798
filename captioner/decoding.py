"""Caption generation from image features: greedy, sampling (temperature, top-k, top-p), beam search.

All three work on a batch of images at once. Every caption carries its log-probability under the
model (sum over its words and ``<end>``; ``<unk>`` is never said, and its probability goes to the
other words), its perplexity ``exp(-log_prob / length)`` and whether it
is finished (ends with ``<end>``) or was cut at ``max_length``. With ``explain``, each also carries,
per word, its log-probability and the attention over the image's cells when it was said, kept as
decoding goes (beam search carries them through its reordering of the beams, as it does the words);
a step's attention is what it added to the coverage, the attention each cell has had so far.
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
    unk: int | None = None  # never said: its probability goes to the words the vocabulary kept


def next_word_log_probs(logits: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """(N, V) logits (or log-probabilities) -> (N, V) float32 log-probabilities of the next word,
    ``<unk>`` excluded: a caption saying "two <unk> <unk>" tells a reader nothing."""
    logits = logits.float()
    if ids.unk is not None:
        logits = logits.index_fill(-1, torch.tensor([ids.unk], device=logits.device), float("-inf"))
    return F.log_softmax(logits, dim=-1)


def _trim(row: list[int], end: int) -> list[int]:
    """Ids up to and including the first ``<end>``."""
    return row[: row.index(end) + 1] if end in row else row


@torch.inference_mode()
def generate(decoder, features: torch.Tensor, options: DecodeOptions, ids: SpecialIds, seeds=None):
    """Captions for a batch of image features.

    Args:
        decoder: an ``AttentionDecoder`` (``start`` and ``step``).
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
    n_rows, device, length = features.size(0), features.device, options.max_length
    memory, state = decoder.start_stepwise(features, options.concept_boost)
    tokens = torch.full((n_rows,), ids.start, dtype=torch.long, device=device)
    words = torch.full((n_rows, length), ids.pad, dtype=torch.long, device=device)
    log_prob = torch.zeros(n_rows, device=device)
    if options.explain:  # per row and step, the word's log-probability and the attention it was said with
        said = torch.zeros(n_rows, length, device=device)
        looked = torch.zeros(n_rows, length, state.coverage.size(-1), device=device)
    active = torch.arange(n_rows, device=device)  # the rows still writing, in order
    for t in range(length):
        coverage = state.coverage[0]  # (A, cells): the attention each cell has had before this step
        logits, state = decoder.step(tokens, state, memory)
        logp = next_word_log_probs(logits, ids)  # (A, V)
        if generators is None:
            chosen, word = logp.max(dim=-1)  # (A,) each
        else:
            # Every image draws at every step, finished or not: its samples never depend on others'.
            per_image = options.num_captions
            uniform = torch.cat([torch.rand(per_image, generator=g) for g in generators]).to(device)[active]
            cdf = _filter_logits(logp, options).softmax(dim=-1).cumsum(dim=-1)  # (A, V)
            word = torch.searchsorted(cdf, uniform.unsqueeze(1).to(cdf.dtype)).squeeze(1).clamp_(max=logp.size(-1) - 1)
            chosen = logp.gather(1, word.unsqueeze(1)).squeeze(1)  # (A,)
        # In place, one operation each: a step costs its number of operations more than their size.
        log_prob.index_add_(0, active, chosen)
        words[:, t].index_copy_(0, active, word)
        if options.explain:
            said[:, t].index_copy_(0, active, chosen)
            looked[:, t].index_copy_(0, active, state.coverage[0] - coverage)  # this step's attention weights
        writing = word != ids.end
        if not writing.all():
            if not writing.any():
                break
            kept = writing.nonzero().squeeze(1)
            active, word, memory = active[kept], word[kept], memory.rows(kept)
            state = state.rows(kept)
        tokens = word
    hypotheses = [
        Hypothesis(_trim(row, ids.end), float(lp), finished=ids.end in row)
        for row, lp in zip(words.tolist(), log_prob.tolist())
    ]
    if options.explain:
        _attach(hypotheses, said, looked)
    return hypotheses


@torch.inference_mode()
def beam_search(decoder, features: torch.Tensor, options: DecodeOptions, ids: SpecialIds, keep: int | None = None):
    """Beam search over a whole batch of images at once.

    Beams are ranked by length-normalised log-probability (mean per word, i.e. by perplexity).
    A beam that emits ``<end>`` stays in the beam, finished, with its score frozen; a beam still
    running at ``max_length`` is returned as it is, so a model that never emits ``<end>`` still gets
    captions. With beam_size 1 this is exactly greedy decoding.

    Args:
        decoder: an ``AttentionDecoder``.
        features: (B, F) image features.
        options: ``beam_size``, ``num_captions``, ``max_length`` and ``explain`` are used.
        ids: the special token ids.
        keep: how many hypotheses to return, up to ``beam_size`` (default ``num_captions``): the
            whole beam for re-ranking, which may be wider than the most captions one may ask for.

    Returns:
        For each image, its ``keep`` best hypotheses, best first.
    """
    batch, k, device = features.size(0), options.beam_size, features.device
    memory, state = decoder.start_stepwise(features, options.concept_boost)
    # Row r of the beams always belongs to image r // k, so the memory is only ever reordered
    # when a finished image leaves the batch.
    memory = memory.rows(torch.arange(batch, device=device).repeat_interleave(k))  # B*k rows
    state = state.repeat(k)  # B*k rows
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so they do not duplicate each other
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, device=device)
    sequences = torch.empty(batch, k, 0, dtype=torch.long, device=device)
    # With explain, each beam's history of word log-probabilities (B, k, T) and attention (B, k, T, N).
    said, looked = torch.empty(batch, k, 0, device=device), torch.empty(batch, k, 0, state.coverage.size(-1), device=device)
    tokens = torch.full((batch * k,), ids.start, dtype=torch.long, device=device)
    first_rows = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1) the row of each image's first beam
    # A finished beam's one continuation, <pad>, at no cost: 0 there, -inf elsewhere.
    pad_only = torch.full((decoder.config.vocab_size,), float("-inf"), device=device)
    pad_only[ids.pad] = 0.0
    searching = torch.arange(batch, device=device)  # the images whose beams are not all finished
    done: dict[int, tuple] = {}  # image -> its final beams (scores, lengths, finished, words, said, looked)
    for _ in range(options.max_length):
        b = len(searching)
        coverage = state.coverage[0]  # (b*k, N): the attention each cell has had before this step
        logits, state = decoder.step(tokens, state, memory)
        logp = next_word_log_probs(logits, ids).view(b, k, -1)  # (b, k, V)
        flat, beam, scores, lengths = _best_continuations(logp, scores, finished, lengths, pad_only)
        word = flat % logp.size(-1)
        was_finished = finished.gather(1, beam)
        word = word.masked_fill(was_finished, ids.pad)
        sequences = _extend(sequences, beam, word)
        if options.explain:
            said = _extend(said, beam, logp.view(b, -1).gather(1, flat))
            attention = (state.coverage[0] - coverage).view(b, k, -1)  # (b, k, N) of the beams before
            looked = _extend(looked, beam, attention.gather(1, beam.unsqueeze(-1).expand_as(attention)))
        finished = was_finished | (word == ids.end)
        rows = beam + first_rows[:b]  # (b, k) the state each beam continues
        ended = finished.all(dim=1)  # (b,)
        if ended.any():  # images with every beam finished leave the batch
            going = ~ended
            for i in ended.nonzero().flatten().tolist():
                done[int(searching[i])] = (scores[i], lengths[i], finished[i], sequences[i], said[i], looked[i])
            if not going.any():
                break
            searching, scores, lengths, finished = searching[going], scores[going], lengths[going], finished[going]
            sequences, said, looked, rows, word = sequences[going], said[going], looked[going], rows[going], word[going]
            memory = memory.rows(going.repeat_interleave(k))
        rows = rows.view(-1)
        state = state.rows(rows)
        tokens = word.view(-1)
    for i, image in enumerate(searching.tolist()):
        done.setdefault(image, (scores[i], lengths[i], finished[i], sequences[i], said[i], looked[i]))
    keep = options.num_captions if keep is None else keep
    return [_best_beams(*done[image], keep, options.explain) for image in range(batch)]


def _best_continuations(logp, scores, finished, lengths, pad_only):
    """The k best continuations of (b, k) beams, from their next words' (b, k, V) log-probabilities.

    Ranked by log-probability per word; a finished beam has one continuation, ``<pad>`` (whose
    (V,) ``pad_only`` log-probabilities are 0 there and -inf elsewhere), which keeps its score and
    length. Returns the (b, k) choices as indices into k * V, the beams they continue, their scores
    and their lengths.
    """
    b, k, vocab = logp.shape
    candidates = scores.unsqueeze(-1) + torch.where(finished.unsqueeze(-1), pad_only, logp)  # (b, k, V)
    new_lengths = lengths + ~finished  # (b, k)
    normalised = candidates / new_lengths.clamp(min=1).unsqueeze(-1)  # (b, k, V)
    _, flat = normalised.view(b, -1).topk(k, dim=-1)  # (b, k)
    beam = flat // vocab
    return flat, beam, candidates.view(b, -1).gather(1, flat), new_lengths.gather(1, beam)


def _best_beams(scores, lengths, finished, sequences, said, looked, keep: int, explain: bool) -> list[Hypothesis]:
    """An image's (k,) beam scores, lengths and finished flags, (k, T) words and, with explain,
    (k, T) and (k, T, N) histories -> its ``keep`` best hypotheses, best first."""
    hypotheses = []
    for j in (scores / lengths.clamp(min=1)).argsort(descending=True).tolist():
        if math.isfinite(scores[j].item()) and len(hypotheses) < keep:
            length = int(lengths[j].item())
            hyp = Hypothesis(sequences[j, :length].tolist(), scores[j].item(), finished=bool(finished[j]))
            if explain:
                _attach([hyp], said[j : j + 1], looked[j : j + 1])
            hypotheses.append(hyp)
    return hypotheses


def _extend(history: torch.Tensor, beam: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(B, k, T, ...) per-beam history, reordered to the beams each new beam continues ((B, k)
    ``beam``), with this step's (B, k, ...) ``new`` appended -> (B, k, T + 1, ...)."""
    index = beam.view(*beam.shape, *[1] * (history.dim() - 2)).expand(-1, -1, *history.shape[2:])
    return torch.cat([history.gather(1, index), new.unsqueeze(2).to(history.dtype)], dim=2)


def _attach(hypotheses: list[Hypothesis], log_probs: torch.Tensor, attention: torch.Tensor) -> None:
    """Gives each hypothesis its row of (R, T) word log-probabilities and (R, T, N) attention,
    cut to its own length."""
    log_probs, attention = log_probs.tolist(), attention.float().clamp(min=0).tolist()
    for h, said, looked in zip(hypotheses, log_probs, attention, strict=True):
        h.word_log_probs, h.attention = said[: len(h.tokens)], looked[: len(h.tokens)]
