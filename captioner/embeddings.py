"""Word2vec vectors (gensim) for the decoder's frozen embedding.

Either trained on the training captions, or loaded from a pretrained file such as
GoogleNews-vectors-negative300.bin. The embedding matrix is built for our vocabulary; words
without a vector get a deterministic random vector, and the coverage is reported.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gensim.models import KeyedVectors, Word2Vec

from captioner.data.vocab import PAD, SPECIALS, Vocabulary
from captioner.errors import CaptionerError
from captioner.options import TRAINED_VECTORS_DIM


@dataclass
class WordEmbedding:
    """The (V, E) matrix for a vocabulary and where it came from."""

    matrix: torch.Tensor
    info: dict  # plain data stored in the checkpoint: source, dimension, coverage


def _stable_hash(text: str) -> int:
    # gensim seeds each word's initial vector with ``hashfxn``, Python's salted hash() by
    # default, which changes between processes; crc32 makes training repeatable.
    return zlib.crc32(text.encode("utf-8"))


def train_word2vec(sentences: Sequence[Sequence[str]], dim: int, seed: int, epochs: int = 10) -> KeyedVectors:
    """Skip-gram word2vec on tokenised captions, single worker so it is repeatable.

    Args:
        sentences: tokenised training captions.
        dim: vector size.
        seed: random seed.
        epochs: passes over the captions.

    Returns:
        The trained vectors.
    """
    model = Word2Vec(
        sentences=[list(s) for s in sentences],
        vector_size=dim,
        window=5,
        min_count=1,
        sg=1,
        workers=1,
        seed=seed,
        epochs=epochs,
        hashfxn=_stable_hash,
    )
    return model.wv


def load_vectors(path: str | Path) -> KeyedVectors:
    """Pretrained vectors: word2vec binary or text format, or a gensim KeyedVectors file.

    Args:
        path: the vectors file (``.bin``/``.bin.gz`` binary, ``.txt``/``.vec`` text, ``.kv`` gensim).

    Returns:
        The vectors.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"word vectors file not found: {path}")
    if path.suffix == ".kv":
        attempts = [lambda: KeyedVectors.load(str(path))]
    else:
        binary_first = ".bin" in path.suffixes
        attempts = [
            lambda b=b: KeyedVectors.load_word2vec_format(str(path), binary=b, unicode_errors="ignore")
            for b in (binary_first, not binary_first)
        ]
    for attempt in attempts:
        try:
            return attempt()
        except Exception:  # gensim raises many types on a file of another format
            continue
    raise CaptionerError(
        f"cannot read word vectors from {path}: expected the word2vec binary or text format "
        "(as GoogleNews-vectors-negative300.bin) or a gensim .kv file"
    )


def _lookup(vectors: KeyedVectors, word: str) -> np.ndarray | None:
    # Our tokens are lower case; GoogleNews keeps case, so also try the capitalised forms.
    for form in (word, word.capitalize(), word.upper()):
        if form in vectors.key_to_index:
            return vectors[form]
    return None


def _fallback_vector(word: str, dim: int, scale: float) -> np.ndarray:
    """Deterministic random vector for a word without one: same word, same vector, any run."""
    rng = np.random.default_rng(_stable_hash(word))
    return rng.normal(0.0, scale, dim).astype(np.float32)


def build_embedding(vocab: Vocabulary, vectors: KeyedVectors, token_counts: Counter, source: dict) -> WordEmbedding:
    """The embedding matrix for ``vocab`` from ``vectors``, with coverage statistics.

    Args:
        vocab: the vocabulary.
        vectors: word2vec vectors.
        token_counts: training token counts, for the share of running tokens covered.
        source: where the vectors came from (stored in the checkpoint).

    Returns:
        The matrix (``<pad>`` is zero; centred and scaled to unit variance) and its info.
    """
    dim = vectors.vector_size
    scale = float(np.std(vectors.vectors[: min(len(vectors), 100_000)]))
    matrix = np.zeros((len(vocab), dim), dtype=np.float32)
    found_words = found_tokens = total_tokens = 0
    for i, word in enumerate(vocab.words):
        if word == PAD:
            continue
        vector = None if word in SPECIALS else _lookup(vectors, word)
        if vector is not None:
            found_words += 1
            found_tokens += token_counts.get(word, 0)
        matrix[i] = vector if vector is not None else _fallback_vector(word, dim, scale)
        if word not in SPECIALS:
            total_tokens += token_counts.get(word, 0)
    # Centre, then one global rescale to unit variance. word2vec on a small corpus leaves vectors
    # near their tiny initial values, sharing one large common direction; a frozen embedding would
    # feed the LSTM near-identical inputs. Removing the mean vector (as in "all-but-the-top",
    # Mu & Viswanath 2018) and a global factor keep every difference between words.
    rows = np.arange(len(vocab)) != vocab.pad
    matrix[rows] -= matrix[rows].mean(axis=0)
    scale = float(matrix[rows].std()) or 1.0
    matrix[rows] /= scale
    words = len(vocab) - len(SPECIALS)
    info = {
        **source,
        "dim": dim,
        "coverage_words": found_words / max(words, 1),
        "coverage_tokens": found_tokens / max(total_tokens, 1),
        "missing_words": words - found_words,
        "centred": True,
        "rescaled_by": 1.0 / scale,
    }
    return WordEmbedding(torch.from_numpy(matrix), info)


def grow_embedding(old: torch.Tensor, vocab: Vocabulary, sentences: Sequence[Sequence[str]], seed: int, epochs: int = 10) -> WordEmbedding:
    """The embedding of a grown vocabulary: the (V_old, E) ``old`` rows as they are, and vectors for
    the words after them trained by word2vec on ``sentences`` with the old words' vectors held
    fixed (gensim's ``vectors_lockf``), so that a new word lands among the old ones it is used like.
    """
    grown = len(vocab) - len(old)
    if grown < 0:
        raise CaptionerError("a grown vocabulary cannot have fewer words than the one it grew from")
    if grown == 0:
        return WordEmbedding(old.clone(), {"new_words": 0})
    model = Word2Vec(vector_size=old.size(1), window=5, min_count=1, sg=1, workers=1, seed=seed, hashfxn=_stable_hash)
    model.build_vocab([list(s) for s in sentences])
    lock = np.ones(len(model.wv), dtype=np.float32)
    for word, i in model.wv.key_to_index.items():
        if vocab.index.get(word, len(vocab)) < len(old):  # an old word: its vector, held fixed
            model.wv.vectors[i] = old[vocab.index[word]].numpy()
            lock[i] = 0.0
    model.wv.vectors_lockf = lock
    model.train([list(s) for s in sentences], total_examples=len(sentences), epochs=epochs)
    matrix = old.new_zeros(len(vocab), old.size(1))
    matrix[: len(old)] = old
    scale = float(old[len(SPECIALS) :].std())
    for i in range(len(old), len(vocab)):
        word = vocab.words[i]
        vector = model.wv[word] if word in model.wv.key_to_index else _fallback_vector(word, old.size(1), scale)
        matrix[i] = torch.tensor(np.asarray(vector, dtype=np.float32))
    return WordEmbedding(matrix, {"new_words": grown, "new_words_trained_on": len(sentences)})


def word_embedding(
    vocab: Vocabulary,
    sentences: Sequence[Sequence[str]],
    *,
    vectors_path: str | Path | None,
    dim: int | None,
    seed: int,
) -> WordEmbedding:
    """The frozen embedding for training: word2vec trained on ``sentences`` or loaded from a file.

    Args:
        vocab: the vocabulary.
        sentences: tokenised training captions (word2vec's corpus, and the coverage counts).
        vectors_path: a pretrained vectors file, or None to train on ``sentences``.
        dim: embedding size; for a file it must match the file's (None takes the file's).
        seed: random seed for training word2vec.
    """
    counts = Counter(t for s in sentences for t in s)
    if vectors_path is None:
        dim = dim or TRAINED_VECTORS_DIM
        vectors = train_word2vec(sentences, dim, seed)
        source = {"source": "trained", "corpus": "training captions", "sentences": len(sentences)}
    else:
        vectors = load_vectors(vectors_path)
        if dim is not None and dim != vectors.vector_size:
            raise CaptionerError(
                f"{Path(vectors_path).name} has {vectors.vector_size}-dimensional vectors but "
                f"--embed-dim is {dim}; leave --embed-dim out to use the file's dimension"
            )
        source = {"source": "file", "file": Path(vectors_path).name, "file_vectors": len(vectors)}
    return build_embedding(vocab, vectors, counts, source)
