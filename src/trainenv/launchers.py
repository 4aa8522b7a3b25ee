"""The argv each node runs: one process (``none``), torchrun, accelerate, deepspeed or Open MPI; pure.

``plan_launch`` is the one place where the entry point's argv and the shell are chosen, and
where an engine's command line is built around them from the cluster trainenv discovered
(``trainenv.cluster``); the plan (``trainenv.plan``) calls it once::

    launch = plan_launch(env, settings, entry, python, args, nproc, port, run_dir, environ, names)
    launch.argv, launch.env, launch.hostfile, launch.hostfile_text, launch.peers

It reads ``PATH`` and the effective uid and writes nothing; what happens between nodes at run
time (the wait for node 0, the outcome relay) is ``trainenv.nodes``. trainenv never
re-implements an engine: it runs the engine under its supervisor like any entry point.

Entry points (``entry_argv``):

| entry point        | argv                                              |
|--------------------|---------------------------------------------------|
| ``train.py``       | ``<python> train.py <hyperparameter args>``        |
| ``-m pkg.mod``     | ``<python> -m pkg.mod <hyperparameter args>``      |
| ``run.sh``         | ``/bin/sh run.sh <hyperparameter args>``           |
| ``tool``           | ``<code dir>/tool`` or ``tool`` on PATH, ``<args>`` |
| ``pkg.mod:func``   | ``<python> -m trainenv.runtimes.function pkg.mod:func`` (hyperparameters from the snapshot) |
| ``file.py:func``   | ``<python> -m trainenv.runtimes.function <code dir>/file.py:func`` |
| ``nb.ipynb``       | ``<python> -m trainenv.runtimes.notebook <code dir>/nb.ipynb --output ...`` (hyperparameters injected as a cell) |
| command string     | ``/bin/sh -c <command>`` (no args appended)        |
| command list       | the list as is, no shell (no args appended)       |

A command that starts its own launcher (``torchrun train.py``, ``accelerate launch ...``,
``deepspeed ...``) runs that launcher with the node arguments it misses
(``trainenv.launcher_commands``), whatever the distribution (``none`` or the same launcher;
another one is a ``ConfigError``). ``distribution: accelerate|deepspeed`` runs
``<python> -m accelerate.commands.launch`` / ``<python> -m deepspeed.launcher.runner`` with the
same node arguments before the entry point's program (``--module`` for a module or function,
``--no_python`` for anything not Python).

One process per node (``distribution: none``)
---------------------------------------------

The entry point's argv as is. On several nodes with known ranks the process-level names equal
the node-level ones: ``RANK`` = node rank, ``WORLD_SIZE`` = nodes, ``LOCAL_RANK=0``,
``LOCAL_WORLD_SIZE=1``.

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
setting is forced. Before launching, ``trainenv.nodes.prepare_nodes`` checks that ``<python>`` can import
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

"""

from __future__ import annotations

import os
import re
import sys

from trainenv.errors import ConfigError
from trainenv.frozen import FrozenDict, frozen
from trainenv.launcher_commands import MODULES, Extended, NodeFacts, extend_argv, extend_string, node_arguments, program_argv
from trainenv.layout import hostfile as hostfile_path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Collection, Mapping, Sequence

    from trainenv.environment import TrainingEnv
    from trainenv.settings import LaunchSettings

SHELL = "/bin/sh"
TORCHRUN = ("-m", "torch.distributed.run")
FUNCTION_RUNTIME = "trainenv.runtimes.function"
NOTEBOOK_RUNTIME = "trainenv.runtimes.notebook"
MPIRUN = "mpirun"
WAIT_FOR_MASTER = ("-m", "trainenv.nodes", "wait-for-master")  # what the other nodes of an MPI job run

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


@frozen
class EntryPoint:
    """What the job runs: its kind, the path, module or command, and where it was configured."""

    kind: str  # "script", "module", "function", "notebook", "shell", "executable", "command"
    target: str
    source: str
    given: str = ""  # the entry point as configured (``train.py``), for SageMaker's SM_USER_ENTRY_POINT
    argv: tuple[str, ...] = ()  # a command given as a list: run as is (``target`` is its JSON)


@frozen
class Launch:
    """What runs on this node, and what has to happen before (see the module docstring)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = FrozenDict()  # TRAINENV_* always set; others only when absent
    hostfile: str | None = None  # written by the runner before launching
    hostfile_text: str | None = None
    peers: tuple[tuple[str, int], ...] = ()  # (host, port) to wait for before launching
    launcher: str | None = None  # torchrun, accelerate or deepspeed: the launcher the argv starts (not for mpi)


def entry_argv(entry: EntryPoint, python: str, args: tuple[str, ...]) -> tuple[str, ...]:
    """The argv of one process of the job (see the table above)."""
    if entry.kind == "script":
        return (python, entry.target, *args)
    if entry.kind == "module":
        return (python, "-m", entry.target, *args)
    if entry.kind == "function":
        return (python, "-m", FUNCTION_RUNTIME, entry.target, *args)
    if entry.kind == "notebook":
        return (python, "-m", NOTEBOOK_RUNTIME, entry.target, *args)
    if entry.kind == "shell":
        return (SHELL, entry.target, *args)
    if entry.kind == "executable":
        return (entry.target, *args)
    if entry.argv:
        return entry.argv
    return (SHELL, "-c", entry.target)


def hub_port(port: int) -> int:
    """Where node 0's trainenv listens for the other nodes: the port after ``MASTER_PORT``."""
    return port + 1 if port < 65535 else port - 1


def endpoint(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def plan_launch(
    env: TrainingEnv,
    settings: LaunchSettings,
    entry: EntryPoint,
    python: str,
    args: tuple[str, ...],
    nproc: int,
    port: int,
    directory: str,
    environ: Mapping[str, str],
    exported: Collection[str],
) -> Launch:
    """The argv on this node, its extra environment, hostfile and peers.

    ``port`` is the resolved ``MASTER_PORT``, ``directory`` this launch's run dir and
    ``exported`` the names trainenv sets in the job's environment (for ``mpirun -x``).
    """
    facts = NodeFacts(
        env.num_nodes, env.node_rank, nproc, env.master_host, port, env.job_name, tuple(env.hosts), hostfile_path(directory),
        _platform(environ, "PET_NNODES"), _platform(environ, "PET_RDZV_ENDPOINT"),
    )
    if entry.kind == "command":
        extended = extend_argv(entry.argv, facts) if entry.argv else extend_string(entry.target, SHELL, facts)
        if extended is not None:
            return _plan_launcher_command(env, settings, extended, port)
    if settings.distribution in ("accelerate", "deepspeed"):
        return _plan_launcher(env, settings, entry, python, args, port, facts)
    if settings.distribution == "torchrun":
        return _plan_torchrun(env, settings, entry, python, args, nproc, port, environ)
    if settings.distribution == "mpi":
        return _plan_mpi(env, settings, entry, python, args, nproc, port, directory, environ, exported)
    extra: dict[str, str] = {}
    if env.num_nodes > 1 and env.node_rank is not None:
        extra = {"RANK": str(env.node_rank), "WORLD_SIZE": str(env.num_nodes), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    return Launch(argv=entry_argv(entry, python, args), env=extra)


def _peers(env: TrainingEnv, port: int) -> tuple[tuple[str, int], ...]:
    """Node 0's trainenv, for the other nodes of a job whose ranks are known (``trainenv.nodes``)."""
    if env.num_nodes > 1 and env.node_rank not in (None, 0):
        return ((env.master_host, hub_port(port)),)
    return ()


def _plan_launcher_command(env: TrainingEnv, settings: LaunchSettings, extended: Extended, port: int) -> Launch:
    """The user's own launcher command, with the node arguments it misses (``trainenv.launcher_commands``)."""
    if settings.distribution not in ("none", extended.launcher):
        raise ConfigError.at(
            _distribution_source(settings), None,
            f"{settings.distribution}: the command starts its own launcher ({extended.launcher}); "
            f"set the distribution to none or {extended.launcher}, or run the program without the launcher",
        )
    return Launch(
        argv=extended.argv, hostfile=extended.hostfile, hostfile_text=extended.hostfile_text,
        peers=_peers(env, port), launcher=extended.launcher,
    )


def _plan_launcher(
    env: TrainingEnv, settings: LaunchSettings, entry: EntryPoint, python: str, args: tuple[str, ...], port: int, facts: NodeFacts
) -> Launch:
    """``distribution: accelerate|deepspeed``: ``<python> -m <launcher module> <node args> <program>``."""
    launcher = settings.distribution
    added, text = node_arguments(launcher, {}, facts)
    program = program_argv(launcher, entry.kind, entry_argv(entry, python, args))
    return Launch(
        argv=(python, "-m", MODULES[launcher], *added, *program),
        hostfile=facts.hostfile if text is not None else None, hostfile_text=text,
        peers=_peers(env, port), launcher=launcher,
    )


def _hygiene(nproc: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}


def _explicit(settings: LaunchSettings, name: str) -> bool:
    return settings.sources.get(name, "default") != "default"


def _platform(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _rdzv_conf(environ: Mapping[str, str], **extra: str) -> str:
    """The platform's ``PET_RDZV_CONF`` (``k=v,...``) with ``extra`` keys it does not set."""
    items = [item.strip() for item in _platform(environ, "PET_RDZV_CONF").split(",") if item.strip()]
    keys = {item.split("=", 1)[0].strip() for item in items}
    items += [f"{key}={value}" for key, value in extra.items() if key not in keys]
    return ",".join(items)


def _torchrun_program(entry: EntryPoint, python: str, args: tuple[str, ...]) -> list[str]:
    """torchrun's program arguments for the same argv ``entry_argv`` gives."""
    argv = list(entry_argv(entry, python, args))
    if entry.kind == "script":
        return argv[1:]  # torchrun runs the script with its own interpreter
    if entry.kind in ("module", "function"):
        return ["--module", *argv[2:]]
    return ["--no-python", *argv]


def _plan_torchrun(
    env: TrainingEnv,
    settings: LaunchSettings,
    entry: EntryPoint,
    python: str,
    args: tuple[str, ...],
    nproc: int,
    port: int,
    environ: Mapping[str, str],
) -> Launch:
    restarts = settings.max_restarts
    if not _explicit(settings, "max_restarts") and _platform(environ, "PET_MAX_RESTARTS").isdigit():
        restarts = int(_platform(environ, "PET_MAX_RESTARTS"))
    argv = [python, *TORCHRUN]
    peers: tuple[tuple[str, int], ...] = ()
    if env.num_nodes <= 1:
        argv += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    elif env.node_rank is None:
        # Elastic (Kubeflow's worker-only jobs): the rendezvous assigns the node ranks.
        backend = _platform(environ, "PET_RDZV_BACKEND")
        argv += [
            "--nnodes", _platform(environ, "PET_NNODES") or str(env.num_nodes),
            "--nproc-per-node", str(nproc),
            "--rdzv-backend", backend if backend and backend != "static" else "c10d",
            "--rdzv-endpoint", _platform(environ, "PET_RDZV_ENDPOINT") or endpoint(env.master_host, port),
            "--rdzv-id", _platform(environ, "PET_RDZV_ID") or env.job_name,
        ]
    else:
        backend = settings.rdzv_backend
        if not _explicit(settings, "rdzv_backend") and _platform(environ, "PET_RDZV_BACKEND") in ("static", "c10d"):
            backend = _platform(environ, "PET_RDZV_BACKEND")
        argv += ["--nnodes", str(env.num_nodes), "--nproc-per-node", str(nproc)]
        if backend == "static":
            argv += ["--node-rank", str(env.node_rank), "--rdzv-backend", "static"]
            argv += ["--rdzv-endpoint", endpoint(env.master_host, port)]
        else:
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint(env.master_host, port)]
            argv += ["--rdzv-id", _platform(environ, "PET_RDZV_ID") or env.job_name]
            argv += ["--rdzv-conf", _rdzv_conf(environ, is_host="1" if env.node_rank == 0 else "0")]
        if env.node_rank != 0:
            peers = ((env.master_host, hub_port(port)),)
    argv += ["--max-restarts", str(restarts)]
    argv += _torchrun_program(entry, python, args)
    return Launch(argv=tuple(argv), env=_hygiene(nproc), peers=peers, launcher="torchrun")


def _mentions(options: Sequence[str], names: Sequence[str]) -> bool:
    """Whether mpirun options name one of ``names`` (as a flag, ``--flag=...``, or an MCA key)."""
    return any(o in names or o.split("=", 1)[0] in names for o in options)


def _mca_set(options: Sequence[str], environ: Mapping[str, str], key: str) -> bool:
    """Whether the MCA parameter ``key`` is already given: in the options or as ``OMPI_MCA_<key>``."""
    return _mentions(options, (key,)) or bool(_platform(environ, f"OMPI_MCA_{key}"))


def mpi_exported_names(names: Sequence[str]) -> list[str]:
    """The ``-x`` names for mpirun: every name of the job's environment but the excluded ones."""
    return sorted(
        n for n in set(names)
        if _NAME.match(n) and n not in NODE_NAMES and n not in SESSION_NAMES and not n.startswith(LAUNCHER_PREFIXES)
    )


def _distribution_source(settings: LaunchSettings) -> str:
    return settings.sources.get("distribution", "TRAINENV_DISTRIBUTION")


def _plan_mpi(
    env: TrainingEnv,
    settings: LaunchSettings,
    entry: EntryPoint,
    python: str,
    args: tuple[str, ...],
    nproc: int,
    port: int,
    directory: str,
    environ: Mapping[str, str],
    exported: Collection[str],
) -> Launch:
    import shutil

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
    hub = hub_port(port)
    if env.num_nodes > 1 and env.node_rank != 0:
        wait = (
            sys.executable, *WAIT_FOR_MASTER,
            env.master_host, str(hub), f"{settings.peer_timeout_seconds:g}",
            "--job", env.job_name, "--rank", str(env.node_rank), "--host", env.current_host,
            "--failure-file", env.failure_file,
        )
        return Launch(argv=wait, env={}, peers=((env.master_host, hub),))

    hosts = env.hosts if env.num_nodes > 1 else ("localhost",)
    hostfile = hostfile_path(directory)
    hostfile_text = "".join(f"{host} slots={nproc}\n" for host in hosts)
    options = list(settings.mpi_options)
    argv: list[str] = [mpirun]
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
    names = set(environ) | set(exported) | set(launch_env)
    for name in mpi_exported_names(list(names)):
        argv += ["-x", name]
    argv += options
    argv += entry_argv(entry, python, args)
    return Launch(argv=tuple(argv), env=launch_env, hostfile=hostfile, hostfile_text=hostfile_text)

