"""Several processes per node, several nodes: launching through torchrun or Open MPI.

The ``distribution`` setting (``TRAINENV_DISTRIBUTION``) picks the engine; trainenv never
re-implements one, it builds the engine's command line from the cluster trainenv discovered
(``trainenv.cluster``) and runs it under its supervisor like any entry point::

    launch = plan_launch(env, settings, entry, python, args, nproc, run_dir, os.environ)
    launch.argv, launch.env, launch.hostfile, launch.hostfile_text, launch.peers

``plan_launch`` is pure (it reads ``PATH`` and the effective uid, writes nothing); the runner
writes the hostfile, then calls ``prepare_nodes`` (checks, the wait for node 0, node 0's link
to the other nodes) right before the supervisor starts the engine, and ``NodeLink.finish``
with the exit status at the end.

torchrun (``distribution: torchrun``)
-------------------------------------

Every node runs ``<python> -m torch.distributed.run`` with:

==========================  =====================================================================
``--nnodes``                the number of nodes (elastic jobs: the platform's ``MIN:MAX``)
``--nproc-per-node``        ``nproc_per_node``: the setting, the platform's value, the GPUs, or 1
``--node-rank``             this node's rank (static rendezvous only; c10d assigns ranks itself)
``--rdzv-backend``          the ``rdzv_backend`` setting; when it is not set, the platform's
                            ``PET_RDZV_BACKEND`` (static or c10d), else ``static``
``--rdzv-endpoint``         ``MASTER_HOST:PORT``: the first host (or the platform's master
                            address) and ``master_port`` (setting, then ``MASTER_PORT``, else 29500)
``--rdzv-id``               c10d only: the platform's ``PET_RDZV_ID``, else the job name
``--rdzv-conf``             c10d with known ranks: ``is_host=1`` on node 0 and ``is_host=0``
                            elsewhere (added to the platform's ``PET_RDZV_CONF``), so node 0
                            hosts the store whatever its hostname resolves to
``--max-restarts``          the ``max_restarts`` setting, else ``PET_MAX_RESTARTS``, else 0
``--module``                entry point ``-m pkg.mod``
``--no-python``             a shell script (``/bin/sh run.sh``), an executable, or a command
                            string (``/bin/sh -c CMD``)
==========================  =====================================================================

One node: ``--standalone`` (a rendezvous on a free local port). Elastic jobs (Kubeflow's
worker-only jobs: no ``PET_NODE_RANK``) use c10d on ``PET_RDZV_ENDPOINT`` and pass no node
rank. ``OMP_NUM_THREADS=1`` when it is unset and more than one process runs per node
(torchrun's own rule, decided in the plan rather than by torchrun at run time). No NCCL
setting is forced. Before launching, ``prepare_nodes`` checks that ``<python>`` can import
torch; it runs after the requirements are installed, because ``requirements.txt`` may be what
brings torch. A failure there is a ``ConfigError`` naming the fix. When a rank fails,
torchrun ends its node and the other nodes' ranks fail on the broken connections, so every
node exits non-zero and writes its own failure file.

Open MPI (``distribution: mpi``)
--------------------------------

MPI needs the host list (``resourceconfig.json``, ``TF_CONFIG``, ``CLUSTER_SPEC``, trainenv's
own ``hosts``); the rank-only sources (``PET_*``, ``MASTER_ADDR``+``RANK``) are a
``ConfigError``. ``mpirun`` must be on ``PATH`` on every node (its ``orted`` runs there too).

Node 0 writes the hostfile (``<host> slots=<nproc>``, node 0 first) into its run dir and runs::

    mpirun [--allow-run-as-root] --hostfile FILE -np NODES*NPROC
           --mca plm_rsh_agent AGENT --bind-to none --map-by slot
           [--mca btl_tcp_if_include IF --mca oob_tcp_if_include IF] -x NAME ... [mpi_options] PROGRAM

* ``--allow-run-as-root`` when trainenv runs as root (containers usually do).
* ``plm_rsh_agent`` is the ``mpi_rsh_agent`` setting (``ssh``); it is left out when the
  platform set ``OMPI_MCA_plm_rsh_agent`` and the setting was not given (Kubeflow's kubexec).
* ``--bind-to none --map-by slot`` (SageMaker's and Horovod's choice: data loaders and
  threads are not pinned to one core) unless ``mpi_options`` names a binding or a mapping
  (or the platform set ``OMPI_MCA_hwloc_base_binding_policy``/``..._mapping_policy``).
* The interface flags come from resourceconfig's ``network_interface_name`` unless
  ``mpi_options`` or an ``OMPI_MCA_*`` variable sets them; anything else (``--mca btl ...``,
  ``--tag-output``) goes in ``mpi_options``, appended last. A platform's ``OMPI_MCA_*``
  variables reach mpirun unchanged (they are its environment).
* ``-x``: ranks on the other hosts start from the remote shell's bare environment, so every
  variable of the job's environment is exported *by name*, except (a) facts about this node
  (``NODE_RANK``, ``PET_NODE_RANK``, ``TRAINENV_NODE_RANK``, ``TRAINENV_CURRENT_HOST``,
  ``TRAINENV_ENV_FILE``, ``TF_CONFIG``, ``CLUSTER_SPEC``, ``SM_CURRENT_HOST``,
  ``SM_TRAINING_ENV``, ``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``, ``ROLE_RANK``,
  ``HOSTNAME``), (b) the MPI launcher's own (``OMPI_*``, ``PMIX_*``, ``PRTE_*``, ``OPAL_*``,
  ``ORTE_*``, ``PMI_*``, ``HYDRA_*``) and (c) a login session's (``HOME``, ``USER``,
  ``LOGNAME``, ``SHELL``, ``PWD``, ``OLDPWD``, ``SHLVL``, ``TERM``, ``DISPLAY``, ``MAIL``,
  ``_``, ``SSH_*``, ``BASH_FUNC_*``). Secrets are exported too (the job needs its tokens on
  every host), but only ever by name: no value is on mpirun's command line, in ``ps`` or in
  ``--dry-run``. A rank on another host that calls ``training_env()`` rebuilds the snapshot
  there (``TRAINENV_ENV_FILE`` is node 0's file).

The other nodes do not run the job: Open MPI starts their ranks through the remote shell.
Their trainenv waits for node 0 and ends with node 0's outcome, with no fixed sleeps:

1. node 0's trainenv listens on ``MASTER_PORT + 1`` (see "Waiting for node 0");
2. every other node waits until that port accepts connections (``wait_for_peers``), then runs,
   as its supervised job, ``python -m trainenv.distributed wait-for-master HOST PORT TIMEOUT``,
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
import shutil
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from trainenv.errors import EXIT_CONFIG, ConfigError, TrainenvError, shown
from trainenv.exports import DEFAULT_MASTER_PORT
from trainenv.frozen import FrozenDict, frozen

if TYPE_CHECKING:  # pragma: no cover
    from trainenv.environment import TrainingEnv
    from trainenv.plan import EntryPoint, LaunchPlan
    from trainenv.settings import LaunchSettings

__all__ = [
    "DistributedLaunch",
    "NodeLink",
    "PeerTimeout",
    "hub_port",
    "main",
    "master_port",
    "mpi_exported_names",
    "plan_launch",
    "prepare_nodes",
    "wait_for_master",
    "wait_for_peers",
]

REPORT_EVERY = 10.0  # seconds between "still waiting" lines
RETRY_EVERY = 0.5  # seconds between connection attempts
TORCHRUN = ("-m", "torch.distributed.run")
MPIRUN = "mpirun"
SHELL = "/bin/sh"
MAX_MESSAGE = 64 * 1024  # a node's failure text is at most 8 KiB; anything longer is not ours

# Names never exported to ranks on other hosts (see "Open MPI" above).
NODE_NAMES = frozenset({
    "NODE_RANK", "PET_NODE_RANK", "TRAINENV_NODE_RANK", "TRAINENV_CURRENT_HOST", "TRAINENV_ENV_FILE",
    "TF_CONFIG", "CLUSTER_SPEC", "SM_CURRENT_HOST", "SM_TRAINING_ENV", "RANK", "LOCAL_RANK", "GROUP_RANK",
    "ROLE_RANK", "HOSTNAME",
})
SESSION_NAMES = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "TERM", "DISPLAY", "MAIL", "_"})
LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "PRTE_", "OPAL_", "ORTE_", "PMI_", "HYDRA_", "SSH_", "BASH_FUNC_")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BINDING_OPTIONS = ("--bind-to", "-bind-to", "--map-by", "-map-by", "--rank-by", "-rank-by", "--cpu-set", "-cpu-set")


class PeerTimeout(ConfigError):
    """Another node did not show up in time (category ``ConfigError``, exit 78)."""


@frozen
class DistributedLaunch:
    """What runs on this node, and what has to happen before (see the module docstring)."""

    argv: Tuple[str, ...]
    env: Mapping[str, str] = FrozenDict()  # TRAINENV_* always set; others only when absent
    hostfile: Optional[str] = None  # written by the runner before launching
    hostfile_text: Optional[str] = None
    peers: Tuple[Tuple[str, int], ...] = ()  # (host, port) to wait for before launching


# -- planning (pure) -------------------------------------------------------------------------


def master_port(env: "TrainingEnv", settings: "LaunchSettings") -> int:
    """The rendezvous port: the setting, then the platform's, then 29500 (as ``exports`` exports it)."""
    return int(settings.master_port or env.master_port or DEFAULT_MASTER_PORT)


def hub_port(port: int) -> int:
    """Where node 0's trainenv listens for the other nodes: the port after ``MASTER_PORT``."""
    return port + 1 if port < 65535 else port - 1


def plan_launch(
    env: "TrainingEnv",
    settings: "LaunchSettings",
    entry: "EntryPoint",
    python: str,
    args: Tuple[str, ...],
    nproc: int,
    directory: str,
    environ: Mapping[str, str],
) -> DistributedLaunch:
    """The engine's command line on this node, its extra environment, hostfile and peers."""
    if settings.distribution == "torchrun":
        return _plan_torchrun(env, settings, entry, python, args, nproc, environ)
    if settings.distribution == "mpi":
        return _plan_mpi(env, settings, entry, python, args, nproc, directory, environ)
    raise ValueError(f"no distributed launch for distribution {settings.distribution!r}")


def _hygiene(nproc: int) -> Dict[str, str]:
    return {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _explicit(settings: "LaunchSettings", name: str) -> bool:
    return settings.sources.get(name, "default") != "default"


def _platform(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _rdzv_conf(environ: Mapping[str, str], **extra: str) -> str:
    """The platform's ``PET_RDZV_CONF`` (``k=v,...``) with ``extra`` keys it does not set."""
    items = [item.strip() for item in _platform(environ, "PET_RDZV_CONF").split(",") if item.strip()]
    keys = {item.split("=", 1)[0].strip() for item in items}
    items += [f"{key}={value}" for key, value in extra.items() if key not in keys]
    return ",".join(items)


def _torchrun_program(entry: "EntryPoint", args: Tuple[str, ...]) -> List[str]:
    if entry.kind == "script":
        return [entry.target, *args]
    if entry.kind == "module":
        return ["--module", entry.target, *args]
    if entry.kind == "shell":
        return ["--no-python", SHELL, entry.target, *args]
    if entry.kind == "executable":
        return ["--no-python", entry.target, *args]
    return ["--no-python", SHELL, "-c", entry.target]


def _plan_torchrun(
    env: "TrainingEnv",
    settings: "LaunchSettings",
    entry: "EntryPoint",
    python: str,
    args: Tuple[str, ...],
    nproc: int,
    environ: Mapping[str, str],
) -> DistributedLaunch:
    restarts = settings.max_restarts
    if not _explicit(settings, "max_restarts") and _platform(environ, "PET_MAX_RESTARTS").isdigit():
        restarts = int(_platform(environ, "PET_MAX_RESTARTS"))
    argv = [python, *TORCHRUN]
    peers: Tuple[Tuple[str, int], ...] = ()
    port = master_port(env, settings)
    if env.num_nodes <= 1:
        argv += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    elif env.node_rank is None:
        # Elastic (Kubeflow's worker-only jobs): the rendezvous assigns the node ranks.
        backend = _platform(environ, "PET_RDZV_BACKEND")
        argv += [
            "--nnodes", _platform(environ, "PET_NNODES") or str(env.num_nodes),
            "--nproc-per-node", str(nproc),
            "--rdzv-backend", backend if backend and backend != "static" else "c10d",
            "--rdzv-endpoint", _platform(environ, "PET_RDZV_ENDPOINT") or _endpoint(env.master_host, port),
            "--rdzv-id", _platform(environ, "PET_RDZV_ID") or env.job_name,
        ]
    else:
        backend = settings.rdzv_backend
        if not _explicit(settings, "rdzv_backend") and _platform(environ, "PET_RDZV_BACKEND") in ("static", "c10d"):
            backend = _platform(environ, "PET_RDZV_BACKEND")
        argv += ["--nnodes", str(env.num_nodes), "--nproc-per-node", str(nproc)]
        if backend == "static":
            argv += ["--node-rank", str(env.node_rank), "--rdzv-backend", "static"]
            argv += ["--rdzv-endpoint", _endpoint(env.master_host, port)]
        else:
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", _endpoint(env.master_host, port)]
            argv += ["--rdzv-id", _platform(environ, "PET_RDZV_ID") or env.job_name]
            argv += ["--rdzv-conf", _rdzv_conf(environ, is_host="1" if env.node_rank == 0 else "0")]
        if env.node_rank != 0:
            peers = ((env.master_host, hub_port(port)),)
    argv += ["--max-restarts", str(restarts)]
    argv += _torchrun_program(entry, args)
    return DistributedLaunch(argv=tuple(argv), env=_hygiene(nproc), peers=peers)


def _mentions(options: Sequence[str], names: Sequence[str]) -> bool:
    """Whether mpirun options name one of ``names`` (as a flag, ``--flag=...``, or an MCA key)."""
    return any(o in names or o.split("=", 1)[0] in names for o in options)


def _mca_set(options: Sequence[str], environ: Mapping[str, str], key: str) -> bool:
    """Whether the MCA parameter ``key`` is already given: in the options or as ``OMPI_MCA_<key>``."""
    return _mentions(options, (key,)) or bool(_platform(environ, f"OMPI_MCA_{key}"))


def mpi_exported_names(names: Sequence[str]) -> List[str]:
    """The ``-x`` names for mpirun: every name of the job's environment but the excluded ones."""
    return sorted(
        n for n in set(names)
        if _NAME.match(n) and n not in NODE_NAMES and n not in SESSION_NAMES and not n.startswith(LAUNCHER_PREFIXES)
    )


def _distribution_source(settings: "LaunchSettings") -> str:
    return settings.sources.get("distribution", "TRAINENV_DISTRIBUTION")


def _plan_mpi(
    env: "TrainingEnv",
    settings: "LaunchSettings",
    entry: "EntryPoint",
    python: str,
    args: Tuple[str, ...],
    nproc: int,
    directory: str,
    environ: Mapping[str, str],
) -> DistributedLaunch:
    source = _distribution_source(settings)
    mpirun = shutil.which(MPIRUN, path=environ.get("PATH", os.defpath))
    if mpirun is None:
        raise ConfigError.at(
            source, None,
            "mpi: mpirun is not on PATH; install Open MPI in the image on every node "
            "(apt-get install openmpi-bin) or choose another distribution",
        )
    if env.num_nodes > 1 and not env.hosts:
        raise ConfigError.at(
            source, None,
            f"mpi needs the list of hosts, but the cluster comes from {env.cluster_source}, which names only ranks; "
            "list the hosts in resourceconfig.json, TF_CONFIG, CLUSTER_SPEC, TRAINENV_HOSTS or hosts in trainenv.yaml",
        )
    port = hub_port(master_port(env, settings))
    if env.num_nodes > 1 and env.node_rank != 0:
        argv = (
            sys.executable, "-m", "trainenv.distributed", "wait-for-master",
            env.master_host, str(port), f"{settings.peer_timeout_seconds:g}",
            "--job", env.job_name, "--rank", str(env.node_rank), "--host", env.current_host,
            "--failure-file", env.failure_file,
        )
        return DistributedLaunch(argv=argv, env={}, peers=((env.master_host, port),))

    from trainenv.plan import entry_argv

    hosts = env.hosts if env.num_nodes > 1 else ("localhost",)
    hostfile = os.path.join(directory, "hostfile")
    hostfile_text = "".join(f"{host} slots={nproc}\n" for host in hosts)
    options = list(settings.mpi_options)
    argv: List[str] = [mpirun]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    argv += ["--hostfile", hostfile, "-np", str(nproc * len(hosts))]
    agent_given = _explicit(settings, "mpi_rsh_agent") and not _mentions(options, ("plm_rsh_agent",))
    if env.num_nodes > 1 and (agent_given or not _mca_set(options, environ, "plm_rsh_agent")):
        argv += ["--mca", "plm_rsh_agent", settings.mpi_rsh_agent]
    binding_keys = ("hwloc_base_binding_policy", "rmaps_base_mapping_policy")
    if not _mentions(options, _BINDING_OPTIONS) and not any(_mca_set(options, environ, k) for k in binding_keys):
        argv += ["--bind-to", "none", "--map-by", "slot"]
    if env.network_interface:
        for key in ("btl_tcp_if_include", "oob_tcp_if_include"):
            if not _mca_set(options, environ, key):
                argv += ["--mca", key, env.network_interface]
    launch_env = _hygiene(nproc)
    exported = env.to_env_vars(
        settings.compat, nproc_per_node=nproc, master_port=settings.master_port, entry_point=settings.entry_point
    )  # the same call as plan.build_plan: these names are in the job's environment
    names = set(environ) | set(exported) | set(launch_env) | {"PYTHONPATH", "PYTHONUNBUFFERED"}
    for name in mpi_exported_names(list(names)):
        argv += ["-x", name]
    argv += options
    argv += entry_argv(entry, python, args)
    return DistributedLaunch(argv=tuple(argv), env=launch_env, hostfile=hostfile, hostfile_text=hostfile_text)


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


def wait_for_peers(peers: Sequence[Tuple[str, int]], timeout: float, console: Any) -> None:
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
                    console.info(f"node 0 ({_endpoint(host, port)}) is up after {time.monotonic() - started:.1f} s")
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise PeerTimeout(
                    f"timed out after {timeout:g} s waiting for node 0 at {_endpoint(host, port)} ({last}): check that "
                    f"trainenv runs on node 0 and that the master address (MASTER_ADDR, the host list) and port {port} "
                    "(MASTER_PORT + 1) are reachable from here, or raise TRAINENV_PEER_TIMEOUT_SECONDS"
                )
            if report_at is None:
                console.info(f"waiting for node 0 at {_endpoint(host, port)} ({last}; {_limit(timeout)})")
                report_at = now + REPORT_EVERY
            elif now >= report_at:
                console.info(f"still waiting for node 0 at {_endpoint(host, port)} after {now - started:.0f} s ({last})")
                report_at = now + REPORT_EVERY
            pause = RETRY_EVERY if deadline is None else min(RETRY_EVERY, max(0.0, deadline - now))
            time.sleep(pause)


_TORCH_PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 3)"


def check_torch(python: str, env: Mapping[str, str], cwd: str, python_source: str, source: str) -> None:
    """``ConfigError`` unless ``python`` can import torch (found, not imported: ~20 ms)."""
    try:
        done = subprocess.run(
            [python, "-c", _TORCH_PROBE], env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError.at(python_source, None, f"cannot run the interpreter {shown(python)}: {problem}") from None
    if done.returncode == 3:
        raise ConfigError.at(
            source, None,
            f"torchrun needs torch, but {python} cannot import it; install torch in the image (pip install torch) "
            "or in requirements.txt, or set TRAINENV_PYTHON to an interpreter that has it",
        )
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise ConfigError.at(python_source, None, f"the interpreter {shown(python)} does not start: {lines[-1]}")


def prepare_nodes(env: "TrainingEnv", plan: "LaunchPlan", console: Any) -> Optional["NodeLink"]:
    """The runner's step before launching: checks, the peer wait, node 0's link to the others.

    Returns the :class:`NodeLink` on node 0 of a multi-node job with known ranks (the runner
    calls its ``finish`` with the exit status once the job is over), else ``None``.
    """
    settings = plan.settings
    if settings.distribution == "torchrun":
        check_torch(
            settings.interpreter, plan.env, plan.cwd,
            settings.sources.get("python", "TRAINENV_PYTHON") if settings.python else "the interpreter running trainenv",
            _distribution_source(settings),
        )
    if plan.peers:
        wait_for_peers(plan.peers, settings.peer_timeout_seconds, console)
    if env.num_nodes <= 1 or env.node_rank != 0:
        return None
    others = {rank: env.hosts[rank] if env.hosts else f"node{rank}" for rank in range(1, env.num_nodes)}
    link = NodeLink.open(hub_port(master_port(env, settings)), env.job_name, others, console)
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

    def __init__(self, listener: socket.socket, port: int, job: str, others: Mapping[int, str], console: Any) -> None:
        self.listener: Optional[socket.socket] = listener
        self.port = port
        self.job = job
        self.others = dict(others)
        self.console = console
        self.ready: Dict[int, socket.socket] = {}

    @classmethod
    def open(cls, port: int, job: str, others: Mapping[int, str], console: Any) -> "NodeLink":
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
        buffers: Dict[socket.socket, bytearray] = {}
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
                    else:
                        self._read(key.fileobj, selector, buffers)  # type: ignore[arg-type]
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

    def _accept(self, selector: selectors.BaseSelector, buffers: Dict[socket.socket, bytearray]) -> None:
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

    def _drop(self, sock: socket.socket, selector: selectors.BaseSelector, buffers: Dict[socket.socket, bytearray]) -> None:
        selector.unregister(sock)
        buffers.pop(sock, None)
        for rank, ready in list(self.ready.items()):
            if ready is sock:
                del self.ready[rank]
                self.console.info(f"{self.others[rank]} (node {rank}) went away before the job started")
        sock.close()

    def _read(self, sock: socket.socket, selector: selectors.BaseSelector, buffers: Dict[socket.socket, bytearray]) -> None:
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

    def _hello(self, line: bytes, sock: socket.socket, selector: selectors.BaseSelector, buffers: Dict[socket.socket, bytearray]) -> None:
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

    def finish(self, code: int, failure_file: Optional[str] = None, text: Optional[str] = None) -> None:
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


# -- the other nodes' side (MPI): python -m trainenv.distributed wait-for-master ---------------


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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def wait_for_master(
    host: str,
    port: int,
    timeout: float,
    *,
    job: str,
    rank: int,
    current_host: str,
    failure_file: Optional[str] = None,
    console: Any = None,
) -> int:
    """Say hello to node 0, wait until its job ends, return its exit status (see the docstring)."""
    if console is None:
        from trainenv.console import console_for

        console = console_for()
    where = _endpoint(host, port)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m trainenv.distributed wait-for-master HOST PORT TIMEOUT [--job J --rank R --host H --failure-file F]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainenv.distributed", description="trainenv's multi-node helpers.")
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
