"""Standard caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), computed by pycocoevalcap; and
``CiderD``, CIDEr-D against fixed references, for the many captions that training and re-ranking score.

pycocoevalcap is the reference implementation behind the numbers papers report, so it is used
exactly as its ``COCOEvalCap.evaluate`` does: PTB-tokenize both sides, then each scorer's
``compute_score(gts, res)``. The PTB tokenizer and METEOR run on Java; without Java, use
``tokenizer="simple"`` and METEOR is reported as unavailable (``None``, never 0).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from captioner.errors import CaptionerError

METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
TOKENIZERS = ("ptb", "simple")

_NOT_WORD = re.compile(r"[^\w\s]|_")
NGRAMS = 4
SIGMA = 6.0  # CIDEr-D's length penalty: exp(-(len(candidate) - len(reference))^2 / (2 sigma^2))


@functools.cache
def java_available() -> bool:
    """Whether ``java -version`` runs. Cached: call ``java_available.cache_clear()`` after changing PATH.

    Returns:
        True if a working ``java`` is on PATH (the PTB tokenizer and METEOR need it).
    """
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer, for quick validation without Java.

    Scores on this tokenization are close to, but not the same as, the PTB ones papers report.

    Args:
        text: a caption.

    Returns:
        The caption lower-cased, punctuation replaced by spaces, words joined by single spaces.
    """
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def caption_metrics(
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenizer: str = "ptb",
    meteor: bool = True,
) -> dict[str, float | str | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of generated captions against references.

    Args:
        candidates: image id (int or str) -> the one generated caption for that image.
        references: image id -> its reference captions (at least one). Same ids as ``candidates``.
        tokenizer: ``"ptb"`` (pycocoevalcap's Java PTB tokenizer, as COCOEvalCap; for reported
            numbers) or ``"simple"`` (:func:`simple_tokenize`; no Java, for per-epoch validation).
        meteor: compute METEOR (starts a JVM that loads for several seconds; needs Java).

    Returns:
        ``{name: float}`` for every name in :data:`METRIC_NAMES`, on pycocoevalcap's 0..1 scale
        (CIDEr 0..10). ``"meteor"`` is None when it was not computed, and then
        ``"meteor_unavailable"`` holds a one-line reason.

    Raises:
        CaptionerError: empty input, ids that differ, malformed captions, an unknown tokenizer,
            or ``tokenizer="ptb"`` without Java.
    """
    _check_inputs(candidates, references)
    ids = list(candidates)
    if tokenizer == "ptb":
        gts, res = _ptb_tokenize(ids, candidates, references)
    elif tokenizer == "simple":
        gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
        res = {i: [simple_tokenize(candidates[i])] for i in ids}
    else:
        raise CaptionerError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")

    # verbose=0 keeps Bleu from printing its statistics to stdout (the CLI writes JSON there);
    # it changes nothing else.
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result: dict[str, float | str | None] = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}
    result["meteor"] = None
    result["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    # pycocoevalcap's Cider class is CIDEr-D (clipped n-gram counts, Gaussian length penalty,
    # x10 scale), the variant the COCO leaderboard reports as "CIDEr". Document frequencies
    # come from these references, so the score depends on the whole evaluated set.
    result["cider"] = float(Cider().compute_score(gts, res)[0])

    if not meteor:
        reason = "METEOR was not requested (meteor=False)"
    elif not java_available():
        reason = "METEOR needs Java, and no working `java` is on PATH"
    else:
        result["meteor"], reason = _meteor_score(gts, res)
    if reason is not None:
        result["meteor_unavailable"] = reason
    return result


def _check_inputs(candidates: Mapping, references: Mapping) -> None:
    """Raises CaptionerError unless both mappings are non-empty, share ids and hold captions."""
    if not candidates or not references:
        raise CaptionerError("no captions to score: candidates and references must be non-empty")
    missing = [i for i in references if i not in candidates]
    extra = [i for i in candidates if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} without a candidate ({_some(missing)})")
        if extra:
            parts.append(f"{len(extra)} without references ({_some(extra)})")
        raise CaptionerError("candidates and references must have the same image ids: " + "; ".join(parts))
    for i, caption in candidates.items():
        if not isinstance(caption, str):
            raise CaptionerError(f"the candidate for image {i!r} must be one string, not {type(caption).__name__}")
    for i, refs in references.items():
        # A bare string is a Sequence[str] too, but would be scored as one reference per character.
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise CaptionerError(f"the references for image {i!r} must be a non-empty list of strings")


def _some(ids: list, shown: int = 3) -> str:
    """A few ids, repr'd so that 1 and '1' stay distinguishable."""
    more = f", ... {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(repr(i) for i in ids[:shown]) + more


def _ptb_tokenize(
    ids: list, candidates: Mapping, references: Mapping
) -> tuple[dict[object, list[str]], dict[object, list[str]]]:
    """Both sides through pycocoevalcap's PTBTokenizer, one call per side as COCOEvalCap does.

    Returns:
        ``(gts, res)``: image id -> tokenized references, image id -> ``[tokenized candidate]``.
    """
    if not java_available():
        raise CaptionerError(
            'tokenizer="ptb" runs the Stanford PTB tokenizer on Java, and no working `java` is on '
            'PATH; install Java (e.g. a JRE 8+) or use tokenizer="simple"'
        )
    # The tokenizer maps output lines back to captions by position, but Java also breaks lines at
    # \r, \f, \u2028, ... which it does not replace, shifting every later caption. Collapsing
    # whitespace to single spaces avoids that; PTB splits words at whitespace anyway.
    gts = {i: [{"caption": " ".join(r.split())} for r in references[i]] for i in ids}
    res = {i: [{"caption": " ".join(candidates[i].split())}] for i in ids}
    ptb = ptbtokenizer.PTBTokenizer()
    try:
        # PTBTokenizer writes a temporary file next to its jar, inside site-packages.
        gts_tok, res_tok = ptb.tokenize(gts), ptb.tokenize(res)
    except OSError as exc:
        jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
        raise CaptionerError(
            f"the PTB tokenizer failed ({exc}); it needs to write a temporary file in pycocoevalcap's "
            f"tokenizer directory ({jar_dir}), or use tokenizer=\"simple\""
        ) from exc
    # Guard the positional mapping: a lost or extra line would silently pair captions with the
    # wrong image.
    for side, tok in ((gts, gts_tok), (res, res_tok)):
        if any(len(tok.get(i, ())) != len(side[i]) for i in ids):
            raise CaptionerError("the PTB tokenizer returned a different number of captions than it was given")
    return gts_tok, res_tok


def _meteor_score(gts: dict, res: dict) -> tuple[float | None, str | None]:
    """METEOR via pycocoevalcap, its JVM stopped before returning.

    Returns:
        ``(score, None)``, or ``(None, reason)`` if the JVM failed (e.g. could not start).
    """
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as exc:
        # compute_score leaves its lock held when it fails; Meteor.__del__ would deadlock on it.
        scorer.lock.release()
        detail = _stop_meteor(scorer) or str(exc)
        return None, f"METEOR's Java process failed: {detail}"
    _stop_meteor(scorer)
    return float(score), None


def _stop_meteor(scorer: Meteor) -> str:
    """Ends the METEOR JVM now rather than whenever the garbage collector runs ``Meteor.__del__``.

    Closes every pipe too, so no ResourceWarning follows; ``__del__`` later finds nothing to do.

    Returns:
        The first line the JVM wrote to stderr ("" if none).
    """
    proc = scorer.meteor_p
    with scorer.lock:
        # Flushing stdin to a JVM that already died raises; the pipe is closed regardless.
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.kill()
        proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stdout.close()
        proc.stderr.close()
    return err.splitlines()[0] if err else ""


def _ngrams(words: Sequence[str]) -> list[Counter]:
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, NGRAMS + 1)]


class CiderD:
    """CIDEr-D of candidate captions against fixed references: pycocoevalcap's (the same n-grams,
    tf-idf, clipping and length penalty; a test checks the scores are equal), with the document
    frequencies counted once and each reference's vectors computed once, in pure Python: the
    self-critical reward of tens of thousands of sampled captions an epoch, and re-ranking's.

    Args:
        references: for each image, its reference captions as lists of words; the document
            frequencies are counted over these images.
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]]):
        counts = [[_ngrams(ref) for ref in refs] for refs in references]
        self.df: Counter = Counter()
        for refs in counts:
            self.df.update({gram for ref in refs for order in ref for gram in order})
        self.log_images = math.log(float(len(references)))
        self.references = [[self._vector(ref, sum(ref[0].values())) for ref in refs] for refs in counts]

    def _vector(self, grams: list[Counter], length: int):
        """Per n-gram order its tf-idf weights and their norm, and the caption's length."""
        weights = [
            {g: tf * (self.log_images - math.log(max(1.0, self.df[g]))) for g, tf in order.items()} for order in grams
        ]
        return weights, [math.sqrt(sum(w * w for w in order.values())) for order in weights], length

    def score(self, image: int, words: Sequence[str]) -> float:
        """CIDEr-D (x 10, as pycocoevalcap reports it) of ``words`` against ``image``'s references."""
        return self.mean_score([image], words)

    def mean_score(self, images: Sequence[int], words: Sequence[str]) -> float:
        """The mean of ``score`` over ``images``, the caption's own vectors computed once."""
        candidate = self._vector(_ngrams(words), len(words))
        return sum(self._against(candidate, image) for image in images) / len(images)

    def _against(self, candidate, image: int) -> float:
        weights, norms, length = candidate
        total = 0.0
        for ref_weights, ref_norms, ref_length in self.references[image]:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for order, ref_order, norm, ref_norm in zip(weights, ref_weights, norms, ref_norms):
                if norm and ref_norm:
                    overlap = sum(min(w, ref_order[g]) * ref_order[g] for g, w in order.items() if g in ref_order)
                    total += overlap / (norm * ref_norm) * penalty
        return 10.0 * total / NGRAMS / max(len(self.references[image]), 1)
