"""The gunicorn worker for the service: gthread that slow clients cannot starve, and JSON errors.

gunicorn's gthread worker hands a connection to a request thread as soon as its first byte
arrives, and the thread then blocks until the request is complete: forty clients sending a byte a
second hold forty threads, and everyone else waits. This worker reads each request's head (and a
small body) in its event loop instead, without a thread, and hands the connection on only once
that has arrived; a request not complete within ``CAPTIONER_READ_TIMEOUT_S`` seconds (default 20)
of its first byte is dropped. A larger body is read by the request thread against the same
deadline, so a slow one holds a thread for at most that long.

An answer given before the body was read (429 busy, 401, 503, a bad option) keeps its word: a
body within the app's MAX_CONTENT_LENGTH is read and thrown away after the answer, for at most 5 s
(and within the request's read deadline), and the connection stays open as the answer said; a
body declared larger is answered "Connection: close". (gunicorn reads at most 64 KiB of such a body and then closes a
connection it had announced kept alive: a client sending half a megabyte met a reset.)

On SIGTERM, requests in flight finish and are answered "Connection: close"; kept-alive
connections stay open while any request is in flight and at least 2 s after, so a
client's next request is answered (with "Connection: close") instead of meeting a closed socket.

gunicorn's own error answers (400, 414, 431, ...) are JSON like the app's.

SIGHUP (forwarded by the master: service/gunicorn.conf.py) has the app read its key file and its
models again, in place: no request is dropped, and only a model whose file changed is loaded
again, beside the one serving (service.models).

Lean on system calls (``ClientSocket``): under load each one is a chance for another of the
request threads to take the GIL, and a thread switch. A connection's socket stays non-blocking
throughout, a kept-alive connection's next request is read as soon as the loop sees it, and an
answer leaves in one send.
"""

from __future__ import annotations

import errno
import math
import os
import re
import select
import selectors
import signal
import socket
import time
from collections import deque
from functools import partial

import gunicorn.util
from gunicorn.workers.gthread import ThreadWorker, TConn

from service.errors import error_body

READ_TIMEOUT_S = float(os.environ.get("CAPTIONER_READ_TIMEOUT_S", "20"))
HEAD_LIMIT = 64 * 1024  # beyond this without a blank line, gunicorn's parser refuses the head
STOP_LINGER_S = 2.0  # while stopping, how long a kept-alive connection outlives the last request
BODY_PREBUFFER = 256 * 1024  # bodies up to this are read in the loop with the head
GATHER_LIMIT = 256 * 1024  # an answer's writes gathered beyond this are sent on
DRAIN_STEP = 64 * 1024  # bytes of an unread body read and thrown away at a time
# How long a request thread reads an unread body after the answer (gunicorn's own bound): a client
# sending the rest slowly must not hold a thread for the whole read deadline for a refused request.
DRAIN_TIMEOUT_S = 5.0
DEFAULT_BODY_LIMIT = 16 * 1024 * 1024  # the app's MAX_CONTENT_LENGTH, for an app without one
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n", re.IGNORECASE)


class ClientSocket:
    """A client's socket as this worker uses it.

    The socket itself is always non-blocking. gunicorn switches a connection between its event
    loop (non-blocking) and a request thread (blocking) and back for every request; here that
    switch only sets a field, and a thread's blocking is played by waiting in poll when the socket
    has nothing to give or take. Each ``setblocking`` would otherwise be a system call, and every
    system call gives the GIL up for the other request threads to take.

    Reads are served first from what the event loop read, and end at the request's deadline.
    Between ``gather`` and ``flush`` writes are gathered, so an answer's head and body leave in
    one send.
    """

    def __init__(self, sock):
        sock.setblocking(False)
        self._sock = sock
        self._timeout: float | None = 0.0  # as gunicorn set it: None waits without limit, 0.0 never
        self._gathering = False
        self._gathered = bytearray()
        self.pending = bytearray()  # read by the event loop, not yet by the parser
        self.deadline: float | None = None  # for reads: the request's

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def arrived(self) -> bytes | None:
        """For the event loop: what has arrived, without waiting (b"": the client is gone)."""
        try:
            return self._sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def recv(self, size: int) -> bytes:
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()  # all at once: the parser keeps any surplus
            return data
        return self._when_ready(lambda: self._sock.recv(size), select.POLLIN, self._until(self.deadline))

    def send(self, data) -> int:
        self._send_gathered()
        return self._when_ready(lambda: self._sock.send(data), select.POLLOUT, self._until())

    def sendall(self, data) -> None:
        if self._gathering:
            self._gathered += data
            if len(self._gathered) >= GATHER_LIMIT:
                self._send_gathered()
            return
        self._send_all(data)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        """``socket.sendfile``, which refuses a non-blocking socket."""
        self._send_gathered()
        until, sent = self._until(), 0
        while count is None or sent < count:
            left = (count or 1 << 30) - sent
            size = self._when_ready(
                lambda: os.sendfile(self._sock.fileno(), file.fileno(), offset + sent, left), select.POLLOUT, until
            )
            if size == 0:
                break
            sent += size
        file.seek(offset + sent)
        return sent

    def gather(self) -> None:
        """Hold ``sendall``'s writes from here (up to GATHER_LIMIT bytes) until ``flush``."""
        self._gathering = True

    def flush(self) -> None:
        """Send what was gathered, and stop gathering."""
        self._gathering = False
        self._send_gathered()

    def shutdown(self, how: int) -> None:
        # gunicorn shuts down after an app failed mid-answer: what it believes sent goes first.
        self._send_gathered()
        self._sock.shutdown(how)

    def _send_gathered(self) -> None:
        if self._gathered:
            data, self._gathered = self._gathered, bytearray()
            self._send_all(data)

    def _send_all(self, data) -> None:
        view, until = memoryview(data), self._until()
        while view:
            view = view[self._when_ready(lambda: self._sock.send(view), select.POLLOUT, until) :]

    def _until(self, deadline: float | None = None) -> float | None:
        """When an operation starting now must end: the caller's timeout, or ``deadline`` if sooner."""
        if self._timeout is None:
            return deadline
        own = time.monotonic() + self._timeout
        return own if deadline is None else min(own, deadline)

    def _when_ready(self, operation, event: int, until: float | None):
        """``operation()``, tried at once and again each time the socket is ready for ``event``."""
        while True:
            try:
                return operation()
            except BlockingIOError:
                self._wait(event, until)

    def _wait(self, event: int, until: float | None) -> None:
        """Wait for the socket to be ready for ``event``; raise as a socket with a timeout would."""
        if self._timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "the socket is not ready")
        poller = select.poll()
        poller.register(self._sock, event)
        while True:
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                if self.deadline is not None and event == select.POLLIN and until >= self.deadline:
                    raise _late()
                raise TimeoutError("timed out")
            if poller.poll(None if left is None else left * 1000):
                return


def _late() -> TimeoutError:
    # ENOTCONN: gunicorn drops the connection quietly; the app answers 408 (service.errors).
    return TimeoutError(errno.ENOTCONN, "the request did not arrive in time")


def _head_complete(buffer: bytearray) -> bool:
    """Whether ``buffer`` holds a request's head and, when small, its whole body."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return len(buffer) > HEAD_LIMIT  # the parser will refuse it; no point waiting
    length = _CONTENT_LENGTH.search(buffer, 0, end + 2)
    if length is None or int(length.group(1)) > BODY_PREBUFFER:
        return True
    return len(buffer) >= end + 4 + int(length.group(1))


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's error page, as JSON (it may quote the client: cut)."""
    code = reason.lower().replace(" ", "_")
    body = error_body(status_int, code, str(mesg)[:200])
    head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    gunicorn.util.write_nonblock(sock, head.encode("latin1") + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def _declared_length(environ) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


class KeepsItsWord:
    """The WSGI app, called so that an answer to a request whose declared body is larger than
    ``body_limit`` says "Connection: close": such a body is not read to reach the next request.
    Anything else the app has (``extensions``, ``config``) is the app's."""

    def __init__(self, app, body_limit: int):
        self.app, self.body_limit = app, body_limit

    def __getattr__(self, name):
        return getattr(self.app, name)

    def __call__(self, environ, start_response):
        length = _declared_length(environ)
        if length is None or length <= self.body_limit:
            return self.app(environ, start_response)
        response = getattr(start_response, "__self__", None)  # gunicorn's Response

        def start_closing(status, headers, exc_info=None):
            if response is not None:
                response.force_close()
            return start_response(status, headers, exc_info)

        return self.app(environ, start_closing)


class CaptionerWorker(ThreadWorker):
    """gthread with request heads read in the event loop under a deadline (see the module)."""

    def init_process(self):
        self.reading: deque[TConn] = deque()  # connections whose request is arriving, oldest first
        self.in_threads = 0  # connections a request thread has
        # Only the page is ours: gunicorn's handle_error still chooses the status. This process
        # is this worker's alone, so the swap touches nothing else.
        gunicorn.util.write_error = _write_json_error
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        config = getattr(self.wsgi, "config", None) or {}
        self.body_limit = int(config.get("MAX_CONTENT_LENGTH") or DEFAULT_BODY_LIMIT)
        self.wsgi = KeepsItsWord(self.wsgi, self.body_limit)

    def init_signals(self):
        super().init_signals()
        signal.signal(signal.SIGHUP, self.handle_hup)

    def handle_hup(self, sig, frame):
        """The app reads its key file and models again (not loaded yet, it reads them as it loads)."""
        runtime = getattr(getattr(self, "wsgi", None), "extensions", {}).get("captioner")
        if runtime is not None:
            runtime.reload_soon()

    def accept(self, listener):
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())
        conn.sock = ClientSocket(client)
        self._read_head(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request is arriving: read it like a new one."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn, readable=True)

    def _read_head(self, conn, readable=False):
        """Take the connection's next request in the loop; ``readable``: bytes wait to be read."""
        conn.sock.deadline = time.monotonic() + READ_TIMEOUT_S
        self.reading.append(conn)
        # What has arrived is read at once: registering first would cost two epoll calls and a
        # turn of the loop for nothing.
        if not (readable and self._on_head_bytes(conn)):
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn, registered=True))

    def _on_head_bytes(self, conn, client=None, registered=False) -> bool:
        """Read what arrived; whether the connection left the loop (to a thread, or closed)."""
        data = conn.sock.arrived()
        if data is None:
            return False
        if data:
            conn.sock.pending += data
            if not _head_complete(conn.sock.pending):
                return False
        if registered:
            self.poller.unregister(conn.sock)
        self.reading.remove(conn)
        if not data:  # the client went away
            self.nr_conns -= 1
            conn.close()
            return True
        conn.data_ready = True
        self.enqueue_req(conn)
        return True

    def murder_pending(self):
        """Also drop connections whose request has not arrived by its deadline."""
        super().murder_pending()
        now = time.monotonic()
        while self.reading and self.reading[0].sock.deadline <= now:
            conn = self.reading.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            try:
                _write_json_error(conn.sock, 408, "Request Timeout", "the request did not arrive in time")
            except OSError:
                pass
            conn.close()

    def enqueue_req(self, conn):
        self.in_threads += 1
        super().enqueue_req(conn)

    def handle_request(self, req, conn):
        """gunicorn's, with the answer's head and body sent together."""
        conn.sock.gather()
        try:
            return super().handle_request(req, conn)
        finally:
            conn.sock.flush()

    def _keepalive_after(self, conn, keepalive):
        """Whether the connection can serve another request: what the app left of the body is
        read and thrown away first, up to ``body_limit`` bytes, for DRAIN_TIMEOUT_S at most and
        within the request's read deadline (gunicorn reads 64 KiB at most, and closes a
        connection it announced kept alive)."""
        if not keepalive:
            return False
        body = getattr(conn.parser.mesg, "body", None)
        if body is None:
            return True
        if getattr(body, "failed", False) is True:
            return False  # where the next request starts is unknown
        drained = 0
        conn.sock.deadline = min(conn.sock.deadline or math.inf, time.monotonic() + DRAIN_TIMEOUT_S)
        try:
            while drained <= self.body_limit:
                data = body.read(DRAIN_STEP)
                if not data:
                    return True
                drained += len(data)
        except Exception:  # the deadline passed (TimeoutError), the client went away, a bad chunk
            return False
        return False

    def finish_request(self, conn, fs):
        self.in_threads -= 1
        parser = conn.parser
        if parser is not None and not conn.is_http2 and parser.unreader.buf.getvalue():
            # A pipelined request, already partly read: gunicorn hands it straight to a thread.
            conn.sock.deadline = time.monotonic() + READ_TIMEOUT_S
        if not self.alive:
            self._linger()  # another answer is out: its client's next request is on its way
        super().finish_request(conn, fs)

    def _linger(self):
        deadline = time.monotonic() + STOP_LINGER_S
        for conn in self.keepalived_conns:
            conn.timeout = max(conn.timeout, deadline)

    def _cap_keepalive(self, deadline):
        """Stopping: kept-alive connections keep their time (gunicorn cuts it to 2 s from the
        signal, which can pass while a long request is still in flight); see _linger."""

    def murder_keepalived(self, force=False):
        """Close expired kept-alive connections, but while stopping not before requests in flight
        (arriving or in a thread) are answered: until then a client may still send its next
        request on one."""
        now = time.monotonic()
        if not force and not self.alive and (self.in_threads or self.reading):
            self._linger()  # also keeps the stopping loop's wait from reaching 0 and spinning
            return
        while self.keepalived_conns and (force or self.keepalived_conns[0].timeout <= now):
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            _close_quietly(conn.sock)


def _close_quietly(sock) -> None:
    """FIN first and read what already arrived, so the close is not a reset (RFC 9112 9.6)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.arrived():
            pass
    except OSError:
        pass
    gunicorn.util.close(sock)
