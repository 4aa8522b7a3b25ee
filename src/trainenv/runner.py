"""``trainenv train``: the launch sequence, where every side effect of a launch happens.

1. resolve the layout; remove ``output/failure`` left by an earlier run (not with ``--dry-run``);
   read ``trainenv.yaml``, resolve the launch settings;
2. build the snapshot (``TrainingEnv``); with a ``source`` setting (not with ``--dry-run``),
   fetch the code into the code dir (``trainenv.sources``); build the plan (``LaunchPlan``) — pure;
3. ``--dry-run`` stops here and prints the plan: it writes nothing, not even on failure;
4. create the output dirs, write the snapshot file (``TRAINENV_ENV_FILE``) and hostfile (an
   ``OSError`` here is a ``ConfigError`` naming the path);
5. log a short, redacted start-up summary;
6. with a conda pack, unpack it once per node (``trainenv.sources.conda_pack``); install the
   requirements (``trainenv.install``);
7. an entry function run by another interpreter (``TRAINENV_PYTHON``, a conda pack): check that it can import
   trainenv (``trainenv.runtimes.function``); a notebook: check that the job's interpreter can
   import nbclient and ipykernel (``trainenv.runtimes.notebook``); a launcher (torchrun, accelerate, deepspeed, mpi): check the engine, wait for the peers; on node 0 of an MPI job, wait for every
   other node (``trainenv.nodes.prepare_nodes``);
8. run the plan under the supervisor (``trainenv.supervisor``);
9. classify the outcome, write ``output/failure`` on failure, return the exit status (node 0 of
   an MPI job also sends it, with the failure file, to the other nodes).

SIGTERM or SIGINT before the job starts (steps 1-7) ends the sequence at the next step, with
exit 128+N and a ``Signal`` failure file: a wait (for the peers) and a fetch end at once, the installer is
stopped (``trainenv.install``), and from step 8 the supervisor owns the signals: one noted
before it took over stops the launch before the job is spawned; one that arrives once its
handlers are in place is forwarded to the job like any later one.

Any ``TrainenvError`` ends the sequence with its category and exit code (78, 69, 128+N for a
signal); anything else is an ``InternalError`` (70) whose traceback goes to the log and the
failure file. The reason is always logged first, so it shows even when the failure file
cannot be written.
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping

from trainenv.console import Console, console_for
from trainenv.errors import ConfigError, SignalError, TrainenvError
from trainenv.layout import JobTree
from trainenv.outcome import Outcome, classify, failure_text, remove_failure_file, write_failure_file
from trainenv.redact import known_secrets, secret_values


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_lines(env: Any, plan: Any) -> list[str]:
    """The start-up summary: a few redacted lines, never the whole environment."""
    gpus = ", ".join(f"{g['index']}:{g['name']}" for g in env.gpus) or "none"
    channels = ", ".join(env.channels) or "none"
    return [
        f"job {env.job_name} on {env.current_host} (node {env.node_rank} of {env.num_nodes}, master {env.master_host}, from {env.cluster_source})",
        f"resources: {env.num_cpus} CPUs, {_human_bytes(env.memory_bytes)} memory, GPUs: {gpus}",
        f"channels: {channels}; model dir {env.model_dir}",
        f"entry point ({plan.entry.kind}, {plan.settings.distribution}): {_cut(' '.join(plan.argv[:3]))}{' ...' if len(plan.argv) > 3 else ''}",
    ]


def _check_private(run_dir: str) -> None:
    """The run dir holds the snapshot (secrets, and what the job's ``training_env()`` reads): it
    must be ours alone, and so must its parent, unless the parent is sticky (as ``/tmp`` is).
    Another user's dir, or one others can write to, is a ``ConfigError`` naming it."""
    import stat

    me = os.geteuid()
    for path, is_leaf in ((run_dir, True), (os.path.dirname(run_dir), False)):
        info = os.lstat(path)
        shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if stat.S_ISLNK(info.st_mode) or info.st_uid not in (me, 0) or (is_leaf and info.st_uid != me):
            problem = f"is owned by uid {info.st_uid}, not by this user ({me})" if not stat.S_ISLNK(info.st_mode) else "is a symlink"
        elif shared and (is_leaf or not info.st_mode & stat.S_ISVTX):
            problem = f"can be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
        else:
            continue
        raise ConfigError(
            f"run dir {path} {problem}: trainenv keeps the job's snapshot there; remove it, or set "
            "TRAINENV_RUN_DIR to a dir of this user's"
        )


class PendingSignals:
    """SIGTERM and SIGINT before the job starts: noted by the handler, acted on at the next step.

    ``check`` raises ``SignalError`` (exit 128+N) once one arrived; inside ``waiting`` (a
    wait that may last minutes, such as the peer wait) the handler raises it at once.
    """

    NUMBERS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.number: int | None = None
        self.raise_at_once = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        try:
            for number in self.NUMBERS:
                self.previous[number] = signal.signal(number, self._note)
        except ValueError:  # not the main thread (trainenv used as a library): keep Python's defaults
            self.restore()

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _note(self, number: int, frame: Any) -> None:
        self.number = self.number or number
        if self.raise_at_once:
            self.raise_at_once = False
            raise self._error()

    def _error(self) -> SignalError:
        assert self.number is not None
        return SignalError(f"trainenv received {signal.Signals(self.number).name} before the job started", self.number)

    def check(self) -> None:
        if self.number is not None:
            raise self._error()

    def waiting(self, wait: Callable[[], Any]) -> Any:
        """Run ``wait()``; a signal meanwhile ends it with ``SignalError``."""
        self.check()
        self.raise_at_once = True
        try:
            return wait()
        finally:
            self.raise_at_once = False


class Launch:
    """One ``trainenv train`` run; holds what the failure report needs."""

    def __init__(self, flags: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self.flags = dict(flags)
        self.environ = environ
        self.layout = JobTree.resolve(environ)
        self.secrets = secret_values(environ)
        self.console: Console = console_for(environ, self.secrets)
        self.dry_run = False
        self.signals = PendingSignals()
        self.nodes: Any = None  # node 0 of a multi-node MPI job: its link to the other nodes

    def run(self, dry_run: bool = False) -> int:
        code = self._run(dry_run)
        if self.nodes is not None:  # tell the other nodes how the job ended (trainenv.nodes)
            self.nodes.finish(code, self.layout.failure_file)
        return code

    def _run(self, dry_run: bool) -> int:
        self.dry_run = dry_run
        try:
            if not dry_run:
                self.signals.install()
                self._start_clean()
            return self._sequence(dry_run)
        except TrainenvError as exc:
            return self._fail(Outcome(exc.exit_code, exc.category, str(exc), getattr(exc, "tail", "")))
        except KeyboardInterrupt:
            return self._fail(Outcome(130, "Signal", "trainenv was interrupted before the job started"))
        except Exception as exc:  # noqa: BLE001 - the contract: any bug is an InternalError, 70
            import traceback

            trace = traceback.format_exc()
            self.console.error(trace.rstrip())
            return self._fail(Outcome(70, "InternalError", f"trainenv failed: {type(exc).__name__}: {exc}", trace))
        finally:
            self.signals.restore()

    def _sequence(self, dry_run: bool) -> int:
        from trainenv import config
        from trainenv.environment import build_training_env
        from trainenv.plan import build_plan
        from trainenv.settings import resolve_settings

        file_settings, settings_path = config.read_file_settings(self.layout.settings_files)
        settings = resolve_settings(self.flags, self.environ, file_settings, settings_path or "trainenv.yaml")
        self.console.set_level(settings.log_level)
        env = self._snapshot(lambda: build_training_env(
            self.environ, layout=self.layout, settings=file_settings, settings_source=settings_path,
        ), settings.peer_timeout_seconds, dry_run)
        self._scrub(known_secrets(self.environ, env.hyperparameters))  # before anything can quote them
        if settings.source and not dry_run:  # the plan checks the entry point in the fetched code
            self.signals.waiting(lambda: self._fetch(settings))  # a signal stops the fetch at once
        plan = build_plan(
            env, settings, self.environ, job_args=tuple(self.flags.get("job_args") or ()), code_fetched=bool(settings.source and not dry_run)
        )
        self._scrub(plan.secrets)
        if dry_run:
            sys.stdout.write(plan.describe(bool(self.flags.get("show_secrets"))) + "\n")
            return 0
        self.signals.check()
        self._prepare(plan)
        for line in (*summary_lines(env, plan), *plan.warnings):
            self.console.info(line)
        if plan.conda_pack is not None:  # its interpreter runs the install and the job
            self.signals.waiting(lambda: self._unpack(plan))  # a signal stops the unpack at once
        if settings.install:
            self.signals.check()
            self._install(plan)
        if plan.entry is not None and plan.entry.kind == "function" and plan.install_python != sys.executable:
            from trainenv.runtimes.function import check_interpreter

            check_interpreter(plan.install_python, plan.env, plan.cwd, plan.python_source)
        if plan.entry is not None and plan.entry.kind == "notebook":  # nbclient and ipykernel, before anything runs
            from trainenv.runtimes.notebook import check_interpreter as check_notebook_interpreter

            check_notebook_interpreter(
                plan.install_python, plan.env, plan.cwd, python_source=plan.python_source, source=plan.entry.source
            )
        if settings.distribution != "none" or plan.launcher:
            from trainenv.nodes import prepare_nodes

            self.nodes = self.signals.waiting(lambda: prepare_nodes(env, plan, self.console))
        return self._supervise(plan)

    def _snapshot(self, build: Callable[[], Any], timeout: float, dry_run: bool) -> Any:
        """``build()``, retried every second while OCI Data Science's node list does not name every
        node yet (``cluster_values.NodesNotListed``), for at most ``timeout`` (the peer timeout);
        ``env`` and ``--dry-run`` do not wait."""
        import time

        from trainenv.cluster_values import NodesNotListed

        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                return build()
            except NodesNotListed as exc:
                if dry_run:
                    raise
                if time.monotonic() >= deadline:
                    raise ConfigError(f"{exc}; waited {timeout:g} s (TRAINENV_PEER_TIMEOUT_SECONDS)") from None
                if not said:
                    self.console.info(f"waiting for the node list: {exc}")
                    said = True
                self.signals.waiting(lambda: time.sleep(1.0))

    def _fetch(self, settings: Any) -> None:
        """Fetch the code (``trainenv.sources``) into the code dir, replacing what was there."""
        from trainenv.sources import fetch_source

        fetch_source(
            settings.source,
            self.layout.code_dir,
            where=settings.sources.get("source", "TRAINENV_SOURCE"),
            git_ref=settings.git_ref,
            ssh_key=(settings.git_ssh_key_file, settings.sources.get("git_ssh_key_file", "TRAINENV_GIT_SSH_KEY_FILE")) if settings.git_ssh_key_file else None,
            max_bytes=settings.source_max_bytes,
            info=self.console.info,
        )

    def _unpack(self, plan: Any) -> None:
        """Unpack the conda pack (``trainenv.sources.conda_pack``), unless this node already has it."""
        from trainenv.sources.conda_pack import unpack

        unpack(plan.conda_pack, plan.env, plan.settings.source_max_bytes, info=self.console.info)

    def _scrub(self, secrets: Any) -> None:
        """From now on, these secret values are scrubbed from the log and the failure file."""
        self.secrets = list(secrets)
        self.console.secrets = tuple(secrets)

    def _start_clean(self) -> None:
        """A run starts without the failure file of an earlier run (``--dry-run`` keeps it)."""
        path = self.layout.failure_file
        try:
            remove_failure_file(path)
        except OSError as exc:
            raise ConfigError(f"cannot remove the failure file of an earlier run {path}: {exc.strerror or exc}") from None

    def _prepare(self, plan: Any) -> None:
        """Create the output dirs, the run dir (this user's only), the snapshot file and hostfile.

        Any ``OSError`` (a read-only volume, a file where a dir should be) is a ``ConfigError``
        naming the path: the job's tree or ``TRAINENV_RUN_DIR`` is unusable, not trainenv.
        """
        from trainenv.files import write_atomic

        path = ""
        try:
            for path in plan.dirs_to_create:
                os.makedirs(path, exist_ok=True)
            path = os.path.dirname(plan.env_file)
            os.makedirs(path, mode=0o700, exist_ok=True)
            _check_private(path)
            path = plan.env_file
            write_atomic(path, plan.snapshot_json, mode=0o600)  # the snapshot may hold secrets
            if plan.hostfile and plan.hostfile_text is not None:
                path = plan.hostfile
                write_atomic(path, plan.hostfile_text, mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create {exc.filename or path}: {exc.strerror or exc}") from None

    def _install(self, plan: Any) -> None:
        if not plan.requirements_file and not plan.settings.requirements:
            return
        from pathlib import Path

        from trainenv.install import InstallRequest, install_requirements

        request = InstallRequest(
            python=plan.install_python,
            requirements_file=Path(plan.requirements_file) if plan.requirements_file else None,
            extra_requirements=tuple(plan.settings.requirements),
            cwd=Path(plan.cwd),
            env=plan.env,
            installer=plan.settings.installer,
        )
        install_requirements(request, self.console.info)  # logs its own progress, a skip included

    def _supervise(self, plan: Any) -> int:
        from trainenv.resources import oom_kill_counter
        from trainenv.supervisor import Supervisor, become_subreaper

        become_subreaper()
        supervisor = Supervisor(
            plan.argv,
            plan.env,
            plan.cwd,
            grace_seconds=plan.settings.grace_seconds,
            max_run_seconds=plan.settings.max_run_seconds,
            log_prefix=plan.log_prefix,
            debug=self.console.debug,
            info=self.console.info,
            oom_count=oom_kill_counter(),
            before_spawn=self.signals.check,
        )
        self.console.divert(lambda data: supervisor.output.write(2, data))
        try:
            result = supervisor.run()
        finally:
            self.console.divert(None)
        what = "the command" if plan.entry.kind == "command" else f"{plan.entry.kind} {os.path.basename(plan.entry.target)}"
        if result.exec_error:
            outcome = Outcome(result.exit_code, "UserError", result.exec_error)
        else:
            outcome = classify(
                what=what,
                exit_code=result.exit_code,
                signal_number=result.signal_number,
                stderr_tail=result.stderr_tail,
                timed_out=result.timed_out,
                stopped_by=result.stopped_by,
                oom_killed=result.oom_killed,
                runtime=plan.entry.kind in ("function", "notebook"),
            )
        if not outcome.failed:
            self.console.info(f"{outcome.reason} in {result.seconds:.1f} s")
            return 0
        return self._fail(outcome)

    def _fail(self, outcome: Outcome) -> int:
        self.console.error(f"{outcome.category}: {outcome.reason}")
        if self.dry_run:
            return outcome.exit_code  # --dry-run writes nothing, not even a failure file
        try:
            written = write_failure_file(self.layout.failure_file, failure_text(outcome, self.secrets))
            if not written:
                self.console.info(f"kept the failure file the job wrote: {self.layout.failure_file}")
        except OSError as exc:
            self.console.error(f"cannot write the failure file {self.layout.failure_file}: {exc.strerror}")
        return outcome.exit_code


def run_training(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, dry_run: bool = False) -> int:
    """``trainenv train``: returns the exit status (see ``trainenv.outcome``)."""
    return Launch(flags, os.environ if environ is None else environ).run(dry_run)
