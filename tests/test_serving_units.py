"""Unit tests of the serving pieces that need no server: settings, media types, codecs,
protocol shapes, the handler pool and the hook checks."""

from __future__ import annotations

from trainenv.frozen import FrozenRecordError
import io
import json
import threading
import time
import types
from pathlib import Path

import pytest

from trainenv.errors import EXIT_CONFIG, ConfigError
from trainenv.layout import Layout
from trainenv.serving import (
    BadRequest,
    HTTPError,
    Response,
    UnprocessableEntity,
    codecs,
    media,
)
from trainenv.serving.config import MIB, ServingEnv, resolve_serving_env
from trainenv.serving.handler import Handler, HandlerError, HookError, Hooks
from trainenv.serving.protocols import kserve, vertex
from trainenv.serving.pool import (
    AlreadyAnswered,
    DeadlineExceeded,
    InlineRunner,
    Saturated,
)

LAYOUT = Layout(Path("/ml"))


def resolve(env=None, cpus=8, gpus=0, flags=None, dirs=()):
    """Resolve with only ``dirs`` existing on the (pretend) filesystem."""
    return resolve_serving_env(env or {}, LAYOUT, cpus, gpus, flags or {}, is_dir=lambda p: p in dirs)


# -- settings -------------------------------------------------------------------------------


def test_defaults():
    env = resolve()
    assert (env.host, env.port, env.port_source) == ("0.0.0.0", 8080, "default")
    assert env.workers == 1 and env.threads == 4
    assert env.timeout_s == 60 and env.grace_s == 25 and env.startup_timeout_s is None
    assert env.max_request_bytes == 6 * MIB
    assert env.default_accept == "application/json"
    assert env.model_dir == Path("/ml/model") and env.code_dir == Path("/ml/usercode")
    assert env.handler is None and env.handler_module is None
    assert env.handler_files == (Path("/ml/model/code/inference.py"), Path("/ml/usercode/inference.py"))
    assert env.server == "stdlib" and env.model_name == "model"
    assert env.vertex_health_route is None and env.vertex_predict_route is None
    assert env.log_level == "INFO" and env.access_log is True


def test_is_a_read_only_mapping_with_json():
    env = resolve()
    assert env["port"] == 8080 and "workers" in env and len(env) == len(dict(env))
    decoded = json.loads(env.to_json())
    assert (
        decoded["model_dir"] == "/ml/model" and decoded["handler_files"][0] == "/ml/model/code/inference.py"
    )
    with pytest.raises(FrozenRecordError):
        env.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "variables, port, source",
    [
        ({"PORT": "7000"}, 7000, "PORT"),
        ({"PORT": "7000", "LISTENING_PORT": "8000"}, 8000, "LISTENING_PORT"),
        ({"LISTENING_PORT": "8000", "AIP_HTTP_PORT": "8501"}, 8501, "AIP_HTTP_PORT"),
        ({"AIP_HTTP_PORT": "8501", "SAGEMAKER_BIND_TO_PORT": "9000"}, 9000, "SAGEMAKER_BIND_TO_PORT"),
        ({"SAGEMAKER_BIND_TO_PORT": "9000", "TRAINENV_SERVING_PORT": "9100"}, 9100, "TRAINENV_SERVING_PORT"),
        ({"TRAINENV_SERVING_PORT": "", "PORT": "7000"}, 7000, "PORT"),
        ({"TRAINENV_SERVING_PORT": "0"}, 0, "TRAINENV_SERVING_PORT"),
    ],
)
def test_port_precedence(variables, port, source):
    env = resolve(variables)
    assert (env.port, env.port_source) == (port, source)


@pytest.mark.parametrize(
    "variables, fragment",
    [
        ({"TRAINENV_SERVING_PORT": "http"}, "TRAINENV_SERVING_PORT: 'http' is not a port number"),
        ({"SAGEMAKER_BIND_TO_PORT": "70000"}, "SAGEMAKER_BIND_TO_PORT: '70000' is not a port number"),
        ({"PORT": "-1"}, "PORT: '-1'"),
        ({"TRAINENV_SERVING_WORKERS": "-2"}, "TRAINENV_SERVING_WORKERS: '-2' is not a worker count"),
        ({"SAGEMAKER_MODEL_SERVER_WORKERS": "0"}, "SAGEMAKER_MODEL_SERVER_WORKERS: '0'"),
        ({"TRAINENV_SERVING_THREADS": "many"}, "TRAINENV_SERVING_THREADS: 'many'"),
        (
            {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "0"},
            "SAGEMAKER_MODEL_SERVER_TIMEOUT: '0' is not a number of seconds",
        ),
        ({"TRAINENV_SERVING_TIMEOUT": "nan"}, "TRAINENV_SERVING_TIMEOUT: 'nan'"),
        ({"TRAINENV_SERVING_GRACE_SECONDS": "-1"}, "TRAINENV_SERVING_GRACE_SECONDS: '-1'"),
        ({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "big"}, "SAGEMAKER_MAX_PAYLOAD_IN_MB: 'big' is not a size in MiB"),
        ({"TRAINENV_SERVING_MAX_REQUEST_BYTES": "0"}, "TRAINENV_SERVING_MAX_REQUEST_BYTES: '0'"),
        (
            {"TRAINENV_SERVING_BACKLOG": "5"},
            "TRAINENV_SERVING_BACKLOG: '5' is not a listen backlog (expected an integer >= 128)",
        ),
        (
            {"TRAINENV_SERVING_DEFAULT_ACCEPT": "*/*"},
            "TRAINENV_SERVING_DEFAULT_ACCEPT: '*/*' is not a concrete media type",
        ),
        ({"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "json"}, "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT: 'json'"),
        ({"TRAINENV_SERVER": "uwsgi"}, "TRAINENV_SERVER: 'uwsgi' is not one of stdlib, gunicorn"),
        (
            {"TRAINENV_SERVING_MODULE": "my-handler"},
            "TRAINENV_SERVING_MODULE: 'my-handler' is neither a dotted module name nor a .py file",
        ),
        (
            {"TRAINENV_SERVING_MODULE": "sub/handler.txt"},
            "TRAINENV_SERVING_MODULE: 'sub/handler.txt' is not a .py file",
        ),
        ({"AIP_PREDICT_ROUTE": "predict"}, "AIP_PREDICT_ROUTE: 'predict' is not a URL path"),
        ({"TRAINENV_SERVING_LOG_LEVEL": "loud"}, "TRAINENV_SERVING_LOG_LEVEL: 'loud' is not a log level"),
        ({"TRAINENV_SERVING_ACCESS_LOG": "maybe"}, "TRAINENV_SERVING_ACCESS_LOG: 'maybe' is not a boolean"),
        ({"TRAINENV_SERVING_HOST": "a b"}, "TRAINENV_SERVING_HOST: 'a b'"),
        ({"TRAINENV_SERVING_MODEL_NAME": "a/b"}, "TRAINENV_SERVING_MODEL_NAME: 'a/b'"),
    ],
)
def test_bad_values_are_one_line_config_errors(variables, fragment):
    with pytest.raises(ConfigError) as caught:
        resolve(variables)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    assert caught.value.exit_code == EXIT_CONFIG


def test_workers_default_to_one_process_and_for_gunicorn_to_gpus_else_cpus_capped_at_four():
    assert resolve(cpus=64, gpus=8).workers == 1
    gunicorn = {"TRAINENV_SERVER": "gunicorn"}
    assert resolve(gunicorn, cpus=2).workers == 2
    assert resolve(gunicorn, cpus=64).workers == 4
    assert resolve(gunicorn, cpus=0).workers == 1
    assert resolve(gunicorn, cpus=64, gpus=8).workers == 8
    assert resolve({"SAGEMAKER_MODEL_SERVER_WORKERS": "3"}, gpus=8).workers == 3
    assert resolve({"TRAINENV_SERVING_WORKERS": "5", "SAGEMAKER_MODEL_SERVER_WORKERS": "3"}).workers == 5


def test_sagemaker_names_are_read():
    env = resolve(
        {
            "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "2.5",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "9",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": "100",
            "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "Text/CSV",
            "SAGEMAKER_STARTUP_TIMEOUT": "600",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "30",
            "SAGEMAKER_PROGRAM": "serve.py",
        }
    )
    assert env.timeout_s == 2.5
    assert env.max_request_bytes == 100 * MIB
    assert env.default_accept == "text/csv"
    assert env.startup_timeout_s == 600
    assert env.log_level == "WARNING"
    assert (env.handler, env.handler_source) == ("serve.py", "SAGEMAKER_PROGRAM")
    assert env.handler_files == (Path("/ml/model/code/serve.py"), Path("/ml/usercode/serve.py"))


def test_model_dir_sources():
    assert resolve({"TRAINENV_MODEL_DIR": "/opt/ml/model"}).model_dir == Path("/opt/ml/model")
    assert resolve({"AIP_STORAGE_URI": "gs://bucket/model"}).model_dir == Path("/ml/model")
    assert resolve({"AIP_STORAGE_URI": "file:///mnt/model"}).model_dir == Path("/mnt/model")
    assert resolve({"AIP_STORAGE_URI": "/mnt/model", "SM_MODEL_DIR": "/x"}).model_dir == Path("/mnt/model")
    assert resolve({"SM_MODEL_DIR": "/opt/ml/model"}).model_dir == Path("/opt/ml/model")
    env = resolve({"TRAINENV_MODEL_DIR": "/m"})
    assert env.handler_files[0] == Path("/m/code/inference.py")


def test_model_dir_defaults_to_output_model_when_only_that_exists():
    trained, served = Path("/ml/output/model"), Path("/ml/model")
    assert resolve().model_dir == served
    assert resolve(dirs=(trained,)).model_dir == trained
    assert resolve(dirs=(trained, served)).model_dir == served
    env = resolve(dirs=(trained,))
    assert env.handler_files == (trained / "code" / "inference.py", Path("/ml/usercode/inference.py"))
    assert resolve({"TRAINENV_MODEL_DIR": "/m"}, dirs=(trained,)).model_dir == Path("/m")


def test_flags_override_every_variable_and_say_so():
    env = resolve(
        {"TRAINENV_SERVING_PORT": "eighty", "TRAINENV_SERVER": "uwsgi", "TRAINENV_SERVING_WORKERS": "x", "TRAINENV_MODEL_DIR": "/v"},
        flags={"port": "9001", "server": "gunicorn", "workers": "3", "model_dir": "/f"},
    )
    assert (env.port, env.server, env.workers, env.model_dir) == (9001, "gunicorn", 3, Path("/f"))
    assert env.sources["port"] == "option --port" and env.port_source == "option --port"
    assert env.sources["model_dir"] == "option --model-dir" and env.sources["threads"] == "default"
    with pytest.raises(ConfigError, match=r"^option --port: 'eighty' is not a port number"):
        resolve(flags={"port": "eighty"})
    with pytest.raises(ConfigError, match=r"^option --workers: '0' is not a worker count"):
        resolve(flags={"workers": "0"})


NON_DEFAULT = {
    "TRAINENV_SERVING_HOST": "127.0.0.1",
    "SAGEMAKER_BIND_TO_PORT": "9100",
    "TRAINENV_SERVER": "gunicorn",
    "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
    "TRAINENV_SERVING_THREADS": "7",
    "SAGEMAKER_MODEL_SERVER_TIMEOUT": "9.5",
    "TRAINENV_SERVING_STARTUP_TIMEOUT": "300",
    "TRAINENV_GRACE_SECONDS": "5",
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2",
    "TRAINENV_SERVING_MAX_QUEUE": "3",
    "TRAINENV_SERVING_MAX_BATCH_SIZE": "8",
    "TRAINENV_SERVING_MAX_BATCH_DELAY_MS": "2.5",
    "TRAINENV_SERVING_MAX_CONNECTIONS": "9",
    "TRAINENV_SERVING_BACKLOG": "256",
    "TRAINENV_SERVING_KEEPALIVE": "4",
    "TRAINENV_SERVING_READ_TIMEOUT": "2",
    "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "text/csv",
    "AIP_STORAGE_URI": "file:///mnt/m",
    "SAGEMAKER_PROGRAM": "serve.py",
    "TRAINENV_SERVING_MODEL_NAME": "iris",
    "AIP_HEALTH_ROUTE": "/h",
    "AIP_PREDICT_ROUTE": "/p",
    "SAGEMAKER_CONTAINER_LOG_LEVEL": "30",
    "TRAINENV_SERVING_ACCESS_LOG": "off",
}


def test_the_shell_variables_are_exactly_the_ones_read_and_reproduce_the_settings():
    from trainenv.settings.serving import SERVING, serving_variables

    env = resolve(NON_DEFAULT)
    assert all(env.sources[s.name] != "default" for s in SERVING), env.sources
    variables = serving_variables(env)
    assert set(variables) == {s.variable for s in SERVING}
    assert resolve(variables) == env  # the printed names, read back, give the same settings
    for name in variables:  # each printed name is read: a bad value stops the start naming it
        if name in ("TRAINENV_MODEL_DIR",):
            continue
        with pytest.raises(ConfigError, match=f"^{name}: "):
            resolve({**variables, name: "\n bad value"})
    for unread in ("TRAINENV_SERVING_TIMEOUT_S", "TRAINENV_SERVING_GRACE_S", "TRAINENV_SERVING_HANDLER", "TRAINENV_SERVING_SERVER"):
        assert unread not in variables


def test_env_serving_shell_prints_the_names_serve_reads(run_trainenv, tmp_path):
    from trainenv.settings.serving import SERVING

    result = run_trainenv("env", "--serving", "--format", "shell", cwd=tmp_path, extra_env={"TRAINENV_BASE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    names = {line.split()[1].split("=", 1)[0] for line in result.stdout.splitlines() if line.startswith("export ")}
    assert names == {s.variable for s in SERVING}, names
    assert "TRAINENV_SERVING_TIMEOUT_S" not in result.stdout and "TRAINENV_SERVING_HANDLER" not in result.stdout


def test_docs_list_every_serving_variable():
    from trainenv.settings.serving import SERVING

    text = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    for setting in SERVING:
        for name in (setting.variable, *setting.fallbacks):
            assert f"`{name}`" in text, name


def test_handler_forms():
    env = resolve({"TRAINENV_SERVING_MODULE": "my_pkg.serving"})
    assert env.handler_module == "my_pkg.serving" and env.handler_files == ()
    env = resolve({"TRAINENV_SERVING_MODULE": "/srv/h.py"})
    assert env.handler_module is None and env.handler_files == (Path("/srv/h.py"),)


def test_vertex_routes_and_misc():
    env = resolve(
        {
            "AIP_HEALTH_ROUTE": "/health",
            "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
            "TRAINENV_SERVER": "Gunicorn",
            "TRAINENV_SERVING_ACCESS_LOG": "off",
            "TRAINENV_SERVING_HOST": "127.0.0.1",
        }
    )
    assert env.vertex_health_route == "/health"
    assert env.vertex_predict_route == "/v1/endpoints/1/deployedModels/2:predict"
    assert env.server == "gunicorn" and env.access_log is False and env.host == "127.0.0.1"


# -- media types and negotiation ---------------------------------------------------------------


def test_parse_media_type():
    assert media.parse_media_type("Application/JSON; charset=UTF-8") == (
        "application/json",
        {"charset": "UTF-8"},
    )
    assert media.parse_media_type('text/csv;header="present; yes"') == (
        "text/csv",
        {"header": "present; yes"},
    )
    assert media.parse_media_type("json") is None
    assert media.parse_media_type("text/csv; charset") is None


def test_acceptable_weights_wildcards_and_default():
    offers = ["application/json", "text/csv", "text/plain"]
    assert media.acceptable(None, offers, "application/json")[0] == "application/json"
    assert media.acceptable("", offers, "text/csv")[0] == "text/csv"
    assert media.acceptable("*/*", offers, "text/csv")[0] == "text/csv"
    assert media.acceptable("application/json;q=0.9", offers, "application/json") == ["application/json"]
    assert media.acceptable("text/csv;q=0.5, application/json;q=0.9", offers, "x/y")[:2] == [
        "application/json",
        "text/csv",
    ]
    assert media.acceptable("text/*", offers, "application/json") == ["text/csv", "text/plain"]
    assert media.acceptable("text/*, text/csv;q=0", offers, "application/json") == ["text/plain"]
    assert media.acceptable("application/xml", offers, "application/json") == []
    assert media.acceptable("*/*;q=0", offers, "application/json") == []
    assert media.acceptable("garbage", offers, "application/json") == []
    assert media.acceptable("TEXT/CSV", offers, "application/json") == ["text/csv"]


def test_preferred_for_user_output_fn():
    assert media.preferred(None, "application/json") == "application/json"
    assert media.preferred("*/*", "text/csv") == "text/csv"
    assert media.preferred("application/xml", "application/json") == "application/xml"
    assert media.preferred("text/*;q=0.4, image/png;q=0.8", "application/json") == "image/png"
    assert media.preferred("text/*", "application/json", ["application/json", "text/csv"]) == "text/csv"
    assert media.preferred("image/*", "application/json", ["application/json"]) is None


# -- codecs ---------------------------------------------------------------------------------------


def test_decode_types():
    assert codecs.decode(b'{"a": [1, 2]}', "application/json", {}) == {"a": [1, 2]}
    assert codecs.decode('{"é": 1}'.encode("utf-16"), "application/json", {"charset": "utf-16"}) == {"é": 1}
    assert codecs.decode(b'{"a":1}\n\n[2]\n', "application/jsonlines", {}) == [{"a": 1}, [2]]
    assert codecs.decode(b"1,2.5,x\n3,4,y\n", "text/csv", {}) == [[1, 2.5, "x"], [3, 4, "y"]]
    assert codecs.decode(b"hello", "text/plain", {}) == "hello"
    assert codecs.decode(b"\x00\x01", "application/octet-stream", {}) == b"\x00\x01"


@pytest.mark.parametrize(
    "body, media_type, params, status",
    [
        (b'{"a": ', "application/json", {}, 400),
        (b"\xff\xfe\xfa", "application/json", {}, 400),
        (b'{"a":1}\n{oops', "application/x-jsonlines", {}, 400),
        (b"x", "application/json", {"charset": "no-such-charset"}, 415),
        (b"<a/>", "application/xml", {}, 415),
    ],
)
def test_decode_errors(body, media_type, params, status):
    with pytest.raises(HTTPError) as caught:
        codecs.decode(body, media_type, params)
    assert caught.value.status == status


def test_npy_never_unpickles():
    numpy = pytest.importorskip("numpy")
    buffer = io.BytesIO()
    numpy.save(buffer, numpy.arange(6, dtype="float32").reshape(2, 3))
    array = codecs.decode(buffer.getvalue(), "application/x-npy", {})
    assert array.shape == (2, 3) and array.dtype == numpy.float32
    pickled = io.BytesIO()
    numpy.save(pickled, numpy.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadRequest):
        codecs.decode(pickled.getvalue(), "application/x-npy", {})
    encoded = codecs.encode(numpy.ones((2, 2)), "application/x-npy")
    assert numpy.load(io.BytesIO(encoded), allow_pickle=False).sum() == 4
    with pytest.raises(codecs.CannotEncode):
        codecs.encode([{"a": 1}], "application/x-npy")


def test_encode_types():
    assert codecs.encode({"a": [1, 2]}, "application/json") == b'{"a":[1,2]}'
    assert codecs.encode([[1, 2], [3, 4]], "text/csv") == b"1,2\n3,4\n"
    assert codecs.encode([1, 2], "text/csv") == b"1\n2\n"
    assert codecs.encode([{"a": 1}, 2], "application/jsonlines") == b'{"a":1}\n2\n'
    assert codecs.encode("hi", "text/plain") == b"hi"
    assert codecs.encode(b"\x00", "application/octet-stream") == b"\x00"
    with pytest.raises(codecs.CannotEncode):
        codecs.encode({"a": 1}, "application/octet-stream")
    with pytest.raises(codecs.CannotEncode):
        codecs.encode(b"\x00", "application/json")
    numpy = pytest.importorskip("numpy")
    assert codecs.encode(numpy.arange(3), "application/json") == b"[0,1,2]"
    assert codecs.encode({"x": numpy.float32(0.5)}, "application/json") == b'{"x":0.5}'


# -- protocols -----------------------------------------------------------------------------------


def test_v2_request_reshapes_and_checks():
    body = json.dumps(
        {"id": "r1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4.5]}]}
    ).encode()
    request = kserve.V2Request(body)
    assert request.id == "r1" and request.data == [[1, 2], [3, 4.5]]
    nested = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [1, 2], "datatype": "INT64", "data": [[1, 2]]},
                {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["s"]},
            ]
        }
    ).encode()
    assert kserve.V2Request(nested).data == {"a": [[1, 2]], "b": ["s"]}


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": []},
        {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]},
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1.5]}]},
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]},
        {"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]},
        {"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
        [1, 2],
    ],
)
def test_v2_request_errors(document):
    with pytest.raises(BadRequest):
        kserve.V2Request(json.dumps(document).encode())


def kserve_body(*args):
    content_type, headers, body = kserve.answer(*args)
    assert (content_type, headers) == ("application/json", ())
    return body


def test_v2_response_shapes():
    request = kserve.V2Request(
        b'{"id":"7","inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}'
    )
    out = json.loads(kserve_body(request, [[1, 2], [3, 4]], "m", "2"))
    assert out == {
        "model_name": "m",
        "model_version": "2",
        "id": "7",
        "outputs": [{"name": "output0", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}],
    }
    out = json.loads(kserve_body(request, {"p": [0.5, 1], "label": "cat"}, "m", None))
    assert out["outputs"] == [
        {"name": "p", "shape": [2], "datatype": "FP64", "data": [0.5, 1]},
        {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["cat"]},
    ]
    with pytest.raises(TypeError):
        kserve.answer(request, [[1, 2], [3]], "m", None)
    with pytest.raises(TypeError):
        kserve.answer(request, [[1, 2], [3, [4]]], "m", None)
    numpy = pytest.importorskip("numpy")
    out = json.loads(kserve_body(request, numpy.zeros((1, 3), dtype="float32"), "m", None))
    assert out["outputs"][0]["datatype"] == "FP32" and out["outputs"][0]["shape"] == [1, 3]


def test_vertex_shapes():
    assert vertex.parse_request(b'{"instances": [1, 2], "parameters": {"k": 1}}') == (
        [1, 2],
        {"k": 1},
    )
    with pytest.raises(BadRequest):
        vertex.parse_request(b'{"inputs": [1]}')
    assert json.loads(vertex.response((1, 2))) == {"predictions": [1, 2]}
    with pytest.raises(TypeError):
        vertex.response({"a": 1})


# -- pool ------------------------------------------------------------------------------------------


def test_inline_runner_answers_through_on_timeout_and_counts_the_overrun():
    runner = InlineRunner(1, 1)
    answered = []
    release = threading.Event()
    outcomes = []

    def overrun():
        try:
            runner.run(release.wait, (5,), time.monotonic() + 0.2, lambda: answered.append(time.monotonic()))
        except AlreadyAnswered:
            outcomes.append("already answered")

    try:
        assert runner.run(lambda a: a * 2, (21,), time.monotonic() + 1) == 42
        with pytest.raises(ZeroDivisionError):
            runner.run(lambda: 1 / 0, (), time.monotonic() + 1)
        started = time.monotonic()
        first = threading.Thread(target=overrun)
        first.start()
        deadline = time.monotonic() + 2
        while not answered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answered and 0.15 <= answered[0] - started < 0.6  # on time, while the call still runs
        assert runner.overrunning == 1 and runner.admitted == 1
        # the overrunning call keeps its slot: the next waits in the queue and times out unstarted
        with pytest.raises(DeadlineExceeded):
            runner.run(lambda: "never", (), time.monotonic() + 0.2)
        queued = threading.Thread(
            target=lambda: outcomes.append(runner.run(lambda: "queued", (), time.monotonic() + 5))
        )
        queued.start()
        time.sleep(0.05)
        with pytest.raises(Saturated):
            runner.run(lambda: "refused", (), time.monotonic() + 5)
        release.set()
        first.join(2)
        queued.join(2)
        assert sorted(outcomes) == ["already answered", "queued"]
        assert runner.overrunning == 0 and runner.admitted == 0
    finally:
        release.set()
        runner.stop()


# -- hooks ------------------------------------------------------------------------------------------


def module(**hooks):
    mod = types.ModuleType("fake_handler")
    mod.__file__ = "/x/inference.py"
    for name, fn in hooks.items():
        setattr(mod, name, fn)
    return mod


def test_transform_fn_excludes_the_other_hooks():
    with pytest.raises(HandlerError, match="transform_fn cannot be combined with predict_fn"):
        Hooks(module(transform_fn=lambda m, b, c, a: b, predict_fn=lambda d, m: d))


def test_hook_arity_is_checked_and_context_detected():
    with pytest.raises(
        HandlerError, match=r"predict_fn has the wrong parameters; expected predict_fn\(data, model\)"
    ):
        Hooks(module(predict_fn=lambda data: data))
    with pytest.raises(HandlerError, match="model_fn is not a function"):
        Hooks(module(model_fn=3))
    hooks = Hooks(
        module(predict_fn=lambda data, model, context: data, input_fn=lambda body, content_type: body)
    )
    assert hooks.wants_context == {"predict_fn": True, "input_fn": False}


def make_handler(**hooks):
    handler = Handler(Hooks(module(**hooks)), resolve())
    handler.load()
    return handler


def test_default_predict_needs_a_callable_model():
    with pytest.raises(HandlerError, match="no predict_fn"):
        make_handler(model_fn=lambda d: None)
    handler = make_handler(model_fn=lambda d: (lambda x: [v * 2 for v in x]))
    status, content_type, _, body = handler.invoke(
        b"[1,2]", "application/json", {}, ["application/json"], None
    )
    assert (status, content_type, body) == (200, "application/json", b"[2,4]")


def test_model_fn_failure_is_a_handler_error_with_the_traceback():
    def model_fn(model_dir):
        raise FileNotFoundError("no model.pt")

    with pytest.raises(HandlerError) as caught:
        make_handler(model_fn=model_fn, predict_fn=lambda d, m: d)
    assert str(caught.value) == "model_fn raised FileNotFoundError: no model.pt"
    assert "Traceback" in caught.value.detail


def test_sagemaker_style_hooks_get_str_and_bare_types():
    seen = {}

    def input_fn(body, content_type):
        seen["input"] = (type(body).__name__, content_type)
        return body.split(",")

    def output_fn(prediction, accept):
        seen["accept"] = accept
        return ",".join(prediction), "text/csv"

    handler = make_handler(input_fn=input_fn, predict_fn=lambda d, m: d[::-1], output_fn=output_fn)
    result = handler.invoke(
        b"a,b", "text/csv", {"charset": "utf-8"}, handler.negotiate("text/csv;q=0.9"), None
    )
    assert result == (200, "text/csv; charset=utf-8", (), b"b,a")
    assert seen == {"input": ("str", "text/csv"), "accept": "text/csv"}


def test_hook_errors_keep_http_status_and_wrap_others():
    def predict_fn(data, model):
        if data == 1:
            raise UnprocessableEntity("too short")
        raise KeyError("k")

    handler = make_handler(predict_fn=predict_fn)
    with pytest.raises(HTTPError) as http_error:
        handler.invoke(b"1", "application/json", {}, ["application/json"], None)
    assert http_error.value.status == 422 and http_error.value.code == "unprocessable_entity"
    with pytest.raises(HookError, match="predict_fn raised KeyError"):
        handler.invoke(b"2", "application/json", {}, ["application/json"], None)


def test_output_fn_must_return_bytes_like():
    handler = make_handler(predict_fn=lambda d, m: d, output_fn=lambda p, a: {"not": "bytes"})
    with pytest.raises(HookError, match="output_fn raised TypeError: returned a dict"):
        handler.invoke(b"1", "application/json", {}, ["application/json"], None)
    handler = make_handler(
        predict_fn=lambda d, m: d, output_fn=lambda p, a: Response(b"x", 201, "a/b", {"X-A": "1"})
    )
    assert handler.invoke(b"1", "application/json", {}, ["application/json"], None) == (
        201,
        "a/b",
        (("X-A", "1"),),
        b"x",
    )


def test_default_output_falls_back_to_the_next_accepted_type():
    handler = make_handler(predict_fn=lambda d, m: b"\x00raw")
    accept = handler.negotiate("application/json, application/octet-stream;q=0.5")
    assert handler.invoke(b"1", "application/json", {}, accept, None) == (
        200,
        "application/octet-stream",
        (),
        b"\x00raw",
    )
    with pytest.raises(HookError, match="cannot be written as any accepted type"):
        handler.invoke(b"1", "application/json", {}, ["application/json"], None)


def test_http_error_api():
    assert HTTPError(418, "teapot").status == 418
    assert BadRequest("nope").status == 400 and BadRequest("nope").message == "nope"
    assert HTTPError(503).message == "Service Unavailable"
    with pytest.raises(ValueError):
        HTTPError(200, "fine")


def test_serving_env_is_exported():
    import trainenv.serving as serving

    assert serving.ServingEnv is ServingEnv and callable(serving.run_server)


def test_serving_modules_import_in_one_direction_and_the_app_knows_no_server():
    import ast

    root = Path(__file__).resolve().parent.parent / "src"
    names = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (root / "trainenv" / "serving").rglob("*.py")
    }
    graph = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # imports for type checkers only are not edges
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:  # ``from pkg import module`` is an edge to the module
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in names else node.module)
        assert len(path.read_text().splitlines()) <= 500, path
    graph = {k: {m for m in v if m in graph and m != k} for k, v in graph.items()}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph[start])

    cycles = [k for k in graph if reaches(k, k)]
    assert not cycles, cycles
    for module in ("trainenv.serving.app", "trainenv.serving.request", "trainenv.serving.answers"):
        source = (root / Path(*module.split("."))).with_suffix(".py").read_text()
        assert "gunicorn" not in source.lower() and "servers" not in graph[module], module
