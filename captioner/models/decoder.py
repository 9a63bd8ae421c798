"""The LSTM decoder: image feature -> initial state, then one word at a time (Show and Tell, Karpathy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from captioner.errors import CaptionerError

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (L, B, H)


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder. ``vocab_size`` and ``embed_dim`` come from the word embedding."""

    feature_dim: int
    vocab_size: int
    embed_dim: int
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.3

    def __post_init__(self):
        if self.hidden_size < 1 or self.num_layers < 1 or not 0.0 <= self.dropout < 1.0:
            raise CaptionerError("hidden size and layers must be positive and dropout in [0, 1)")

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
        # Frozen word2vec vectors: no gradient, so never in the optimizer either.
        self.embed = nn.Embedding.from_pretrained(embedding.float(), freeze=True, padding_idx=pad_id)
        self.feature_norm = nn.LayerNorm(config.feature_dim)
        state_size = config.num_layers * config.hidden_size
        self.init_h = nn.Linear(config.feature_dim, state_size)
        self.init_c = nn.Linear(config.feature_dim, state_size)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, features: torch.Tensor) -> State:
        """(B, F) image features -> initial (h, c), each (L, B, H)."""
        x = self.dropout(self.feature_norm(features))
        layers, hidden = self.config.num_layers, self.config.hidden_size
        h = torch.tanh(self.init_h(x)).view(-1, layers, hidden).transpose(0, 1).contiguous()  # (L, B, H)
        c = torch.tanh(self.init_c(x)).view(-1, layers, hidden).transpose(0, 1).contiguous()  # (L, B, H)
        return h, c

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, F) features and (B, T) input ids -> (B, T, V) next-word logits."""
        output, _ = self.lstm(self.embed(tokens), self.init_state(features))  # (B, T, H)
        return self.out(self.dropout(output))  # (B, T, V)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One step of generation: (B,) last ids -> (B, V) next-word logits and the new state."""
        output, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # (B, 1, H)
        return self.out(output.squeeze(1)), state  # (B, V)
