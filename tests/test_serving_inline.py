"""The connection loop answers fast requests on its own thread (``servers.dispatch.InlineLane``),
end to end on a real ``python -m trainenv.serving``: which thread answered is what the handler
reports. A request that turns out slow (a handler that sleeps or hangs past its timeout, a
client that does not read a large answer) must never hold the other connections: a new loop
thread takes over, and the work goes back to the handler threads for a while."""

from __future__ import annotations

import json
import socket
import threading
import time

from support import Server, make_base

HANDLER = """
import threading
import time

def model_fn(model_dir):
    return None

def predict_fn(data, model):
    if data == "hold":
        time.sleep(2.0)
    if data == "big":
        return "x" * 24_000_000
    return threading.current_thread().name
"""
BATCH_HANDLER = """
import threading

def model_fn(model_dir):
    return None

def predict_batch_fn(inputs, model):
    return [threading.current_thread().name for _ in inputs]
"""
LOOP = "trainenv-connections"
HANDLER_THREAD = "trainenv-http"


def start(tmp_path, handler: str = HANDLER, **env: str) -> Server:
    srv = Server(make_base(tmp_path, handler), {"TRAINENV_SERVING_THREADS": "2", **env})
    srv.wait_ready()
    return srv


def who(srv: Server) -> str:
    status, _, body = srv.post(b'"who"')
    assert status == 200, body
    return json.loads(body)


def in_background(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_fast_requests_are_answered_on_the_loop_thread_over_keep_alive(tmp_path):
    """A run over the 2 ms budget (a loaded test machine) sends work to the handler threads for
    1 s, so the loop thread need only answer most of them."""
    srv = start(tmp_path)
    try:
        deadline = time.monotonic() + 10
        conn = srv.connection()
        try:
            names = []
            while names.count(LOOP) < 20:
                assert time.monotonic() < deadline, names
                conn.request("POST", "/invocations", body=b'"who"', headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                assert response.status == 200
                names.append(json.loads(response.read()))
            assert set(names) <= {LOOP, HANDLER_THREAD}
        finally:
            conn.close()
    finally:
        assert srv.stop() == 0


def test_a_slow_request_on_the_loop_thread_does_not_hold_the_other_connections(tmp_path):
    """The first request is allowed inline and sleeps 2 s: /ping and another request are answered
    meanwhile (on the handler threads), the slow one still gets its answer, and once the cool-down
    has passed fast requests run on the loop thread again."""
    srv = start(tmp_path)
    try:
        slow, answers = in_background(lambda: srv.post(b'"hold"'))
        time.sleep(0.2)
        began = time.monotonic()
        assert srv.request("GET", "/ping")[0] == 200
        assert who(srv) == HANDLER_THREAD
        assert time.monotonic() - began < 1.0 and slow.is_alive()
        slow.join(10)
        assert answers[0][0] == 200 and json.loads(answers[0][2]) == LOOP  # it ran inline
        deadline = time.monotonic() + 5
        while who(srv) != LOOP:
            assert time.monotonic() < deadline, "the loop thread never answered again"
            time.sleep(0.2)
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log


def test_a_handler_past_its_timeout_on_the_loop_thread_gets_504_and_the_server_goes_on(tmp_path):
    srv = start(tmp_path, TRAINENV_SERVING_TIMEOUT="0.3")
    try:
        slow, answers = in_background(lambda: srv.post(b'"hold"'))
        slow.join(10)
        assert answers[0][0] == 504
        assert srv.request("GET", "/ping")[0] == 200
        assert who(srv) in (LOOP, HANDLER_THREAD)
    finally:
        assert srv.stop() == 0


def test_a_client_that_does_not_read_a_large_answer_does_not_hold_the_loop(tmp_path):
    """24 MB answered (more than the socket buffers of both ends hold) to a client that reads nothing for 1.5 s: the send blocks whichever thread
    runs it; /ping on another connection is answered meanwhile, and the whole answer arrives."""
    srv = start(tmp_path, TRAINENV_SERVING_READ_TIMEOUT="30")
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
            sock.sendall(b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                         b'Content-Length: 5\r\n\r\n"big"')
            time.sleep(0.3)
            began = time.monotonic()
            assert srv.request("GET", "/ping")[0] == 200
            assert time.monotonic() - began < 1.0
            time.sleep(1.2)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(body) < length:
                chunk = sock.recv(1 << 20)
                assert chunk
                body += chunk
            assert head.startswith(b"HTTP/1.1 200 ") and length == 24_000_002
    finally:
        assert srv.stop() == 0


def test_expect_100_continue_is_answered_on_a_handler_thread(tmp_path):
    """The body of ``Expect: 100-continue`` is read after the interim answer: never on the loop."""
    srv = start(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            interim = sock.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            sock.sendall(b'"who"')
            data = b""
            while not data.endswith(b'"'):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b'"' + HANDLER_THREAD.encode() + b'"')
    finally:
        assert srv.stop() == 0


def test_with_batching_requests_never_run_on_the_loop_thread(tmp_path):
    srv = start(tmp_path, BATCH_HANDLER, TRAINENV_SERVING_MAX_BATCH_SIZE="4", TRAINENV_SERVING_MAX_BATCH_DELAY_MS="0")
    try:
        names = {json.loads(srv.post(b'"who"')[2]) for _ in range(5)}
        assert LOOP not in names and names, names
    finally:
        assert srv.stop() == 0


MARK_HANDLER = """
import itertools
import threading
import time

_marks = itertools.count()

def model_fn(model_dir):
    return None

def predict_fn(data, model):
    time.sleep(0.005)  # slow enough for the handler threads
    thread = threading.current_thread()
    return [thread.name, thread.__dict__.setdefault("trainenv_test_mark", next(_marks))]
"""


def test_with_no_queue_the_handler_threads_are_kept_not_started_per_request(tmp_path):
    """``TRAINENV_SERVING_MAX_QUEUE=0``: 40 requests one after another on the handler threads
    are answered by the few threads the server keeps, not by a new thread each."""
    srv = start(tmp_path, MARK_HANDLER, TRAINENV_SERVING_MAX_QUEUE="0")
    try:
        seen = [json.loads(srv.post(b"[1]")[2]) for _ in range(40)]
        on_threads = {mark for name, mark in seen if name == HANDLER_THREAD}
        assert len([1 for name, _ in seen if name == HANDLER_THREAD]) >= 30, seen
        assert len(on_threads) <= 3, seen
    finally:
        assert srv.stop() == 0


def test_requests_that_arrive_with_a_slow_one_are_answered_by_the_new_loop_thread(tmp_path):
    """A slow request and 20 fast ones on other connections sent at once: the fast ones that
    the loop had already taken when it got stuck are handed to the new loop thread, not lost."""
    srv = start(tmp_path)
    post = b'POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n'
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(21)]
    try:
        time.sleep(0.2)  # all accepted and watched
        socks[0].sendall(post.replace(b"Length: 5", b"Length: 6") + b'"hold"')
        for sock in socks[1:]:
            sock.sendall(post + b'"who"')
        began = time.monotonic()
        for sock in socks[1:]:
            data = b""
            while not data.endswith(b'"'):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
        assert time.monotonic() - began < 1.5  # well before the slow one's 2 s
    finally:
        for sock in socks:
            sock.close()
        assert srv.stop() == 0
