"""``trainenv local --image``: the job's containers, planned from a laid-out local job dir.

The host job dir is laid out by ``job.py`` (a copy of the source dir, inputs linked,
``hyperparameters.json``); this module adds one dir per node under ``nodes/algo-<i>/`` (its
``resourceconfig.json``, and its ``output/`` for nodes after the first, whose output is the job
dir's ``output/``) and plans every engine command line. Each container sees the platform's
layout at ``/ml``:

- ``/ml/usercode``: the job dir's copy of the code (read-write, as on a platform);
- ``/ml/input/data/<channel>``: each input's real path, read-only (a file input: the file, at
  ``/ml/input/data/<channel>/<name>``, with ``PAI_INPUT_<CHANNEL>`` naming it);
- ``/ml/input/config``: the job dir's config dir, read-only, with the node's own
  ``resourceconfig.json`` (hosts ``algo-1..N``, ``current_host`` this node's);
- ``/ml/output``: the node's output dir, kept on the host afterwards.

Every ``trainenv train`` option given and every ``--env NAME=VALUE`` reaches the container as a
variable (a flag as its ``TRAINENV_*`` variable, which wins over an ``--env`` of the same
name); a secret-looking name, or a value holding a URL's credentials, is passed as ``-e NAME``
with its value in the engine's own environment, so the value is never on a command line. The
command is the image's ENTRYPOINT with ``train`` (as platforms run images), or
``trainenv train`` when the image has none; the job's own arguments follow ``--``.

Networks (``--network``): ``bridge`` (default) puts N > 1 nodes on a network of their own
(``trainenv-<run>``, hostnames ``algo-<i>`` resolved by the engine's DNS); a single node uses
the engine's default network. ``shared``: every node joins the network namespace of one holder
container (``trainenv-<run>-net``, the image's ``sleep infinity``, on the engine's default
network; started first, so a node that ends early takes no one's network with it) and
``algo-1..N`` all resolve to 127.0.0.1 through a hosts file mounted at ``/etc/hosts``: no bridge
needed, as on rootless or sandboxed hosts. ``loopback``: ``shared`` with the holder on no
network at all (``--network none``): the job reaches nothing beyond its own nodes. A single
node needs no holder: it has the namespace itself.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable, Mapping, Sequence

    from trainenv.layout import Layout
    from trainenv.local.engine import Engine

from trainenv.errors import ConfigError
from trainenv.frozen import frozen

NETWORKS = ("bridge", "shared", "loopback")
ML = "/ml"


@frozen
class ContainerPlan:
    """Every engine command line of one run, in order, and the engine's environment."""

    run_id: str
    network_mode: str
    network: str | None  # the user-defined network to create and remove (bridge, N > 1)
    names: tuple[str, ...]  # container names, node 1 first
    creates: tuple[tuple[str, ...], ...]  # one ``create`` argv per node
    secrets: tuple[tuple[str, str], ...]  # (name, value) passed through the engine's environment
    holder: tuple[str, ...] = ()  # the ``create`` argv of the shared modes' network holder, if any

    @property
    def holder_name(self) -> str | None:
        return f"trainenv-{self.run_id}-net" if self.holder else None

    def lines(self, engine: Engine) -> list[list[str]]:
        """The command lines a run executes, for ``--dry-run``."""
        from trainenv.local.engine import network_create_argv, start_argv

        lines = [network_create_argv(engine, self.network, self.run_id)] if self.network else []
        lines += [list(self.holder)] if self.holder else []
        lines += [list(argv) for argv in self.creates]
        lines += [engine.argv("start", self.holder_name)] if self.holder_name else []
        return lines + [start_argv(engine, name) for name in self.names]


def check_options(nodes: str | None, network: str | None, gpus: str | None) -> dict[str, Any]:
    """``--nodes``, ``--network`` and ``--gpus`` checked; a bad one is a ``ConfigError`` naming it."""
    from trainenv.local.engine import check_gpus

    count = 1 if nodes is None else (int(nodes) if nodes.isdigit() else 0)
    if not 1 <= count <= 64:
        raise ConfigError.at("--nodes", None, f"{nodes!r}: expected a number from 1 to 64")
    if network is not None and network not in NETWORKS:
        raise ConfigError.at("--network", None, f"{network!r}: expected one of {', '.join(NETWORKS)}")
    return {"nodes": count, "network": network or "bridge", "gpus": check_gpus(gpus)}


def node_name(index: int) -> str:
    """The host name of node ``index`` (0-based): ``algo-1``, ``algo-2``, ... as SageMaker's."""
    return f"algo-{index + 1}"


def container_variables(flags: Mapping[str, Any], env_pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The variables every container gets: ``--env`` pairs, then each given option as its variable."""
    from trainenv.settings import SETTINGS

    variables = {name: value for name, value in env_pairs}
    for setting in SETTINGS:
        value = flags.get(setting.name)
        if not setting.flag or value is None:
            continue
        variables[setting.variable] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return variables


def lay_out_nodes(layout: Layout, nodes: int, network_mode: str = "bridge") -> None:
    """Write each node's ``resourceconfig.json`` and make its output dir.

    The interface it names is the one the nodes reach each other on: ``eth0`` on a bridge,
    ``lo`` in the shared modes (one loopback, where ``algo-1..N`` resolve to 127.0.0.1; the
    loopback mode has no other interface). Launchers pass it on (``GLOO_SOCKET_IFNAME``, ...).
    """
    from trainenv.files import write_atomic

    hosts = [node_name(index) for index in range(nodes)]
    interface = "eth0" if network_mode == "bridge" else "lo"
    try:
        for index, host in enumerate(hosts):
            node_dir = layout.base_dir / "nodes" / host
            (node_dir / "output").mkdir(parents=True, exist_ok=True)
            config = {"current_host": host, "hosts": hosts, "network_interface_name": interface}
            write_atomic(node_dir / "resourceconfig.json", json.dumps(config, indent=2) + "\n")
        layout.output_dir.mkdir(parents=True, exist_ok=True)
        # Node 1's, in the config dir itself: each node's own is mounted over it (a mount point
        # inside a read-only mount must exist already).
        write_atomic(layout.config_dir / "resourceconfig.json", json.dumps(
            {"current_host": hosts[0], "hosts": hosts, "network_interface_name": interface}, indent=2) + "\n")
        write_atomic(layout.base_dir / "nodes" / "hosts",
                     "".join(f"127.0.0.1\t{name}\n" for name in ["localhost", *hosts]))
    except OSError as exc:
        raise ConfigError(f"cannot lay out the nodes in {exc.filename or layout.base_dir}: {exc.strerror or exc}") from None


def input_mounts(layout: Layout) -> tuple[list[str], dict[str, str]]:
    """``-v`` flags mounting each input's real path read-only, and ``PAI_INPUT_<CH>`` for file inputs."""
    from trainenv.local.job import file_input_variables

    flags: list[str] = []
    data_dir = layout.data_dir
    for channel in sorted(os.listdir(data_dir)):
        channel_dir = data_dir / channel
        inside = f"{ML}/input/data/{channel}"
        if channel_dir.is_symlink():
            flags += ["-v", f"{os.path.realpath(channel_dir)}:{inside}:ro"]
        else:
            for entry in sorted(channel_dir.iterdir()):
                flags += ["-v", f"{os.path.realpath(entry)}:{inside}/{entry.name}:ro"]
    variables = {name: f"{ML}/input/data/{os.path.relpath(path, data_dir)}"
                 for name, path in file_input_variables(layout).items()}
    return flags, variables


def source_mount(variables: dict[str, str]) -> list[str]:
    """A ``TRAINENV_SOURCE`` that is a local path: mounted read-only, the variable pointing at it."""
    source = variables.get("TRAINENV_SOURCE")
    if not source or "://" in source or source.startswith("git@") or not os.path.exists(source):
        return []
    inside = f"{ML}/source/{os.path.basename(os.path.abspath(source).rstrip('/'))}"
    variables["TRAINENV_SOURCE"] = inside
    return ["-v", f"{os.path.abspath(source)}:{inside}:ro"]


def plan_containers(
    engine: Engine,
    layout: Layout,
    image: str,
    has_entrypoint: bool,
    variables: Mapping[str, str],
    job_args: Sequence[str],
    nodes: int = 1,
    network_mode: str = "bridge",
    gpus: str | None = None,
    run_id: str = "",
) -> ContainerPlan:
    """Every ``create`` command line of the run (pure: reads the laid-out job dir only)."""
    from trainenv.local.engine import LABEL, gpu_flags
    from trainenv.redact import is_secret_name, redact_urls

    names = tuple(f"trainenv-{run_id}-{node_name(index)}" for index in range(nodes))
    network = f"trainenv-{run_id}" if network_mode == "bridge" and nodes > 1 else None
    values = dict(variables)
    mounts = source_mount(values)
    inputs, file_variables = input_mounts(layout)
    values.update(file_variables)
    env_flags: list[str] = []
    secrets = []
    for name, value in values.items():
        if is_secret_name(name) or redact_urls(value) != value:  # a secret, or a URL with credentials
            env_flags += ["-e", name]
            secrets.append((name, value))
        else:
            env_flags += ["-e", f"{name}={value}"]
    command = ["train"] if has_entrypoint else ["trainenv", "train"]
    if job_args:
        command += ["--", *job_args]
    label = f"{LABEL}={run_id}"
    hosts_file = ["-v", f"{layout.base_dir / 'nodes' / 'hosts'}:/etc/hosts:ro"]
    own_network = ["--network", "none"] if network_mode == "loopback" else []
    holder: tuple[str, ...] = ()
    if network_mode != "bridge" and nodes > 1:
        holder = tuple(engine.argv("create", "--name", f"trainenv-{run_id}-net", "--label", label, *own_network,
                                   *engine.run_flags, *hosts_file, "--stop-signal", "KILL", "--entrypoint", "sleep", image, "infinity"))
    creates = []
    for index, host in enumerate(node_name(index) for index in range(nodes)):
        node_dir = layout.base_dir / "nodes" / host
        output = layout.output_dir if index == 0 else node_dir / "output"
        if network is not None:
            net = ["--network", network, "--network-alias", host]
        elif network_mode == "bridge":
            net = []
        elif holder:
            net = ["--network", f"container:trainenv-{run_id}-net", *hosts_file]
        else:
            net = [*own_network, *hosts_file]
        argv = engine.argv(
            "create", "--rm", "--name", names[index], "--label", label, "--hostname", host,
            *net, *engine.run_flags, *gpu_flags(engine.kind, gpus, index),
            "-v", f"{layout.code_dir}:{ML}/usercode",
            *inputs, *mounts,
            "-v", f"{layout.config_dir}:{ML}/input/config:ro",
            "-v", f"{node_dir / 'resourceconfig.json'}:{ML}/input/config/resourceconfig.json:ro",
            "-v", f"{output}:{ML}/output",
            *env_flags, image, *command,
        )
        creates.append(tuple(argv))
    return ContainerPlan(run_id, network_mode, network, names, tuple(creates), tuple(secrets), holder)
