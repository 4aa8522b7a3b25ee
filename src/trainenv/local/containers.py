"""Run ``trainenv local --image``'s containers: every side effect of the container route.

``check_image`` asks the engine about the image before anything is created. ``run_image_job``
writes the nodes' files, plans the command lines (``image.plan_containers``), prints them for
``--dry-run``, else runs them: the network (bridge mode, N > 1 nodes; when the engine cannot
make one, the run says so and falls back to the shared mode), one ``create`` per node, then
``start --attach`` for each, node 1 first, their output streamed line by line behind
``[node-<i>]`` when there are several. The exit status is node 1's container's. When node 1
ends, the other nodes get the grace period to end too, then are stopped.

SIGTERM or SIGINT (Ctrl-C) stops every container (``<engine> stop -t <grace + 5>``: the image's
stop signal, then a kill; trainenv inside has the grace for the job) and exits ``128+N``.
Whatever happens, also when the engine fails halfway, a ``finally`` removes every container
labelled ``trainenv.run=<run id>`` and the run's network (the nodes are created with ``--rm``,
so after a normal end the engine has removed them already and this costs little): nothing is left behind but the job
dir, whose output dirs are kept.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import IO, Any, Callable, Mapping, Sequence

    from trainenv.layout import Layout
    from trainenv.local.engine import Engine
    from trainenv.local.image import ContainerPlan

from trainenv.errors import ConfigError

STOP_MARGIN = 5.0  # seconds beyond the job's grace before the engine kills a container


class _Stop(Exception):
    """A SIGTERM or SIGINT arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def check_image(image: str, environ: Mapping[str, str], dry_run: bool,
                say: Callable[[str], None]) -> tuple[Engine, bool]:
    """The engine, and whether ``image`` has an ENTRYPOINT; a missing image is a ``ConfigError``.

    ``--dry-run`` needs no engine that answers: it then assumes an ENTRYPOINT and says so.
    """
    import json

    from trainenv.local.engine import answers, find_engine, inspect_entrypoint_argv, run_quietly

    engine = find_engine(environ, probe=not dry_run)
    if dry_run and answers(engine):
        say(f"{engine.command[0]} does not answer: assuming {image} has an ENTRYPOINT")
        return engine, True
    errors: list[str] = []
    status, out = run_quietly(inspect_entrypoint_argv(engine, image), on_error=errors.append, timeout=60)
    if status != 0:
        raise ConfigError.at("--image", None, f"{engine.command[0]} cannot inspect image {image!r} "
                             f"({errors[-1] if errors else 'no answer'}): build or pull it first")
    try:
        entrypoint = json.loads(out or "null")
    except ValueError:
        entrypoint = None
    return engine, bool(entrypoint)


def run_image_job(
    engine: Engine,
    layout: Layout,
    image: str,
    has_entrypoint: bool,
    options: Mapping[str, Any],
    dry_run: bool = False,
    say: Callable[[str], None] = lambda line: None,
) -> int:
    """Run (or, with ``dry_run``, print) the job's containers; returns the job's exit status.

    ``options``: ``flags`` (the ``train`` options), ``env`` (``--env`` pairs), ``job_args``,
    ``nodes``, ``network``, ``gpus``.
    """
    import shlex
    import uuid

    from trainenv.local.image import container_variables, lay_out_nodes, plan_containers
    from trainenv.redact import redact_text

    flags = options["flags"]
    grace = _grace(flags, os.environ)
    nodes = int(options.get("nodes") or 1)
    variables = container_variables(flags, options.get("env", ()))
    run_id = uuid.uuid4().hex[:12]

    def plan_for(network: str) -> ContainerPlan:
        lay_out_nodes(layout, nodes, network)  # again on the fallback to shared: before any container
        return plan_containers(engine, layout, image, has_entrypoint, variables, options.get("job_args", ()),
                               nodes, network, options.get("gpus"), run_id)

    plan = plan_for(options.get("network") or "bridge")
    say(f"job dir:    {layout.base_dir}")
    if dry_run:
        secrets = [value for _name, value in plan.secrets]
        for argv in plan.lines(engine):
            print(redact_text(shlex.join(argv), secrets))
        return 0
    status = run_containers(engine, plan, grace, say, lambda: plan_for("shared"))
    say(f"output dir: {layout.output_dir}")
    return status


def _grace(flags: Mapping[str, Any], environ: Mapping[str, str]) -> float:
    """The job's grace period (the option, else its variable, else 30 s), checked."""
    given, source = flags.get("grace_seconds"), "--grace-seconds"
    if given is None:
        given, source = environ.get("TRAINENV_GRACE_SECONDS"), "TRAINENV_GRACE_SECONDS"
    if given is None or given == "":
        return 30.0
    try:
        value = float(given)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise ConfigError.at(source, None, f"{given!r} is not a number of seconds")
    return value


def run_containers(engine: Engine, plan: ContainerPlan, grace: float, say: Callable[[str], None],
                   replan: Callable[[], ContainerPlan] | None = None) -> int:
    """Create, start, stream, supervise and remove the plan's containers (see the module docstring)."""
    import signal
    import subprocess
    import threading

    from trainenv.local.engine import network_create_argv, run_quietly, start_argv, stop_argv

    env = dict(os.environ, **dict(plan.secrets))
    procs: list[subprocess.Popen[bytes]] = []
    pumps: list[threading.Thread] = []
    lock = threading.Lock()

    def on_signal(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    network = plan.network  # removed at the end even when a signal cut its creation short
    try:
        try:
            if plan.network:
                errors: list[str] = []
                if run_quietly(network_create_argv(engine, plan.network, plan.run_id), env, on_error=errors.append)[0]:
                    if replan is None:
                        raise ConfigError(f"cannot create network {plan.network}: {errors[-1]}")
                    say(f"cannot create a bridge network ({errors[-1]}): using --network shared")
                    plan = replan()
            holder = [(plan.holder_name, plan.holder)] if plan.holder_name else []
            for name, argv in [*holder, *zip(plan.names, plan.creates)]:
                errors = []
                if run_quietly(argv, env, on_error=errors.append)[0]:
                    raise ConfigError(f"{engine.command[0]} could not create container {name}: {errors[-1]}")
            if plan.holder_name:
                errors = []
                if run_quietly(engine.argv("start", plan.holder_name), env, on_error=errors.append)[0]:
                    raise ConfigError(f"{engine.command[0]} could not start container {plan.holder_name}: {errors[-1]}")
            for index, name in enumerate(plan.names):
                proc = subprocess.Popen(start_argv(engine, name), env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
                procs.append(proc)
                prefix = f"[node-{index + 1}] ".encode() if len(plan.names) > 1 else b""
                assert proc.stdout is not None
                pump = threading.Thread(target=_pump, args=(proc.stdout, prefix, lock), daemon=True)
                pump.start()
                pumps.append(pump)
            procs[0].wait()
            try:
                for proc in procs[1:]:
                    proc.wait(timeout=grace + STOP_MARGIN)
            except subprocess.TimeoutExpired:
                say("node 1 ended: stopping the other nodes")
                run_quietly(stop_argv(engine, plan.names[1:], grace + STOP_MARGIN), env, timeout=grace + 120)
            return procs[0].returncode  # ``start --attach`` exits with the container's status
        except _Stop as stop:
            _ignore_signals()
            say(f"signal {stop.signum}: stopping the containers (grace {grace:g}s)")
            run_quietly(stop_argv(engine, plan.names, grace + STOP_MARGIN), env, timeout=grace + 120)
            return 128 + stop.signum
    finally:
        _ignore_signals()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pump in pumps:
            pump.join(timeout=5)
        holder_name = [plan.holder_name] if plan.holder_name else []
        remove_run(engine, [*holder_name, *plan.names], plan.run_id, network, env, say)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signals() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def remove_run(engine: Engine, names: Sequence[str], run_id: str, network: str | None,
               env: Mapping[str, str], say: Callable[[str], None]) -> None:
    """Remove the run's containers (dependents first; when one cannot be, every container with the
    run's label) and its network."""
    from trainenv.local.engine import labelled_argv, network_rm_argv, rm_argv, run_quietly

    failed = [name for name in reversed(names) if run_quietly(rm_argv(engine, [name]), env)[0]]
    status, out = run_quietly(labelled_argv(engine, run_id), env) if failed else (1, "")
    left = out.split() if status == 0 else []
    if left:
        run_quietly(rm_argv(engine, left), env, on_error=lambda line: say(f"cannot remove containers {left}: {line}"))
    if network:
        run_quietly(network_rm_argv(engine, network), env)


def _pump(stream: IO[bytes], prefix: bytes, lock: Any) -> None:
    """Copy one container's output to stdout, each line behind ``prefix``."""
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line if prefix else line)
            out.flush()
    stream.close()

