"""Training: cached CNN features -> LSTM decoder with cross-entropy (then, if asked, self-critical
epochs: ``captioner.self_critical``), checkpoints and resume.

``train(config)`` runs the whole job, as torchvision's reference ``main`` does: read the data set,
build the model (vocabulary, frozen word2vec embedding, a frozen encoder with ImageNet weights, a
file, or auxiliary pretraining on the shapes world), cache the encoder's features, then train the
decoder epoch by epoch. Each epoch logs train and validation loss/perplexity, the gradient norm
before clipping and the validation scores of greedy captions (``evaluation.score``); ``model.pt``
keeps the best epoch, ``last.pt`` the latest with its optimizer, and ``metrics.jsonl`` one line
per epoch.

Started by ``torchrun`` the same job trains with DistributedDataParallel: every process takes its
share of each epoch's batches, so the effective batch is ``batch_size`` times the number of
processes (the learning rate is used as given, not scaled). Rank 0 alone pretrains the CNN, fills
the feature cache first, evaluates, and writes the run folder; how the processes wait for and hear
from one another is ``captioner.distributed``'s.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner.checkpoint import read_checkpoint, save_checkpoint
from captioner.consensus import CaptionMemory
from captioner.data.datasets import Dataset, ImageRecord, load_dataset
from captioner.data.mentions import TEXT_ONLY, parse_groups, text_only
from captioner.data.vocab import SPECIALS, Vocabulary, tokenize
from captioner.distributed import (
    Process, broadcast, check_agreement, gather_rng_states, host_group, init_process, own_rng_state, process_device,
    rank_zero_first, shutdown,
)  # fmt: skip
from captioner.embeddings import grow_embedding, word_embedding
from captioner.errors import CaptionerError
from captioner.evaluation import CaptionTensors, caption_loss, encode_captions, score
from captioner.features import cached_features, default_cache_dir
from captioner.io import remove_temporaries, strict_json
from captioner.metrics import CiderD
from captioner.models.captioner import Captioner
from captioner.models.concepts import ConceptMap
from captioner.models.decoder import DecoderConfig, AttentionDecoder
from captioner.models.encoder import Encoder, EncoderConfig, weights_fingerprint
from captioner.options import PHOTO_ENCODER, PHOTO_RERANK, SHAPES_WORLD_ENCODER, TrainConfig, parse_decoding
from captioner.runtime import resolve_device
from captioner.self_critical import sample_length, self_critical_epoch
from captioner.shapes import GRID
from captioner.shapes.pretraining import CELL_CLASSES, COLOUR_CLASSES, pretrain_encoder


def train(config: TrainConfig) -> dict:
    """Runs a whole training job; returns the best epoch's metrics.

    Under ``torchrun`` every process calls this with the same options and trains its share of each
    epoch with DistributedDataParallel (gloo on CPU, nccl on CUDA); all return the same metrics.

    Args:
        config: the options.

    Returns:
        The metrics of the epoch saved as ``model.pt``.
    """
    out = Path(config.out)
    if (out / "last.pt").exists() and not config.resume:
        raise CaptionerError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if config.resume and not (out / "last.pt").exists():
        raise CaptionerError(f"nothing to resume: {out / 'last.pt'} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(process_device(config.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl works on the current device
    process = init_process(device)
    try:
        return _main(replace(config, progress=config.progress and process.is_main), out, device, process)
    finally:
        shutdown()


@dataclass(frozen=True)
class Run:
    """What the epochs of one run share, made once before the first (``_start``).

    torchvision's reference hands ``train_one_epoch`` the optimizer, the scaler, the device and
    ``args`` one by one; here they travel together, read by name.
    """

    config: TrainConfig
    out: Path  # the run folder: model.pt, last.pt, metrics.jsonl
    device: torch.device
    process: Process  # rank 0 of 1 without torchrun
    host: dist.ProcessGroup | None  # the gloo group for waits between processes (None: one process)
    dataset: Dataset | None  # with the training images of held-out words moved out of the paired data
    train_records: list[ImageRecord]
    val_records: list[ImageRecord]  # the first --val-images of the val split
    train_features: torch.Tensor  # (N, F) cached encoder features of train_records
    val_features: torch.Tensor  # (V, F) of val_records
    train_captions: CaptionTensors  # every training caption, encoded by the model's vocabulary
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler  # cosine, over the cross-entropy epochs
    scaler: torch.amp.GradScaler  # loss scaling, on for float16 only
    amp: torch.dtype | None  # the dtype of the steps under autocast (``autocast_dtype``); None: float32

    @classmethod
    def alone(
        cls, config: TrainConfig, optimizer: torch.optim.Optimizer, features: torch.Tensor, captions: CaptionTensors,
        amp: torch.dtype | None = None,
    ) -> Run:  # fmt: skip
        """A run of one process on the CPU whose epochs step ``optimizer`` on ``features`` and encoded
        ``captions``, with no data set and no validation images: for steps taken outside ``train``
        (tests, benchmarks). ``config`` gives the batch size, the clipping and the progress bars."""
        return cls(
            config=config, out=Path(config.out), device=torch.device("cpu"), process=Process(), host=None,
            dataset=None, train_records=[], val_records=[], train_features=features, val_features=features[:0],
            train_captions=captions, optimizer=optimizer, schedule=torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0),
            scaler=torch.amp.GradScaler("cuda", enabled=False), amp=amp,
        )  # fmt: skip


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best so far and every epoch's metrics."""

    start_epoch: int = 1
    best: dict | None = None
    history: list[dict] = field(default_factory=list)


def _main(config: TrainConfig, out: Path, device: torch.device, process: Process) -> dict:
    """The job: the run (data, model and features, optimizer), then the epoch loop."""
    run, model, progress = _start(config, out, device, process)
    decoder = model.decoder  # checkpoints save this plain module; DDP only wraps it for the training steps
    if process.distributed:
        decoder = DistributedDataParallel(model.decoder, device_ids=[device.index] if device.type == "cuda" else None)
    cider = None  # the self-critical epochs' reward, built when the first one starts
    for epoch in range(progress.start_epoch, config.epochs + config.self_critical_epochs + 1):
        started = time.monotonic()
        self_critical = epoch > config.epochs
        if self_critical:  # after the cosine schedule, a small constant rate
            for group in run.optimizer.param_groups:
                group["lr"] = config.self_critical_lr
        row = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], "world_size": process.world_size}
        row["effective_batch_size"] = config.batch_size * process.world_size
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        if self_critical:
            if cider is None:
                cider = _reward(model, run.train_records)
            row |= self_critical_epoch(
                decoder, run.train_features, cider, model.vocab.words, run, ids=model.ids,
                max_length=sample_length(run.train_captions, model.vocab.pad), generator=generator,
            )  # fmt: skip
        else:
            row |= train_one_epoch(
                decoder, run.train_features, run.train_captions, run, pad=model.vocab.pad, generator=generator
            )
            run.schedule.step()
        _stop_if_not_finite(row)  # every rank: under DDP the training loss is the same on all
        rngs = gather_rng_states(process, run.host)
        if process.is_main:
            row |= validate(model, run.val_features, run.val_records, config.max_caption_length)
            row["seconds"] = round(time.monotonic() - started, 2)
            _stop_if_not_finite(row)
            _save_epoch(run, model, row, progress, rngs)
        progress.best = broadcast(progress.best, process, run.host)
    return progress.best


def _start(config: TrainConfig, out: Path, device: torch.device, process: Process) -> tuple[Run, Captioner, Progress]:
    """The run, its model (restored from ``last.pt``, or built) and where it stands; the random state
    set to go on with, and ``metrics.jsonl`` rewritten from the saved history."""
    amp = autocast_dtype(config.precision, device)  # first: a precision this device lacks is refused before any work
    dataset = load_dataset(config.data, format=config.format, images=config.images, skip_missing=config.skip_missing)
    dataset, held = dataset.with_validation(config.val_fraction, config.seed)
    if held and config.progress and process.is_main:
        _log(
            f"{dataset.name} has no validation images: {held} of its {held + len(dataset.split('train'))} training images "
            f"are held out for validation (--val-fraction {config.val_fraction}, chosen by --seed; to choose them "
            "yourself, give each image's split in a 'split' column)"
        )
    if config.holdout_words:
        dataset = hold_out_words(dataset, parse_groups(config.holdout_words), config.progress)
    val_records = dataset.split("val")[: config.val_images or None]
    _check_shares(config, dataset, process)
    host = host_group(process)
    resumed = read_checkpoint(out / "last.pt") if config.resume else None
    if process.is_main:
        remove_temporaries(out)  # of writes a kill interrupted: the run folder has one writer, this one
        if resumed:
            _repair_best(resumed, out)
    model, train_features, val_features = rank_zero_first(
        process, host, lambda: _prepare(config, dataset, val_records, out, device, resumed)
    )
    # DDP gives every rank rank 0's decoder, the frozen embedding included (it is a parameter), but the
    # vocabulary and the features must agree already; they do when every process read the same data
    # set and the same encoder-pretrained.pt.
    check_agreement(
        (model.vocab.words, weights_fingerprint(model.encoder)), process, host,
        "the processes built different vocabularies or encoders: every machine needs the "
        "same --data, and --out in a folder they all share",
    )  # fmt: skip
    train_records = dataset.split("train")
    train_captions = encode_captions(train_records, model.vocab, config.max_caption_length)
    optimizer, schedule, scaler = _optimizer(model, config, amp)
    run = Run(
        config=config, out=out, device=device, process=process, host=host, dataset=dataset,
        train_records=train_records, val_records=val_records, train_features=train_features,
        val_features=val_features, train_captions=train_captions, optimizer=optimizer, schedule=schedule,
        scaler=scaler, amp=amp,
    )  # fmt: skip
    progress = _restore(run, resumed) if resumed else Progress()
    if resumed:  # dropout masks continue as if never stopped; under torchrun each rank's own
        training = resumed["training"]
        torch.set_rng_state(own_rng_state(training.get("rng_ranks") or [training["rng"]], process))
    else:  # dropout does not depend on what the feature cache held; each rank draws its own masks
        torch.manual_seed(config.seed + process.rank)
    if process.is_main:  # the log rewritten from the saved history: an epoch that was not saved is dropped
        (out / "metrics.jsonl").write_text("".join(strict_json(h) + "\n" for h in progress.history))
    return run, model, progress


def _reward(model: Captioner, records: list[ImageRecord]) -> CiderD:
    """The self-critical epochs' reward: CIDEr-D against the training captions, which a caption
    memory holds already."""
    return model.memory.cider if model.memory else CiderD([[tokenize(c) for c in r.captions] for r in records])


def _length_buckets(ids: torch.Tensor, pad: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random batches of captions of similar length, so little compute goes to padding.

    Captions are shuffled, sorted by length within pools of 50 batches, cut into batches, and
    the batches shuffled again: random enough for SGD, and one-object and three-object
    captions of the shapes world (5 vs 25 words) rarely share a batch.
    """
    lengths = (ids != pad).sum(1)
    order = torch.randperm(len(ids), generator=generator)
    batches = []
    for pool in order.split(batch_size * 50):
        pool = pool[lengths[pool].argsort(stable=True)]
        batches += list(pool.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def train_one_epoch(
    decoder, features: torch.Tensor, captions: CaptionTensors, run: Run, *, pad: int, generator: torch.Generator
) -> dict:
    """One pass over ``captions`` in a seeded random order, ``run.config.batch_size`` captions a step.

    Args:
        decoder: the decoder, or its DistributedDataParallel wrapper (whose backward syncs gradients).
        features: (N, F) the features of the images that ``captions.image_index`` counts.
        run: the run: its optimizer and scaler (a ``torch.amp.GradScaler``, enabled for float16;
            disabled it changes nothing) take the steps, with the config's ``clip_norm``, on its
            device, under autocast to its ``amp`` dtype (None: float32). Under
            DistributedDataParallel every rank draws the same batches from ``generator`` and takes
            every world_size-th one (``run.process``), after the last ``len % world_size`` are
            dropped: all ranks must take the same number of steps, or DDP's gradient all-reduce
            waits forever.
        pad: the ``<pad>`` id.

    Returns:
        ``{"train_loss", "train_perplexity", "grad_norm", "grad_norm_max", "clip_rate"}``; the loss
        is over all ranks' batches; the gradient norms (this rank's, the same on every rank once DDP
        has averaged the gradients) are measured before clipping, so exploding gradients show in the
        log, and ``clip_rate`` is the share of steps whose norm was over ``clip_norm`` (clipped).
    """
    config, device, optimizer, scaler = run.config, run.device, run.optimizer, run.scaler
    world_size = run.process.world_size
    batches = _length_buckets(captions.ids, pad, config.batch_size, generator)
    batches = batches[: len(batches) - len(batches) % world_size][run.process.rank :: world_size]
    decoder.train()
    total_loss, total_words, norms, clipped = 0.0, 0, [], 0
    params = [p for p in decoder.parameters() if p.requires_grad]
    for batch in tqdm(batches, desc="training", unit="batch", disable=not config.progress, leave=False):
        ids = captions.ids[batch]
        ids = ids[:, : int((ids != pad).sum(1).max())].to(device)  # trim common padding
        with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
            loss, words = caption_loss(decoder, features[captions.image_index[batch]].to(device), ids, pad)
        value = loss.item()
        if not math.isfinite(value) and world_size == 1:
            total_loss = value
            break  # no step on it; under DDP every rank must take the same steps, so the epoch ends first
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / words).backward()
        scaler.unscale_(optimizer)  # clip and log the true norm, not the scaled one
        norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip_norm))
        if math.isfinite(norm):  # a float16 overflow: the scaler skips this step and lowers its scale
            norms.append(norm)
            clipped += norm > config.clip_norm
        scaler.step(optimizer)
        scaler.update()
        total_loss += value
        total_words += words
    if world_size > 1:
        totals = torch.tensor([total_loss, total_words], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        total_loss, total_words = totals[0].item(), int(totals[1].item())
    mean = total_loss / max(total_words, 1)
    return {
        "train_loss": mean,
        "train_perplexity": math.exp(mean) if mean < 700 else math.inf,  # math.exp overflows near 710
        "grad_norm": sum(norms) / max(len(norms), 1),
        "grad_norm_max": max(norms, default=0.0),
        "clip_rate": clipped / max(len(norms), 1),
    }


@torch.inference_mode()
def validate(model: Captioner, features: torch.Tensor, records, max_length: int) -> dict:
    """The validation columns of an epoch's row: teacher-forced loss and perplexity, and BLEU-4,
    CIDEr and (shapes world) truthfulness of greedy captions, with the quick scores of ``score``."""
    report, _ = score(model, features, records, batch_size=512, max_length=max_length, full=False)
    keys = ("loss", "perplexity", "bleu_4", "cider", "truthfulness")
    return {f"val_{key}": report[key] for key in keys if key in report}


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _check_shares(config: TrainConfig, dataset: Dataset, process: Process) -> None:
    """Checks that every process gets batches; under torchrun, says how they share them."""
    num_batches = math.ceil(sum(len(r.captions) for r in dataset.split("train")) / config.batch_size)
    if num_batches < process.world_size:
        raise CaptionerError(
            f"{num_batches} batch(es) of {config.batch_size} training captions cannot be shared by "
            f"{process.world_size} processes: lower --batch-size or start fewer processes"
        )
    if process.distributed and process.is_main:
        _log(
            f"DistributedDataParallel: {process.world_size} processes ({dist.get_backend()}), batch size "
            f"{config.batch_size} per process, {config.batch_size * process.world_size} in all; "
            f"lr {config.lr} as given (not scaled with the number of processes); "
            f"{num_batches // process.world_size} steps per epoch, {num_batches % process.world_size} batch(es) left out"
        )


def _prepare(config: TrainConfig, dataset: Dataset, val_records, out: Path, device: torch.device, resumed):
    """The model (restored, or built anew) on ``device`` and the cached features of train and validation."""
    if resumed:
        model = Captioner.from_checkpoint(resumed, source="last.pt")
        if config.progress:
            _log(f"resuming {out} after epoch {resumed['training']['epoch']}")
    elif config.init:
        model = grown_model(config, dataset)
    else:
        model = build_model(config, dataset, out, device)
    if not resumed and (config.decoding is not None or not config.init):  # a grown model keeps its own unless told
        model.default_decoding = parse_decoding(config.decoding)
    model.to(device)
    cache_dir = Path(config.feature_cache) if config.feature_cache else default_cache_dir()
    args = dict(cache_dir=cache_dir, device=device, num_workers=config.num_workers, progress=config.progress)
    train_features = cached_features(model.encoder, [r.path for r in dataset.split("train")], **args)
    val_features = cached_features(model.encoder, [r.path for r in val_records], **args)
    grid = train_features[:, : model.decoder.config.grid_dim]  # the memory compares photographs by their grids
    if config.init and not resumed and model.memory is not None:  # the new training images join the old ones
        captions = [[tokenize(c) for c in r.captions] for r in dataset.split("train")]
        model.memory = model.memory.extended(grid, model.decoder.config.cells, captions)
    elif not resumed or not config.init:
        model.memory = caption_memory(config, dataset, grid, model.decoder.config.cells)
    return model, train_features, val_features


def grown_model(config: TrainConfig, dataset: Dataset) -> Captioner:
    """The trained model ``config.init``, ready to learn this data set's captions: its encoder,
    decoder and caption memory kept, its vocabulary grown by the words of the new captions
    (their word2vec vectors trained on them beside the old, fixed vectors; frozen, as all are),
    and with concepts, classes it could not map given the new words that name them. Its sizes are
    its own: the options that size a new decoder do not apply.

    Raises:
        CaptionerError: the data set needs another encoder than the model's.
    """
    model = Captioner.load(config.init)
    name, image_size, grid = SHAPES_WORLD_ENCODER if dataset.meta.get("shapes_world") else PHOTO_ENCODER
    own = model.encoder.config
    wanted = (config.encoder or name, config.image_size or own.image_size, config.pool_grid or own.pool_grid)
    if wanted != (own.name, own.image_size, own.pool_grid):
        raise CaptionerError(
            f"{Path(config.init).name} has the encoder {own.name} at {own.image_size} px pooled to {own.pool_grid} x "
            f"{own.pool_grid}, not the {wanted[0]} at {wanted[1]} px pooled to {wanted[2]} x {wanted[2]} this data "
            "set and these options need: start from a model of the same encoder, or train a new one"
        )
    captions = [c for r in dataset.records if r.split in ("train", TEXT_ONLY) for c in r.captions]
    vocab = model.vocab.grown(captions, config.min_count)
    embedding = grow_embedding(model.decoder.embed.weight.detach().cpu(), vocab, [tokenize(c) for c in captions], config.seed)
    concepts = model.decoder.config.concept_ids
    if concepts:  # old classes keep their words; unmapped ones may find a new word
        now = concept_ids(vocab, captions, progress=False)
        concepts = tuple(old if old >= 0 else new for old, new in zip(concepts, now))
    decoder = model.decoder.grown(embedding.matrix, concepts)
    if config.progress:
        new = vocab.words[len(model.vocab) :]
        _log(f"starting from {Path(config.init).name}: {len(new)} new words ({', '.join(new[:8])}{', ...' if len(new) > 8 else ''})")
    started = {"model": Path(config.init).name, "version": model.version, "data": model.data}
    return Captioner(
        model.encoder, decoder, vocab, embedding={**model.embedding, "grown": embedding.info},
        data={**dataset.summary(), "started_from": started}, memory=model.memory,
    )  # fmt: skip


def hold_out_words(dataset: Dataset, groups: tuple[tuple[str, ...], ...], progress: bool) -> Dataset:
    """``dataset`` with the training images that mention a held-out word moved out of the paired
    data (``mentions.text_only``): every use of ``split("train")`` then leaves them out."""
    records = tuple(text_only(dataset.records, groups))
    left_out = sum(r.split == TEXT_ONLY for r in records)
    if progress:
        _log(
            f"held out {', '.join('/'.join(g) for g in groups)}: {left_out} of {left_out + sum(r.split == 'train' for r in records)} "
            "training images leave the image-caption data (their captions still train the vocabulary and word2vec)"
        )
    return replace(dataset, records=records, meta={**dataset.meta, "held_out_words": [list(g) for g in groups]})


def caption_memory(config: TrainConfig, dataset: Dataset, train_features: torch.Tensor, cells: int) -> CaptionMemory | None:
    """What the model keeps of its training images for consensus re-ranking (None: nothing)."""
    records = dataset.split("train")
    neighbours = config.rerank
    if neighbours is None:  # by data, and never more than there are training images
        neighbours = 0 if dataset.meta.get("shapes_world") else min(PHOTO_RERANK, len(records))
    if not neighbours:
        return None
    return CaptionMemory.from_features(train_features, cells, [[tokenize(c) for c in r.captions] for r in records], neighbours)


def build_model(config: TrainConfig, dataset: Dataset, out: Path, device: torch.device) -> Captioner:
    """A new captioner: vocabulary and frozen word2vec embedding of the training captions, the
    frozen encoder, and a randomly initialised decoder (seeded)."""
    # Text alone reads the held-out images' captions too (DCC's in-domain text).
    captions = [c for r in dataset.records if r.split in ("train", TEXT_ONLY) for c in r.captions]
    vocab = Vocabulary.build(captions, config.min_count)
    embedding = word_embedding(
        vocab, [tokenize(c) for c in captions], vectors_path=config.word2vec, dim=config.embed_dim, seed=config.seed
    )
    info = embedding.info
    if config.progress:
        _log(
            f"vocabulary {len(vocab)} words; word2vec {info['source']} {info['dim']}-d, coverage "
            f"{info['coverage_words']:.1%} of words, {info['coverage_tokens']:.1%} of tokens"
        )
    encoder = build_encoder(config, dataset, out, device)
    torch.manual_seed(config.seed)
    decoder_config = DecoderConfig(
        feature_dim=encoder.feature_dim,
        vocab_size=len(vocab),
        embed_dim=embedding.matrix.size(1),
        cells=encoder.config.pool_grid**2,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        cell=config.cell,
        copy_ids=copy_ids(encoder.config.cell_classes, vocab) if config.copy_labels else (),
        concept_ids=concept_ids(vocab, captions, config.progress) if encoder.config.concepts else (),
    )
    decoder = AttentionDecoder(decoder_config, embedding.matrix, pad_id=vocab.pad)
    return Captioner(encoder, decoder, vocab, embedding=info, data=dataset.summary())


def copy_ids(cell_classes: tuple[tuple[str, ...], ...], vocab: Vocabulary) -> tuple[tuple[int, ...], ...]:
    """The vocabulary id of each class the encoder's cell head names (-1: no name, or not a word
    of the captions): what the decoder copies. Empty if no class name is a word."""
    ids = tuple(tuple(vocab.index.get(name, -1) if name else -1 for name in group) for group in cell_classes)
    return ids if any(i >= 0 for group in ids for i in group) else ()


def concept_ids(vocab: Vocabulary, captions: list[str], progress: bool) -> tuple[int, ...]:
    """Each ImageNet class's word in ``vocab`` (-1: unmapped; by how often ``captions`` say each
    word, ``ConceptMap.build``), said in one line."""
    said = Counter(t for c in captions for t in tokenize(c))
    concepts = ConceptMap.build({w: said[w] for w in vocab.words[len(SPECIALS) :]})
    summary = concepts.summary()
    if progress:
        _log(
            f"concepts: {summary['mapped']} of {summary['classes']} ImageNet classes map to {summary['words']} caption words; "
            f"{len(summary['unmapped'])} unmapped (e.g. {', '.join(summary['unmapped'][:3])})"
        )
    return concepts.ids(vocab.index)


def build_encoder(config: TrainConfig, dataset: Dataset, out: Path, device: torch.device) -> Encoder:
    """The frozen encoder: pretrained on the shapes world's scenes, or with the weights asked for."""
    shapes = dataset.meta.get("shapes_world")
    name, image_size, grid = SHAPES_WORLD_ENCODER if shapes else PHOTO_ENCODER
    torch.manual_seed(config.seed)  # a randomly initialised encoder (weights none) is repeatable too
    weights = config.encoder_weights
    if weights == "auto":
        weights = "auxiliary" if shapes else "imagenet"
    auxiliary = weights == "auxiliary"
    if auxiliary and (not shapes or not all(r.scene for r in dataset.records)):
        raise CaptionerError("--encoder-weights auxiliary needs a shapes-world data set (made by captioner synth)")
    if auxiliary and config.pool_grid not in (None, GRID):
        raise CaptionerError(f"--encoder-weights auxiliary reads the scene grid: the pool grid must be {GRID}")
    encoder = Encoder(
        EncoderConfig(
            name=config.encoder or name,
            image_size=config.image_size or image_size,
            pool_grid=GRID if auxiliary else config.pool_grid or grid,
            cell_classes=CELL_CLASSES if auxiliary else (),
            colour_group=CELL_CLASSES.index(COLOUR_CLASSES) if auxiliary and config.colour_path else None,
            concepts=weights == "imagenet" if config.concepts is None else config.concepts,
        )
    )
    if auxiliary:
        return _pretrained_on_shapes(encoder, config, dataset, out, device)
    encoder.load_weights(weights)
    return encoder.freeze()


def _pretrained_on_shapes(encoder: Encoder, config: TrainConfig, dataset: Dataset, out: Path, device) -> Encoder:
    """``encoder`` pretrained on the shapes world's scenes, or read back from an earlier run's
    ``out/encoder-pretrained.pt`` (a resumed run, or another rank)."""
    saved = out / "encoder-pretrained.pt"
    encoder.weights = "auxiliary:shapes-world"
    if saved.exists():
        state = read_checkpoint(saved)  # damaged: an error that says so
        try:
            encoder.load_state_dict(state["state_dict"])
            encoder.pretraining = state["pretraining"]
        except (RuntimeError, KeyError, TypeError):
            raise CaptionerError(
                f"{saved} does not fit this encoder (another --encoder or an older captioner): "
                "delete it to pretrain again"
            ) from None
        if encoder.pretraining.get("protocol") != config.protocol:
            raise CaptionerError(
                f"{saved} was pretrained under protocol {encoder.pretraining.get('protocol')}, not "
                f"{config.protocol}: delete it to pretrain again, or pass --protocol {encoder.pretraining.get('protocol')}"
            )
        return encoder.freeze()
    encoder.pretraining = pretrain_encoder(
        encoder,
        dataset.meta["shapes_world"],
        dataset.split("val"),
        epochs=config.pretrain_epochs,
        images_per_epoch=len(dataset.split("train")),
        device=device,
        seed=config.seed,
        protocol=config.protocol,
        progress=config.progress,
    )
    save_checkpoint({"state_dict": encoder.state_dict(), "pretraining": encoder.pretraining}, saved)
    return encoder


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the training steps under autocast for ``--precision`` (None: float32 throughout).

    Autocast runs the matrix products and the LSTMs in the lower precision and keeps the weights,
    their gradients and Adam's moments in float32, so only the arithmetic of a step is rounded.
    """
    if precision == "auto":
        precision = "float16" if device.type == "cuda" else "float32"
    if precision == "float16" and device.type != "cuda":
        raise CaptionerError("--precision float16 needs CUDA (its loss scaling is CUDA's): on the CPU use bfloat16")
    return None if precision == "float32" else getattr(torch, precision)


def _optimizer(model: Captioner, config: TrainConfig, amp: torch.dtype | None):
    """Adam over the parameters that train (the frozen embedding and encoder are not among them),
    a cosine learning-rate schedule, and loss scaling for float16 (bfloat16 has float32's range)."""
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr * 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    return optimizer, schedule, scaler


def _restore(run: Run, resumed: dict) -> Progress:
    """The run's optimizer, schedule and scaler as ``last.pt`` left them, and where its run stood."""
    training = resumed["training"]
    run.optimizer.load_state_dict(training["optimizer"])
    run.schedule.load_state_dict(training["schedule"])
    if training.get("scaler"):
        run.scaler.load_state_dict(training["scaler"])
    return Progress(training["epoch"] + 1, training["best"], training["history"])


def _save_epoch(run: Run, model: Captioner, row: dict, progress: Progress, rngs: list | None) -> None:
    """Records the epoch: ``last.pt`` to resume from, ``model.pt`` if it is the best, a log line.
    ``rngs``: every rank's random state under torchrun (``gather_rng_states``), else None."""
    progress.history.append(row)
    # Not truthfulness: a model that leaves the third object out says fewer false things.
    is_best = progress.best is None or row["val_cider"] > progress.best["val_cider"]
    progress.best = row if is_best else progress.best
    config, out = run.config, run.out
    settings = {k: v for k, v in asdict(config).items() if k not in ("resume", "progress")}
    training = {
        "epoch": row["epoch"],
        "best": progress.best,
        "history": progress.history,
        "config": settings,
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if rngs:
        training["rng_ranks"] = rngs
    # last.pt first: a kill before model.pt is written leaves last.pt holding the best epoch's
    # weights, from which _repair_best rewrites model.pt on --resume (the other order would lose them).
    save_checkpoint(model.to_checkpoint(metrics=row, training=training), out / "last.pt")
    if is_best:
        model_training = {"epoch": row["epoch"], "config": settings, "history": progress.history}
        save_checkpoint(model.to_checkpoint(metrics=row, training=model_training), out / "model.pt")
    with (out / "metrics.jsonl").open("a") as f:
        f.write(strict_json(row) + "\n")
    truthful = f", truthful {row['val_truthfulness']:.1%}" if "val_truthfulness" in row else ""
    trained = (
        f"train ppl {row['train_perplexity']:.3f}" if "train_perplexity" in row else f"self-critical, train CIDEr-D {row['train_reward']:.3f}"
    )
    _log(
        f"epoch {row['epoch']}/{config.epochs + config.self_critical_epochs}: {trained}, val ppl "
        f"{row['val_perplexity']:.3f}, val BLEU-4 {row['val_bleu_4']:.3f}, CIDEr {row['val_cider']:.3f}{truthful}, "
        f"grad norm {row['grad_norm']:.2f} (max {row['grad_norm_max']:.2f}, clipped {row['clip_rate']:.0%}){' *' if is_best else ''}"
    )


def _stop_if_not_finite(row: dict) -> None:
    """Stops training at a NaN or infinite loss or score, before anything of the epoch is saved."""
    bad = [key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise CaptionerError(
            f"epoch {row['epoch']}: {', '.join(bad)} not finite ({row[bad[0]]}): training stopped before "
            "saving it (lower --lr or --clip-norm, or check the data); --resume goes on from the last saved epoch"
        )


def _repair_best(resumed: dict, out: Path) -> None:
    """Makes ``model.pt`` hold the best epoch that ``last.pt`` records.

    A kill after ``last.pt`` of a new best epoch was written and before ``model.pt`` was leaves
    ``model.pt`` an epoch behind (or absent); ``last.pt`` then holds that best epoch's weights.
    """
    training = resumed["training"]
    best = training["best"]["epoch"]
    try:
        held = (read_checkpoint(out / "model.pt").get("training") or {}).get("epoch")
    except CaptionerError:  # absent or damaged
        held = None
    if held == best:
        return
    if training["epoch"] != best:
        raise CaptionerError(
            f"model.pt does not hold epoch {best}, the best that last.pt records, and that epoch's weights "
            "are no longer in last.pt: restore model.pt from a copy, or train again in another --out"
        )
    model_training = {"epoch": best, "config": training["config"], "history": training["history"]}
    state = {k: v for k, v in resumed.items() if k not in ("format", "version", "created", "training")}
    save_checkpoint({**state, "training": model_training}, out / "model.pt")
    _log(f"model.pt held epoch {held}, not the best epoch {best} that last.pt records: rewritten from last.pt")
