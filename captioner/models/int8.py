"""The CNN trunk in int8 for CPU inference: calibrated once on training images, rebuilt on load.

PyTorch's FX graph-mode post-training quantization with the x86 backend (fbgemm/oneDNN kernels):
``prepare`` inserts observers that record the range of every activation, the training images are
run through it (``calibrate``), and ``convert`` turns the observed graph into int8 operators. A
checkpoint keeps its fp32 weights and only the observers' state (``calibration``, a few hundred
KB), so one file serves both: the int8 trunk is rebuilt from them whenever it is asked for.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from captioner.errors import CaptionerError

_OBSERVED = "activation_post_process"  # the prefix FX gives the observers it inserts


@contextmanager
def _quiet():
    """Quiets FX quantization's notices (deprecated upstream in favour of torchao's PT2E, which the
    pinned torch does not ship; observers' reduce_range) so that users see none of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        warnings.filterwarnings("ignore", module=r"torch\.ao\.quantization")
        yield


def _prepare(trunk: nn.Module, image_size: int) -> nn.Module:
    """An observed copy of ``trunk`` (the fp32 trunk itself is left as it was)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = "x86"
    example = torch.zeros(1, 3, image_size, image_size)
    return prepare_fx(copy.deepcopy(trunk).cpu().eval(), get_default_qconfig_mapping("x86"), example_inputs=(example,))


def calibrate(trunk: nn.Module, image_size: int, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ranges of every activation of ``trunk`` over ``batches`` of (B, 3, S, S) normalised images.

    Returns:
        The observers' state: what ``convert`` needs besides the fp32 weights.
    """
    with _quiet():
        observed = _prepare(trunk, image_size)
    seen = 0
    with torch.inference_mode():
        for batch in batches:
            observed(batch.cpu())
            seen += len(batch)
    if not seen:
        raise CaptionerError("no images to calibrate the int8 CNN on")
    return {k: v.clone() for k, v in observed.state_dict().items() if k.startswith(_OBSERVED)}


def convert(trunk: nn.Module, image_size: int, calibration: dict[str, torch.Tensor]) -> nn.Module:
    """The int8 version of ``trunk`` (CPU only), from its fp32 weights and ``calibration``."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        observed = _prepare(trunk, image_size)
        expected = {k for k in observed.state_dict() if k.startswith(_OBSERVED)}
        if set(calibration) != expected:
            raise CaptionerError("the model's int8 calibration does not fit its CNN; run captioner calibrate again")
        observed.load_state_dict(calibration, strict=False)
        return _Int8Trunk(convert_fx(observed).eval())


class _Int8Trunk(nn.Module):
    """The converted graph, run with the notices about quantized tensors quieted."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with _quiet():
            return self.graph(images)
