"""The models a service serves, by name, each in a model process of its own; and how a model is
swapped for a new file without failing a request.

Where they come from (service settings, read at start and again on SIGHUP):

- ``MODEL_PATH``: one model file, named "default" (or ``MODEL_NAME``, where that is a plain name:
  letters, digits, ".", "_" and "-").
- ``MODELS``: several, the first the default. ``name=path`` pairs separated by commas
  (``shapes=/srv/shapes.pt,photos=/srv/photos.pt``); or a folder, whose ``*.pt`` files are the
  models, named by their stems, in the order of their names; or a text file of ``name=path``
  lines (``#`` starts a comment; a relative path is taken from the file's folder).

A name is what clients ask for (``/v1/captions?model=NAME``) and what metrics are labelled with.

Each name has a ``ModelSlot``: the ``ModelProcess`` that serves it now. A request takes a lease on
it (``ModelSlot.lease``) before it reads anything of the model, and gives it back once answered.
``ServedModels.reload`` (SIGHUP) reads the sources again: a name whose file was replaced (another
file, or the same path with another inode, size or modification time) loads the new file in a
new model process while the old one keeps answering; once the new one is ready, new requests go
to it, and the old one is stopped when its last lease is given back. A new file that cannot be
loaded (damaged, a checksum that does not match, not a model) is refused in one log line, and the
old model keeps serving. Names added to a folder or list file start loading; names gone from it
are no longer offered, and their model processes stop once their requests are answered.

Imports nothing heavy: gunicorn's master checks the sources with it before any worker starts.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.errors import CaptionerError

if TYPE_CHECKING:  # the model process imports torch; this module must not (see above)
    from service.model_process import ModelProcess

log = logging.getLogger("captioner.service")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_NAME = "default"
LOAD_TIMEOUT_S = 600.0  # a new file's model process gets this long to load before it is refused
# Beyond the request timeout, how long a swapped-out model process waits for its last request:
# the worker's read deadline (CAPTIONER_READ_TIMEOUT_S, 20 s) and a margin.
DRAIN_GRACE_S = 30.0


@dataclass(frozen=True)
class ModelSource:
    """A named model file.

    Attributes:
        name: what clients ask for, and the metrics' label.
        path: the model file (None: none configured; its load fails, saying so).
        shown_as: the name answers carry (None: the model's own, from its encoder).
    """

    name: str
    path: str | None
    shown_as: str | None = None


def read_sources(models: str | None, model_path: str | None, model_name: str | None = None) -> list[ModelSource]:
    """The models the settings name, the default first (see the module).

    Raises:
        CaptionerError: both or a malformed ``models``, a bad or repeated name, a folder without
            model files; one line.
    """
    if models is not None and model_path is not None:
        raise CaptionerError("set CAPTIONER_MODEL_PATH (one model) or CAPTIONER_MODELS (several), not both")
    if models is None:  # a MODEL_NAME that is no plain name is only shown, as before there were names
        name = model_name if model_name and NAME.fullmatch(model_name) else DEFAULT_NAME
        return [ModelSource(name, str(model_path) if model_path else None, model_name)]
    if model_name is not None:
        raise CaptionerError("service setting MODEL_NAME names the one model of CAPTIONER_MODEL_PATH; CAPTIONER_MODELS names its own")
    if "=" in models:
        sources = [_pair(item, "CAPTIONER_MODELS", None) for item in models.split(",") if item.strip()]
        where = "CAPTIONER_MODELS"
    else:
        path = Path(models)
        where = str(path)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.pt") if p.is_file())
            sources = []
            for file in files:
                _check_name(file.stem, f"the model file {file}")
                sources.append(ModelSource(file.stem, str(file), file.stem))
        elif path.suffix == ".pt":
            raise CaptionerError(f"CAPTIONER_MODELS names one model file ({path}): use CAPTIONER_MODEL_PATH, or name=path")
        else:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise CaptionerError(f"CAPTIONER_MODELS: {path} is neither a folder, nor a file, nor name=path pairs") from None
            except (OSError, UnicodeDecodeError) as error:
                raise CaptionerError(f"CAPTIONER_MODELS: {path} cannot be read ({getattr(error, 'strerror', None) or 'not text'})") from None
            sources = []
            for number, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    sources.append(_pair(line, f"line {number} of {path}", path.parent))
    if not sources:
        raise CaptionerError(f"CAPTIONER_MODELS: no models in {where}")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CaptionerError(f"CAPTIONER_MODELS: the name {repeated[0]!r} is given twice")
    return sources


def _pair(text: str, where: str, folder: Path | None) -> ModelSource:
    name, equals, path = (part.strip() for part in text.partition("="))
    if not equals or not path:
        raise CaptionerError(f"{where}: {text.strip()[:60]!r} is not name=path")
    _check_name(name, where)
    if folder is not None and not os.path.isabs(path):
        path = str(folder / path)
    return ModelSource(name, path, name)


def _check_name(name: str, where: str) -> None:
    if not NAME.fullmatch(name):
        raise CaptionerError(
            f"{where}: {name[:60]!r} is not a model name (letters, digits, '.', '_' and '-', up to 64, "
            "starting with a letter or digit)"
        )


def file_identity(path: str | None) -> tuple | None:
    """What tells a replaced file from the one loaded (a link followed); None: no such file."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class ModelSlot:
    """One named model: the model process serving it now (``current``), and while a swap drains
    them, those that served it before (see the module).

    Args:
        source: its name and file.
        make_process: a (not yet started) ``ModelProcess`` for a source.
        drain_timeout_s: how long an old model process waits for its requests after a swap.
        on_swap: called with the outcome of each swap ("swapped" or "refused"), for metrics.
    """

    def __init__(
        self,
        source: ModelSource,
        make_process: Callable[[ModelSource], ModelProcess],
        drain_timeout_s: float = 60.0 + DRAIN_GRACE_S,
        on_swap: Callable[[str], None] = lambda outcome: None,
    ):
        self.name = source.name
        self.source = source
        self.identity = file_identity(source.path)
        self._make = make_process
        self._drain_timeout_s = drain_timeout_s
        self._on_swap = on_swap
        self._changed = threading.Condition()  # guards current and _leases; told when a lease is given back
        self._leases: dict[ModelProcess, int] = {}
        self._others: set[ModelProcess] = set()  # loading for a swap, or draining after one
        self._stopped = False
        self.current: ModelProcess = make_process(source).start()

    @property
    def ready(self) -> bool:
        return self.current.ready

    def queue_depth(self) -> int:
        """Requests handed to the model and not yet answered, by every model process of the name."""
        with self._changed:
            processes = {self.current, *self._others}
        return sum(process.queue_depth() for process in processes)

    @contextmanager
    def lease(self) -> Iterator[ModelProcess]:
        """The model process that serves the name now, kept from being stopped by a swap until
        the block ends: a request's model, from reading its card to taking its answer."""
        with self._changed:
            process = self.current
            self._leases[process] = self._leases.get(process, 0) + 1
        try:
            yield process
        finally:
            with self._changed:
                self._leases[process] -= 1
                if not self._leases[process]:
                    del self._leases[process]
                    self._changed.notify_all()

    def swap(self, source: ModelSource) -> bool:
        """Load ``source`` in a new model process while the current one serves; once it is ready,
        serve from it and stop the old one when its last request is answered. Whether it was
        swapped: a file that cannot be loaded is refused in one log line, and nothing changes."""
        identity = file_identity(source.path)
        old = self.current
        if identity is None:
            return self._refuse(f"{source.path} is not there", old)
        candidate = self._make(source)
        candidate.log_load_failure = False  # refused below, in one line
        with self._changed:
            if self._stopped:
                return False
            self._others.add(candidate)
        candidate.start()
        problem = _wait_loaded(candidate, LOAD_TIMEOUT_S, lambda: self._stopped)
        if problem is not None:
            self._retire(candidate, wait=False)
            return False if self._stopped else self._refuse(problem, old)
        with self._changed:
            if self._stopped:
                return False
            old, self.current = self.current, candidate
            self._others.discard(candidate)
            self._others.add(old)
            self.source, self.identity = source, identity
        was = old.served.version if old.served is not None else None
        fields = {"model": self.name, "version": candidate.served.version, "was": was}
        log.info(f"model {self.name}: the new file serves now; the old one stops once its requests are answered", extra={"fields": fields})
        self._on_swap("swapped")
        threading.Thread(target=self._retire, args=(old,), name=f"captioner-retire-{self.name}", daemon=True).start()
        return True

    def _refuse(self, problem: str, old: ModelProcess) -> bool:
        version = old.served.version if old.served is not None else None
        fields = {"model": self.name, "version": version}
        log.error(f"model {self.name}: the new file is refused ({problem}); the model in use keeps serving", extra={"fields": fields})
        self._on_swap("refused")
        return False

    def _retire(self, process: ModelProcess, wait: bool = True) -> None:
        """Stop ``process`` once no request holds it (at most the drain timeout)."""
        if wait:
            with self._changed:
                self._changed.wait_for(lambda: process not in self._leases, timeout=self._drain_timeout_s)
        process.stop()
        with self._changed:
            self._others.discard(process)

    def retire_all(self) -> None:
        """The name is no longer offered: stop its model processes once their requests are answered."""
        with self._changed:
            self._changed.wait_for(lambda: not self._leases, timeout=self._drain_timeout_s)
        self.stop()

    def stop(self) -> None:
        """Stop every model process of the name now (the service is stopping)."""
        with self._changed:
            self._stopped = True
            processes = [self.current, *self._others]
        for process in processes:
            process.stop()


def _wait_loaded(process: ModelProcess, timeout: float, stopping: Callable[[], bool]) -> str | None:
    """None once ``process`` has loaded its model; otherwise why it did not."""
    deadline = time.monotonic() + timeout
    while not process.wait_ready(0.1):
        if process.load_error is not None:
            return str(process.load_error)
        if process.not_ready_reason is not None:  # its process died before the model was loaded
            return process.not_ready_reason
        if stopping():
            return "the service is stopping"
        if time.monotonic() > deadline:
            return f"not loaded within {timeout:g} s"
    return None


class ServedModels:
    """Every model the service serves, by name, the default first (see the module).

    Args:
        read_sources: the sources as the settings name them now; called at start and on reload.
        make_slot: a ``ModelSlot`` for a source (its model process starting).
        on_removed: called with the name of a model no longer offered (for metrics).
    """

    def __init__(
        self,
        read_sources: Callable[[], list[ModelSource]],
        make_slot: Callable[[ModelSource], ModelSlot],
        on_removed: Callable[[str], None] = lambda name: None,
    ):
        self._read_sources = read_sources
        self._make_slot = make_slot
        self._on_removed = on_removed
        self._reloading = threading.Lock()
        self._removed: list[ModelSlot] = []
        sources = read_sources()
        self._slots: dict[str, ModelSlot] = {}  # in the sources' order: the first is the default
        for source in sources:
            self._slots[source.name] = make_slot(source)

    @property
    def default(self) -> ModelSlot:
        return next(iter(self._slots.values()))

    def __iter__(self) -> Iterator[ModelSlot]:
        return iter(list(self._slots.values()))

    def names(self) -> list[str]:
        return list(self._slots)

    def get(self, name: str | None) -> ModelSlot | None:
        """The slot of ``name`` (None: the default's); None if no model has that name."""
        return self.default if name is None else self._slots.get(name)

    def reload(self) -> None:
        """Read the sources again: swap the models whose files changed, start the names added, retire
        the names gone (see the module). Sources that cannot be read change nothing (logged)."""
        with self._reloading:
            try:
                sources = self._read_sources()
            except CaptionerError as error:
                log.error(f"{error}: the models in use keep serving")
                return
            slots, swaps = {}, []
            for source in sources:
                slot = self._slots.get(source.name)
                if slot is None:
                    slots[source.name] = self._make_slot(source)
                    log.info(f"model {source.name}: added", extra={"fields": {"model": source.name}})
                    continue
                slots[source.name] = slot
                changed = source.path != slot.source.path or file_identity(source.path) != slot.identity
                if changed or slot.current.load_error is not None:  # a model that failed to load: tried again
                    swaps.append((slot, source))
            gone = [slot for name, slot in self._slots.items() if name not in slots]
            self._slots = slots  # one assignment: a request sees the old names or the new
            for slot in gone:
                log.info(f"model {slot.name}: no longer offered; it stops once its requests are answered", extra={"fields": {"model": slot.name}})
                self._removed.append(slot)
                self._on_removed(slot.name)
                threading.Thread(target=slot.retire_all, name=f"captioner-retire-{slot.name}", daemon=True).start()
            for slot, source in swaps:  # one at a time: each loads beside the model it replaces
                slot.swap(source)

    def reload_soon(self) -> threading.Thread:
        """``reload`` in a thread of its own (for a signal handler); the thread, started."""
        thread = threading.Thread(target=self.reload, name="captioner-models", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop every model process of every model, now."""
        for slot in [*self._slots.values(), *self._removed]:
            slot.stop()
