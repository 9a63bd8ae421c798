"""The service worker's client socket: non-blocking underneath, blocking for request threads.

Real sockets (socketpairs) with small buffers, so that writes meet a full peer."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from service.worker import ClientSocket

SMALL = 4096  # bytes of socket buffer: a megabyte cannot go out without the peer reading


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
    yield ClientSocket(ours), theirs
    ours.close()
    theirs.close()


def read_slowly(sock: socket.socket, size: int, into: bytearray) -> None:
    while len(into) < size:
        chunk = sock.recv(SMALL)
        if not chunk:
            return
        into += chunk
        time.sleep(0.0005)


def later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


def test_blocking_is_played_without_touching_the_socket(pair):
    client, _ = pair
    client.setblocking(True)
    assert client.gettimeout() is None
    assert os.get_blocking(client.fileno()) is False
    client.settimeout(2.5)
    assert client.gettimeout() == 2.5
    client.setblocking(False)
    assert client.gettimeout() == 0.0


def test_reads_serve_what_the_loop_read_then_wait_for_more(pair):
    client, peer = pair
    peer.sendall(b"GET / HTTP/1.1\r\n")
    assert client.arrived() == b"GET / HTTP/1.1\r\n"
    assert client.arrived() is None  # nothing more yet, and no waiting
    client.pending += b"GET / HTTP/1.1\r\n"
    client.setblocking(True)
    assert client.recv(100) == b"GET / HTTP/1.1\r\n"
    sender = later(0.2, lambda: peer.sendall(b"Host: x\r\n\r\n"))
    assert client.recv(100) == b"Host: x\r\n\r\n"
    sender.join()
    peer.shutdown(socket.SHUT_WR)
    assert client.recv(100) == b""
    assert client.arrived() == b""


def test_reads_end_at_the_callers_timeout_or_at_the_requests_deadline(pair):
    client, _ = pair
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    client.settimeout(0.1)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as caller:
        client.recv(100)
    assert caller.value.errno is None and 0.09 < time.monotonic() - started < 1
    client.setblocking(True)
    client.deadline = time.monotonic() + 0.1
    with pytest.raises(TimeoutError) as late:
        client.recv(100)
    assert late.value.errno == errno.ENOTCONN  # gunicorn drops the connection quietly


def test_blocking_writes_wait_for_a_slow_reader(pair, tmp_path):
    client, peer = pair
    data = os.urandom(1 << 20)
    client.setblocking(False)
    with pytest.raises(BlockingIOError):  # as a real non-blocking socket would
        client.sendall(data)
    peer.setblocking(True)
    drained = bytearray()
    while True:  # what the refused sendall left in the buffers
        try:
            drained += peer.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    client.setblocking(True)
    received = bytearray()
    reader = threading.Thread(target=read_slowly, args=(peer, 2 * len(data) + 1000, received))
    reader.start()
    client.sendall(data)
    file = tmp_path / "file"
    file.write_bytes(data)
    with open(file, "rb") as f:
        assert client.sendfile(f, offset=1000) == len(data) - 1000
        assert f.tell() == len(data)
    client.shutdown(socket.SHUT_WR)
    reader.join(timeout=30)
    assert bytes(received) == data + data[1000:]


def test_an_answer_leaves_in_one_send(pair):
    client, peer = pair
    client.setblocking(True)
    client.gather()
    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    client.sendall(b"{}")
    with pytest.raises(BlockingIOError):
        peer.recv(100, socket.MSG_DONTWAIT)  # held back until the answer is complete
    client.flush()
    assert peer.recv(100) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    client.sendall(b"after")  # no longer gathering
    assert peer.recv(100) == b"after"
