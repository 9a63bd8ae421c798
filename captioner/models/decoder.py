"""The LSTM decoder: image features -> initial state, then one word at a time, attending to the image.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from captioner.errors import CaptionerError

# (word h, word c, language h, language c, context, coverage), each (layers or 1, B, H or cells):
# every tensor has the batch in dimension 1, so beam search reorders them all alike.
State = tuple[torch.Tensor, ...]


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

    def __post_init__(self):
        if self.hidden_size < 1 or self.num_layers < 1 or not 0.0 <= self.dropout < 1.0:
            raise CaptionerError("hidden size and layers must be positive and dropout in [0, 1)")
        if self.cells < 1 or self.feature_dim % self.cells:
            raise CaptionerError(f"a {self.feature_dim}-d feature cannot be split into {self.cells} cells")

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMDecoder(nn.Module):
    """Generates a caption from an image feature.

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
        hidden, cell_dim = config.hidden_size, config.feature_dim // config.cells
        # Frozen word2vec vectors: no gradient, so never in the optimizer either.
        self.embed = nn.Embedding.from_pretrained(embedding.float(), freeze=True, padding_idx=pad_id)
        self.feature_norm = nn.LayerNorm(cell_dim)
        self.word_lstm = nn.LSTM(config.embed_dim, hidden, batch_first=True)
        self.memory = nn.Linear(cell_dim, hidden)  # what attention reads from each cell
        # Where each cell is: a context vector is a weighted sum of cell contents, which says what
        # was looked at but not where; relations ("left of", "above") need the where. The cells'
        # (row, column) coordinates, projected, rather than a free vector per cell: "left of" is
        # then a comparison along one direction, which the decoder learns in a few epochs.
        self.register_buffer("coordinates", _grid_coordinates(config.cells), persistent=False)
        self.position = nn.Linear(2, hidden)
        self.attention = _Attention(hidden)
        between_layers = config.dropout if config.num_layers > 1 else 0.0
        self.language_lstm = nn.LSTM(2 * hidden, hidden, config.num_layers, batch_first=True, dropout=between_layers)
        self.init_state = nn.Linear(cell_dim, 2 * (1 + config.num_layers) * hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(hidden, config.vocab_size)

    def start(self, features: torch.Tensor) -> tuple[torch.Tensor, State]:
        """(B, F) image features -> attention memory (B, N, H) and the initial state."""
        batch, cells = features.size(0), self.config.cells
        x = features.view(batch, -1, cells).transpose(1, 2)  # (B, N, C)
        x = self.dropout(self.feature_norm(x))
        layers, hidden = 1 + self.config.num_layers, self.config.hidden_size
        init = torch.tanh(self.init_state(x.mean(dim=1))).view(batch, 2, layers, hidden)  # (B, 2, 1+L, H)
        h, c = init.permute(1, 2, 0, 3).contiguous()  # each (1+L, B, H)
        memory = self.memory(x) + self.position(self.coordinates)
        context, coverage = memory.new_zeros(1, batch, hidden), memory.new_zeros(1, batch, cells)
        return memory, (h[:1], c[:1], h[1:], c[1:], context, coverage)

    def run(self, tokens: torch.Tensor, state: State, memory: torch.Tensor) -> tuple[torch.Tensor, State]:
        """(B, T) input ids from ``state`` -> (B, T, V) next-word logits and the state after them."""
        word_h, word_c, h, c, context, coverage = state
        queries, (word_h, word_c) = self.word_lstm(self.embed(tokens), (word_h, word_c))  # (B, T, H)
        contexts, context, coverage = self.attention(queries, memory, context[0], coverage[0])
        x, (h, c) = self.language_lstm(torch.cat([queries, contexts], dim=-1), (h, c))
        return self.out(self.dropout(x)), (word_h, word_c, h, c, context[None], coverage[None])

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, F) features and (B, T) input ids -> (B, T, V) next-word logits."""
        memory, state = self.start(features)
        return self.run(tokens, state, memory)[0]

    def step(self, tokens: torch.Tensor, state: State, memory: torch.Tensor) -> tuple[torch.Tensor, State]:
        """One word: (B,) last ids -> (B, V) next-word logits and the new state."""
        logits, state = self.run(tokens.unsqueeze(1), state, memory)
        return logits.squeeze(1), state


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
        self.score = nn.Linear(hidden, 1)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, context: torch.Tensor, coverage: torch.Tensor):
        """(B, T, H) queries over (B, N, H) memory, from the (B, H) context and (B, N) coverage
        left by the steps before -> (B, T, H) contexts, the last context and the coverage after."""
        contexts = []
        for query in self.query(queries).unbind(1):  # the only loop over steps in training
            keys = memory + (query + self.feed(context)).unsqueeze(1) + coverage.unsqueeze(-1) * self.coverage_weight
            weights = self.score(torch.tanh(keys)).squeeze(-1).softmax(dim=-1)  # (B, N)
            context = (weights.unsqueeze(1) @ memory).squeeze(1)
            coverage = coverage + weights
            contexts.append(context)
        return torch.stack(contexts, dim=1), context, coverage
