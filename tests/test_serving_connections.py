"""The stdlib server's connection model, end to end on a real ``python -m trainenv.serving``:
idle keep-alive connections and slow clients cost no thread, and never starve a normal request;
pipelined requests, bodies sent in pieces and chunked bodies are still answered."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from support import Server, make_base

HANDLER = """
import time

def model_fn(model_dir):
    return None

def predict_fn(data, model):
    if data == "hold":
        time.sleep(1.0)
    return data
"""
POST = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3\r\n\r\n[1]"


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def server(tmp_path):
    srv = Server(make_base(tmp_path, HANDLER), {"TRAINENV_SERVING_THREADS": "2", "TRAINENV_SERVING_READ_TIMEOUT": "30"})
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0


def answer(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"[1]"):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_idle_keep_alive_connections_cost_no_thread(server):
    """200 keep-alive connections, each answered once and left open: the thread count stays
    bounded (a thread per connection would be 200 more) and a fresh client is answered."""
    before = threads_of(server.proc.pid)
    held = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(POST)
            assert answer(sock).startswith(b"HTTP/1.1 200 ")
            held.append(sock)
        during = threads_of(server.proc.pid)
        assert during <= before + 8, (before, during)
        status, _, body = server.post(b"[1]")
        assert (status, body) == (200, b"[1]")
    finally:
        for sock in held:
            sock.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_slow_clients_hold_no_thread_and_do_not_starve_a_normal_request(server):
    """60 slowloris clients (a head byte every 0.1 s) and 60 slow bodies (a body byte every
    0.1 s): no thread each, and a normal request is answered meanwhile; each slow client is still
    answered once it has sent everything."""
    before = threads_of(server.proc.pid)
    heads = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(60)]
    bodies = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(60)]
    stop = threading.Event()
    head_bytes = POST[: POST.index(b"\r\n\r\n") + 4]

    def trickle() -> None:
        for sock in bodies:
            sock.sendall(head_bytes)  # a whole head, then the body byte by byte
        for i in range(len(head_bytes) - 1):
            if stop.wait(0.1):
                return
            for sock in heads:
                sock.sendall(head_bytes[i : i + 1])
            if i < 2:
                for sock in bodies:
                    sock.sendall(b"[1]"[i : i + 1])

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        time.sleep(1.0)
        during = threads_of(server.proc.pid)
        assert during <= before + 8, (before, during)
        started = time.monotonic()
        status, _, body = server.post(b"[1]")
        assert (status, body) == (200, b"[1]")
        assert time.monotonic() - started < 5.0
        sender.join(60)
        assert not sender.is_alive()
        for sock in bodies:
            sock.sendall(b"]")
            assert answer(sock).startswith(b"HTTP/1.1 200 ")
        for sock in heads:
            sock.sendall(head_bytes[-1:] + b"[1]")
            assert answer(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        stop.set()
        for sock in heads + bodies:
            sock.close()


def test_pipelined_requests_and_split_bodies_are_answered_in_order(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(POST.replace(b"[1]", b"[7]") + POST + b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200 ") < 3:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.index(b"[7]") < data.index(b"[1]") < data.index(b'"ready"')
        # a chunked body in pieces, the end of the head in another packet
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n")
        time.sleep(0.1)
        sock.sendall(b"\r\n2\r\n[1\r\n")
        time.sleep(0.1)
        sock.sendall(b"1\r\n]\r\n0\r\n\r\n")
        assert answer(sock).startswith(b"HTTP/1.1 200 ")


def test_requests_waiting_for_a_thread_count_against_the_queue(tmp_path):
    """1 handler slot, a queue of 2: of 8 concurrent slow requests, 3 are answered 200 and the
    other 5 get 503 at once, although the server holds some of them before the pool sees them."""
    srv = Server(make_base(tmp_path, HANDLER), {"TRAINENV_SERVING_THREADS": "1", "TRAINENV_SERVING_MAX_QUEUE": "2",
                                                "TRAINENV_SERVING_TIMEOUT": "30"})
    try:
        srv.wait_ready()
        statuses: list[int] = []
        lock = threading.Lock()

        def post() -> None:
            status = srv.post(b'"hold"')[0]
            with lock:
                statuses.append(status)

        clients = [threading.Thread(target=post) for _ in range(8)]
        for client in clients:
            client.start()
            time.sleep(0.02)
        for client in clients:
            client.join(30)
        assert sorted(statuses) == [200] * 3 + [503] * 5, statuses
    finally:
        assert srv.stop() == 0


def test_a_burst_of_connections_spreads_over_the_workers(tmp_path):
    """64 connections opened at once on 2 workers: each worker gets about half (the request id
    starts with the answering worker's pid)."""
    srv = Server(make_base(tmp_path, HANDLER), {"TRAINENV_SERVING_WORKERS": "2"})
    socks = []
    try:
        srv.wait_ready()
        for _ in range(64):  # all at once, each sending its request as soon as it is connected
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", srv.port))
            socks.append(sock)
        for sock in socks:
            sock.settimeout(10)
            sock.sendall(POST)
        workers: dict[bytes, int] = {}
        for sock in socks:
            head = answer(sock)
            pid = head.split(b"X-Request-Id: ", 1)[1].split(b"-", 1)[0]
            workers[pid] = workers.get(pid, 0) + 1
        assert len(workers) == 2 and min(workers.values()) >= 20, workers
    finally:
        for sock in socks:
            sock.close()
        assert srv.stop() == 0
