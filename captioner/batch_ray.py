"""Batch captioning on Ray Data: any number of images, any number of machines, workers that may die.

The pipeline is the one Ray Data's batch-inference guide describes, in three stages:

    read_images(inputs)        image files (folders, globs, lists), Parquet, WebDataset shards
      -> map_batches(decode_images)     bytes -> (3, S, S) by the model's own transform
      -> map_batches(CaptionActor)      a pool of actors, each loading the model once
    -> write_parquet(folder) in shards, or records streamed in input order to JSONL / CSV

On CPUs, Ray Data fuses the two map steps (they ask for the same resources): each actor decodes
the images it captions, one actor per CPU, and no pixels cross the object store. With GPUs,
decoding runs in Ray tasks on the cluster's CPUs while the actors caption on their GPUs.

    import ray
    from captioner.batch_ray import caption_dataset, read_images
    ds = caption_dataset(read_images(["shards/*.tar"]), "model.pt", DecodeOptions(mode="beam"), num_actors=4)
    ds.write_parquet("captions/")

Captions come from ``captioner.batch.caption_tensors``, the function the single-process command
uses, so both engines give the same captions. An image that cannot be decoded becomes a row with
an error code and message. An actor that dies is restarted by Ray and its batch retried
(Ray Data's actor pools default to ``max_restarts=-1``, ``max_task_retries=-1``); a batch's rows reach the output only when its task
finishes, so each image is written exactly once.

The driver never imports torch: importing it (and torchvision) takes seconds that would come
before any actor starts. The model file goes to the cluster as bytes (``ClusterModel``) and is
loaded there by each actor, which hands its preprocessing to the decoding fused into it; the
stages import torch where they run. The command does not wait for the model to be checked first:
where it cannot be loaded, the actors leave as they start, and the driver says why.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
import ray.data

from captioner.errors import CaptionerError
from captioner.options import CaptionJob, DecodeOptions
from captioner.records import RecordFormat, ResumableOutput, collect_inputs

if TYPE_CHECKING:
    import torch

    from captioner.models.captioner import Captioner
    from captioner.models.encoder import ImageTransform

# A WebDataset sample's image is its member with one of these extensions (lower case).
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# A Parquet file's image id, when it has no column of these names, is its path column.
ID_COLUMNS = ("id", "key", "__key__", "image_id", "uid", "name")
PATH_COLUMNS = ("path", "image_path", "file", "filename", "image", "url")

DECODER_MEMORY = 1 << 30  # bytes: torch and a block of images (0.6 GiB measured on the shapes world)
BLOCK_ROWS = 128  # image files per block of the input
# What the stages pass on: the image's id, and its bytes or its path (the other null).
IMAGES = pa.schema([("image", pa.string()), ("path", pa.string()), ("data", pa.binary())])
CAPTION = pa.struct([("text", pa.string()), ("log_prob", pa.float64()), ("perplexity", pa.float64())])
# One output row per image: captions, or an error code and message.
RECORDS = pa.schema(
    [("image", pa.string()), ("captions", pa.list_(CAPTION)), ("error_code", pa.string()), ("error_message", pa.string())]
)


def _sources(inputs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The inputs as (kind, names) in the order given: ``files`` (runs of inputs that
    ``collect_inputs`` reads), ``parquet`` and ``shards`` (each input's files, its glob expanded)."""
    sources: list[tuple[str, list[str]]] = []
    for name in inputs:
        suffix = name.lower().rsplit(".", 1)[-1] if "." in Path(name).name else ""
        kind = {"parquet": "parquet", "tar": "shards"}.get(suffix, "files")
        if kind == "files":
            if sources and sources[-1][0] == "files":
                sources[-1][1].append(name)
            else:
                sources.append((kind, [name]))
            continue
        matches = [name] if Path(name).exists() or not glob.has_magic(name) else sorted(glob.glob(name, recursive=True))
        if not matches or not all(Path(m).is_file() for m in matches):
            raise CaptionerError(f"input not found: {name}")
        sources.append((kind, matches))
    return sources


def read_images(inputs: Sequence[str], *, skip: int = 0) -> ray.data.Dataset:
    """One row per image (columns ``image``: its id, ``path`` or ``data``: its bytes), in input order.

    Args:
        inputs: image files, folders, globs and lists (as ``collect_inputs`` reads them), Parquet
            files (``*.parquet``: a binary column of image bytes, or a path column) and WebDataset
            shards (``*.tar``: a sample's image is its jpg/png/... member, its id its key).
        skip: leave out the first ``skip`` images (a resumed run); only where all are image files.

    Raises:
        CaptionerError: an input that is not there, or a Parquet file without an image column.
    """
    sources = _sources(inputs)
    if skip and any(kind != "files" for kind, _ in sources):
        raise CaptionerError("only runs over image files resume; delete the unfinished output to start again")
    parts = []
    for kind, names in sources:
        if kind == "parquet":
            parts.append(_read_parquet(names))  # each input apart: their columns may differ
        elif kind == "shards":
            parts.append(ray.data.read_webdataset(names, decoder=None).map_batches(_shard_rows, batch_format="pyarrow"))
        else:
            paths = [str(p) for p in collect_inputs(names)[skip:]]
            rows = pa.table({"image": paths, "path": paths, "data": pa.nulls(len(paths), pa.binary())}, schema=IMAGES)
            # Small blocks, so that decoding, captioning and writing overlap, and at least one per
            # CPU, so that every actor has work (Ray Data warns of an actor pool with less).
            step = max(1, min(BLOCK_ROWS, -(-len(paths) // int(ray.cluster_resources().get("CPU", 1)))))
            # from_blocks rather than from_arrow: the same blocks, their metadata taken here rather
            # than by Ray tasks, which would start worker processes before the actors do.
            parts += [ray.data.from_blocks([rows.slice(i, step) for i in range(0, len(paths), step)])] if paths else []
    if not parts:
        return ray.data.from_blocks([IMAGES.empty_table()])
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _read_parquet(files: list[str]) -> ray.data.Dataset:
    """Parquet rows -> image rows: the first binary column holds the image, else a path column does."""
    ds = ray.data.read_parquet(files)
    schema = ds.schema()
    types = dict(zip(schema.names, schema.types))
    binary = [n for n, t in types.items() if pa.types.is_binary(t) or pa.types.is_large_binary(t)]
    strings = [n for n, t in types.items() if pa.types.is_string(t) or pa.types.is_large_string(t)]
    path = next((n for n in PATH_COLUMNS if n in strings), None)
    id_column = next((n for n in ID_COLUMNS if n in strings), path)
    if not binary and path is None:
        raise CaptionerError(
            f"{Path(files[0]).name}: no image column: a binary column of image bytes, or a string column "
            f"named {', '.join(PATH_COLUMNS)}"
        )
    if binary and id_column is None:
        raise CaptionerError(f"{Path(files[0]).name}: no image id column: a string column named {', '.join(ID_COLUMNS + PATH_COLUMNS)}")
    columns = {"image": id_column, "path": None if binary else path, "data": binary[0] if binary else None}
    return ds.map_batches(_parquet_rows, batch_format="pyarrow", fn_kwargs={"columns": columns})


def _parquet_rows(table: pa.Table, columns: dict) -> pa.Table:
    n = table.num_rows
    picked = {k: table[v].cast(IMAGES.field(k).type) if v else pa.nulls(n, IMAGES.field(k).type) for k, v in columns.items()}
    return pa.table(picked, schema=IMAGES)


def _shard_rows(table: pa.Table) -> pa.Table:
    """WebDataset samples -> image rows: the id is the key, the bytes the first image member."""
    members = [n for n in table.column_names if n.lower() in SHARD_IMAGE_KEYS]
    data = [None] * table.num_rows
    for name in members:
        data = [d if d is not None else v for d, v in zip(data, table[name].to_pylist())]
    return pa.table({"image": table["__key__"], "path": pa.nulls(table.num_rows, pa.string()), "data": data}, schema=IMAGES)


class ClusterModel:
    """A model file shipped to the cluster through Ray's object store (workers need no shared
    disk) and loaded there, once per worker process that needs it.

    Args:
        path: the model file.
        cnn: ``eager`` or ``int8``, as the actors load it (``Captioner.load``).

    Raises:
        CaptionerError: the file is not there (whether it loads, ``check`` says).
    """

    def __init__(self, path: str | Path, cnn: str = "eager"):
        path = Path(path)
        if not path.is_file():
            raise CaptionerError(f"model file not found: {path}")
        self.name, self.cnn = path.name, cnn
        self.checkpoint = ray.put(path.read_bytes())

    def check(self) -> None:
        """Loads the model in a Ray task (the driver never imports torch).

        Raises:
            CaptionerError: with the loader's message, where the model cannot be loaded.
        """
        if problem := ray.get(_problem.options(num_cpus=0).remote(self)):  # no CPU: never behind the actors
            raise CaptionerError(problem)

    def load(self, device: str | torch.device = "cpu") -> Captioner:
        """The model, in this worker, on ``device`` (``auto``, ``cpu``, ``cuda`` or a torch device)."""
        from captioner.models.captioner import Captioner
        from captioner.runtime import resolve_device

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / self.name  # its own name, for the messages of a damaged file
            path.write_bytes(ray.get(self.checkpoint))
            model = Captioner.load(path, resolve_device(device), cnn=self.cnn)
        _TRANSFORMS[self.checkpoint.hex()] = model.transform
        return model

    def transform(self) -> ImageTransform:
        """The model's preprocessing: an actor's (decoding fused into it), else loaded here."""
        if self.checkpoint.hex() not in _TRANSFORMS:
            self.load()
        return _TRANSFORMS[self.checkpoint.hex()]


_TRANSFORMS: dict[str, ImageTransform] = {}  # a worker's preprocessing, by its model's checkpoint


@ray.remote
def _problem(model: ClusterModel) -> str | None:
    """Why ``model`` cannot be loaded, or None (returned, not raised: Ray prints no traceback)."""
    try:
        model.load()
    except CaptionerError as exc:
        return str(exc)
    return None


def decode_images(batch: dict[str, np.ndarray], model: ClusterModel) -> dict[str, np.ndarray]:
    """Image rows -> ``pixels`` (B, 3, S, S) uint8, resized (zeros where it failed), and an error code and message.

    Decoded by the model's own preprocessing (``load_image``, as the single-process command does).
    """
    from captioner.batch import load_image

    transform = model.transform()
    size = transform.config.image_size
    pixels = np.zeros((len(batch["image"]), 3, size, size), dtype=np.uint8)  # (B, 3, S, S): normalised by the actor
    codes, messages = [], []
    for i, (path, data) in enumerate(zip(batch["path"], batch["data"])):
        source = data if data is not None else path
        tensor, error = load_image(transform, source) if source is not None else (None, _NO_IMAGE)
        if tensor is not None:
            pixels[i] = tensor.numpy()
        codes.append(error["code"] if error else "")
        messages.append(error["message"] if error else "")
    return {"image": batch["image"], "pixels": pixels, "error_code": np.array(codes), "error_message": np.array(messages)}


_NO_IMAGE = {"code": "empty_image", "message": "the sample holds no image"}


class CaptionActor:
    """Captions decoded batches; Ray Data keeps a pool of these, each loading the model once.

    Args:
        model: the model file, on the cluster.
        options: decoding options.
        device: ``auto``, ``cpu`` or ``cuda``: an actor given GPUs by Ray sees only those.
        threads: torch threads (the CPUs Ray gave it).
    """

    def __init__(self, model: ClusterModel, options: DecodeOptions, device: str = "auto", threads: int = 1):
        import torch

        from captioner.runtime import resolve_device

        torch.set_num_threads(threads)
        device = resolve_device(device)  # a GPU asked for and not there: raised, Ray says why
        try:
            self.model = model.load(device)
        except CaptionerError:
            # The model file: the driver finds out why and says it (run_ray_job). Raised here, it
            # would come with the traceback Ray prints of an actor that failed to start; leaving
            # stops the run too.
            ray.actor.exit_actor()
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from captioner.batch import caption_tensors

        good = batch["error_code"] == ""
        captions = iter(caption_tensors(self.model, torch.from_numpy(batch["pixels"][good]), self.options) if good.any() else [])
        rows = [next(captions) if ok else None for ok in good]
        errors = {k: [str(e) if not ok else None for e, ok in zip(batch[k], good)] for k in ("error_code", "error_message")}
        return pa.table({"image": batch["image"], "captions": rows, **errors}, schema=RECORDS)


def caption_dataset(
    images: ray.data.Dataset,
    model: str | Path | ClusterModel,
    options: DecodeOptions,
    *,
    batch_size: int = 32,
    num_actors: int = 0,
    reads_in_tasks: bool = True,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    device: str = "auto",
) -> ray.data.Dataset:
    """The captioning pipeline over ``images`` (rows of ``read_images``): rows of ``RECORDS``.

    Args:
        images: the images to caption.
        model: the model file (its CNN in fp32), checked here (loaded in a Ray task) before any
            work; or a ``ClusterModel`` (its CNN as it says, e.g. int8), unchecked: a model that cannot be loaded then fails the run as its
            actors start (``ClusterModel.check`` says why), without a wait for a check first.
        options: decoding options, every one the single-process command has.
        batch_size: images per decoding task and per model call.
        num_actors: captioning actors (0: as many as the cluster's CPUs, or GPUs, have room for).
            On CPUs each actor also decodes its images (decoding fused into it).
        reads_in_tasks: whether ``images`` is read by Ray tasks (Parquet, WebDataset: ``read_images``
            of image files alone is not): on CPUs, one is then kept from the actors for them.
        num_cpus: CPUs per actor; its torch threads.
        num_gpus: GPUs per actor.
        device: the actors' device (``auto``: the GPU Ray gives an actor, else CPU).

    Raises:
        CaptionerError: a model file given by its path that cannot be loaded.
    """
    if not isinstance(model, ClusterModel):
        model = ClusterModel(model, "eager")
        model.check()
    if num_gpus:
        # A decoding worker's memory. Asking for it also keeps Ray Data from fusing decoding into
        # the actors (it fuses steps that ask for the same resources): decoding stays in tasks, on
        # the CPUs of the cluster, while the actors caption on their GPUs.
        resources = {"memory": DECODER_MEMORY}
    else:
        # On CPUs, the same resources as the actors: Ray Data fuses decoding into them, so each
        # actor decodes its own images (no pixels through the object store, no worker process
        # beside the actors starting torch).
        resources = {"num_cpus": num_cpus}
    decoded = images.map_batches(decode_images, fn_kwargs={"model": model}, batch_size=batch_size, batch_format="numpy", **resources)
    return decoded.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"model": model, "options": options, "device": device, "threads": max(1, int(num_cpus))},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=_pool_size(num_actors, num_cpus, num_gpus, reads_in_tasks),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        # Fault tolerance is Ray Data's default for actor pools (passing it is deprecated): an actor
        # that dies is started again (max_restarts=-1) and given its batch again (max_task_retries=-1).
    )


def _pool_size(num_actors: int, num_cpus: float, num_gpus: float, reads_in_tasks: bool) -> int:
    """``num_actors``, or as many as the cluster's GPUs hold, else its CPUs (each actor decoding its
    own images). Actors hold their CPUs from the start, so where the images are read by Ray tasks
    (listing and reading Parquet files or shards) a CPU is kept for those, else they never run."""
    resources = ray.cluster_resources()
    if num_gpus:
        return num_actors or max(1, int(resources.get("GPU", 0) // num_gpus))
    fit = max(1, int((resources.get("CPU", 1) - reads_in_tasks) // num_cpus))
    if not num_actors:
        return fit
    return min(num_actors, fit) if reads_in_tasks else num_actors


def records(ds: ray.data.Dataset) -> Iterator[dict]:
    """The pipeline's rows as the single-process command's records, in the dataset's order."""
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in table.to_pylist():
            record = {"image": row["image"]}
            if row["error_code"] is not None:
                record["error"] = {"code": row["error_code"], "message": row["error_message"]}
            else:
                record["captions"] = row["captions"]
            yield record


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Joins the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else starts a local one; leaves it
    after. Within a Ray session already begun (a test, a notebook), runs in that one."""
    if ray.is_initialized():
        yield
        return
    local = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, **({"include_dashboard": False} if local else {}))
    try:
        yield
    finally:
        ray.shutdown()


def run_ray_job(job: CaptionJob, options: DecodeOptions, out=None) -> None:
    """``captioner caption --engine ray``: the pipeline, written as Parquet shards by Ray's workers,
    or streamed in input order as the single-process command's records (to ``out`` without --output).

    A JSONL or CSV file of image files resumes as the single-process command's does.
    """
    only_files = all(kind == "files" for kind, _ in _sources(job.inputs))
    settings = dict(batch_size=job.batch_size, num_actors=job.num_actors, num_cpus=job.num_cpus, num_gpus=job.num_gpus, device=job.device)
    settings |= {"reads_in_tasks": not only_files}  # image files come in memory, as rows of paths
    # Ray prints its workers' messages (an actor that died...) on standard output: to standard
    # error with them, for the whole session, so that standard output holds the records alone.
    with contextlib.redirect_stdout(sys.stderr), ray_session(job.ray_address):
        if job.format == "parquet":
            folder = Path(job.output)
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise CaptionerError(f"{folder.name} exists and is not an empty folder: choose another --output")
            model = ClusterModel(job.model, job.cnn)
            pipeline = caption_dataset(read_images(job.inputs), model, options, **settings)
            _a_bad_model_said(model, lambda: pipeline.write_parquet(str(folder)))
            return
        record_format = RecordFormat(job.format, options.num_captions)
        output = ResumableOutput(Path(job.output), record_format) if job.output else None
        if output and output.path.exists() and output.path.stat().st_size and not only_files:
            raise CaptionerError(f"{output.path.name} exists; only runs over image files resume: choose another --output")
        done = output.recover(collect_inputs(job.inputs)) if output and output.path.exists() and only_files else 0
        model = ClusterModel(job.model, job.cnn)
        with _in_input_order():
            pipeline = records(caption_dataset(read_images(job.inputs, skip=done), model, options, **settings))

            def write() -> None:
                # The first record before any output: a run whose actors cannot load the model
                # leaves no file (nor a CSV header) behind.
                rows = itertools.chain(list(itertools.islice(pipeline, 1)), pipeline)
                if output:
                    output.append(rows)
                else:
                    out.write(record_format.header())
                    out.writelines(map(record_format.line, rows))

            _a_bad_model_said(model, write)


def _a_bad_model_said(model: ClusterModel, run: Callable[[], None]) -> None:
    """Runs the pipeline (``run``) on a model nothing has loaded yet: its actors load it as they
    start, so the driver neither waits for a check nor imports torch. Where the pipeline fails, a
    model that cannot be loaded is the reason given, one line (``check``, after the failure);
    another failure is raised as it is. Either way Ray Data's own account of it (ERROR lines with
    stack traces, kept in its log files) stays off the terminal."""
    terminal = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    for handler in terminal:
        handler.addFilter(_below_error)
    try:
        run()
    except Exception:
        model.check()
        raise
    finally:
        for handler in terminal:
            handler.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def _in_input_order() -> Iterator[None]:
    """Datasets made within give their rows in input order (Ray Data's ``preserve_order``)."""
    execution = ray.data.DataContext.get_current().execution_options
    before, execution.preserve_order = execution.preserve_order, True
    try:
        yield
    finally:
        execution.preserve_order = before


def local_actor_pids() -> set[int]:
    """This machine's captioning actor processes (Ray titles them after ``CaptionActor``): for fault
    drills, which kill one mid-run to see Ray replace it."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"CaptionActor" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return pids - {os.getpid()}
