"""Hostile handlers and clients against a real server over 127.0.0.1 (stdlib and gunicorn):
hooks that call ``sys.exit`` or raise ``KeyboardInterrupt``, bodies without a ``Content-Type``
or in a type the server cannot decode, and a client that goes silent in the middle of a body."""

from __future__ import annotations

import json
import socket
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
    if data == "exit":
        sys.exit(3)
    if data == "interrupt":
        raise KeyboardInterrupt()
    return data


def output_fn(prediction, accept):
    if prediction == "exit-in-output":
        raise SystemExit("bye")
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
