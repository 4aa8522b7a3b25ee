"""Side effects between nodes: the wait for node 0, node 0's link to the others, the relay.

The runner calls ``prepare_nodes(env, plan, console)`` right before the supervisor starts the
job (after the requirements are installed): it checks that torchrun's interpreter has torch
(and, for DeepSpeed on several nodes, that its launcher is new enough for ``--no_ssh``),
waits for node 0 where the plan names peers, and on node 0 of a multi-node job opens the
:class:`NodeLink` whose ``finish`` the runner calls with the exit status at the end. The
argv each node runs comes from ``trainenv.launchers`` (pure).

The other nodes do not run the job: Open MPI starts their ranks through the remote shell.
Their trainenv waits for node 0 and ends with node 0's outcome, with no fixed sleeps:

1. node 0's trainenv listens on ``MASTER_PORT + 1`` (see "Waiting for node 0");
2. every other node waits until that port accepts connections (``wait_for_peers``), then runs,
   as its supervised job, ``python -m trainenv.nodes wait-for-master HOST PORT TIMEOUT``,
   which says hello (job name, node rank, host) and blocks;
3. node 0 starts ``mpirun`` once every node has said hello, so every node has installed its
   requirements before any rank starts there, and logs who it is waiting for every 10 s;
4. when the job ends, node 0 sends its exit status and its failure file to every node; each
   writes that failure (first line ``<Category>: on node 0 (<host>): <reason>``) and exits
   with the same status. A node 0 that vanishes (its connection closes without a status, or
   TCP keepalive gives up after about 2 min) ends the wait with status 1 and a
   ``ConnectionError`` line.

Waiting for node 0
------------------

On several nodes with known ranks, node 0's trainenv listens on ``MASTER_PORT + 1`` from the
moment it has installed its requirements until the job ends (``MASTER_PORT`` itself stays
free for the engine and the job, e.g. torch's store, or ``env://`` under mpirun). Every other
node, once its own requirements are installed, waits until that port accepts connections
(``wait_for_peers``), logging every 10 s, then starts its side of the job. Waiting for node
0's trainenv rather than for torch's store lets every node's torchrun import torch at the same
time (the store only opens once node 0's torchrun has imported torch, seconds later).
Elastic jobs skip the wait (which node hosts the rendezvous is not known in advance;
torchrun's own ``join_timeout`` applies). After ``peer_timeout_seconds``
(``TRAINENV_PEER_TIMEOUT_SECONDS``, default 600; 0 waits without limit) the wait raises
:class:`PeerTimeout`: category ``ConfigError``, exit 78, one line naming the address and what
to check. Node 0 of an MPI job waits for the other nodes' hellos under the same limit, and a
timeout there is sent to the nodes that did come. torchrun's own rendezvous timeouts (600 s)
still apply once it runs.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time

from trainenv.errors import EXIT_CONFIG, ConfigError, TrainenvError, shown
from trainenv.launchers import endpoint, hub_port

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping, Sequence

    from trainenv.console import Console
    from trainenv.environment import TrainingEnv
    from trainenv.plan import LaunchPlan

__all__ = ["NodeLink", "PeerTimeout", "check_torch", "main", "prepare_nodes", "relayed_failure", "wait_for_master", "wait_for_peers"]

REPORT_EVERY = 10.0  # seconds between "still waiting" lines
RETRY_EVERY = 0.5  # seconds between connection attempts
MAX_MESSAGE = 64 * 1024  # a node's failure text is at most 8 KiB; anything longer is not ours


class PeerTimeout(ConfigError):
    """Another node did not show up in time (category ``ConfigError``, exit 78)."""


# -- before launching (side effects: processes, sockets) ------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "the name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _limit(timeout: float) -> str:
    return f"limit {timeout:g} s" if timeout > 0 else "no limit"


def wait_for_peers(peers: Sequence[tuple[str, int]], timeout: float, console: Console) -> None:
    """Wait until every ``(host, port)`` (node 0's trainenv) accepts a TCP connection.

    ``PeerTimeout`` after ``timeout`` s.

    ``timeout`` <= 0 waits without limit. ``console.info`` gets a line when the wait starts,
    every 10 s while it lasts, and when it ends.
    """
    started = time.monotonic()
    deadline = started + timeout if timeout > 0 else None
    for host, port in peers:
        last = ""
        report_at = None
        while True:
            now = time.monotonic()
            attempt = RETRY_EVERY * 4 if deadline is None else max(0.05, min(RETRY_EVERY * 4, deadline - now))
            try:
                socket.create_connection((host, port), timeout=attempt).close()
            except OSError as exc:
                last = _reason(exc)
            else:
                if report_at is not None:
                    console.info(f"node 0 ({endpoint(host, port)}) is up after {time.monotonic() - started:.1f} s")
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise PeerTimeout(
                    f"timed out after {timeout:g} s waiting for node 0 at {endpoint(host, port)} ({last}): check that "
                    f"trainenv runs on node 0 and that the master address (MASTER_ADDR, the host list) and port {port} "
                    "(MASTER_PORT + 1) are reachable from here, or raise TRAINENV_PEER_TIMEOUT_SECONDS"
                )
            if report_at is None:
                console.info(f"waiting for node 0 at {endpoint(host, port)} ({last}; {_limit(timeout)})")
                report_at = now + REPORT_EVERY
            elif now >= report_at:
                console.info(f"still waiting for node 0 at {endpoint(host, port)} after {now - started:.0f} s ({last})")
                report_at = now + REPORT_EVERY
            pause = RETRY_EVERY if deadline is None else min(RETRY_EVERY, max(0.0, deadline - now))
            time.sleep(pause)


def check_torch(python: str, env: Mapping[str, str], cwd: str, python_source: str, source: str) -> None:
    """``ConfigError`` unless ``python`` can import torch (found, not imported: ~20 ms)."""
    from trainenv.interpreter import require_module

    require_module(
        python, "torch", env, cwd, python_source=python_source, source=source,
        missing=f"torchrun needs torch, but {python} cannot import it; install torch in the image (pip install torch) "
        "or in requirements.txt, or set TRAINENV_PYTHON to an interpreter that has it",
    )


_DEEPSPEED_PROBE = (
    "import importlib.metadata as m, sys\n"
    "try:\n    print(m.version('deepspeed'))\nexcept m.PackageNotFoundError:\n    sys.exit(3)"
)


def _deepspeed_python(plan: LaunchPlan) -> str:
    """The interpreter that runs DeepSpeed's launcher: trainenv's, or the ``deepspeed`` script's."""
    import shutil

    if plan.entry is None or plan.entry.kind != "command":
        return plan.install_python
    script = shutil.which("deepspeed", path=plan.env.get("PATH", os.defpath))
    if script is None:
        raise ConfigError.at(plan.entry.source, None, "deepspeed is not on PATH: install deepspeed in the image or in requirements.txt")
    try:
        with open(script, "rb") as handle:
            words = handle.readline(4096).decode("utf-8", "replace").split() if handle.read(2) == b"#!" else []
    except OSError:
        words = []
    if words and os.path.basename(words[0]) == "env":
        words = words[1:]
    return words[0] if words and "python" in os.path.basename(words[0]) else plan.install_python


def check_deepspeed(plan: LaunchPlan) -> None:
    """``ConfigError`` unless DeepSpeed's launcher has ``--no_ssh`` (every node runs its own)."""
    from trainenv.launcher_commands import DEEPSPEED_NO_SSH

    source = plan.entry.source if plan.entry is not None and plan.entry.kind == "command" else plan.settings.sources.get("distribution", "TRAINENV_DISTRIBUTION")
    python = _deepspeed_python(plan)
    try:
        done = subprocess.run(
            [python, "-c", _DEEPSPEED_PROBE], env=dict(plan.env), cwd=plan.cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError.at(source, None, f"cannot run the interpreter {shown(python)}: {getattr(exc, 'strerror', None) or exc}") from None
    version = done.stdout.decode("utf-8", "replace").strip()
    need = f"install deepspeed>={DEEPSPEED_NO_SSH} (pip install 'deepspeed>={DEEPSPEED_NO_SSH}') in the image or in requirements.txt"
    if done.returncode != 0 or not version:
        raise ConfigError.at(source, None, f"deepspeed on several nodes: {python} has no DeepSpeed; {need}")
    numbers = tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version)[:3])
    if numbers < tuple(int(part) for part in DEEPSPEED_NO_SSH.split(".")):
        raise ConfigError.at(
            source, None,
            f"deepspeed {version} has no --no_ssh, which trainenv needs to start DeepSpeed on every node without ssh; {need}",
        )


def prepare_nodes(env: TrainingEnv, plan: LaunchPlan, console: Console) -> NodeLink | None:
    """The runner's step before launching: checks, the peer wait, node 0's link to the others.

    Returns the :class:`NodeLink` on node 0 of a multi-node job with known ranks (the runner
    calls its ``finish`` with the exit status once the job is over), else ``None``.
    """
    settings = plan.settings
    if settings.distribution == "torchrun":
        check_torch(
            plan.install_python, plan.env, plan.cwd, plan.python_source,
            settings.sources.get("distribution", "TRAINENV_DISTRIBUTION"),
        )
    if plan.launcher == "deepspeed" and env.num_nodes > 1:
        check_deepspeed(plan)
    if plan.peers:
        wait_for_peers(plan.peers, settings.peer_timeout_seconds, console)
    if env.num_nodes <= 1 or env.node_rank != 0:
        return None
    others = {rank: env.hosts[rank] if env.hosts else f"node{rank}" for rank in range(1, env.num_nodes)}
    link = NodeLink.open(hub_port(plan.master_port), env.job_name, others, console)
    if settings.distribution != "mpi":
        return link  # torchrun: the port only tells the others that node 0 is about to start
    try:
        link.gather(settings.peer_timeout_seconds)
    except TrainenvError as exc:
        link.finish(exc.exit_code, text=f"{exc.category}: {exc}\n")
        raise
    except BaseException:
        link.finish(130, text="Signal: trainenv on node 0 was interrupted before the job started\n")
        raise
    return link


# -- node 0's link to the other nodes (MPI) --------------------------------------------------


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")


def _keepalive(sock: socket.socket) -> None:
    """Notice a peer whose machine vanished (no FIN ever comes) after about two minutes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class NodeLink:
    """Node 0's side: a listening port the other nodes wait for; for MPI, their hellos and the outcome."""

    def __init__(self, listener: socket.socket, port: int, job: str, others: Mapping[int, str], console: Console) -> None:
        self.listener: socket.socket | None = listener
        self.port = port
        self.job = job
        self.others = dict(others)
        self.console = console
        self.ready: dict[int, socket.socket] = {}

    @classmethod
    def open(cls, port: int, job: str, others: Mapping[int, str], console: Console) -> NodeLink:
        """Listen on ``port`` on every address; ``ConfigError`` when that is impossible."""
        try:
            backlog = max(128, len(others) + 1)  # probes wait in the backlog; nobody needs to accept them
            try:
                listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=backlog)
            except (OSError, ValueError):  # no IPv6 here: IPv4 only
                listener = socket.create_server(("", port), backlog=backlog)
        except OSError as exc:
            raise ConfigError(
                f"node 0 cannot listen on port {port} (MASTER_PORT + 1) for the other nodes: {_reason(exc)}; "
                "set TRAINENV_MASTER_PORT to a port whose successor is free"
            ) from None
        listener.setblocking(False)
        return cls(listener, port, job, others, console)

    def _missing(self) -> str:
        return ", ".join(f"{host} (node {rank})" for rank, host in sorted(self.others.items()) if rank not in self.ready)

    def gather(self, timeout: float) -> None:
        """Block until every other node said hello; ``PeerTimeout`` after ``timeout`` s (<= 0: no limit)."""
        assert self.listener is not None
        started = time.monotonic()
        deadline = started + timeout if timeout > 0 else None
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, bytearray] = {}
        report_at = started
        try:
            while len(self.ready) < len(self.others):
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise PeerTimeout(
                        f"timed out after {timeout:g} s waiting for {self._missing()} to connect to node 0 on port "
                        f"{self.port}: start trainenv there with TRAINENV_DISTRIBUTION=mpi and the same hosts, "
                        "or raise TRAINENV_PEER_TIMEOUT_SECONDS"
                    )
                if now >= report_at:
                    waited = f" after {now - started:.0f} s" if now - started >= 1 else ""
                    self.console.info(
                        f"waiting for {len(self.others) - len(self.ready)} of {len(self.others)} nodes to connect "
                        f"on port {self.port}{waited}: {self._missing()} ({_limit(timeout)})"
                    )
                    report_at = now + REPORT_EVERY
                wait = report_at - now if deadline is None else min(report_at, deadline) - now
                for key, _ in selector.select(max(0.0, wait)):
                    if key.data is None:
                        self._accept(selector, buffers)
                    elif isinstance(key.fileobj, socket.socket):  # a peer's connection
                        self._read(key.fileobj, selector, buffers)
        finally:
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
            selector.close()
            for sock in buffers:
                if sock not in self.ready.values():
                    sock.close()
            self.listener.close()
            self.listener = None
        for rank, sock in sorted(self.ready.items()):
            try:
                sock.setblocking(True)
                sock.settimeout(10)
                _send(sock, {"start": True})
            except OSError:
                pass
        self.console.info(f"all {len(self.others) + 1} nodes are here: starting the job")

    def _accept(self, selector: selectors.BaseSelector, buffers: dict[socket.socket, bytearray]) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            _keepalive(sock)
            buffers[sock] = bytearray()
            selector.register(sock, selectors.EVENT_READ, "peer")

    def _drop(self, sock: socket.socket, selector: selectors.BaseSelector, buffers: dict[socket.socket, bytearray]) -> None:
        selector.unregister(sock)
        buffers.pop(sock, None)
        for rank, ready in list(self.ready.items()):
            if ready is sock:
                del self.ready[rank]
                self.console.info(f"{self.others[rank]} (node {rank}) went away before the job started")
        sock.close()

    def _read(self, sock: socket.socket, selector: selectors.BaseSelector, buffers: dict[socket.socket, bytearray]) -> None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # a probe (wait_for_peers), or a node that went away
            self._drop(sock, selector, buffers)
            return
        buffer = buffers[sock]
        buffer += data
        if len(buffer) > MAX_MESSAGE:
            self._drop(sock, selector, buffers)
            return
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            self._hello(line, sock, selector, buffers)

    def _hello(self, line: bytes, sock: socket.socket, selector: selectors.BaseSelector, buffers: dict[socket.socket, bytearray]) -> None:
        try:
            message = json.loads(line)
            job, rank = message["hello"], int(message["rank"])
        except (ValueError, KeyError, TypeError):
            self._drop(sock, selector, buffers)
            return
        if job != self.job or rank not in self.others:
            self.console.info(f"ignored a hello from node {rank} of job {job!r} ({message.get('host')}): this is node 0 of job {self.job!r}")
            self._drop(sock, selector, buffers)
            return
        previous = self.ready.get(rank)
        if previous is not None and previous is not sock:
            self._drop(previous, selector, buffers)
        self.ready[rank] = sock

    def finish(self, code: int, failure_file: str | None = None, text: str | None = None) -> None:
        """Send the exit status (and, on failure, the failure file) to every node; never raises."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if not self.ready:
            return
        if text is None:
            text = ""
            if code != 0 and failure_file:
                try:
                    with open(failure_file, encoding="utf-8", errors="replace") as handle:
                        text = handle.read(MAX_MESSAGE // 2)
                except OSError:
                    text = ""
        told = 0
        for rank, sock in sorted(self.ready.items()):
            try:
                sock.setblocking(True)
                sock.settimeout(10)
                _send(sock, {"exit": int(code), "failure": text})
                sock.shutdown(socket.SHUT_WR)
                told += 1
            except OSError as exc:
                self.console.info(f"could not tell {self.others[rank]} (node {rank}) how the job ended: {_reason(exc)}")
            finally:
                sock.close()
        self.console.info(f"told {told} other node{'s' if told != 1 else ''} the job ended with status {code}")
        self.ready = {}


# -- the other nodes' side (MPI): python -m trainenv.nodes wait-for-master ---------------


def relayed_failure(text: str, master: str, code: int) -> str:
    """Node 0's failure text, its first line saying where it happened."""
    first, _, rest = text.partition("\n")
    category, sep, reason = first.partition(": ")
    if sep and category.isidentifier():
        first = f"{category}: on node 0 ({master}): {reason}"
    else:
        rest = text
        first = f"UserError: on node 0 ({master}): the job exited with status {code}"
    if len(first) > 1000:
        first = first[:997] + "..."
    return first + "\n" + rest.lstrip("\n")


def _write_file(path: str, text: str) -> None:
    from trainenv.files import write_atomic

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, text)


def wait_for_master(
    host: str,
    port: int,
    timeout: float,
    *,
    job: str,
    rank: int,
    current_host: str,
    failure_file: str | None = None,
    console: Console | None = None,
) -> int:
    """Say hello to node 0, wait until its job ends, return its exit status (see the docstring)."""
    if console is None:
        from trainenv.console import console_for

        console = console_for()
    where = endpoint(host, port)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=RETRY_EVERY * 4)
            break
        except OSError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                sys.stderr.write(
                    f"ConfigError: timed out after {timeout:g} s connecting to node 0 at {where} ({_reason(exc)})\n"
                )
                return EXIT_CONFIG
            time.sleep(RETRY_EVERY)
    with sock:
        sock.settimeout(None)
        _keepalive(sock)
        _send(sock, {"hello": job, "rank": rank, "host": current_host})
        console.info(f"waiting for node 0 ({where}) to run the job; this node's ranks are started by its mpirun")
        reader = sock.makefile("rb")
        while True:
            try:
                line = reader.readline(MAX_MESSAGE)
            except OSError:
                line = b""
            if not line:
                sys.stderr.write(
                    f"ConnectionError: node 0 ({where}) closed the connection without saying how the job ended; "
                    "see node 0's log (did its container stop?)\n"
                )
                return 1
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("start"):
                console.info("node 0 started the job")
            elif "exit" in message:
                code = int(message["exit"])
                text = str(message.get("failure") or "")
                if code == 0:
                    console.info("node 0 reports the job succeeded")
                    return 0
                relayed = relayed_failure(text, host, code)
                if failure_file:
                    try:
                        _write_file(failure_file, relayed)
                    except OSError as exc:
                        console.info(f"cannot write the failure file {failure_file}: {_reason(exc)}")
                console.info(f"node 0 reports the job failed with status {code}:")
                sys.stderr.write(relayed)
                sys.stderr.flush()
                return code if 0 < code < 256 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainenv.nodes wait-for-master HOST PORT TIMEOUT [--job J --rank R --host H --failure-file F]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainenv.nodes", description="trainenv's multi-node helpers.")
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait-for-master", help="on a node other than 0 of an MPI job: wait for node 0's job to end")
    wait.add_argument("master", help="node 0's host")
    wait.add_argument("port", type=int, help="node 0's port (MASTER_PORT + 1)")
    wait.add_argument("timeout", type=float, help="seconds to keep trying to connect (0: no limit)")
    wait.add_argument("--job", default="", help="the job name (node 0 checks it)")
    wait.add_argument("--rank", type=int, default=1, help="this node's rank")
    wait.add_argument("--host", default=socket.gethostname(), help="this node's host name")
    wait.add_argument("--failure-file", default=None, help="where to write node 0's failure")
    options = parser.parse_args(argv)
    try:
        return wait_for_master(
            options.master, options.port, options.timeout, job=options.job, rank=options.rank,
            current_host=options.host, failure_file=options.failure_file,
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

