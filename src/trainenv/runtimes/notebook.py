"""``python -m trainenv.runtimes.notebook NOTEBOOK --output PATH [--exclude-tags JSON] [--grace-seconds S]``:
run a Jupyter notebook as the job.

The plan (``trainenv.plan``) builds this argv for an entry point ending in ``.ipynb``, with the
job's interpreter; that interpreter needs jupyter's ``nbclient`` and ``ipykernel`` (the
``notebook`` extra: ``pip install 'trainenv[notebook]'``), which the runner checks before
anything runs (``check_interpreter``). Then:

1. the notebook is read (nbformat 4); cells tagged ``injected-parameters`` (left by an earlier
   run) are dropped, and the snapshot's hyperparameters (``TRAINENV_ENV_FILE``, decoded: numbers
   stay numbers) become one code cell tagged ``injected-parameters``, ``name = value`` a line,
   put after the first cell tagged ``parameters`` (papermill's convention), else at the top.
   A hyperparameter whose name is not a Python name is a ``ConfigError`` (exit 78);
2. a ``python3`` kernel starts with *this* interpreter (``sys.executable``, whatever a kernelspec
   or ``PATH`` says), in the notebook's own dir (as Jupyter runs it), with the job's
   environment: the code dir is on ``sys.path`` through ``PYTHONPATH``. Its connection file and
   sockets are in a private temp dir (no TCP port, nothing under ``$HOME``), removed at the end;
3. each code cell runs in order, except cells with a tag listed in ``--exclude-tags`` (kept as
   they are). What a cell writes to stdout/stderr, and the ``text/plain`` of its result, goes to
   this process's stdout/stderr (the job's log) as the kernel sends it;
4. the executed notebook is written atomically to ``--output`` (``output/<stem>.ipynb``; never
   over the input, see ``executed_path``), whatever the end; a secret-named hyperparameter's
   value is not written into that copy. Where a launcher runs several processes of the job
   (torchrun, mpirun, one per node), each writes its own copy: rank 0 to ``--output``, rank N
   to ``<stem>.rank<N>.ipynb`` beside it (``copy_for_rank``).

| how it ends                         | exit status                                                     |
|-------------------------------------|-----------------------------------------------------------------|
| every cell ran                      | 0                                                               |
| a cell raised (``sys.exit`` too)    | 1; a report on stderr: the cell's number, its first lines, the traceback |
| the kernel died (OOM, ``os._exit``) | the kernel's signal (this process ends by it) or status, else 1 |
| SIGTERM / SIGINT to this process    | forwarded to the kernel, which gets the grace period to end the cell; then the kernel is killed and this process ends by that signal (143 / 130) |
| cannot run the notebook at all      | 78, one ``trainenv: ConfigError: ...`` line (``errors.CHILD_CONFIG_ERROR``) |

The cell numbers in the report count the input notebook's cells from 1 (the injected cell is
not counted). The report starts with ``Traceback (most recent call last):`` so the runner's
failure file (``trainenv.outcome``) holds it whole; ANSI colour codes are stripped.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping

    from nbclient import NotebookClient
    from nbformat import NotebookNode

from trainenv.errors import CHILD_CONFIG_ERROR, EXIT_CONFIG, ConfigError, shown

RUNTIME = "trainenv.runtimes.notebook"
EXTRA = "pip install 'trainenv[notebook]'"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
SOURCE_HEAD_LINES = 5
TRACEBACK_CHARS = 4000  # the failure file keeps 8 KiB: the report fits, the end of a long traceback kept
_ANSI = r"\x1b\[[0-?]*[ -/]*[@-~]"  # compiled on first use (re caches it)
_KERNEL_POLL = 0.05
_SOCKET_DIR_LIMIT = 80  # a Unix socket's path has at most 107 bytes: ``<dir>/kernel-ipc-<n>`` must fit


def executed_path(notebook: str, output_dir: str) -> str:
    """Where the executed copy goes: ``<output dir>/<stem>.ipynb``, or ``<stem>.executed.ipynb``
    when that is the input itself (a notebook kept in the output dir): never over the input."""
    stem = os.path.splitext(os.path.basename(notebook))[0]
    path = os.path.join(output_dir, stem + ".ipynb")
    if os.path.realpath(path) == os.path.realpath(notebook):
        path = os.path.join(output_dir, stem + ".executed.ipynb")
    return path


def copy_for_rank(output: str, environ: Mapping[str, str]) -> str:
    """``output`` for rank 0 (or no launcher), ``<stem>.rank<N>.ipynb`` beside it for rank N: the
    processes of one job never write over each other's copy, on one node or a shared disk."""
    rank = environ.get("RANK") or environ.get("OMPI_COMM_WORLD_RANK") or environ.get("PMI_RANK") or ""
    if not rank.isdigit() or int(rank) == 0:
        return output
    root, extension = os.path.splitext(output)
    return f"{root}.rank{int(rank)}{extension}"


def runtime_args(notebook: str, output_dir: str, exclude_tags: tuple[str, ...], grace_seconds: float) -> tuple[str, ...]:
    """The runtime's arguments after the notebook's path (the plan's part of the argv)."""
    import json

    args: tuple[str, ...] = ("--output", executed_path(notebook, output_dir))
    if exclude_tags:
        args += ("--exclude-tags", json.dumps(list(exclude_tags)))
    return args + ("--grace-seconds", f"{grace_seconds:g}")


def check_interpreter(python: str, env: Mapping[str, str], cwd: str, *, python_source: str, source: str) -> None:
    """``ConfigError`` unless ``python`` can import what runs a notebook (trainenv, nbclient, ipykernel).

    The runner calls it before the job starts (after the requirements are installed, which may
    bring them); ~20 ms a module, trainenv only probed for another interpreter than trainenv's.
    """
    from trainenv.interpreter import require_module

    modules = ("nbclient", "ipykernel") if python == sys.executable else ("trainenv", "nbclient", "ipykernel")
    for module in modules:
        missing = (
            f"a notebook runs in trainenv's runtime, but {python} cannot import trainenv; install trainenv in that "
            f"environment ({python_source} chose it)"
            if module == "trainenv"
            else f"a notebook runs with jupyter's nbclient and ipykernel, but {python} cannot import {module}: "
            f"{EXTRA} (or add nbclient and ipykernel to requirements.txt)"
        )
        require_module(python, module, env, cwd, python_source=python_source, source=source, missing=missing)


# -- the notebook as data --------------------------------------------------------------------------


def literal(value: Any) -> str:
    """``value`` (decoded JSON) as Python source; non-finite floats as ``float('nan')``."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(key)}: {literal(item)}" for key, item in value.items()) + "}"
    return repr(value)


def parameters_source(hyperparameters: Mapping[str, Any], where: str, hide_secrets: bool = False) -> str:
    """The injected cell's source: one ``name = value`` line per hyperparameter, in order.

    A name that is not a Python name is a ``ConfigError`` naming ``where`` (the file). With
    ``hide_secrets``, a secret-named one is ``name = ...`` (for the copy written to disk).
    """
    import keyword

    from trainenv.redact import is_secret_name

    lines = ["# Parameters: the job's hyperparameters, injected by trainenv"]
    for name, value in hyperparameters.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ConfigError.at(
                where, name, "not a Python name, and a notebook gets each hyperparameter as a variable: rename it "
                "(or use an entry function or script, which take any name)"
            )
        if hide_secrets and is_secret_name(name):
            lines.append(f"{name} = ...  # a secret: its value is not written into this copy")
        else:
            lines.append(f"{name} = {literal(value)}")
    return "\n".join(lines) + "\n"


def _tags(cell: Any) -> list[str]:
    tags = cell.get("metadata", {}).get("tags", [])
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


def inject_parameters(nb: NotebookNode, source: str | None) -> list[int | None]:
    """Drop earlier injected cells; add one with ``source`` (if any) after the ``parameters`` cell.

    Returns, for each cell now in ``nb``, its number in the input notebook (from 1), or None
    for the injected cell.
    """
    import nbformat

    kept = [(number, cell) for number, cell in enumerate(nb.cells, 1) if INJECTED_TAG not in _tags(cell)]
    numbers: list[int | None] = [number for number, _ in kept]
    cells = [cell for _, cell in kept]
    if source is not None:
        at = next((index + 1 for index, cell in enumerate(cells) if PARAMETERS_TAG in _tags(cell)), 0)
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})  # type: ignore[no-untyped-call]
        if nb.get("nbformat_minor", 0) < 5:
            del cell["id"]  # cell ids came with nbformat 4.5: an older notebook stays valid
        cells.insert(at, cell)
        numbers.insert(at, None)
    nb.cells = cells
    return numbers


def read_notebook(path: str) -> NotebookNode:
    """The notebook at ``path`` as nbformat 4; a ``ConfigError`` naming it when it is not one."""
    import nbformat

    try:
        with open(path, encoding="utf-8") as handle:
            nb: NotebookNode = nbformat.read(handle, as_version=4)  # type: ignore[no-untyped-call]
    except OSError as exc:
        raise ConfigError.at(path, None, f"cannot read the notebook: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - nbformat raises many kinds for a file that is not a notebook
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError.at(path, None, f"not a Jupyter notebook: {shown(first)}") from None
    if not isinstance(nb.get("cells"), list):
        raise ConfigError.at(path, None, "not a Jupyter notebook: it has no list of cells")
    return nb


def strip_ansi(text: str) -> str:
    import re

    return re.sub(_ANSI, "", text)


def failure_report(notebook: str, number: int | None, cell: Any, output: str) -> str:
    """The stderr report of a failing cell: where, the source's first lines, the traceback."""
    lines = str(cell.get("source", "")).splitlines()
    head = [f"    {line[:200]}" for line in lines[:SOURCE_HEAD_LINES]]
    if len(lines) > SOURCE_HEAD_LINES:
        head.append(f"    ... ({len(lines) - SOURCE_HEAD_LINES} more lines)")
    which = f"cell {number}" if number is not None else "the injected parameters cell"
    count = cell.get("execution_count")
    error = next((o for o in reversed(cell.get("outputs", [])) if o.get("output_type") == "error"), None)
    if error is not None:
        trace = strip_ansi("\n".join(error.get("traceback", []))).strip("\n")
        trace = trace or f"{error.get('ename', 'Error')}: {error.get('evalue', '')}"
    else:
        trace = "(the kernel sent no traceback)"
    if len(trace) > TRACEBACK_CHARS:
        kept = trace[-TRACEBACK_CHARS:]
        trace = "...\n" + kept.split("\n", 1)[-1]
    return (
        "Traceback (most recent call last):\n"
        f"  Notebook {notebook}, {which}{f' (In [{count}])' if count else ''} failed; the executed copy is {output}\n"
        + "\n".join(head)
        + "\n"
        + trace
        + "\n"
    )


def _echo(msg: Mapping[str, Any]) -> None:
    """A kernel message's stream text, or a result's ``text/plain``, to our stdout/stderr now."""
    kind, content = msg.get("msg_type"), msg.get("content") or {}
    if kind == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(str(content.get("text", "")))
        stream.flush()
    elif kind == "execute_result" and "text/plain" in content.get("data", {}):
        sys.stdout.write(str(content["data"]["text/plain"]) + "\n")
        sys.stdout.flush()


# -- running it ------------------------------------------------------------------------------------


def _client(nb: NotebookNode) -> NotebookClient:
    """An nbclient that echoes output as it arrives, with a kernel run by this interpreter."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class JobKernelManager(AsyncKernelManager):
        """``python3``, run by ``sys.executable`` whatever a kernelspec or ``PATH`` names."""

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            connection = os.path.realpath(self.connection_file)
            return [sys.executable, "-m", "ipykernel_launcher", "-f", connection, *(extra_arguments or [])]

    class EchoingClient(NotebookClient):
        def output(self, outs: list[NotebookNode], msg: dict[str, Any], display_id: str | None, cell_index: int) -> NotebookNode | None:
            _echo(msg)
            return super().output(outs, msg, display_id, cell_index)

    return EchoingClient(nb, kernel_name="python3", kernel_manager_class=JobKernelManager)


class Run:
    """One execution: the cell being run, and the signal that stopped it (if any)."""

    def __init__(self, client: NotebookClient, cwd: str, private_dir: str, exclude_tags: frozenset[str], grace_seconds: float) -> None:
        self.client = client
        self.cwd = cwd
        self.private_dir = private_dir
        self.exclude_tags = exclude_tags
        self.grace_seconds = grace_seconds
        self.index: int | None = None  # the cell running (or last run)
        self.stopped_by: int | None = None
        self.kernel_status: int | None = None  # the kernel's exit status (negative: its signal) once it died
        self._task: Any = None
        self._closing = False

    async def execute(self) -> None:
        """Start the kernel, run the cells; the kernel is shut down (killed when stopped) at the end."""
        import asyncio
        import signal

        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, self._on_signal, number)
        client = self.client
        client.km = km = client.create_kernel_manager()
        km.connection_file = os.path.join(self.private_dir, "kernel.json")  # nothing written under $HOME
        if len(self.private_dir) < _SOCKET_DIR_LIMIT:  # sockets in our own dir: no port to share
            km.transport = "ipc"
        try:
            await client.async_start_new_kernel(cwd=self.cwd)
            await client.async_start_new_kernel_client()
            for index, cell in enumerate(client.nb.cells):
                if self.stopped_by is not None:
                    break
                if self.exclude_tags.intersection(_tags(cell)):
                    continue
                self.index = index
                await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
        finally:
            self._closing = True
            await self._shutdown()

    def _on_signal(self, number: int) -> None:
        """First SIGTERM/SIGINT: forward it to the kernel, give it the grace; a second: stop now."""
        import asyncio

        if self.stopped_by is None:
            self.stopped_by = number
            asyncio.ensure_future(self._forward(number))
        else:
            self._cancel()

    def _cancel(self) -> None:
        if not self._closing and self._task is not None:
            self._task.cancel()

    async def _forward(self, number: int) -> None:
        """Signal the kernel; stop waiting when it is gone or the grace (less a margin) is over."""
        import asyncio
        import time

        from nbclient.util import ensure_async

        km = self.client.km
        deadline = time.monotonic() + max(0.0, self.grace_seconds - min(1.0, self.grace_seconds / 2))
        try:
            if km is not None and km.has_kernel:
                await ensure_async(km.signal_kernel(number))
            while km is not None and time.monotonic() < deadline and await ensure_async(km.is_alive()):
                await asyncio.sleep(_KERNEL_POLL)
        except Exception:  # noqa: BLE001 - a kernel already gone: nothing to wait for
            pass
        self._cancel()

    async def _shutdown(self) -> None:
        from nbclient.util import ensure_async

        km, kc = self.client.km, self.client.kc
        if km is None:
            return
        try:
            provisioner = km.provisioner
            if provisioner is not None:
                self.kernel_status = await provisioner.poll()
            if km.has_kernel:
                await ensure_async(km.shutdown_kernel(now=self.stopped_by is not None or self.kernel_status is not None))
        except Exception:  # noqa: BLE001 - a kernel that died meanwhile
            pass
        if kc is not None:
            kc.stop_channels()


def _options(argv: list[str]) -> tuple[str, str, frozenset[str], float]:
    """``(notebook, output, exclude tags, grace seconds)`` from the argv the plan built."""
    import json

    usage = f"usage: python -m {RUNTIME} NOTEBOOK --output PATH [--exclude-tags JSON] [--grace-seconds S] (got {argv!r})"
    if len(argv) < 3 or len(argv) % 2 == 0:
        raise ConfigError(usage)
    options = dict(zip(argv[1::2], argv[2::2]))
    if "--output" not in options or set(options) - {"--output", "--exclude-tags", "--grace-seconds"}:
        raise ConfigError(usage)
    try:
        tags = json.loads(options.get("--exclude-tags", "[]"))
        grace = float(options.get("--grace-seconds", "30"))
    except ValueError:
        raise ConfigError(usage) from None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ConfigError(usage)
    return os.path.abspath(argv[0]), os.path.abspath(options["--output"]), frozenset(tags), grace


def _write_copy(nb: NotebookNode, path: str, hidden_source: str | None, numbers: list[int | None]) -> None:
    """The executed notebook, atomically, with the injected cell as ``hidden_source`` (no secrets)."""
    import nbformat

    from trainenv.files import write_atomic

    if hidden_source is not None and None in numbers:
        nb.cells[numbers.index(None)]["source"] = hidden_source
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, nbformat.writes(nb))  # type: ignore[no-untyped-call]
    except OSError as exc:  # the job's outcome stays what it is; the log says what is missing
        sys.stderr.write(f"trainenv: cannot write the executed notebook {exc.filename or path}: {exc.strerror or exc}\n")


def _end_by_signal(number: int) -> int:
    """End this process by signal ``number`` (so whoever waits sees it), else 128+N."""
    import signal

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if number not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
        signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)
    return 128 + number


def main(argv: list[str]) -> int:
    """Read, inject, run, write the copy; exit statuses as in the module docstring."""
    import asyncio

    from trainenv.environment import training_env
    from trainenv.frozen import plain
    from trainenv.layout import JobTree

    try:
        notebook, output, exclude_tags, grace = _options(argv)
        import importlib.util

        missing = [module for module in ("nbclient", "ipykernel") if importlib.util.find_spec(module) is None]
        if missing:
            raise ConfigError(f"{notebook}: a notebook needs jupyter's nbclient and ipykernel, and {missing[0]} is missing: {EXTRA}")
        env = training_env()
        hyperparameters = plain(env.hyperparameters)
        where = JobTree(env.base_dir).hyperparameters_file
        source = parameters_source(hyperparameters, where) if hyperparameters else None
        hidden = parameters_source(hyperparameters, where, hide_secrets=True) if hyperparameters else None
        nb = read_notebook(notebook)
    except ConfigError as exc:
        sys.stderr.write(f"{CHILD_CONFIG_ERROR}{exc}\n")
        return EXIT_CONFIG
    numbers = inject_parameters(nb, source)
    if os.path.basename(output) != os.path.splitext(os.path.basename(notebook))[0] + ".ipynb":
        sys.stderr.write(f"trainenv: the executed notebook goes to {output}, not over the input {notebook}\n")
    output = copy_for_rank(output, os.environ)
    import shutil
    import tempfile

    from nbclient.exceptions import CellExecutionError

    private_dir = tempfile.mkdtemp(prefix="trainenv-notebook-")  # the kernel's connection file and sockets
    run = Run(_client(nb), os.path.dirname(notebook), private_dir, exclude_tags, grace)
    failed = False
    try:
        asyncio.run(run.execute())
    except CellExecutionError:
        failed = True
    except BaseException:  # noqa: BLE001 - a stop (cancelled) or the kernel's death (DeadKernelError)
        if run.stopped_by is None and run.kernel_status is None:
            raise
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)
        _write_copy(nb, output, hidden, numbers)
    if run.stopped_by is not None:
        return _end_by_signal(run.stopped_by)
    index = run.index if run.index is not None else 0
    if failed:
        sys.stderr.write(failure_report(notebook, numbers[index], nb.cells[index], output))
        return 1
    if run.kernel_status is not None:
        status = run.kernel_status
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        which = numbers[index] if run.index is not None else 0
        when = "before any cell ran" if not which and run.index is None else f"while cell {which} ran" if which else "while the injected parameters cell ran"
        sys.stderr.write(f"trainenv: the notebook's kernel {how} {when}; the executed copy is {output}\n")
        return _end_by_signal(-status) if status < 0 else (status or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
