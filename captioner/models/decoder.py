"""The attention decoder: image features -> initial state, then one word at a time, attending to the image.

The image sets the LSTMs' initial states (Show and Tell; Karpathy & Fei-Fei) and, at every step,
soft attention over the cells of the CNN's pooled feature map feeds the language LSTM what it
needs for the next word (Show, Attend and Tell, Xu et al. 2015). Without attention a single
initial state must carry every object of a scene through a long caption, and the decoder blends
the attributes of different objects. With a globally pooled encoder there is one cell, and
attention reduces to feeding the image feature at every step.

The attention remembers where it looked: its query adds the previous step's context (input
feeding, Luong et al. 2015) and each cell's coverage, the attention the cell has had so far (Tu et
al. 2016; See et al. 2017). Without them, the query for "a red circle left of a ..." knows the
words but not where the red circle is, nor that it was described already, and the decoder names
the same object twice. Only the attention runs step by step; both LSTMs read whole sequences in
PyTorch's fused kernels in training.

When the encoder names what each cell holds (a classifier head whose classes are words, such as the
shapes world's shapes, colours and sizes), the decoder says those words by copying them from the
cell it attends to, never from memory of which words went together: its output layer predicts the
other words and, instead of any class name, a slot per group of classes ("a colour here"); the
attended cell's class probabilities fill the slot (a pointer over the image's labels, as in LSTM-C,
Yao et al. 2017, with slots as in Neural Baby Talk, Lu et al. 2018). A "green" followed by
"triangle" then needs no caption that ever said "green triangle", only a cell the encoder reads as
green and triangle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from captioner.errors import CaptionerError
from captioner.models.recurrent import recurrent_layer, run_layer, unroll
from captioner.options import CELLS

NEW_WORD_MARGIN = 2.0  # a grown vocabulary's new word starts e^2 times less likely than the old word it copies

class DecoderState(NamedTuple):
    """The recurrent state between words. Every tensor has the batch in dimension 1, so that
    beam search and finished captions reorder them all alike (``rows``)."""

    word_h: torch.Tensor  # (1, B, H) the word LSTM's
    word_c: torch.Tensor  # (1, B, H)
    h: torch.Tensor  # (L, B, H) the language LSTM's
    c: torch.Tensor  # (L, B, H)
    context: torch.Tensor  # (1, B, H) what attention read at the last step (fed to the next query)
    coverage: torch.Tensor  # (1, B, N) the attention each cell has had so far

    def rows(self, index: torch.Tensor) -> DecoderState:
        """The state of the rows ``index`` selects, in that order."""
        return DecoderState(*(x.index_select(1, index) for x in self))

    def repeat(self, k: int) -> DecoderState:
        """Each row ``k`` times in a row (the beams of an image)."""
        return DecoderState(*(x.repeat_interleave(k, dim=1) for x in self))


class Memory(NamedTuple):
    """What the decoder reads of each image at every word (``AttentionDecoder.start``)."""

    keys: torch.Tensor  # (B, N, H) what attention reads from each cell
    cells: torch.Tensor  # (B, N, C) what the copy reads (``_Copy.cell_words``), or the cells' features
    # With concepts: (B, V) the log-probability of each word that the classifier's concepts say
    # (``_Concepts``), (B, 1) the probability of the likeliest one, and (B, 1) what generation adds
    # to the copy gate's logit (``DecodeOptions.concept_boost``; 0 in training); else (B, 0) each.
    concept_words: torch.Tensor
    concept_confidence: torch.Tensor
    concept_boost: torch.Tensor

    def rows(self, index: torch.Tensor) -> Memory:
        """The memory of the images ``index`` selects, in that order."""
        return Memory(*(x.index_select(0, index) for x in self))


class StepMemory(NamedTuple):
    """What generation reads at every step (``AttentionDecoder.start_stepwise``): of each image, and of
    the weights, laid out once per batch so that a step makes fewer operations."""

    keys: torch.Tensor  # (B, N, H) what attention reads from each cell
    context_gates: torch.Tensor  # (B, N, 4H) each cell's share of the language LSTM's gates
    cells: torch.Tensor  # (B, N, C) what the copy reads (``_Copy.cell_words``), or the cells' features
    word_gates: torch.Tensor  # (V, 4H) each word's share of the word LSTM's gates, biases included
    # (H, H + 4H) and (H + 4H,): the word LSTM's output projected at once into attention's query
    # and its share of the language LSTM's gates (biases included), one product instead of two.
    query_weight: torch.Tensor
    query_bias: torch.Tensor
    concept_words: torch.Tensor  # (B, V), (B, 1) and (B, 1), as in ``Memory``
    concept_confidence: torch.Tensor
    concept_boost: torch.Tensor

    def rows(self, index: torch.Tensor) -> StepMemory:
        """The memory of the images ``index`` selects (a mask or indices), in that order."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        # index_select: a third to a half of the time of advanced indexing for these gathers.
        per_image = ("keys", "context_gates", "cells", "concept_words", "concept_confidence", "concept_boost")
        return self._replace(**{name: getattr(self, name).index_select(0, index) for name in per_image})

    def read(self) -> Memory:
        """The per-image part, as ``AttentionDecoder.run`` reads it."""
        return Memory(self.keys, self.cells, self.concept_words, self.concept_confidence, self.concept_boost)


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder. ``vocab_size`` and ``embed_dim`` come from the word embedding."""

    feature_dim: int
    vocab_size: int
    embed_dim: int
    cells: int = 1  # the encoder's feature is ``cells`` vectors of feature_dim // cells, channel-major
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.3
    # Per group of the encoder's cell head, the vocabulary id of each class's name (-1: no word, as
    # for "nothing here"): words said by copying them from the attended cell. Empty: no copying.
    copy_ids: tuple[tuple[int, ...], ...] = ()
    cell: str = "lstm"  # the recurrent cell of both layers; checkpoints before it was chosen are LSTMs
    # Per class of the encoder's ImageNet classifier, the vocabulary id of its word (-1: unmapped;
    # ``captioner.models.concepts``): the last len(concept_ids) features are the class
    # probabilities, which the decoder reads and can copy words from. Empty: no concepts.
    concept_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "copy_ids", tuple(tuple(group) for group in self.copy_ids))
        object.__setattr__(self, "concept_ids", tuple(self.concept_ids))
        if self.cell not in CELLS:
            raise CaptionerError(f"unknown cell {self.cell!r}: choose one of {', '.join(CELLS)}")
        if self.hidden_size < 1 or self.num_layers < 1 or not 0.0 <= self.dropout < 1.0:
            raise CaptionerError("hidden size and layers must be positive and dropout in [0, 1)")
        if self.cells < 1 or self.grid_dim < 1 or self.grid_dim % self.cells:
            raise CaptionerError(f"a {self.grid_dim}-d feature cannot be split into {self.cells} cells")
        if self.copy_ids and self.concept_ids:
            raise CaptionerError("a decoder copies either a cell head's class names or concepts, not both")
        if any(not -1 <= i < self.vocab_size for i in self.concept_ids):
            raise CaptionerError("every concept's word must be a word of the vocabulary (or -1)")
        words = [i for group in self.copy_ids for i in group if i >= 0]
        if self.copy_ids and sum(map(len, self.copy_ids)) * self.cells != self.grid_dim:
            raise CaptionerError("copying needs one feature per class of the cell head in every cell")
        if len(words) != len(set(words)) or any(not 0 <= i < self.vocab_size for i in words):
            raise CaptionerError("every copied word must be a distinct word of the vocabulary")

    @property
    def grid_dim(self) -> int:
        """The features' cells, all together: what comes before the concepts."""
        return self.feature_dim - len(self.concept_ids)

    def to_dict(self) -> dict:
        return {**asdict(self), "copy_ids": [list(group) for group in self.copy_ids], "concept_ids": list(self.concept_ids)}


class AttentionDecoder(nn.Module):
    """Generates a caption from an image feature: two recurrent layers (LSTM, GRU or plain RNN)
    with attention over the image's cells between them.

    Args:
        config: sizes.
        embedding: (V, E) word2vec matrix; copied into a frozen ``nn.Embedding``.
        pad_id: the ``<pad>`` id.
    """

    def __init__(self, config: DecoderConfig, embedding: torch.Tensor, pad_id: int):
        super().__init__()
        if tuple(embedding.shape) != (config.vocab_size, config.embed_dim):
            raise CaptionerError(
                f"embedding is {tuple(embedding.shape)}, expected ({config.vocab_size}, {config.embed_dim})"
            )
        self.config = config
        hidden, cell_dim = config.hidden_size, config.grid_dim // config.cells
        # Frozen word2vec vectors: no gradient, so never in the optimizer either.
        self.embed = nn.Embedding.from_pretrained(embedding.float(), freeze=True, padding_idx=pad_id)
        self.feature_norm = nn.LayerNorm(cell_dim)
        # "lstm" in the names whatever the cell: the checkpoints' weight names stay as they were.
        self.word_lstm = recurrent_layer(config.cell, config.embed_dim, hidden)
        self.memory = nn.Linear(cell_dim, hidden)  # what attention reads from each cell
        # Where each cell is: a context vector is a weighted sum of cell contents, which says what
        # was looked at but not where; relations ("left of", "above") need the where. The cells'
        # (row, column) coordinates, projected, rather than a free vector per cell: "left of" is
        # then a comparison along one direction, which the decoder learns in a few epochs.
        self.register_buffer("coordinates", _grid_coordinates(config.cells), persistent=False)
        self.position = nn.Linear(2, hidden)
        self.attention = _Attention(hidden)
        between_layers = config.dropout if config.num_layers > 1 else 0.0
        self.language_lstm = recurrent_layer(config.cell, 2 * hidden, hidden, config.num_layers, between_layers)
        self.init_state = nn.Linear(cell_dim, 2 * (1 + config.num_layers) * hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.copy = _Copy(config.copy_ids, config.vocab_size) if config.copy_ids else None
        init_size = 2 * (1 + config.num_layers) * hidden
        self.concepts = _Concepts(config.concept_ids, config.vocab_size, config.embed_dim, hidden, init_size) if config.concept_ids else None
        self.out = nn.Linear(hidden, config.vocab_size + len(config.copy_ids))  # + a slot per copied group

    def grown(self, embedding: torch.Tensor, concept_ids: tuple[int, ...] = ()) -> AttentionDecoder:
        """This decoder for a vocabulary grown at its end (``Vocabulary.grown``): the (V', E)
        ``embedding`` (the old rows first) and, with concepts, each class's word in it.

        Every old weight is kept. A new word's output row starts as that of the old word nearest it
        in the embedding, ``NEW_WORD_MARGIN`` less likely (DCC's transfer of a known word's
        weights to a new one, Hendricks et al. 2016): no new word outranks the old word it copies,
        so the old model's greedy captions are unchanged until training moves it.
        """
        old, config = self.config.vocab_size, self.config
        grown = replace(config, vocab_size=embedding.size(0), concept_ids=concept_ids or config.concept_ids)
        decoder = AttentionDecoder(grown, embedding, pad_id=self.embed.padding_idx)
        state = {k: v for k, v in self.state_dict().items() if k not in ("embed.weight", "out.weight", "out.bias")}
        unexpected = decoder.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise CaptionerError(f"a grown decoder lacks {unexpected[0]}")
        words = F.normalize(embedding[old:].float(), dim=1) @ F.normalize(embedding[:old].float(), dim=1).T  # (new, old)
        nearest = words.argmax(dim=1)
        with torch.no_grad():
            slots = slice(old, old + len(config.copy_ids))  # the copy's slots come after the words
            for name in ("weight", "bias"):
                before, after = getattr(self.out, name), getattr(decoder.out, name)
                after[:old] = before[:old]
                after[embedding.size(0) :] = before[slots]
                after[old : embedding.size(0)] = before[nearest]
            decoder.out.bias[old : embedding.size(0)] -= NEW_WORD_MARGIN
        return decoder

    def start(self, features: torch.Tensor, concept_boost: float = 0.0) -> tuple[Memory, DecoderState]:
        """(B, F) image features -> what is read of them at every word, and the initial state.

        The memory holds, per cell, what attention reads (H) and, for a copying decoder, the
        probability of each class name the cell holds (C: ``_Copy.cell_words``), else its
        features; with concepts, the words they say, and ``concept_boost`` for the copy gate.
        """
        batch, cells = features.size(0), self.config.cells
        grid, classes = features.split([self.config.grid_dim, len(self.config.concept_ids)], dim=1)
        cell_features = grid.reshape(batch, -1, cells).transpose(1, 2)  # (B, N, C)
        x = self.dropout(self.feature_norm(cell_features))
        layers, hidden = 1 + self.config.num_layers, self.config.hidden_size
        init = self.init_state(x.mean(dim=1))  # (B, 2 * (1+L) * H)
        concept_words = concept_confidence = boost = features.new_zeros(batch, 0)
        if self.concepts is not None:
            concept_words, concept_confidence = self.concepts.words(classes.float())
            boost = concept_confidence.new_full((batch, 1), concept_boost)
            init = init + self.concepts.init(self.concepts.summary(concept_words, self.embed.weight).to(init.dtype))
        init = torch.tanh(init).view(batch, 2, layers, hidden)  # (B, 2, 1+L, H)
        h, c = init.permute(1, 2, 0, 3).contiguous()  # each (1+L, B, H)
        keys = self.memory(x) + self.position(self.coordinates)  # (B, N, H)
        context, coverage = keys.new_zeros(1, batch, hidden), keys.new_zeros(1, batch, cells)
        if self.copy is not None:  # computed once per image, not at every step
            cell_features = self.copy.cell_words(cell_features.float())  # (B, N, L)
        memory = Memory(keys, cell_features.to(keys.dtype), concept_words, concept_confidence, boost)
        return memory, DecoderState(h[:1], c[:1], h[1:], c[1:], context, coverage)

    def start_stepwise(self, features: torch.Tensor, concept_boost: float = 0.0) -> tuple[StepMemory, DecoderState]:
        """``start`` for generation, one ``step`` at a time: the memory as a ``StepMemory``."""
        memory, state = self.start(features, concept_boost)
        keys, cell_features = memory.keys, memory.cells
        concepts = (memory.concept_words, memory.concept_confidence, memory.concept_boost)
        if self.config.cell != "lstm":  # a GRU or RNN (the lecture's comparison) steps through run: no gates kept
            nothing = keys.new_zeros(0)
            return StepMemory(keys, keys[..., :0], cell_features, nothing, nothing, nothing, *concepts), state
        # The language LSTM's gates take the context, a weighted sum of keys: the same weighted
        # sum of each key's share of the gates, computed once here, saves most of a matrix
        # product at every generated word.
        context_gates = keys @ self.language_lstm.weight_ih_l0[:, self.config.hidden_size :].T  # (B, N, 4H)
        # Likewise the word LSTM's input is one of V word vectors: its gates, a row to look up.
        lstm = self.word_lstm
        word_gates = torch.addmm(lstm.bias_ih_l0 + lstm.bias_hh_l0, self.embed.weight, lstm.weight_ih_l0.T)  # (V, 4H)
        lstm, query = self.language_lstm, self.attention.query
        query_weight = torch.cat([query.weight, lstm.weight_ih_l0[:, : self.config.hidden_size]]).T.contiguous()
        query_bias = torch.cat([query.bias, lstm.bias_ih_l0 + lstm.bias_hh_l0])
        return StepMemory(keys, context_gates, cell_features, word_gates, query_weight, query_bias, *concepts), state

    def run(
        self, tokens: torch.Tensor, state: DecoderState, memory: Memory, trace: dict | None = None
    ) -> tuple[torch.Tensor, DecoderState]:
        """(B, T) input ids from ``state`` -> (B, T, V) next-word logits and the state after them.

        With copying or concepts the logits are log-probabilities (their softmax is themselves). ``trace``, a
        dict, asks to look inside (``captioner.inspection``): the language layer then runs unrolled
        by its equations, and the dict receives the (B, T, N) ``attention`` and that layer's
        ``gates``, ``cell`` and ``hidden`` (see ``recurrent.unroll``). Without it nothing changes.
        """
        queries, word_h, word_c = run_layer(self.word_lstm, self.embed(tokens), state.word_h, state.word_c)  # (B, T, H)
        contexts, weights, context, coverage = self.attention(queries, memory.keys, state.context[0], state.coverage[0])
        inputs = torch.cat([queries, contexts], dim=-1)  # (B, T, 2H)
        if trace is None:
            x, h, c = run_layer(self.language_lstm, inputs, state.h, state.c)
        else:
            x, h, c = unroll(self.language_lstm, inputs, state.h, state.c, trace)
            trace["attention"] = weights
        logits = self.out(self.dropout(x))  # (B, T, V + slots)
        if self.copy is not None:
            logits = self.copy(logits, weights, memory.cells)
        elif self.concepts is not None:
            concepts = (memory.concept_words, memory.concept_confidence, memory.concept_boost)
            logits = self.concepts(logits, x, *(c.unsqueeze(1) for c in concepts))
        return logits, DecoderState(word_h, word_c, h, c, context[None], coverage[None])

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """Teacher forcing: (B, F) features and (B * repeats, T) input ids -> (B * repeats, T, V)
        next-word logits; each image's features serve ``repeats`` consecutive captions, and what
        is read from them (the memory, the initial state) is computed once."""
        memory, state = self.start(features)
        if repeats > 1:
            memory, state = memory.rows(torch.arange(features.size(0), device=features.device).repeat_interleave(repeats)), state.repeat(repeats)
        return self.run(tokens, state, memory)[0]

    def step(self, tokens: torch.Tensor, state: DecoderState, memory: StepMemory) -> tuple[torch.Tensor, DecoderState]:
        """One word: (B,) last ids -> (B, V) next-word logits and the new state (memory and the
        first state from ``start_stepwise``).

        What ``run`` computes for one step, in fewer operations: generation takes one step per
        word for every caption, and at a batch of a few dozen images the cost of a step is the
        number of operations as much as their arithmetic (no ``nn.LSTM`` sequence set-up, no
        stacking of one-step sequences, the input side of both LSTMs looked up or summed from
        ``start_stepwise``'s precomputed gates).
        """
        if self.config.cell != "lstm":
            logits, state = self.run(tokens.unsqueeze(1), state, memory.read())
            return logits.squeeze(1), state
        h, c = state.h, state.c
        word_gates = torch.addmm(memory.word_gates.index_select(0, tokens), state.word_h[0], self.word_lstm.weight_hh_l0.T)  # (B, 4H)
        query, word_c = _lstm_from_gates(word_gates, state.word_c[0])  # (B, H)
        projected = torch.addmm(memory.query_bias, query, memory.query_weight)  # (B, H + 4H)
        hidden = self.config.hidden_size
        context, weights, coverage = self.attention.step(projected[:, :hidden], memory.keys, state.context[0], state.coverage[0])
        gates = torch.addmm(projected[:, hidden:], h[0], self.language_lstm.weight_hh_l0.T)
        gates = gates.unsqueeze(1).baddbmm(weights.unsqueeze(1), memory.context_gates).squeeze(1)  # (B, 4H)
        x, c_layer = _lstm_from_gates(gates, c[0])
        if self.config.num_layers == 1:
            h, c = x.unsqueeze(0), c_layer.unsqueeze(0)
        else:
            hs, cs = [x], [c_layer]
            for layer in range(1, self.config.num_layers):
                x, c_layer = _lstm_cell(self.language_lstm, layer, x, h[layer], c[layer])
                hs.append(x)
                cs.append(c_layer)
            h, c = torch.stack(hs), torch.stack(cs)
        logits = self.out(x)  # (B, V + slots); dropout is off in generation
        if self.copy is not None:
            logits = self.copy(logits, weights, memory.cells)
        elif self.concepts is not None:
            logits = self.concepts(logits, x, memory.concept_words, memory.concept_confidence, memory.concept_boost)
        return logits, DecoderState(query.unsqueeze(0), word_c.unsqueeze(0), h, c, context.unsqueeze(0), coverage.unsqueeze(0))


def _lstm_cell(lstm: nn.LSTM, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """One step of one layer of ``lstm``: (B, I) input, (B, H) state -> the new (B, H) h and c."""
    weights = [getattr(lstm, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return torch.lstm_cell(x, (h, c), *weights)


def _lstm_from_gates(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell's update from its (B, 4H) pre-activation gates (PyTorch's order: i, f, g, o)."""
    # One sigmoid over all four gates (g's is wasted) and one addcmul: fewer, larger
    # operations, as generation's steps are bound by their number more than their arithmetic.
    i, f, _, o = gates.sigmoid().chunk(4, dim=-1)
    hidden = c.size(-1)
    c = torch.addcmul(f * c, i, gates[..., 2 * hidden : 3 * hidden].tanh())
    return o * c.tanh(), c


def _grid_coordinates(cells: int) -> torch.Tensor:
    """(cells, 2) row and column of each cell of a square grid, row-major, scaled to [-1, 1]."""
    side = round(cells**0.5)
    if side * side != cells:
        raise CaptionerError(f"{cells} cells do not form a square grid")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * (2 / max(side - 1, 1)) - 1


class _Attention(nn.Module):
    """Additive attention over the cells (Bahdanau et al. 2015) that knows where it looked."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.feed = nn.Linear(hidden, hidden, bias=False)  # the previous context
        self.coverage_weight = nn.Parameter(torch.zeros(hidden))  # zero: starts as plain attention
        # A cell's score drops by this much per unit of attention it has had: from the first step
        # the decoder looks for the next object elsewhere. Learned from 1 (0 would leave some
        # initialisations describing one object twice, "a red circle left of a red circle", for
        # their first five epochs of twelve; a copying decoder, whose words follow its attention, most).
        self.coverage_penalty = nn.Parameter(torch.ones(()))
        self.score = nn.Linear(hidden, 1)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, context: torch.Tensor, coverage: torch.Tensor):
        """(B, T, H) queries over (B, N, H) memory, from the (B, H) context and (B, N) coverage
        left by the steps before -> (B, T, H) contexts, (B, T, N) attention weights, the last
        context and the coverage after."""
        contexts, all_weights = [], []
        for query in self.query(queries).unbind(1):  # the only loop over steps in training
            context, weights, coverage = self.step(query, memory, context, coverage)
            contexts.append(context)
            all_weights.append(weights)
        return torch.stack(contexts, dim=1), torch.stack(all_weights, dim=1), context, coverage

    def step(self, query: torch.Tensor, memory: torch.Tensor, context: torch.Tensor, coverage: torch.Tensor):
        """One (B, H) projected query -> (B, H) context, (B, N) weights and the coverage after."""
        query = torch.addmm(query, context, self.feed.weight.T)  # the previous context fed in
        keys = torch.addcmul(memory + query.unsqueeze(1), coverage.unsqueeze(-1), self.coverage_weight)
        scores = torch.addcmul(self.score(torch.tanh(keys)).squeeze(-1), coverage, self.coverage_penalty, value=-1)  # (B, N)
        weights = scores.softmax(dim=-1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights, coverage + weights


class _Copy(nn.Module):
    """The next word's distribution when class names are copied from the attended cell.

    p(word) = p_out(word) for the words the output layer says; for the name of class k of group g,
    p(name) = p_out(slot g) * sum over cells n of attention(n) * p(class k | cell n, a named class),
    the cell head's probabilities renormalised over the classes of g that have a name; then the
    whole renormalised, since attention on an empty cell fills no slot.
    """

    def __init__(self, copy_ids: tuple[tuple[int, ...], ...], vocab_size: int):
        super().__init__()
        named = [(g, k, word) for g, group in enumerate(copy_ids) for k, word in enumerate(group) if word >= 0]
        offsets = [sum(map(len, copy_ids[:g])) for g in range(len(copy_ids))]
        self.register_buffer("words", torch.tensor([w for _, _, w in named]), persistent=False)  # (L,)
        self.register_buffer("classes", torch.tensor([offsets[g] + k for g, k, _ in named]), persistent=False)
        self.register_buffer("groups", torch.tensor([g for g, _, _ in named]), persistent=False)
        self.register_buffer("slots", vocab_size + self.groups, persistent=False)  # (L,) each name's slot
        # Added to the output layer's (V + G) logits: -inf for the words only copying says. An
        # addition rather than a masked copy and a concatenation: one operation at every step.
        blocked = torch.zeros(vocab_size + len(copy_ids))
        blocked[self.words] = float("-inf")
        self.register_buffer("blocked", blocked, persistent=False)
        self.vocab_size, self.num_groups = vocab_size, len(copy_ids)

    def cell_words(self, cells: torch.Tensor) -> torch.Tensor:
        """(B, N, C) class probabilities per cell -> (B, N, L) per cell, the probability of each
        named class within its group (renormalised over the classes that have a name)."""
        named = cells[..., self.classes]  # (B, N, L)
        per_group = named.new_zeros(*named.shape[:-1], self.num_groups).index_add_(-1, self.groups, named)
        return named / per_group[..., self.groups].clamp_min(1e-6)  # each group sums to 1

    def forward(self, logits: torch.Tensor, attention: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
        """(..., V + G) output logits, (..., N) attention, (B, N, L) ``cell_words`` -> (..., V)
        log-probabilities of the next word (``...``: (B, T) or (B,))."""
        logits, attention, named = logits.float(), attention.float(), named.float()
        log_p = (logits + self.blocked).log_softmax(dim=-1)  # (..., V + G)
        copied = torch.bmm(attention.unsqueeze(1), named).squeeze(1) if attention.dim() == 2 else attention @ named
        copied = copied.clamp_min(1e-12).log()  # (..., L)
        slots = log_p.index_select(-1, self.slots)  # (..., L)
        out = log_p[..., : self.vocab_size].scatter(-1, self.words.expand_as(copied), slots + copied)
        # Attention on cells with nothing named loses its slots' mass: what is left is renormalised.
        return out.log_softmax(dim=-1)


class _Concepts(nn.Module):
    """The ImageNet classifier's concepts, read and said (Yao et al. 2017, LSTM-A and LSTM-C).

    Each class's probability goes to its word (``concept_ids``), which gives a distribution over
    the words the concepts say. The decoder reads it twice: its word2vec average sets part of the
    initial state (the decoder knows what is there before the first word), and at every word a gate
    copies from it: p(word) = (1 - g) p_out(word) + g p_concepts(word), with g from the language
    layer's output and the likeliest concept's probability (a pointer-generator mixture, See et al.
    2017). A word that no training caption paired with a photograph (a held-out object) has almost
    no probability under p_out, and is said through the copy when the classifier sees it.
    """

    def __init__(self, concept_ids: tuple[int, ...], vocab_size: int, embed_dim: int, hidden: int, init_size: int):
        super().__init__()
        mapped = [(k, w) for k, w in enumerate(concept_ids) if w >= 0]
        if not mapped:
            raise CaptionerError("no concept maps to a word of the vocabulary")
        self.register_buffer("classes", torch.tensor([k for k, _ in mapped]), persistent=False)  # (M,)
        self.register_buffer("words_of", torch.tensor([w for _, w in mapped]), persistent=False)  # (M,)
        self.vocab_size = vocab_size
        self.init = nn.Linear(embed_dim, init_size)  # the concepts' share of the initial state
        self.gate = nn.Linear(hidden + 1, 1)

    def mass(self, classes: torch.Tensor) -> torch.Tensor:
        """(B, 1000) class probabilities -> (B, V) each word's share of them (its classes' sum)."""
        return classes.new_zeros(classes.size(0), self.vocab_size).index_add_(1, self.words_of, classes[:, self.classes])

    def words(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1000) class probabilities -> (B, V) log-probabilities of the words the concepts say
        (renormalised over the mapped classes), and (B, 1) the likeliest word's probability before
        renormalising (how sure the classifier is of any word: the copy gate reads it)."""
        mass = self.mass(classes)
        confidence = mass.amax(dim=1, keepdim=True)
        return (mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-6)).clamp_min(1e-12).log(), confidence

    def summary(self, words: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """(B, V) word log-probabilities -> (B, E) their expected word2vec vector."""
        return words.exp() @ embedding.float()

    def forward(
        self, logits: torch.Tensor, x: torch.Tensor, words: torch.Tensor, confidence: torch.Tensor, boost: torch.Tensor
    ) -> torch.Tensor:
        """(..., V) output logits and (..., H) language outputs, with the image's (B, [1,] V) word
        log-probabilities, (B, [1,] 1) confidence and (B, [1,] 1) boost of the gate's logit ->
        (..., V) log-probabilities of the next word."""
        log_p = logits.float().log_softmax(dim=-1)
        gate = self.gate(torch.cat([x.float(), confidence.float().expand(*x.shape[:-1], 1)], dim=-1)) + boost.float()  # (..., 1)
        return torch.logaddexp(F.logsigmoid(-gate) + log_p, F.logsigmoid(gate) + words.float())
