"""The captioner: encoder + decoder + vocabulary, the one place captions are generated, and the
owner of its checkpoint (what goes in, and how the model is rebuilt from it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from captioner.checkpoint import file_digest, read_checkpoint
from captioner.consensus import CaptionMemory, neighbours_for
from captioner.data.images import decode_image
from captioner.data.vocab import Vocabulary
from captioner.decoding import Hypothesis, SpecialIds, beam_search, generate
from captioner.errors import CaptionerError
from captioner.models.concepts import seen_words, top_concepts
from captioner.models.decoder import AttentionDecoder, DecoderConfig
from captioner.models.encoder import Encoder, EncoderConfig
from captioner.options import DecodeOptions
from captioner.trust import MAX_WORDS, Judge, TrustCalibration, caption_tokens, token_log_probs


class Captioner(nn.Module):
    """A frozen CNN encoder and an LSTM decoder that share one vocabulary.

    Args:
        encoder: the (frozen) CNN.
        decoder: the attention decoder.
        vocab: the decoder's vocabulary.
        embedding: where the word vectors came from (source, file, dimension, coverage).
        metrics: the training metrics of the epoch that was saved.
        data: what it was trained on (data set name, format, images per split, captions, and for
            the shapes world its held-out pairs); empty for checkpoints that predate the record.
        memory: its training images' pooled features and captions, by which beam search re-ranks
            (``captioner.consensus``); None: beam search ranks by probability alone.
        trust: how its captions' scores are computed from their signals, and when a photograph is
            unfamiliar (``captioner.trust``); None: not calibrated yet.
        default_decoding: the decoding it answers with when asked for none (``DecodeOptions``
            fields; ``decode_options``).

    Attributes:
        name: shown to people (the service's MODEL_NAME replaces it).
        version: the short digest of the checkpoint file it was loaded from (None if not loaded).
        created: when its checkpoint was written (UTC, ISO 8601; None if not loaded).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: AttentionDecoder,
        vocab: Vocabulary,
        *,
        embedding: dict | None = None,
        metrics: dict | None = None,
        data: dict | None = None,
        memory: CaptionMemory | None = None,
        trust: TrustCalibration | None = None,
        default_decoding: dict | None = None,
    ):
        super().__init__()
        self.encoder = encoder.freeze()
        self.decoder = decoder
        self.vocab = vocab
        self.embedding = embedding or {}
        self.metrics = metrics or {}
        self.data = data or {}
        self.created: str | None = None  # set by from_checkpoint: when its checkpoint was written
        self.memory = memory
        self.trust = trust
        # The decoding it was chosen with (DecodeOptions fields): what it answers with when asked
        # for none, a request's options overriding it (``DecodeOptions.resolve``).
        self.default_decoding = dict(default_decoding or {})
        self.name = f"captioner-{encoder.config.name}-{decoder.config.cell}"
        self.version: str | None = None
        self.ids = SpecialIds(start=vocab.start, end=vocab.end, pad=vocab.pad, unk=vocab.unk)

    def to_checkpoint(self, **extra) -> dict:
        """The checkpoint dictionary (plain data); ``extra`` adds top-level entries (metrics, training state)."""
        return {
            "encoder": {
                "config": self.encoder.config.to_dict(),
                "weights": self.encoder.weights,
                "pretraining": self.encoder.pretraining,
                "int8_calibration": self.encoder.int8_calibration,
                "state_dict": self.encoder.state_dict(),
            },
            "decoder": {"config": self.decoder.config.to_dict(), "state_dict": self.decoder.state_dict()},
            "vocab": list(self.vocab.words),
            "embedding": self.embedding,
            "data": self.data,
            **({"caption_memory": self.memory.to_dict()} if self.memory else {}),
            **({"trust": self.trust.to_dict()} if self.trust else {}),
            "decoding": dict(self.default_decoding),
            **extra,
        }

    @classmethod
    def from_checkpoint(cls, state: dict, source: str = "the checkpoint") -> Captioner:
        """A captioner rebuilt from a checkpoint dictionary alone; ``source`` names it in errors."""
        missing = [k for k in ("encoder", "decoder", "vocab") if k not in state]
        if missing:
            raise CaptionerError(f"{source} is an incomplete captioner model: no {', '.join(missing)}")
        try:
            vocab = Vocabulary(state["vocab"])
            encoder = Encoder(EncoderConfig.from_dict(state["encoder"]["config"]))
            encoder.load_state_dict(state["encoder"]["state_dict"])
            encoder.weights = state["encoder"].get("weights", "none")
            encoder.pretraining = state["encoder"].get("pretraining", {})
            encoder.int8_calibration = state["encoder"].get("int8_calibration", {})
            decoder_state = state["decoder"]["state_dict"]
            decoder = AttentionDecoder(DecoderConfig(**state["decoder"]["config"]), decoder_state["embed.weight"], pad_id=vocab.pad)
            decoder.load_state_dict(decoder_state)
            memory = CaptionMemory.from_dict(state["caption_memory"]) if "caption_memory" in state else None
            if memory and memory.features.size(1) * decoder.config.cells != decoder.config.grid_dim:
                raise CaptionerError("its caption memory's features are not its encoder's")
            trust = TrustCalibration.from_dict(state["trust"]) if "trust" in state else None
            decoding = dict(state.get("decoding", {}))
            DecodeOptions.resolve(decoding, {})
        except (KeyError, TypeError, AttributeError, RuntimeError, CaptionerError) as exc:
            raise CaptionerError(f"the model in {source} does not fit together ({type(exc).__name__})") from None
        model = cls(
            encoder,
            decoder,
            vocab,
            embedding=state.get("embedding", {}),
            metrics=state.get("metrics", {}),
            data=state.get("data", {}),
            memory=memory,
            trust=trust,
            default_decoding=decoding,
        )
        model.created = state.get("created")
        return model

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", cnn: str = "eager") -> Captioner:
        """A captioner rebuilt from a checkpoint file alone, in eval mode on ``device``; ``cnn="int8"``
        runs its CNN in int8 (CPU only, from the checkpoint's calibration). An fp32 CNN on the CPU
        runs channels-last (``Encoder.use_channels_last``)."""
        model = cls.from_checkpoint(read_checkpoint(path), source=Path(path).name)
        model.version = file_digest(path)
        model = model.to(device).eval()
        if cnn == "int8":
            model.encoder.use_int8()
        elif model.device.type == "cpu":
            model.encoder.use_channels_last()
        return model

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def transform(self):
        """The encoder's preprocessing: an RGB image -> (3, S, S) normalised tensor."""
        return self.encoder.transform

    def images_to_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> (B, 3, S, S) normalised batch on the model's device."""
        return torch.stack([self.transform(im) for im in images]).to(self.device)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, F) float32 features."""
        with torch.autocast("cuda", dtype=torch.float16, enabled=batch.device.type == "cuda"):
            return self.encoder.forward_features(batch).float()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 resized images (``ImageTransform.load`` or ``resize``) -> (B, F)
        float32 features: moved to the model's device and normalised there, the batch at once."""
        return self.encode(self.transform.normalize(pixels.to(self.device)))

    def generate(self, features: torch.Tensor, options: DecodeOptions, seeds=None) -> list[list[Hypothesis]]:
        """(B, F) features -> hypotheses per image (see ``captioner.decoding.generate``); beam
        search's re-ranked by consensus with the training captions the model keeps (``rerank``)."""
        features = features.to(self.device)
        neighbours = self.rerank_neighbours(options)
        if not neighbours:
            return generate(self.decoder, features, options, self.ids, seeds)
        beams = beam_search(self.decoder, features, options, self.ids, keep=options.beam_size)
        grid, classes = features.split([self.decoder.config.grid_dim, len(self.decoder.config.concept_ids)], dim=1)
        seen = self.decoder.concepts.mass(classes.float()) if self.decoder.concepts is not None else None
        ranked = self.memory.rerank(grid, self.decoder.config.cells, beams, self.vocab.words, self.ids.end, neighbours, seen)
        return [hyps[: options.num_captions] for hyps in ranked]

    def rerank_neighbours(self, options: DecodeOptions) -> int:
        """How many training images' captions re-rank these options' captions (0: none)."""
        return neighbours_for(options.mode, options.rerank, self.memory.summary if self.memory else None)

    @property
    def concept_words(self) -> list[str | None]:
        """Each ImageNet class's caption word (None: unmapped); empty without concepts."""
        return [self.vocab.words[i] if i >= 0 else None for i in self.decoder.config.concept_ids]

    def concepts(self, features: torch.Tensor) -> list[list[dict]]:
        """(B, F) features -> per image the classifier's top concepts (``{"class", "prob", "word"}``);
        empty lists without concepts."""
        if not self.decoder.config.concept_ids:
            return [[] for _ in range(len(features))]
        words = self.concept_words
        return [top_concepts(row, words) for row in features[:, self.decoder.config.grid_dim :].float().tolist()]

    def describe(self, hypotheses: list[list[Hypothesis]], features: torch.Tensor | None = None) -> list[list[dict]]:
        """Hypotheses -> ``{"text", "log_prob", "perplexity", "finished"}`` dictionaries; explained
        ones add ``"words"``: ``[{"word", "prob", "attention", "concept"}]``, the attention as rows x
        columns of the encoder's cell grid (the whole image, resized, is the grid), ``concept`` whether
        the word is one of the image's top concepts (``models.concepts.seen_words``); and with
        concepts (given the images' ``features``) ``"concepts"``, the classifier's top classes.

        Given the images' ``features``, each also carries ``"confidence"`` (in [0, 1]: the chance
        that the caption does as well as a person's caption of the image, ``captioner.trust``; None
        without a calibration) and
        ``"unfamiliar"`` (the image is far from every training photograph; None: cannot tell),
        ``"trust_note"`` where either is None or the calibration is not the model's own, and
        explained, ``"trust_signals"``.
        """
        explained = any(h.word_log_probs is not None for hyps in hypotheses for h in hyps)
        concepts = self.concepts(features) if explained and features is not None else [[] for _ in hypotheses]
        described = [[self._describe_one(h, seen) for h in hyps] for hyps, seen in zip(hypotheses, concepts, strict=True)]
        if features is not None:
            self._add_confidence(described, hypotheses, features, explained)
        return described

    def _add_confidence(self, described: list[list[dict]], hypotheses: list[list[Hypothesis]], features: torch.Tensor, explained: bool) -> None:
        """Each described caption's confidence and whether its image is unfamiliar (``describe``)."""
        flat = [(i, h) for i, hyps in enumerate(hypotheses) for h in hyps]
        if not flat:
            return
        judge = self.judge()
        end = self.ids.end
        words = [[self.vocab.words[t] for t in h.tokens if t != end] for _, h in flat]
        rows = [h.tokens for _, h in flat]
        log_probs = [h.log_prob for _, h in flat]  # decoding's own: no pass under the image
        values = judge.signals(features.to(self.device), [i for i, _ in flat], rows, words, log_probs, contrast=judge.confidence_reads_contrast)
        for caption, verdict in zip((c for captions in described for c in captions), judge.verdicts(values)):
            caption["confidence"], caption["unfamiliar"] = verdict.confidence, verdict.unfamiliar
            if verdict.note:
                caption["trust_note"] = verdict.note
            if explained:
                caption["trust_signals"] = verdict.signals

    def judge(self) -> Judge:
        """What computes its captions' trust signals and scores them (``captioner.trust``)."""
        return Judge(self.decoder, self.vocab, self.ids, self.memory, self.trust, self.encoder.config.name)

    @torch.inference_mode()
    def score_features(
        self, features: torch.Tensor, captions: Sequence[str], image_of: Sequence[int] | None = None, max_words: int = MAX_WORDS
    ) -> list[dict]:
        """Scores given captions of images from their (B, F) features (``score``); caption i is of
        the image in row ``image_of[i]`` (default: row i)."""
        if max_words < 1:
            raise CaptionerError("max_words must be at least 1")
        image_of = list(range(len(captions))) if image_of is None else list(image_of)
        if len(image_of) != len(captions) or any(not 0 <= i < len(features) for i in image_of):
            raise CaptionerError("score needs one image for each caption")
        if not captions:
            return []
        features = features.to(self.device)
        tokens = [caption_tokens(text, self.vocab, max_words) for text in captions]
        rows = [t.ids for t in tokens]
        said = token_log_probs(self.decoder, features, rows, self.ids, image_of)
        judge = self.judge()
        values = judge.signals(features, image_of, rows, [t.words for t in tokens], [sum(s) for s in said])
        scored = []
        for text, t, log_probs, verdict in zip(captions, tokens, said, judge.verdicts(values)):
            log_prob = sum(log_probs)
            record = {
                "score": verdict.score,
                "log_prob": log_prob,
                "perplexity": math.exp(min(-log_prob / len(log_probs), 700.0)),
                "words": [
                    {"word": word, "prob": math.exp(lp)}
                    for word, lp in zip(t.words + ([] if t.truncated else ["<end>"]), log_probs, strict=True)
                ],
                "unknown_words": t.unknown,
                "truncated": t.truncated,
                "unfamiliar": verdict.unfamiliar,
                "familiarity": verdict.familiarity,
                "signals": verdict.signals,
            }
            if verdict.note:
                record["trust_note"] = verdict.note
            scored.append(record)
        return scored

    def score(self, images: Sequence, captions: Sequence[str], max_words: int = MAX_WORDS) -> list[dict]:
        """How well each caption describes its image, under the model (one teacher-forced pass).

        Args:
            images: one per caption: PIL images, file paths or encoded bytes.
            captions: the captions, as text.
            max_words: a caption is scored on its first ``max_words`` words (``"truncated"``).

        Returns:
            Per caption, ``{"score", "log_prob", "perplexity", "words": [{"word", "prob"}],
            "unknown_words", "truncated", "unfamiliar", "familiarity", "signals"}``, the score the
            chance that the caption is the image's own rather than another photograph's
            (``captioner.trust.TrustCalibration``: a generated caption's ``confidence`` is another
            question, asked by ``describe``); and a
            ``"trust_note"`` where ``score`` or ``unfamiliar`` cannot be told, or the calibration is
            not the model's own (``captioner.trust``). Unknown words are read as ``<unk>``, and
            listed; ``<end>`` is the last word of a caption that was not cut.
        """
        if len(images) != len(captions):
            raise CaptionerError(f"score needs one image for each caption: {len(images)} images, {len(captions)} captions")
        if not captions:
            return []
        pil = [(im if isinstance(im, Image.Image) else decode_image(im).image).convert("RGB") for im in images]
        return self.score_features(self.encode(self.images_to_batch(pil)), captions, max_words=max_words)

    def _describe_one(self, h: Hypothesis, concepts: list[dict]) -> dict:
        described = {
            "text": self.vocab.decode(h.tokens),
            "log_prob": h.log_prob,
            "perplexity": h.perplexity,
            "finished": h.finished,
        }
        if h.word_log_probs is not None:
            side, seen = self.encoder.config.pool_grid, seen_words(concepts)
            described["words"] = [
                {
                    "word": self.vocab.words[token],
                    "prob": math.exp(log_p),
                    "attention": [weights[row * side : (row + 1) * side] for row in range(side)],  # (G, G)
                    "concept": self.vocab.words[token] in seen,
                }
                for token, log_p, weights in zip(h.tokens, h.word_log_probs, h.attention)
            ]
            if concepts:
                described["concepts"] = concepts
        return described

    def decode_options(self, **given) -> DecodeOptions:
        """The options ``given``, over the model's default decoding (``DecodeOptions.resolve``)."""
        return DecodeOptions.resolve(self.default_decoding, given)

    def caption(self, images: Sequence, **options) -> list[list[dict]]:
        """Captions for images.

        Args:
            images: PIL images, file paths or encoded bytes.
            **options: ``DecodeOptions`` fields (mode, num_captions, temperature, top_k, top_p,
                beam_size, max_length, seed, ...), over the model's default decoding.

        Returns:
            For each image, a list of ``{"text", "log_prob", "perplexity", "finished"}`` (and
            ``"words"`` with ``explain=True``).
        """
        decode_options = self.decode_options(**options)
        pil = [(im if isinstance(im, Image.Image) else decode_image(im).image).convert("RGB") for im in images]
        features = self.encode(self.images_to_batch(pil))
        return self.describe(self.generate(features, decode_options), features)
