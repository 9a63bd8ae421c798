"""The decoder's recurrent layers, by name (LSTM, GRU or a plain tanh RNN), and the same layers
unrolled one step at a time by their equations, so that their gates and cells can be looked at.

Training and captioning run PyTorch's fused ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``. ``unroll``
replays such a module from its own weights, step by step: one fused matmul for all gates of a
step, split afterwards (the layout PyTorch stores them in), then the lecture's equations::

    LSTM  i, f, g, o = σ, σ, tanh, σ (W x_t + U h_{t-1} + b)
          c_t = f ∘ c_{t-1} + i ∘ g          h_t = o ∘ tanh(c_t)
    GRU   r, z = σ(W x_t + U h_{t-1} + b)    n = tanh(W_n x_t + b_n + r ∘ (U_n h_{t-1} + b'_n))
          h_t = (1 - z) ∘ n + z ∘ h_{t-1}
    RNN   h_t = tanh(W x_t + U h_{t-1} + b)

Its outputs equal the fused module's to float precision, and each step's state is a node of the
autograd graph, so gradients with respect to any h_k can be taken (``inspection``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import CaptionerError
from captioner.options import CELLS

# The gates each cell records, in PyTorch's storage order of its weight rows.
GATES = {"lstm": ("input", "forget", "candidate", "output"), "gru": ("reset", "update", "candidate"), "rnn": ()}
_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def recurrent_layer(cell: str, input_size: int, hidden: int, layers: int = 1, dropout: float = 0.0) -> nn.RNNBase:
    """A batch-first recurrent layer of the named cell."""
    if cell not in CELLS:
        raise CaptionerError(f"unknown cell {cell!r}: choose one of {', '.join(CELLS)}")
    return _MODULES[cell](input_size, hidden, layers, batch_first=True, dropout=dropout)


def cell_name(module: nn.RNNBase) -> str:
    return {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}[type(module)]


def run_layer(module: nn.RNNBase, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """(B, T, I) inputs from (L, B, H) h and c -> (B, T, H) outputs, h and c after.

    One state signature for every cell: a GRU or an RNN has no cell state and passes ``c`` through.
    """
    if isinstance(module, nn.LSTM):
        out, (h, c) = module(x, (h, c))
        return out, h, c
    out, h = module(x, h)
    return out, h, c


def unroll(module: nn.RNNBase, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, record: dict):
    """``run_layer`` by the equations, one step at a time, recording the last layer's insides.

    Args:
        module: an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (tanh), batch-first.
        x: (B, T, I) inputs; h, c: (L, B, H) states before them.
        record: filled with the last layer's ``gates`` ({name: (B, T, H)}), ``cell`` (B, T, H) (the
            LSTM's c_t; h_t for the others) and ``hidden``, the list of its (B, H) h_t, graph nodes.

    Returns:
        As ``run_layer``: (B, T, H) outputs, h and c after.
    """
    cell = cell_name(module)
    hs, cs = [], []
    for layer in range(module.num_layers):
        if layer > 0:
            x = F.dropout(x, module.dropout, module.training)
        weights = [getattr(module, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        x, h_last, c_last, gates, cells, hidden = _unroll_layer(cell, x, h[layer], c[layer], *weights)
        hs.append(h_last)
        cs.append(c_last)
    record.update(gates=gates, cell=cells, hidden=hidden)
    return x, torch.stack(hs), torch.stack(cs)


def _unroll_layer(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One layer over (B, T, I) inputs: outputs, last h and c, gates, cells, the list of h_t."""
    projected = F.linear(x, w_ih, b_ih)  # (B, T, G*H): every step's input part in one matmul
    names = GATES[cell]
    gates = {name: [] for name in names}
    hidden, cells = [], []
    for t in range(x.size(1)):
        recurrent = F.linear(h, w_hh, b_hh)  # (B, G*H), all gates of the step at once
        if cell == "lstm":
            i, f, g, o = (projected[:, t] + recurrent).chunk(4, dim=-1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            values = (i, f, g, o)
        elif cell == "gru":
            x_r, x_z, x_n = projected[:, t].chunk(3, dim=-1)
            h_r, h_z, h_n = recurrent.chunk(3, dim=-1)
            r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
            n = (x_n + r * h_n).tanh()
            h = (1 - z) * n + z * h
            values = (r, z, n)
        else:
            h = (projected[:, t] + recurrent).tanh()
            values = ()
        for name, value in zip(names, values):
            gates[name].append(value)
        hidden.append(h)
        cells.append(c if cell == "lstm" else h)
    stacked = {name: torch.stack(v, dim=1) for name, v in gates.items()}  # each (B, T, H)
    return torch.stack(hidden, dim=1), h, c, stacked, torch.stack(cells, dim=1), hidden
