"""Run several "nodes" of a distributed job on one machine, for the distributed tests.

Two ways to fake a cluster:

* **Loopback**: every node is a group of processes on this machine, all talking over
  127.0.0.1. Cheap and needs no privileges; every node has the machine's hostname.
* **Network namespaces** (:class:`NetnsCluster`, root only): node *i* gets its own network
  namespace, its own hostname (``node<i>``, a private UTS namespace) and its own view of
  ``/etc/hosts`` (a file bind-mounted in a private mount namespace) that maps every node name
  to its address ``10.231.X.(i+1)``. The namespaces are joined by a full mesh of veth pairs
  (no bridge; /32 addresses with a host route per peer), so traffic between nodes never leaves
  the namespaces we create, and the machine's own network, hostname and ``/etc/hosts`` are
  untouched. Launchers then run with stock flags, as on real nodes.

Processes::

    procs = [start([PYTHON, "-m", "torch.distributed.run", ...], env=launcher_environ(tmp), log_dir=tmp)]
    results = wait_all(procs, timeout=120)      # every wait has a deadline; never hangs
    with NetnsCluster(2, tmp) as c:
        p = c.start(1, argv, env=..., log_dir=tmp)   # "on node 1"; p.popen is the Popen

Output goes to files (never pipes, so a chatty process cannot block), and a timeout kills the
whole process tree, including children that made their own session (torchrun's workers).

The generic parts (a clean environment, ``free_port``, ``write_script``, the torch and MPI
skips) live in ``support.py``; this module adds what only fake clusters need.

Open MPI on fake hosts: :func:`write_rsh_agent` writes an ``plm_rsh_agent`` script. Open MPI
calls it as ``agent HOST orted ...`` for every host it does not consider local; the script
runs the command on this machine (loopback) or inside node HOST's namespaces (netns), where a
real cluster would ssh.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import pytest

from support import clean_environ, write_script
NETNS_PREFIX = "tvh"  # namespaces: tvh<pid>x<k>n<i>
_NETNS_NAME = re.compile(rf"^{NETNS_PREFIX}(\d+)x\d+n\d+$")
_counter = itertools.count()

TORCH_ALLREDUCE = """\
import datetime, json, os, socket
import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
print(json.dumps({
    "rank": rank, "world": world, "sum": value.item(), "host": socket.gethostname(),
    "local_rank": int(os.environ["LOCAL_RANK"]), "group_rank": int(os.environ["GROUP_RANK"]),
    "master_addr": os.environ["MASTER_ADDR"],
}), flush=True)
dist.destroy_process_group()
"""

MPI_ALLREDUCE = """\
import json, socket
from mpi4py import MPI

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
print(json.dumps({"rank": comm.Get_rank(), "world": comm.Get_size(), "sum": total,
                  "host": socket.gethostname()}), flush=True)
"""


# -- processes -------------------------------------------------------------------------------


@dataclass
class Started:
    """A process started by :func:`start`; its output goes to two files."""

    argv: List[str]
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    started_at: float


@dataclass
class Finished:
    argv: List[str]
    returncode: Optional[int]  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def describe(self) -> str:
        """A multi-line summary for assertion messages."""
        return (
            f"$ {shlex.join(self.argv)}\n-> rc={self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )


def launcher_environ(tmp_dir: Path, **extra: str) -> Dict[str, str]:
    """:func:`support.clean_environ` for launchers, plus ``extra``.

    ``TMPDIR`` points into ``tmp_dir`` so launchers' scratch dirs (torchelastic_*) stay there.
    """
    return clean_environ(**{"TMPDIR": str(tmp_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})


def report_wall_time(record_property, name: str, seconds: float) -> None:
    """Record ``seconds`` as the test's ``<name>_seconds`` property and print it."""
    record_property(f"{name}_seconds", round(seconds, 2))
    print(f"\n[wall time] {name}: {seconds:.1f} s")


_log_counter = itertools.count()


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_dir: Path,
    cwd: Optional[Path] = None,
    owner: Optional["NetnsCluster"] = None,
) -> Started:
    """Start ``argv`` in a new session with stdout/stderr going to files under ``log_dir``.

    With ``owner`` the process is also killed when that :class:`NetnsCluster` is torn down.
    """
    argv = [str(a) for a in argv]
    k = next(_log_counter)
    out, err = log_dir / f"proc{k}.out", log_dir / f"proc{k}.err"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        popen = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,
        )
    started = Started(argv, popen, out, err, time.monotonic())
    if owner is not None:
        owner.track(started)
    return started


def wait_all(procs: Sequence[Started], timeout: float, *, grace_after_failure: float = 15.0) -> List[Finished]:
    """Wait for every process, at most ``timeout`` seconds in all.

    At the deadline every process still running is killed with its whole tree. Once one
    process has failed, the others get ``grace_after_failure`` more seconds (a peer that
    waits for a dead node would otherwise sit out the full timeout).
    """
    deadline = time.monotonic() + timeout
    ended: Dict[int, float] = {}
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, proc in enumerate(procs):
            if i not in ended and proc.popen.poll() is not None:
                ended[i] = time.monotonic() - proc.started_at
                if proc.popen.returncode != 0:
                    deadline = min(deadline, time.monotonic() + grace_after_failure)
        time.sleep(0.05)
    results = []
    for i, proc in enumerate(procs):
        if i not in ended and proc.popen.poll() is not None:
            ended[i] = time.monotonic() - proc.started_at  # finished right at the deadline
        _stop(proc)
        results.append(
            Finished(
                argv=proc.argv,
                returncode=proc.popen.returncode if i in ended else None,
                stdout=proc.stdout_path.read_text(errors="replace"),
                stderr=proc.stderr_path.read_text(errors="replace"),
                seconds=ended.get(i, time.monotonic() - proc.started_at),
            )
        )
    return results


def _stop(proc: Started) -> None:
    """Kill a process still running, with its tree; reap it; then end leftovers of its group.

    A running (or unreaped) process keeps its pid, so its tree is safe to walk. After it was
    reaped only its process group is signalled: a pid still in use as a group id is never
    handed to a new process, so that reaches our leftovers and nothing else.
    """
    if proc.popen.poll() is None:
        kill_tree(proc.popen.pid)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parents() -> Dict[int, int]:
    """pid -> parent pid for every process, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces or parens; split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid`` (children first)."""
    children: Dict[int, List[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group (it leads one: see :func:`start`) and every descendant.

    ``pid`` must be a child of ours not yet reaped (so the number is still its own). The tree
    is listed before anything dies, so children re-parented to init are still reached; the
    walk runs twice to catch a child forked in between.
    """
    for _ in range(2):
        for target in descendants(pid) + [pid]:
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def json_lines(text: str) -> List[dict]:
    """Every JSON object printed in ``text``, in order, wherever it sits on a line.

    Launchers add their own chatter and prefixes, and mpirun may glue two ranks' lines.
    """
    decoder = json.JSONDecoder()
    found, pos = [], text.find("{")
    while pos >= 0:
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        pos = text.find("{", end)
    return found


# -- network namespaces ----------------------------------------------------------------------


def _run(argv: Sequence[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def netns_unsupported_reason() -> Optional[str]:
    """Why namespaced nodes cannot be made here, or ``None`` when they can (probed once)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"{NETNS_PREFIX}{os.getpid()}x999999n0"
    added = _run(["ip", "netns", "add", probe])
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    try:
        inner = _run(["ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "--", "true"])
        if inner.returncode != 0:
            return f"unshare --uts --mount in a namespace failed: {inner.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe])
    return None


def netns_supported() -> bool:
    """Root, ``ip netns`` works, and ``unshare --uts --mount`` works inside a namespace."""
    return netns_unsupported_reason() is None


def remove_stale_namespaces() -> List[str]:
    """Delete namespaces this harness made in runs whose process no longer exists."""
    listed = _run(["ip", "netns", "list"])
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NETNS_NAME.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _run(["ip", "netns", "del", name])
            removed.append(name)
    return removed


class NetnsCluster:
    """``num_nodes`` namespaced nodes with hostnames ``node0``..; a context manager.

    ``command(i, argv)`` is the argv that runs ``argv`` on node *i*; pass
    ``owner=cluster`` to :func:`start` so teardown kills it. Teardown (always, also on a
    failed setup) kills every tracked process tree and deletes the namespaces.
    """

    def __init__(self, num_nodes: int, workdir: Path, *, hostnames: Optional[Sequence[str]] = None):
        if not 1 <= num_nodes <= 250:
            raise ValueError("1..250 nodes")
        self.num_nodes = num_nodes
        self.hostnames = list(hostnames or [f"node{i}" for i in range(num_nodes)])
        if len(self.hostnames) != num_nodes:
            raise ValueError("one hostname per node")
        k = next(_counter)
        self.tag = f"{NETNS_PREFIX}{os.getpid()}x{k}"
        self.namespaces = [f"{self.tag}n{i}" for i in range(num_nodes)]
        octet = (os.getpid() + k) % 250 + 1  # namespaces are isolated; this only aids reading logs
        self.subnet = f"10.231.{octet}.0/24"
        self.addresses = [f"10.231.{octet}.{i + 1}" for i in range(num_nodes)]
        self.workdir = Path(workdir)
        self.hosts_file = self.workdir / f"{self.tag}.hosts"
        self.node_exec = self.workdir / f"{self.tag}-node-exec"
        self._procs: List[Started] = []
        self._created: List[str] = []

    # setup / teardown

    def __enter__(self) -> "NetnsCluster":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ip(self, *args: str) -> None:
        done = _run(["ip", *args])
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _setup(self) -> None:
        remove_stale_namespaces()
        for ns in self.namespaces:
            self._ip("netns", "add", ns)
            self._created.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        for i, j in itertools.combinations(range(self.num_nodes), 2):
            ns_i, ns_j = self.namespaces[i], self.namespaces[j]
            # In node i the link to node j is "te<j>", and vice versa.
            self._ip("link", "add", f"te{j}", "netns", ns_i, "type", "veth", "peer", "name", f"te{i}", "netns", ns_j)
            for ns, dev, own, peer in ((ns_i, f"te{j}", i, j), (ns_j, f"te{i}", j, i)):
                self._ip("-n", ns, "addr", "add", f"{self.addresses[own]}/32", "dev", dev)
                self._ip("-n", ns, "link", "set", dev, "up")
                self._ip("-n", ns, "route", "add", f"{self.addresses[peer]}/32", "dev", dev)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{addr} {name}" for addr, name in zip(self.addresses, self.hostnames)]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self._write_node_exec()

    def _write_node_exec(self) -> None:
        cases = "\n".join(
            f"  {i}) ns={shlex.quote(ns)}; name={shlex.quote(name)};;"
            for i, (ns, name) in enumerate(zip(self.namespaces, self.hostnames))
        )
        inner = 'printf %s "$1" > /proc/sys/kernel/hostname && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        write_script(
            self.node_exec,
            f"""#!/bin/sh
# node-exec I CMD [ARG...]: run CMD on fake node I: its network namespace, its hostname
# (private UTS namespace) and its /etc/hosts (bind mount in a private mount namespace).
case "$1" in
{cases}
  *) echo "node-exec: no node $1" >&2; exit 127;;
esac
shift
exec ip netns exec "$ns" unshare --uts --mount -- /bin/sh -c {shlex.quote(inner)} node-exec "$name" {shlex.quote(str(self.hosts_file))} "$@"
""",
            executable=True,
        )

    def track(self, proc: Started) -> None:
        self._procs.append(proc)

    def close(self) -> None:
        """Kill every tracked process tree, then delete the namespaces (errors ignored)."""
        for proc in self._procs:
            _stop(proc)
        for ns in self._created:
            _run(["ip", "netns", "del", ns])
        self._created = []

    # running things on a node

    def start(self, node: int, argv: Sequence[str], *, env: Mapping[str, str], log_dir: Path, cwd: Optional[Path] = None) -> Started:
        """Start ``argv`` on node ``node`` (``.popen`` is its Popen); killed at teardown."""
        return start(self.command(node, argv), env=env, log_dir=log_dir, cwd=cwd, owner=self)

    def command(self, node: int, argv: Sequence[str]) -> List[str]:
        """The argv that runs ``argv`` on node ``node``."""
        if not 0 <= node < self.num_nodes:
            raise IndexError(node)
        return [str(self.node_exec), str(node), *map(str, argv)]


# -- Open MPI --------------------------------------------------------------------------------


LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def write_rsh_agent(
    path: Path, cluster: Optional[NetnsCluster] = None, *, log: Optional[Path] = None, login_env: bool = False
) -> Path:
    """Write an Open MPI ``plm_rsh_agent`` that runs ``agent [-opts] HOST CMD...`` without ssh.

    Without ``cluster`` (loopback mode) every host is this machine: ``CMD`` runs here. With a
    :class:`NetnsCluster`, HOST must be one of its node names and ``CMD`` runs on that node.
    With ``log``, each call appends the HOST it was asked for to that file. With
    ``login_env``, CMD starts from the bare environment an ssh login gets (``HOME``, ``USER``,
    ``LOGNAME``, ``SHELL``, a default ``PATH``), not from mpirun's: what the ranks there see
    beyond that is only what ``mpirun -x`` exported, as on a real cluster.
    """
    record = f'echo "$host" >> {shlex.quote(str(log))}\n' if log is not None else ""
    shell = "/bin/sh"
    if login_env:
        import pwd

        user = pwd.getpwuid(os.getuid())
        name, home = shlex.quote(user.pw_name), shlex.quote(user.pw_dir)
        shell = f"env -i HOME={home} USER={name} LOGNAME={name} SHELL=/bin/sh PATH={LOGIN_PATH} /bin/sh"
    if cluster is None:
        run = f'exec {shell} -c "$*"'
    else:
        cases = "\n".join(f"  {shlex.quote(name)}) node={i};;" for i, name in enumerate(cluster.hostnames))
        run = (
            f'case "$host" in\n{cases}\n'
            '  *) echo "fake-rsh: unknown host $host" >&2; exit 255;;\nesac\n'
            f'exec {shlex.quote(str(cluster.node_exec))} "$node" {shell} -c "$*"'
        )
    return write_script(
        path,
        f"""#!/bin/sh
# Fake rsh for Open MPI (--mca plm_rsh_agent): "agent [-opts] HOST CMD..." runs CMD on HOST.
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
{record}{run}
""",
        executable=True,
    )


def mpirun_argv(
    hosts_slots: Iterable[str],
    np: int,
    agent: Path,
    interface: str,
    program: Sequence[str],
) -> List[str]:
    """``mpirun`` on fake hosts: ``hosts_slots`` like ``["node0:2", "node1:2"]``.

    ``interface`` (``lo`` or a CIDR such as ``10.231.7.0/24``) pins both Open MPI's
    out-of-band and TCP transport to the faked network, never the machine's real one.
    """
    mpirun = shutil.which("mpirun") or "mpirun"
    return [
        mpirun, "--allow-run-as-root",
        "--mca", "plm_rsh_agent", str(agent),
        "--mca", "oob_tcp_if_include", interface,
        "--mca", "btl_tcp_if_include", interface,
        "--mca", "btl", "self,tcp",
        "-H", ",".join(hosts_slots), "-np", str(np),
        *map(str, program),
    ]


def need_netns() -> None:
    """Skip the calling test when network namespaces cannot be made here."""
    reason = netns_unsupported_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
