"""The gunicorn worker for the service: gthread that slow clients cannot starve, and JSON errors.

gunicorn's gthread worker hands a connection to a request thread as soon as its first byte
arrives, and the thread then blocks until the request is complete: forty clients sending a byte a
second hold forty threads, and everyone else waits. This worker reads each request's head (and a
small body) in its event loop instead, without a thread, and hands the connection on only once
that has arrived; a request not complete within ``CAPTIONER_READ_TIMEOUT_S`` seconds (default 20)
of its first byte is dropped. A larger body is read by the request thread against the same
deadline, so a slow one holds a thread for at most that long.

On SIGTERM, requests in flight finish and are answered "Connection: close"; kept-alive
connections stay open while any request is in flight and at least 2 s after, so a
client's next request is answered (with "Connection: close") instead of meeting a closed socket.

gunicorn's own error answers (400, 414, 431, ...) are JSON like the app's.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
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
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n", re.IGNORECASE)


class DeadlineSocket:
    """A client socket whose reads end at a deadline, served first from what the loop read."""

    def __init__(self, sock):
        self._sock = sock
        self.pending = bytearray()  # read by the event loop, not yet by the parser
        self.deadline: float | None = None

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def recv(self, size: int) -> bytes:
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()  # all at once: the parser keeps any surplus
            return data
        given = self._sock.gettimeout()  # None (blocking), 0.0 (non-blocking) or a caller's timeout
        if self.deadline is None or given == 0.0:
            return self._sock.recv(size)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _late()
        self._sock.settimeout(remaining if given is None else min(given, remaining))
        try:
            return self._sock.recv(size)
        except TimeoutError:
            if time.monotonic() < self.deadline:
                raise  # the caller's own, shorter timeout
            raise _late() from None
        finally:
            self._sock.settimeout(given)


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


class CaptionerWorker(ThreadWorker):
    """gthread with request heads read in the event loop under a deadline (see the module)."""

    def init_process(self):
        self.reading: deque[TConn] = deque()  # connections whose request is arriving, oldest first
        self.in_threads = 0  # connections a request thread has
        # Only the page is ours: gunicorn's handle_error still chooses the status. This process
        # is this worker's alone, so the swap touches nothing else.
        gunicorn.util.write_error = _write_json_error
        super().init_process()

    def accept(self, listener):
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())
        conn.sock = DeadlineSocket(client)
        self._read_head(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request is arriving: read it like a new one."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn)

    def _read_head(self, conn):
        conn.sock.setblocking(False)
        conn.sock.deadline = time.monotonic() + READ_TIMEOUT_S
        self.reading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn, client):
        try:
            data = conn.sock._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.sock.pending += data
            if not _head_complete(conn.sock.pending):
                return
        self.poller.unregister(client)
        self.reading.remove(conn)
        if not data:  # the client went away
            self.nr_conns -= 1
            conn.close()
            return
        conn.data_ready = True
        self.enqueue_req(conn)

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
        sock.setblocking(False)
        while sock._sock.recv(65536):
            pass
    except OSError:
        pass
    gunicorn.util.close(sock)
