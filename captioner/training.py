"""Training: cached CNN features -> LSTM decoder with cross-entropy, checkpoints and resume.

``train(config)`` runs the whole job: read the data set, build the vocabulary and the frozen
word2vec embedding, get a frozen encoder (ImageNet weights, a file, or auxiliary pretraining on the
shapes world), cache its features, then train the decoder epoch by epoch. Each epoch logs train and
validation loss/perplexity, the gradient norm before clipping and validation BLEU-4/CIDEr of
greedy captions; ``model.pt`` keeps the best epoch by validation CIDEr, ``last.pt`` the latest
with its optimizer, and ``metrics.jsonl`` one line per epoch.

Started by ``torchrun`` the same job trains with DistributedDataParallel: every process takes its
share of each epoch's batches, so the effective batch is ``batch_size`` times the number of
processes (the learning rate is used as given, not scaled). Rank 0 alone pretrains the CNN, fills
the feature cache first, evaluates, and writes the run folder.
"""

from __future__ import annotations

import json
import sys
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner.checkpoint import build_captioner, model_state, read_checkpoint, save_checkpoint
from captioner.data.datasets import Dataset, ImageRecord, load_dataset
from captioner.data.vocab import Vocabulary, tokenize
from captioner.distributed import Process, init_process, process_device, shutdown
from captioner.options import DecodeOptions
from captioner.embeddings import word_embedding
from captioner.errors import CaptionerError
from captioner.features import cached_features, default_cache_dir
from captioner.metrics import caption_metrics
from captioner.models.captioner import Captioner
from captioner.models.decoder import DecoderConfig, LSTMDecoder
from captioner.models.encoder import Encoder, EncoderConfig, load_encoder_weights, weights_fingerprint
from captioner.options import TrainConfig
from captioner.shapes import GRID, Scene, check_caption
from captioner.shapes.pretraining import CELL_CLASSES, pretrain_encoder


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device asked for must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaptionerError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionerError(f"device {name} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CaptionerError(f"device {name} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


@dataclass
class CaptionTensors:
    """Every (image, caption) pair of a split as padded ids."""

    ids: torch.Tensor  # (N, T) <start> ... <end> <pad>...
    image_index: torch.Tensor  # (N,) row of the split's feature matrix


def encode_captions(records: list[ImageRecord], vocab: Vocabulary, max_length: int) -> CaptionTensors:
    """Ids of every caption of ``records``, cut to ``max_length`` words."""
    rows, index = [], []
    for i, record in enumerate(records):
        for caption in record.captions:
            ids = vocab.encode(caption)
            rows.append(ids[: max_length + 1] + [vocab.end] if len(ids) > max_length + 2 else ids)
            index.append(i)
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), vocab.pad, dtype=torch.long)
    for r, ids in enumerate(rows):
        padded[r, : len(ids)] = torch.tensor(ids)
    return CaptionTensors(padded, torch.tensor(index))


def caption_loss(decoder: LSTMDecoder, features: torch.Tensor, ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of next-word prediction under teacher forcing, and the number of words.

    Padding is masked out, so a batch's loss does not depend on how it was padded.
    """
    logits = decoder(features, ids[:, :-1])  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad, reduction="sum")
    return loss, int((targets != pad).sum())


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


def train_one_epoch(decoder, features, captions, optimizer, scaler, *, pad, batch_size, clip_norm, device, generator, progress, shard=(0, 1)):
    """One pass over ``captions`` in a seeded random order; mixed precision (float16) on CUDA.

    Args:
        scaler: a ``torch.amp.GradScaler``, enabled on CUDA; disabled it changes nothing.
        shard: ``(rank, world_size)`` under DistributedDataParallel. Every rank draws the same
            batches from ``generator`` and takes every world_size-th one, after the last
            ``len % world_size`` are dropped: all ranks must take the same number of steps, or
            DDP's gradient all-reduce waits forever. ``(0, 1)`` is a single process.

    Returns:
        ``{"train_loss", "train_perplexity", "grad_norm", "grad_norm_max"}``; the loss is over all
        ranks' batches; the gradient norms (this rank's, the same on every rank once DDP has
        averaged the gradients) are measured before clipping, so exploding gradients show in the log.
    """
    rank, world_size = shard
    batches = _length_buckets(captions.ids, pad, batch_size, generator)
    batches = batches[: len(batches) - len(batches) % world_size][rank::world_size]
    decoder.train()
    total_loss, total_words, norms = 0.0, 0, []
    params = [p for p in decoder.parameters() if p.requires_grad]
    for batch in tqdm(batches, desc="training", unit="batch", disable=not progress, leave=False):
        ids = captions.ids[batch]
        ids = ids[:, : int((ids != pad).sum(1).max())].to(device)  # trim common padding
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
            loss, words = caption_loss(decoder, features[captions.image_index[batch]].to(device), ids, pad)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / words).backward()
        scaler.unscale_(optimizer)  # clip and log the true norm, not the scaled one
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
        if math.isfinite(norm):  # a float16 overflow: the scaler skips this step and lowers its scale
            norms.append(norm)
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item()
        total_words += words
    if world_size > 1:
        totals = torch.tensor([total_loss, total_words], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        total_loss, total_words = totals[0].item(), int(totals[1].item())
    mean = total_loss / max(total_words, 1)
    return {
        "train_loss": mean,
        "train_perplexity": math.exp(mean),
        "grad_norm": sum(norms) / max(len(norms), 1),
        "grad_norm_max": max(norms, default=0.0),
    }


@torch.inference_mode()
def evaluate_loss(decoder, features, captions, *, pad, batch_size, device) -> dict:
    """Teacher-forced loss and perplexity of ``captions``."""
    decoder.eval()
    total_loss, total_words = 0.0, 0
    for batch in torch.arange(len(captions.ids)).split(batch_size):
        ids = captions.ids[batch].to(device)
        loss, words = caption_loss(decoder, features[captions.image_index[batch]].to(device), ids, pad)
        total_loss += loss.item()
        total_words += words
    mean = total_loss / max(total_words, 1)
    return {"loss": mean, "perplexity": math.exp(mean)}


@torch.inference_mode()
def generated_metrics(model: Captioner, features, records, *, batch_size) -> dict:
    """BLEU-4 and CIDEr of greedy captions (not teacher-forced) against the references, and on the
    shapes world their truthfulness: the share whose every fact holds in the image's scene."""
    model.eval()
    options = DecodeOptions()
    candidates, references = {}, {}
    for start in range(0, len(records), batch_size):
        hyps = model.generate(features[start : start + batch_size], options)
        for record, (hyp,) in zip(records[start : start + batch_size], hyps):
            candidates[record.image_id] = model.vocab.decode(hyp.tokens)
            references[record.image_id] = list(record.captions)
    scores = caption_metrics(candidates, references, tokenizer="simple", meteor=False)
    metrics = {"bleu_4": scores["bleu_4"], "cider": scores["cider"]}
    if records and all(r.scene for r in records):
        truthful = [check_caption(candidates[r.image_id], Scene.from_dict(r.scene)).truthful for r in records]
        metrics["truthfulness"] = sum(truthful) / len(truthful)
    return metrics


def _encoder(config: TrainConfig, dataset: Dataset, out: Path, device: torch.device) -> Encoder:
    """The frozen encoder: pretrained on the shapes world's scenes, or with the weights asked for."""
    shapes = dataset.meta.get("shapes_world")
    # mobilenet_v3_small's last map is 3 x 3 at 96 pixels: one position per cell of the scene grid.
    name, image_size, grid = ("mobilenet_v3_small", 96, GRID) if shapes else ("resnet50", 224, 1)
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
        )
    )
    if not auxiliary:
        encoder.info = {"weights": load_encoder_weights(encoder, weights)}
        return encoder.freeze()
    saved = out / "encoder-pretrained.pt"
    if saved.exists():  # resumed run: the CNN was pretrained already
        state = torch.load(saved, map_location="cpu", weights_only=True)
        try:
            encoder.load_state_dict(state["state_dict"])
        except (RuntimeError, KeyError, TypeError):
            raise CaptionerError(
                f"{saved} does not fit this encoder (another --encoder or an older captioner): "
                "delete it to pretrain again"
            ) from None
        encoder.info = state["info"]
        return encoder.freeze()
    result = pretrain_encoder(
        encoder,
        shapes,
        dataset.split("val"),
        epochs=config.pretrain_epochs,
        images_per_epoch=len(dataset.split("train")),
        device=device,
        seed=config.seed,
        progress=config.progress,
    )
    encoder.info = {"weights": "auxiliary:shapes-world", "pretraining": result}
    save_checkpoint({"state_dict": encoder.state_dict(), "info": encoder.info}, saved)
    return encoder


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# Rank 0 prepares (CNN pretraining, feature extraction) while the others wait: hours on a large data
# set, far past a collective's default timeout (10 minutes with nccl), so the waits between
# processes outside the training steps go through a gloo group of their own with a long one.
HOST_TIMEOUT = timedelta(hours=24)


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
        return _train(config, out, device, process)
    finally:
        shutdown()


def _train(config: TrainConfig, out: Path, device: torch.device, process: Process) -> dict:
    last_path, best_path, metrics_path = out / "last.pt", out / "model.pt", out / "metrics.jsonl"
    log = _log if process.is_main else (lambda message: None)
    config = replace(config, progress=config.progress and process.is_main)
    dataset = load_dataset(config.data, format=config.format, images=config.images, skip_missing=config.skip_missing)
    train_records, val_records = dataset.split("train"), dataset.split("val")
    val_records = val_records[: config.val_images] if config.val_images else val_records
    num_batches = math.ceil(sum(len(r.captions) for r in train_records) / config.batch_size)
    if num_batches < process.world_size:
        raise CaptionerError(
            f"{num_batches} batch(es) of {config.batch_size} training captions cannot be shared by "
            f"{process.world_size} processes: lower --batch-size or start fewer processes"
        )
    host = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT) if process.distributed else None
    if process.distributed:
        log(
            f"DistributedDataParallel: {process.world_size} processes ({dist.get_backend()}), batch size "
            f"{config.batch_size} per process, {config.batch_size * process.world_size} in all; "
            f"lr {config.lr} as given (not scaled with the number of processes); "
            f"{num_batches // process.world_size} steps per epoch, {num_batches % process.world_size} batch(es) left out"
        )

    resumed = read_checkpoint(last_path) if config.resume else None

    def prepare() -> tuple[Captioner, torch.Tensor, torch.Tensor]:
        if resumed:
            model = build_captioner(resumed)
            log(f"resuming {out} after epoch {resumed['training']['epoch']}")
        else:
            vocab = Vocabulary.build((c for r in train_records for c in r.captions), config.min_count)
            sentences = [tokenize(c) for r in train_records for c in r.captions]
            embedding = word_embedding(
                vocab, sentences, vectors_path=config.word2vec, dim=config.embed_dim, seed=config.seed
            )
            log(
                f"vocabulary {len(vocab)} words; word2vec {embedding.info['source']} {embedding.info['dim']}-d, "
                f"coverage {embedding.info['coverage_words']:.1%} of words, {embedding.info['coverage_tokens']:.1%} of tokens"
            )
            encoder = _encoder(config, dataset, out, device)
            torch.manual_seed(config.seed)
            decoder_config = DecoderConfig(
                feature_dim=encoder.feature_dim,
                vocab_size=len(vocab),
                embed_dim=embedding.matrix.size(1),
                cells=encoder.config.pool_grid**2,
                hidden_size=config.hidden_size,
                num_layers=config.num_layers,
                dropout=config.dropout,
            )
            decoder = LSTMDecoder(decoder_config, embedding.matrix, pad_id=vocab.pad)
            info = {"encoder_weights": encoder.info["weights"], "embedding": embedding.info}
            model = Captioner(encoder, decoder, vocab, info)
        model.to(device)
        cache_dir = Path(config.feature_cache) if config.feature_cache else default_cache_dir()
        feature_args = dict(cache_dir=cache_dir, device=device, num_workers=config.num_workers, progress=config.progress)
        train_features = cached_features(model.encoder, [r.path for r in train_records], **feature_args)
        val_features = cached_features(model.encoder, [r.path for r in val_records], **feature_args)
        return model, train_features, val_features

    # Rank 0 first: it writes out/encoder-pretrained.pt and the feature cache, which the others then
    # read instead of racing it to write them.
    if process.is_main:
        model, train_features, val_features = prepare()
    if process.distributed:
        dist.barrier(group=host)
    if not process.is_main:
        model, train_features, val_features = prepare()
    vocab = model.vocab
    if process.distributed:
        # DDP gives every rank rank 0's decoder, the frozen embedding included (it is a parameter),
        # but the vocabulary and the features must agree already; they do when every process read
        # the same data set and the same encoder-pretrained.pt.
        mine = (vocab.words, weights_fingerprint(model.encoder))
        everyone = [None] * process.world_size
        dist.all_gather_object(everyone, mine, group=host)
        if any(theirs != everyone[0] for theirs in everyone):
            raise CaptionerError(
                "the processes built different vocabularies or encoders: every machine needs the "
                "same --data, and --out in a folder they all share"
            )
    train_captions = encode_captions(train_records, vocab, config.max_caption_length)
    val_captions = encode_captions(val_records, vocab, config.max_caption_length)

    params = [p for p in model.decoder.parameters() if p.requires_grad]  # the frozen embedding is not here
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr * 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start_epoch, best, history = 1, None, []
    if resumed:
        optimizer.load_state_dict(resumed["training"]["optimizer"])
        schedule.load_state_dict(resumed["training"]["schedule"])
        if resumed["training"].get("scaler"):
            scaler.load_state_dict(resumed["training"]["scaler"])
        start_epoch = resumed["training"]["epoch"] + 1
        best = resumed["training"]["best"]
        history = resumed["training"]["history"]
        # Dropout masks continue as if never stopped; under torchrun each rank's own, as long as the
        # number of processes is the same.
        rngs = resumed["training"].get("rng_ranks") or [resumed["training"]["rng"]]
        torch.set_rng_state(rngs[process.rank] if process.rank < len(rngs) else rngs[0])
    else:
        # Dropout does not depend on what the feature cache held; under torchrun each rank draws its own masks.
        torch.manual_seed(config.seed + process.rank)
    if process.is_main:
        # Rewrite the log from the saved history: lines of an epoch that was not saved are dropped.
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    decoder = model.decoder  # checkpoints save this plain module; DDP only wraps it for the training steps
    if process.distributed:
        decoder = DistributedDataParallel(model.decoder, device_ids=[device.index] if device.type == "cuda" else None)
    settings = {k: v for k, v in asdict(config).items() if k not in ("resume", "progress")}
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.monotonic()
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        row = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "world_size": process.world_size,
            "effective_batch_size": config.batch_size * process.world_size,
        }
        row |= train_one_epoch(
            decoder,
            train_features,
            train_captions,
            optimizer,
            scaler,
            pad=vocab.pad,
            batch_size=config.batch_size,
            clip_norm=config.clip_norm,
            device=device,
            generator=generator,
            progress=config.progress,
            shard=(process.rank, process.world_size),
        )
        schedule.step()
        rngs = None
        if process.distributed:
            rngs = [None] * process.world_size if process.is_main else None
            dist.gather_object(torch.get_rng_state(), rngs, dst=0, group=host)
        if process.is_main:
            val = evaluate_loss(
                model.decoder, val_features, val_captions, pad=vocab.pad, batch_size=512, device=device
            )
            row |= {"val_loss": val["loss"], "val_perplexity": val["perplexity"]}
            row |= {f"val_{k}": v for k, v in generated_metrics(model, val_features, val_records, batch_size=512).items()}
            row["seconds"] = round(time.monotonic() - started, 2)
            history.append(row)
            # Not truthfulness: a model that leaves the third object out says fewer false things.
            is_best = best is None or row["val_cider"] > best["val_cider"]
            best = row if is_best else best
            training = {
                "epoch": epoch,
                "best": best,
                "history": history,
                "config": settings,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
            }
            if rngs:
                training["rng_ranks"] = rngs
            save_checkpoint(model_state(model, metrics=row, training=training), last_path)
            if is_best:
                model_training = {"epoch": epoch, "config": settings, "history": history}
                save_checkpoint(model_state(model, metrics=row, training=model_training), best_path)
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            truthful = f", truthful {row['val_truthfulness']:.1%}" if "val_truthfulness" in row else ""
            log(
                f"epoch {epoch}/{config.epochs}: train ppl {row['train_perplexity']:.3f}, val ppl "
                f"{row['val_perplexity']:.3f}, val BLEU-4 {row['val_bleu_4']:.3f}, CIDEr {row['val_cider']:.3f}{truthful}, "
                f"grad norm {row['grad_norm']:.2f} (max {row['grad_norm_max']:.2f}){' *' if is_best else ''}"
            )
        if process.distributed:
            # The others wait here while rank 0 evaluates and saves, and return the same best epoch.
            shared = [best]
            dist.broadcast_object_list(shared, src=0, group=host)
            best = shared[0]
    return best
