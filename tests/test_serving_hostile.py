"""Hostile handlers and clients against a real server over 127.0.0.1 (stdlib and gunicorn):
hooks that call ``sys.exit`` or raise ``KeyboardInterrupt``, bodies without a ``Content-Type``
or in a type the server cannot decode, and a client that goes silent in the middle of a body."""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from support import SERVERS, Server, error_of, make_base

HANDLER = """
import json
import os
import sys


def model_fn(model_dir):
    return model_dir


def predict_fn(data, model):
    if data == "cat-error":
        from trainenv.serving import HTTPError
        raise HTTPError(422, "no", headers={"X-Label": "\u732b"})
    if data == "exit":
        sys.exit(3)
    if data == "interrupt":
        raise KeyboardInterrupt()
    return data


def output_fn(prediction, accept):
    if prediction == "exit-in-output":
        raise SystemExit("bye")
    if prediction == "cat-header":
        from trainenv.serving import Response
        return Response("{}", headers={"X-Label": "\u732b"})
    if prediction == "cat-type":
        return "{}", "text/\u732b"
    return json.dumps(prediction), accept


def ready_fn(model):
    if os.path.exists(os.path.join(model, "exit-in-ready")):
        sys.exit(1)
    return True
"""


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp(f"hostile-{request.param}"), HANDLER)
    srv = Server(
        base,
        {"TRAINENV_SERVER": request.param, "TRAINENV_SERVING_READ_TIMEOUT": "1", "TRAINENV_SERVING_WORKERS": "1"},
    )
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log


# -- hooks that try to end the process ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body, raised",
    [(b'"exit"', "SystemExit"), (b'"interrupt"', "KeyboardInterrupt"), (b'"exit-in-output"', "SystemExit")],
)
def test_sys_exit_or_keyboard_interrupt_in_a_hook_is_a_500_and_the_server_keeps_serving(server, body, raised):
    status, headers, answer = server.post(body)
    assert status == 500, (status, answer, server.log)
    assert headers["Content-Type"] == "application/json"
    assert raised in error_of(answer)["message"]
    assert server.post(b"[1]")[:3:2] == (200, b"[1]")
    assert server.request("GET", "/ping")[0] == 200
    assert server.proc.poll() is None


def test_sys_exit_in_ready_fn_means_not_ready(server):
    flag = server.base / "model" / "exit-in-ready"
    flag.write_text("")
    try:
        status, _, body = server.request("GET", "/ping")
        assert status == 503 and "SystemExit" in error_of(body)["message"]
    finally:
        flag.unlink()
    assert server.request("GET", "/ping")[0] == 200


# -- content types --------------------------------------------------------------------------------------


def test_a_body_without_content_type_is_json(server):
    answer = server.send_raw(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n[1, 2]\n", half_close=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(body) == [1, 2]


def test_a_form_body_is_415_saying_how_to_send_json(server):
    status, _, body = server.post(b"a=1&b=2", "application/x-www-form-urlencoded")
    assert status == 415
    message = error_of(body)["message"]
    assert "-H 'Content-Type: application/json'" in message, message
    assert "curl -d sends application/x-www-form-urlencoded" in message, message


def test_a_form_body_on_the_v2_route_is_415_saying_how_to_send_json(server):
    status, _, body = server.post(b"a=1", "application/x-www-form-urlencoded", path="/v2/models/model/infer")
    assert status == 415
    assert "-H 'Content-Type: application/json'" in json.loads(body)["error"]


# -- a client that goes silent mid-body --------------------------------------------------------------


def test_a_client_silent_mid_body_is_one_warning_and_no_500(server):
    before = len(server.lines)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\nX-Request-Id: silent-1\r\n\r\n[1, 2"
        )
        line = server.wait_for(r"WARNING .*silent-1", 10)  # read timeout is 1 s
        assert "went silent" in line, line
    time.sleep(0.3)
    new = "\n".join(server.lines[before:])
    assert "ERROR" not in new and "Traceback" not in new, new
    assert not [l for l in server.lines[before:] if '" 500 ' in l], new
    assert len([l for l in server.lines[before:] if "silent-1" in l]) == 1, new
    assert server.post(b"[1]")[0] == 200


# -- KServe v2 shapes that cost more than their size -------------------------------------------------


@pytest.mark.parametrize("shape", [[10000000, 0], [1000, 1000, 1000, 0], [100000, 100000, 0]])
def test_a_v2_shape_with_a_zero_dimension_and_millions_of_lists_is_a_quick_400(server, shape):
    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}).encode()
    started = time.monotonic()
    status, headers, answer = server.post(body, path="/v2/models/model/infer")
    assert status == 400, (status, answer)
    assert headers["Content-Type"] == "application/json"
    assert "nested lists" in json.loads(answer)["error"], answer
    assert time.monotonic() - started < 2.0
    small = json.dumps({"inputs": [{"name": "x", "shape": [3, 0], "datatype": "FP32", "data": []}]}).encode()
    assert server.post(small, path="/v2/models/model/infer")[0] == 200


# -- header values HTTP/1.1 cannot carry ---------------------------------------------------------------


@pytest.mark.parametrize("body, header", [(b'"cat-header"', "X-Label"), (b'"cat-error"', "X-Label"), (b'"cat-type"', "Content-Type")])
def test_a_header_value_that_is_not_latin1_is_a_500_naming_it_with_an_error_line(server, body, header):
    status, headers, answer = server.post(body)
    assert status == 500, (status, answer, server.log)
    assert headers["Content-Type"] == "application/json"
    assert f"header '{header}'" in error_of(answer)["message"] and "not latin-1" in error_of(answer)["message"]
    deadline = time.monotonic() + 5
    while not any(" ERROR " in line and "not latin-1" in line for line in server.lines):
        assert time.monotonic() < deadline, server.log
        time.sleep(0.02)
    assert server.post(b"[1]")[:3:2] == (200, b"[1]")


# The app refuses such headers itself; a server whose app let one through (simulated by undoing
# that check) must still answer 500 and log it, not drop the connection without a word.
_UNCHECKED_HEADERS = [
    sys.executable, "-c",
    "import runpy, trainenv.serving.app as app; app.user_headers = lambda hs: [(str(k), str(v)) for k, v in hs]; "
    "runpy.run_module('trainenv.serving', run_name='__main__', alter_sys=True)",
]


def test_a_head_the_server_cannot_encode_is_a_500_and_an_error_line(tmp_path):
    srv = Server(make_base(tmp_path, HANDLER), {"TRAINENV_SERVER": "stdlib"}, argv=_UNCHECKED_HEADERS)
    try:
        srv.wait_ready()
        status, headers, answer = srv.post(b'"cat-header"')
        assert status == 500, (status, answer, srv.log)
        assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
        assert "could not be sent" in json.loads(answer)["message"]
        assert srv.wait_for(r" ERROR cannot send the answer 200: .*latin-1", 5)
        assert srv.post(b"[1]")[:3:2] == (200, b"[1]")
    finally:
        assert srv.stop() == 0, srv.log
