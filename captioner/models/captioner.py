"""The captioner: encoder + decoder + vocabulary, and the one place captions are generated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from captioner.data.images import decode_image
from captioner.data.vocab import Vocabulary
from captioner.decoding import Hypothesis, SpecialIds, generate
from captioner.options import DecodeOptions
from captioner.models.decoder import LSTMDecoder
from captioner.models.encoder import Encoder, image_to_tensor


class Captioner(nn.Module):
    """A frozen CNN encoder and an LSTM decoder that share one vocabulary.

    Args:
        encoder: the (frozen) CNN.
        decoder: the LSTM decoder.
        vocab: the decoder's vocabulary.
        info: plain-data facts kept with the model (embedding source, encoder weights, metrics).
    """

    def __init__(self, encoder: Encoder, decoder: LSTMDecoder, vocab: Vocabulary, info: dict | None = None):
        super().__init__()
        self.encoder = encoder.freeze()
        self.decoder = decoder
        self.vocab = vocab
        self.info = info or {}
        self.ids = SpecialIds(start=vocab.start, end=vocab.end, pad=vocab.pad)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Captioner:
        """A captioner rebuilt from a checkpoint file alone, in eval mode on ``device``."""
        from captioner.checkpoint import load_captioner

        return load_captioner(path, device)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def images_to_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> (B, 3, S, S) normalised batch on the model's device."""
        batch = torch.stack([image_to_tensor(im, self.encoder.config) for im in images])
        return batch.to(self.device)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, F) float32 features."""
        with torch.autocast("cuda", dtype=torch.float16, enabled=batch.device.type == "cuda"):
            return self.encoder.forward_features(batch).float()

    def generate(self, features: torch.Tensor, options: DecodeOptions, seeds=None) -> list[list[Hypothesis]]:
        """(B, F) features -> hypotheses per image (see ``captioner.decoding.generate``)."""
        return generate(self.decoder, features.to(self.device), options, self.ids, seeds)

    def describe(self, hypotheses: list[list[Hypothesis]]) -> list[list[dict]]:
        """Hypotheses -> ``{"text", "log_prob", "perplexity"}`` dictionaries."""
        return [
            [{"text": self.vocab.decode(h.tokens), "log_prob": h.log_prob, "perplexity": h.perplexity} for h in hyps]
            for hyps in hypotheses
        ]

    def caption(self, images: Sequence, **options) -> list[list[dict]]:
        """Captions for images.

        Args:
            images: PIL images, file paths or encoded bytes.
            **options: ``DecodeOptions`` fields (mode, num_captions, temperature, top_k, top_p,
                beam_size, max_length, seed).

        Returns:
            For each image, a list of ``{"text", "log_prob", "perplexity"}``.
        """
        decode_options = DecodeOptions(**options)
        pil = [im if isinstance(im, Image.Image) else decode_image(im).image for im in images]
        pil = [im.convert("RGB") for im in pil]
        features = self.encode(self.images_to_batch(pil))
        return self.describe(self.generate(features, decode_options))
