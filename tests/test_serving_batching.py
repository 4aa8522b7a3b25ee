"""Adaptive batching (``TRAINENV_SERVING_MAX_BATCH_SIZE``) against a real server over 127.0.0.1,
stdlib and gunicorn (one worker, so every request meets the same batcher): concurrent requests
gathered into one ``predict_batch_fn`` call, each answer to its own caller, each error to its
own request or to the whole batch, the KServe and Vertex routes never batched, bad settings."""

from __future__ import annotations

import json
import threading
import types

import pytest

from support import SERVERS, Server, error_of, make_base

HANDLER = """
import os
import sys
import time

from trainenv.serving import HTTPError


def model_fn(model_dir):
    return "model"


def _mark(data, value):
    return [_mark(x, value) for x in data] if isinstance(data, list) else value


if not os.environ.get("TEST_ONLY_BATCH"):
    def predict_fn(data, model):
        return _mark(data, 7) if isinstance(data, list) else {"via": "predict_fn", "echo": data}


def predict_batch_fn(inputs, model):
    if "raise" in inputs:
        raise RuntimeError("the whole batch failed")
    if "exit" in inputs:
        sys.exit(3)
    if "slow" in inputs:
        time.sleep(3)
    out = []
    for x in inputs:
        if isinstance(x, list):
            out.append(_mark(x, 8))
        elif isinstance(x, dict) and "fail" in x:
            out.append(ValueError("bad item " + str(x["fail"])))
        elif isinstance(x, dict) and "status" in x:
            out.append(HTTPError(x["status"], "item refused"))
        else:
            out.append({"echo": x, "batch": len(inputs)})
    if "short" in inputs:
        out.pop()
    return out
"""

BATCH = 6


def _start(root, server_kind: str, **env: str) -> Server:
    settings = {"TRAINENV_SERVER": server_kind, "TRAINENV_SERVING_WORKERS": "1", **env}
    srv = Server(make_base(root, HANDLER), settings)
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module", params=SERVERS)
def gathering(request, tmp_path_factory):
    """Batches of exactly BATCH: one handler thread, a delay far longer than any test needs, so a
    batch runs when full (and only a request waiting for its batch without a slot can fill it)."""
    srv = _start(
        tmp_path_factory.mktemp(f"batch-{request.param}"),
        request.param,
        TRAINENV_SERVING_THREADS="1",
        TRAINENV_SERVING_MAX_BATCH_SIZE=str(BATCH),
        TRAINENV_SERVING_MAX_BATCH_DELAY_MS="10000",
        TRAINENV_SERVING_TIMEOUT="30",
    )
    yield srv
    assert srv.stop() == 0, srv.log


def _concurrently(srv: Server, bodies: list) -> list:
    """POST each body (JSON) on its own connection, all at once; ``(status, document)`` per body, in order."""
    results: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        conn = srv.connection(timeout=60)
        try:
            start.wait()
            conn.request("POST", "/invocations", json.dumps(bodies[i]), {"Content-Type": "application/json"})
            response = conn.getresponse()
            results[i] = (response.status, json.loads(response.read()))
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert all(r is not None for r in results), (results, srv.log)
    return results


def test_concurrent_requests_form_one_batch_and_each_gets_its_own_answer(gathering):
    for round_ in range(2):
        bodies = [{"n": round_ * 100 + i} for i in range(BATCH)]
        results = _concurrently(gathering, bodies)
        assert results == [(200, {"echo": body, "batch": BATCH}) for body in bodies], gathering.log


def test_an_exception_item_fails_only_its_own_request(gathering):
    bodies: list = [{"n": i} for i in range(BATCH - 2)] + [{"fail": "seven"}, {"status": 422}]
    results = _concurrently(gathering, bodies)
    for body, (status, document) in zip(bodies[:-2], results):
        assert (status, document) == (200, {"echo": body, "batch": BATCH})
    status, document = results[-2]
    assert status == 500
    assert "predict_batch_fn raised ValueError: bad item seven" in error_of(json.dumps(document).encode())["message"]
    assert results[-1][0] == 422 and results[-1][1]["message"] == "item refused"


@pytest.mark.parametrize(
    "poison, message",
    [
        ("short", "predict_batch_fn raised ValueError: returned 5 predictions for 6 inputs"),
        ("raise", "predict_batch_fn raised RuntimeError: the whole batch failed"),
        ("exit", "predict_batch_fn raised SystemExit: 3"),
    ],
)
def test_a_raise_or_a_wrong_length_fails_every_request_of_the_batch(gathering, poison, message):
    bodies: list = [{"n": i} for i in range(BATCH - 1)] + [poison]
    results = _concurrently(gathering, bodies)
    assert [status for status, _ in results] == [500] * BATCH, results
    for _, document in results:
        assert message in document["message"], document
    # the server goes on batching
    bodies = [{"after": i} for i in range(BATCH)]
    assert _concurrently(gathering, bodies) == [(200, {"echo": b, "batch": BATCH}) for b in bodies]


@pytest.mark.parametrize("server_kind", SERVERS)
def test_a_lone_request_is_a_batch_of_one_and_kserve_and_vertex_are_not_batched(tmp_path, server_kind):
    srv = _start(
        tmp_path,
        server_kind,
        TRAINENV_SERVING_MAX_BATCH_SIZE="4",
        TRAINENV_SERVING_MAX_BATCH_DELAY_MS="0",
        TRAINENV_SERVING_MODEL_NAME="m",
        AIP_PREDICT_ROUTE="/vertex/predict",
    )
    try:
        status, _, body = srv.post(b'"alone"')
        assert (status, json.loads(body)) == (200, {"echo": "alone", "batch": 1})
        request = {"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}
        status, _, body = srv.post(json.dumps(request).encode(), path="/v2/models/m/infer")
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [7, 7], body  # predict_fn
        status, _, body = srv.post(b'{"instances": [1, 2, 3]}', path="/vertex/predict")
        assert (status, json.loads(body)) == (200, {"predictions": [7, 7, 7]})
    finally:
        assert srv.stop() == 0, srv.log


def test_without_batching_predict_batch_fn_alone_gets_batches_of_one(tmp_path):
    srv = _start(tmp_path, "stdlib", TEST_ONLY_BATCH="1")
    try:
        status, _, body = srv.post(b'{"n": 1}')
        assert (status, json.loads(body)) == (200, {"echo": {"n": 1}, "batch": 1})
        status, _, body = srv.post(b'{"fail": "x"}')
        assert status == 500 and "predict_batch_fn raised ValueError: bad item x" in error_of(body)["message"]
        status, _, body = srv.post(b'"short"')
        assert status == 500 and "returned 0 predictions for 1 inputs" in error_of(body)["message"]
        request = {"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}
        status, _, body = srv.post(json.dumps(request).encode(), path="/v2/models/model/infer")
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [8, 8], body
    finally:
        assert srv.stop() == 0, srv.log


def test_the_request_timeout_still_answers_504_for_every_request_of_a_slow_batch(tmp_path):
    srv = _start(
        tmp_path,
        "stdlib",
        TRAINENV_SERVING_MAX_BATCH_SIZE="3",
        TRAINENV_SERVING_MAX_BATCH_DELAY_MS="10000",
        TRAINENV_SERVING_TIMEOUT="1",
    )
    try:
        results = _concurrently(srv, [{"n": 1}, "slow", {"n": 2}])
        assert [status for status, _ in results] == [504, 504, 504], results
        assert _concurrently(srv, [{"n": i} for i in range(3)]) == [(200, {"echo": {"n": i}, "batch": 3}) for i in range(3)]
    finally:
        assert srv.stop() == 0, srv.log


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("TRAINENV_SERVING_MAX_BATCH_SIZE", "0", "TRAINENV_SERVING_MAX_BATCH_SIZE: '0' is not a batch size"),
        ("TRAINENV_SERVING_MAX_BATCH_SIZE", "many", "TRAINENV_SERVING_MAX_BATCH_SIZE: 'many' is not a batch size"),
        ("TRAINENV_SERVING_MAX_BATCH_DELAY_MS", "-1", "TRAINENV_SERVING_MAX_BATCH_DELAY_MS: '-1' is not a delay"),
        ("TRAINENV_SERVING_MAX_BATCH_DELAY_MS", "nan", "TRAINENV_SERVING_MAX_BATCH_DELAY_MS: 'nan' is not a delay"),
    ],
)
def test_a_bad_batch_setting_exits_78_naming_the_variable(tmp_path, variable, value, message):
    srv = Server(make_base(tmp_path, HANDLER), {variable: value}, wait_listening=False)
    assert srv.wait_exit(20) == 78, srv.log
    assert message in srv.log


def test_batching_with_a_handler_that_cannot_batch_exits_78(tmp_path):
    handler = "def predict_fn(data, model):\n    return data\n"
    srv = Server(make_base(tmp_path, handler), {"TRAINENV_SERVING_MAX_BATCH_SIZE": "8"}, wait_listening=False)
    assert srv.wait_exit(20) == 78, srv.log
    assert "TRAINENV_SERVING_MAX_BATCH_SIZE: 8 needs predict_batch_fn(inputs, model)" in srv.log


def test_predict_batch_fn_may_ask_for_the_contexts():
    from trainenv.serving.api import RequestContext
    from trainenv.serving.config import ServingEnv
    from trainenv.serving.handler import Handler, Hooks

    module = types.ModuleType("batch_handler")
    exec(
        "def predict_batch_fn(inputs, model, context):\n"
        "    return [(x, c.request_id) for x, c in zip(inputs, context)]\n",
        module.__dict__,
    )
    handler = Handler(Hooks(module), ServingEnv())
    handler.load()
    contexts = [RequestContext(f"r{i}", {}, "application/json", "application/json", "/invocations") for i in range(2)]
    assert handler.predict_batch(["a", "b"], contexts) == [("a", "r0"), ("b", "r1")]


def test_a_freed_handler_slot_goes_to_the_oldest_waiter_not_back_to_its_last_holder():
    """Without the hand-over, a thread that finishes a call and asks again (a batch's leader
    after its decode step) takes the slot ahead of the queue, and batches never form."""
    import time

    from trainenv.serving.pool import InlineRunner

    runner = InlineRunner(1, 8)
    order: list = []
    release = threading.Event()
    deadline = time.monotonic() + 30

    def holder() -> None:
        runner.run(release.wait, (30,), deadline)
        runner.run(order.append, ("holder again",), deadline)

    def waiter(name: str) -> None:
        runner.run(order.append, (name,), deadline)

    try:
        threads = [threading.Thread(target=holder)]
        threads[0].start()
        for i in range(3):
            while runner.admitted != i + 1:  # each waiter queues before the next starts
                time.sleep(0.001)
            threads.append(threading.Thread(target=waiter, args=(f"waiter {i}",)))
            threads[-1].start()
        while runner.admitted != 4:
            time.sleep(0.001)
        release.set()
        for thread in threads:
            thread.join(10)
        assert order == ["waiter 0", "waiter 1", "waiter 2", "holder again"]
    finally:
        release.set()
        runner.stop()
