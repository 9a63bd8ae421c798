"""Who may call the service: API keys read from a file, and slowing down an address that keeps
sending wrong ones.

Off unless a key file is named (``CAPTIONER_API_KEYS_FILE``, ``captioner serve --api-keys-file``).
A file that is missing, unreadable, empty or readable by every user refuses to start the
service: one meant to be locked must never come up open. It is read again on SIGHUP; a file that
has gone bad meanwhile is refused in the log and the keys in use are kept. Keys are compared in
constant time and never logged: the log names a key by a short hash of it.

Imports nothing heavy: gunicorn's master checks the file with it before any worker starts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import stat
import threading
import time
from collections import deque

from captioner.errors import CaptionerError

log = logging.getLogger("captioner.service")
MIN_KEY_LENGTH = 16  # shorter keys can be guessed: `openssl rand -hex 32` makes a good one
REFUSALS_PER_WINDOW = 20  # refused requests an address may make per window before it gets 429
REFUSAL_WINDOW_S = 60.0
MAX_ADDRESSES = 10_000  # addresses whose recent refusals are remembered; bounds the memory


def check_key(key: str, where: str) -> bytes:
    """``key`` as bytes, if it is printable ASCII without spaces and long enough.

    Raises:
        CaptionerError: it is not; the message names ``where`` and never quotes the key.
    """
    if not all(33 <= ord(char) <= 126 for char in key):
        raise CaptionerError(f"{where} is not a key: keys are printable ASCII characters without spaces")
    if len(key) < MIN_KEY_LENGTH:
        raise CaptionerError(f"{where} is too short a key: at least {MIN_KEY_LENGTH} characters (openssl rand -hex 32 makes one)")
    return key.encode("ascii")


def read_key_file(path: str) -> tuple[bytes, ...]:
    """The keys of a key file: one a line, ``#`` starts a comment (also after a key).

    Raises:
        CaptionerError: the file is missing, unreadable, readable by every user, holds no keys or
            a line that is not a key; one line that names the problem.
    """
    where = f"the API key file {path}"
    try:
        mode = os.stat(path).st_mode
        if mode & stat.S_IROTH:
            raise CaptionerError(f"{where} can be read by every user of this machine; make it private (chmod 600)")
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        raise CaptionerError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CaptionerError(f"{where} cannot be read ({getattr(error, 'strerror', None) or 'not UTF-8 text'})") from None
    keys = []
    for number, line in enumerate(lines, 1):
        key, comment = (line.split(None, 1) + ["", ""])[:2]
        if not key or key.startswith("#"):
            continue
        if comment and not comment.startswith("#"):
            raise CaptionerError(f"line {number} of {where} is not a key: keys are printable ASCII characters without spaces")
        keys.append(check_key(key, f"line {number} of {where}"))
    if not keys:
        raise CaptionerError(f"{where} holds no keys (one a line; # starts a comment)")
    return tuple(keys)


def key_id(key: bytes) -> str:
    """How the log names a key: enough to tell one client from another, nothing to guess it from."""
    return hashlib.sha256(key).hexdigest()[:8]


def bearer_token(header: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header; None if there is none."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("latin-1", "replace")  # as WSGI decoded it


def matching(token: bytes, keys: tuple[bytes, ...]) -> bytes | None:
    """The key ``token`` is, compared with every key in constant time; None if it is none of them."""
    found = None
    for key in keys:  # no early exit: the time says nothing about which key, or how much, matched
        if hmac.compare_digest(token, key):
            found = key
    return found


class ApiKeys:
    """Keys a request may carry; those of a key file are read again by ``reload`` (on SIGHUP)."""

    def __init__(self, keys: tuple[bytes, ...], path: str | None = None):
        self.path = path
        self._keys = keys
        self._reloading = threading.Lock()

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        return cls(read_key_file(path), path)

    def identify(self, header: str | None) -> tuple[str | None, str]:
        """(the key's id, "ok") for a known key, else (None, "missing") or (None, "wrong")."""
        token = bearer_token(header)
        if token is None:
            return None, "missing"
        key = matching(token, self._keys)
        return (key_id(key), "ok") if key is not None else (None, "wrong")

    def reload_soon(self) -> None:
        """``reload`` in a thread of its own: for a signal handler, which may have interrupted a
        thread that holds the log's lock."""
        threading.Thread(target=self.reload, name="captioner-keys", daemon=True).start()

    def reload(self) -> None:
        """Read the file again; a file gone bad is refused in the log, and the keys in use kept."""
        if self.path is None:
            return
        with self._reloading:
            try:
                keys = read_key_file(self.path)
            except CaptionerError as error:
                log.error(f"{error}: the keys in use are kept")
                return
            self._keys = keys  # one assignment: a request sees the old keys or the new, never a mix
            log.info("API keys read again", extra={"fields": {"keys": [key_id(key) for key in keys]}})


class Refusals:
    """Refused requests by client address over a sliding window; an address over the limit is
    told to wait (429) before its key is even looked at, so guessing keys is slow."""

    def __init__(self, limit: int = REFUSALS_PER_WINDOW, window_s: float = REFUSAL_WINDOW_S):
        self.limit, self.window_s = limit, window_s
        self._recent: dict[str, deque[float]] = {}  # address -> times of its refusals in the window
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """Whole seconds ``address`` must wait before it may try a key again; None: it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent.get(address)
            if times is None:
                return None
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) < self.limit:
                return None
            return max(1, math.ceil(times[0] + self.window_s - now))

    def add(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if address not in self._recent and len(self._recent) >= MAX_ADDRESSES:
                self._forget_before(now - self.window_s)
                if len(self._recent) >= MAX_ADDRESSES:  # all recent: the oldest address goes
                    del self._recent[next(iter(self._recent))]
            times = self._recent.setdefault(address, deque())
            times.append(now)
            while len(times) > self.limit:
                times.popleft()

    def _forget_before(self, cutoff: float) -> None:
        for address in [a for a, times in self._recent.items() if not times or times[-1] <= cutoff]:
            del self._recent[address]
