"""Who the nodes are: the job's cluster, read from whatever the platform provides.

::

    cluster = discover_cluster(os.environ, resource_config=rc, resource_config_source=path,
                               settings=yaml_settings, hostname=socket.gethostname())
    cluster.hosts, cluster.current_host, cluster.node_rank, cluster.num_nodes, cluster.master_addr

``discover_cluster`` is pure: it reads the mappings it is given and nothing else, and never
writes to any of them (a platform value is never overwritten). A *node* is one container
(a pod, an instance); the processes inside a node are the launcher's business.

Sources, first match wins
-------------------------

=================  ==========================================  ===========================  ====================
``source``         matches when                                ``hosts``                    ``node_rank``
=================  ==========================================  ===========================  ====================
``trainenv``       ``TRAINENV_HOSTS`` (JSON list), else        that list                    index of the current
                   ``hosts`` in the settings (trainenv.yaml)                                host in it
``resourceconfig`` ``resource_config`` is given (SageMaker)    ``hosts``                    index of
                                                                                            ``current_host``
``TF_CONFIG``      ``TF_CONFIG`` names a cluster               chief, master, worker        position of the task
``CLUSTER_SPEC``   ``CLUSTER_SPEC`` (Vertex AI)                workerpool0, workerpool1     position of the task
``PET``            ``PET_NNODES`` or ``PET_NODE_RANK``         ``()``                       ``PET_NODE_RANK``
                   (Kubeflow, torchrun's env twins)
``MASTER_ADDR``    ``MASTER_ADDR``, ``RANK`` and               ``()``                       ``RANK`` (node-level)
                   ``WORLD_SIZE`` all set (PAI DLC, KF v1)
``ADS``            ADS's markers and ``NODE_COUNT`` (or        ``()``                       ``NODE_RANK``
                   ``OCI__WORKER_COUNT``, ``NODE_RANK``)
``single``         nothing above                               ``(hostname,)``              0
=================  ==========================================  ===========================  ====================

``master_addr`` is ``hosts[0]`` when there is a host list, else the platform's master address.
``current_host`` is the host the source names for this node, else ``hostname``. An empty or
blank variable counts as unset everywhere.

Host names: an entry ``host:port`` (or ``[v6addr]:port``) keeps only the host; a bare IPv6
address is kept as is. A host name is a non-empty string without whitespace.

Rules worth knowing
-------------------

* **trainenv.** ``TRAINENV_HOSTS`` beats ``hosts`` in the settings, ``TRAINENV_CURRENT_HOST``
  beats ``current_host`` in the settings, and both beat ``hostname``. ``TRAINENV_HOSTS=[]`` is
  what trainenv itself exports when the platform names no hosts (the rank-only sources), so
  an empty list *there* means "no list" and discovery moves on; an empty ``hosts`` in the
  settings is an error.
* **resourceconfig.** SageMaker's ``resourceconfig.json``: ``current_host``, ``hosts`` and
  ``network_interface_name``. ``instance_groups`` and ``current_group_name`` are tolerated;
  when ``hosts`` is missing, the hosts of every instance group, in order, are the node list.
* **TF_CONFIG.** The nodes are the ``chief``, ``master`` and ``worker`` lists, in that order;
  ``task.index`` counts within its type, so worker 1 after one chief is node 2. ``ps`` and
  ``evaluator`` tasks are not training nodes and never shift a training node's rank: such a
  task sees a one-node cluster of its own (``hosts=(its host,)``, rank 0), and its TF code
  keeps reading the untouched ``TF_CONFIG``. An ``evaluator`` task absent from ``cluster``
  (TF keeps evaluators out of it), a ``cluster`` that is missing or ``{}``, and Kubeflow's
  sparse form for dynamic workers (``sparseCluster``, or a job given as an ``{index: address}``
  map) name only the task itself, not the nodes: discovery moves on to the next source. The
  ports in ``TF_CONFIG`` are TensorFlow's gRPC ports (2222 by default), not torch's
  rendezvous port, so they never become ``master_port``. Tasks may share a host (TF's
  local multi-worker form, ``localhost:2222``/``localhost:2223``): then no host name tells
  the nodes apart, so ``hosts`` is ``()`` and only the ranks are known, as for the
  rank-only sources (a host list, when there is one, never repeats a name). The same entry
  twice is an error.
* **CLUSTER_SPEC.** Vertex's pools: ``workerpool0`` is the chief (node 0), ``workerpool1``
  the workers; ``workerpool2`` (parameter or Reduction servers) and ``workerpool3``
  (evaluators) are support tasks, treated like TF's ``ps``/``evaluator``. Keeping them out of
  ``num_nodes`` is what lets a PyTorch job with a Reduction Server pool rendezvous.
* **PET.** ``PET_NNODES`` is ``N`` or ``MIN:MAX`` (elastic); ``num_nodes`` is ``N``, or
  ``MAX``, the most nodes the job may reach. ``node_rank`` is ``PET_NODE_RANK``. Without it,
  when the size is elastic or ``PET_RDZV_BACKEND`` is not static (Kubeflow's worker-only
  elastic jobs), the rendezvous assigns ranks at run time and ``node_rank`` is ``None``:
  the only case that leaves it unknown (a static rendezvous of several nodes without it is
  an error). ``master_addr`` is ``PET_MASTER_ADDR``, else the host of
  ``PET_RDZV_ENDPOINT``, else ``MASTER_ADDR``, else (one node) ``hostname``.
* **MASTER_ADDR + RANK + WORLD_SIZE** are node-level on PAI DLC and Kubeflow v1, with two
  exceptions. Inside a torchrun worker (``GROUP_RANK`` and ``GROUP_WORLD_SIZE`` set) they are
  process-level, so the node values come from ``GROUP_RANK``/``GROUP_WORLD_SIZE`` and
  ``LOCAL_WORLD_SIZE``. Kubeflow v1 with an integer ``nprocPerNode`` *n* > 1 sets
  ``WORLD_SIZE`` = pods × *n* but ``RANK`` = pod index; its marker is ``PET_NPROC_PER_NODE``,
  so when that is an integer *n* > 1 dividing ``WORLD_SIZE``, the node count is
  ``WORLD_SIZE / n`` (Kubeflow also sets ``PET_NNODES``/``PET_NODE_RANK``, so this only
  matters when those were removed). PAI's ``NPROC_PER_NODE`` never scales ``WORLD_SIZE``
  (PAI documents ``WORLD_SIZE`` as the number of nodes).
* **master_port** is the torch rendezvous port the environment already names: for the PET
  source ``PET_MASTER_PORT`` then ``MASTER_PORT``, for every other source ``MASTER_PORT``
  then ``PET_MASTER_PORT``; else ``None`` (the launcher picks its default).
* **nproc_per_node** is ``PET_NPROC_PER_NODE`` then ``NPROC_PER_NODE`` (the first that is
  set; ``LOCAL_WORLD_SIZE`` inside a torchrun worker); torchrun's keywords ``auto``, ``gpu``,
  ``cpu``, ``xpu`` mean "not said": ``None``.
* **ADS** (OCI Data Science, only with its markers: ``cluster_values.is_ads``): the node count
  is ``INITIAL_CLUSTER_SIZE``, else ``NODE_COUNT``, else ``OCI__WORKER_COUNT`` + 1; the master
  is ``MASTER_ADDR``, else rank 0 of the node list ``CLUSTER_NODES_METADATA_FILE`` names (its
  addresses by rank are the hosts), else (one node) ``hostname``.
* **network_interface** comes only from resourceconfig's ``network_interface_name``.

Errors
------

The values inside a source (host names, ranks, ports, JSON variables) are parsed by
``trainenv.cluster_values``. Bad input raises :class:`~trainenv.errors.ConfigError` with one
line naming the source (a variable, a file), the key and the value: unparsable JSON, a wrong
shape, a non-string or
blank host, an empty or duplicated host list, a current host not in the list, an unknown
task type, an index out of range, a non-integer or negative rank, ``RANK >= WORLD_SIZE``, a
port outside 1-65535. Malformed input never surfaces as any other exception.
"""

from __future__ import annotations

from collections.abc import Mapping

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Sequence

from trainenv.cluster_values import (
    ads_node_addresses,
    ads_nodes,
    check_sparse,
    host_list,
    host_name,
    host_of_entry,
    instance_group_hosts,
    is_host_name,
    load_json,
    nnodes,
    no_duplicates,
    non_negative_int,
    platform_master_port,
    platform_nproc_per_node,
    read_var,
    show,
)
from trainenv.errors import ConfigError
from trainenv.frozen import SnapshotMapping, frozen

__all__ = ["Cluster", "discover_cluster", "SOURCES"]

SOURCES = ("trainenv", "resourceconfig", "TF_CONFIG", "CLUSTER_SPEC", "PET", "MASTER_ADDR", "ADS", "single")

_TF_TRAINING = ("chief", "master", "worker")
_TF_SUPPORT = ("ps", "evaluator")
_VERTEX_TRAINING = ("workerpool0", "workerpool1")
_VERTEX_SUPPORT = ("workerpool2", "workerpool3")
_STATIC_RDZV = ("", "static")


@frozen
class Cluster(SnapshotMapping):
    """The nodes of the job and this node's place among them (a read-only mapping)."""

    hosts: tuple[str, ...]
    current_host: str
    node_rank: int | None
    num_nodes: int
    master_addr: str
    master_port: int | None
    network_interface: str | None
    nproc_per_node: int | None
    source: str

    def __post_init__(self) -> None:
        problems = []
        if self.source not in SOURCES:
            problems.append(f"source {self.source!r} is not one of {SOURCES}")
        if self.num_nodes < 1:
            problems.append(f"num_nodes {self.num_nodes} < 1")
        rank_ok = self.node_rank is None or 0 <= self.node_rank < self.num_nodes
        if not rank_ok:
            problems.append(f"node_rank {self.node_rank} not in [0, {self.num_nodes})")
        if self.hosts:
            if len(self.hosts) != self.num_nodes:
                problems.append(f"{len(self.hosts)} hosts for {self.num_nodes} nodes")
            elif not rank_ok or self.node_rank is None or self.hosts[self.node_rank] != self.current_host:
                problems.append(f"current_host {self.current_host!r} is not hosts[node_rank]")
            if len(set(self.hosts)) != len(self.hosts):
                problems.append("a host is listed twice")
            if self.master_addr != self.hosts[0]:
                problems.append(f"master_addr {self.master_addr!r} is not hosts[0]")
        if problems:
            raise ValueError("invalid Cluster: " + "; ".join(problems))

    @property
    def is_master(self) -> bool:
        """True on node 0 (the node that runs ``mpirun`` and hosts the rendezvous)."""
        return self.node_rank == 0


def discover_cluster(
    environ: Mapping[str, str],
    *,
    resource_config: Mapping[str, Any] | None,
    resource_config_source: str,
    settings: Mapping[str, Any] | None,
    hostname: str,
    settings_source: str = "trainenv.yaml",
) -> Cluster:
    """The cluster from the first source that names one (see the module docstring).

    ``resource_config`` is the parsed ``resourceconfig.json`` (``None`` when absent) and
    ``resource_config_source`` its path, used in error messages; likewise ``settings`` (the
    launch settings from ``trainenv.yaml``) and ``settings_source``. ``hostname`` is this
    machine's host name (``socket.gethostname()``).
    """
    if not isinstance(hostname, str) or not is_host_name(hostname):
        raise ConfigError.at("hostname", None, f"{show(hostname)} is not a usable host name")
    readers: Sequence[Callable[[], Cluster | None]] = (
        lambda: _from_trainenv(environ, settings, settings_source, hostname),
        lambda: _from_resource_config(environ, resource_config, resource_config_source),
        lambda: _from_task_cluster(environ, "TF_CONFIG", _TF_TRAINING, _TF_SUPPORT),
        lambda: _from_task_cluster(environ, "CLUSTER_SPEC", _VERTEX_TRAINING, _VERTEX_SUPPORT),
        lambda: _from_pet(environ, hostname),
        lambda: _from_master_addr(environ, hostname),
        lambda: _from_ads(environ, hostname),
    )
    for read in readers:
        cluster = read()
        if cluster is not None:
            return cluster
    return Cluster(
        hosts=(hostname,),
        current_host=hostname,
        node_rank=0,
        num_nodes=1,
        master_addr=hostname,
        master_port=platform_master_port(environ, ("MASTER_PORT", "PET_MASTER_PORT")),
        network_interface=None,
        nproc_per_node=platform_nproc_per_node(environ),
        source="single",
    )


# -- sources ---------------------------------------------------------------------------------


def _from_trainenv(
    environ: Mapping[str, str],
    settings: Mapping[str, Any] | None,
    settings_source: str,
    hostname: str,
) -> Cluster | None:
    settings = {} if settings is None else settings
    if not isinstance(settings, Mapping):
        raise ConfigError.at(settings_source, None, f"{show(settings)} is not a mapping of settings")
    hosts: tuple[str, ...] | None = None
    hosts_from = ""
    raw = read_var(environ, "TRAINENV_HOSTS")
    if raw is not None:
        value = load_json(raw, "TRAINENV_HOSTS")
        if not isinstance(value, list):
            raise ConfigError.at(
                "TRAINENV_HOSTS", None, f"{show(raw)} is not a JSON list of host names"
            )
        if value:
            hosts = host_list(value, "TRAINENV_HOSTS", None)
            hosts_from = "TRAINENV_HOSTS"
    if hosts is None and settings.get("hosts") is not None:
        hosts = host_list(settings["hosts"], settings_source, "hosts")
        hosts_from = f"{settings_source}: hosts"
    if hosts is None:
        return None
    no_duplicates(hosts, hosts_from, None)

    current = read_var(environ, "TRAINENV_CURRENT_HOST")
    where: tuple[str, str | None] = ("TRAINENV_CURRENT_HOST", None)
    if current is None and settings.get("current_host") is not None:
        current = settings["current_host"]
        where = (settings_source, "current_host")
    if current is None:
        current = hostname
        where = ("hostname", None)
    current = host_name(current, *where)
    if current not in hosts:
        hint = "; set TRAINENV_CURRENT_HOST" if where[0] == "hostname" else ""
        raise ConfigError.at(
            where[0], where[1], f"{show(current)} is not in {hosts_from} {show(list(hosts))}{hint}"
        )
    return _listed_cluster(environ, hosts, current, None, "trainenv")


def _from_resource_config(
    environ: Mapping[str, str], config: Mapping[str, Any] | None, source: str
) -> Cluster | None:
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ConfigError.at(source, None, f"{show(config)} is not a JSON object")
    if "hosts" in config:
        hosts = host_list(config["hosts"], source, "hosts")
    elif config.get("instance_groups") is not None:
        hosts = instance_group_hosts(config["instance_groups"], source)
    else:
        raise ConfigError.at(source, "hosts", "missing (and no instance_groups to take it from)")
    no_duplicates(hosts, source, "hosts")
    if config.get("current_host") is None:
        raise ConfigError.at(source, "current_host", "missing")
    current = host_name(config["current_host"], source, "current_host")
    if current not in hosts:
        raise ConfigError.at(
            source, "current_host", f"{show(current)} is not in hosts {show(list(hosts))}"
        )
    nic = config.get("network_interface_name")
    if nic is not None and not (isinstance(nic, str) and is_host_name(nic)):
        raise ConfigError.at(
            source, "network_interface_name", f"{show(nic)} is not an interface name"
        )
    return _listed_cluster(environ, hosts, current, nic, "resourceconfig")


def _listed_cluster(
    environ: Mapping[str, str], hosts: tuple[str, ...], current: str, nic: str | None, source: str
) -> Cluster:
    """A cluster from an explicit host list: node 0 is the first host."""
    return Cluster(
        hosts=hosts,
        current_host=current,
        node_rank=hosts.index(current),
        num_nodes=len(hosts),
        master_addr=hosts[0],
        master_port=platform_master_port(environ, ("MASTER_PORT", "PET_MASTER_PORT")),
        network_interface=nic,
        nproc_per_node=platform_nproc_per_node(environ),
        source=source,
    )


def _from_task_cluster(
    environ: Mapping[str, str],
    name: str,
    training: tuple[str, ...],
    support: tuple[str, ...],
) -> Cluster | None:
    """TF_CONFIG and Vertex's CLUSTER_SPEC: ``{"cluster": {type: [addr]}, "task": {type, index}}``."""
    raw = read_var(environ, name)
    if raw is None:
        return None
    config = load_json(raw, name)
    if not isinstance(config, dict):
        raise ConfigError.at(name, None, f"{show(raw)} is not a JSON object")
    cluster = config.get("cluster")
    if cluster is None or cluster == {}:
        if config.get("sparseCluster") is not None:
            check_sparse(config["sparseCluster"], name, "sparseCluster")
            _task(config, name, training + support)
        return None  # names no cluster: TF reads it the same way (local)
    if not isinstance(cluster, dict):
        raise ConfigError.at(name, "cluster", f"{show(cluster)} is not a JSON object")
    task_type, index = _task(config, name, training + support)

    lists: dict[str, list[str]] = {}
    sparse = False
    for job in training + support:
        if job not in cluster:
            continue
        entries = cluster[job]
        if isinstance(entries, dict):
            check_sparse({job: entries}, name, "cluster")
            sparse = True
            continue
        if not isinstance(entries, list):
            raise ConfigError.at(
                name, f"cluster.{job}", f"{show(entries)} is not a list of host:port entries"
            )
        for i, entry in enumerate(entries):
            host_of_entry(entry, name, f"cluster.{job}[{i}]")
        lists[job] = entries
    if sparse:
        return None  # Kubeflow's sparse form for dynamic workers: names only this task

    if training[0] == "workerpool0" and "workerpool0" not in lists:
        raise ConfigError.at(name, "cluster.workerpool0", "missing (the chief's pool)")
    if task_type not in lists:
        if task_type == "evaluator":
            return None  # TF keeps evaluators out of the cluster: no place among the nodes
        raise ConfigError.at(
            name, "task.type", f"{show(task_type)} has no list in cluster {show(sorted(cluster))}"
        )
    if index >= len(lists[task_type]):
        raise ConfigError.at(
            name,
            "task.index",
            f"{index} is out of range: cluster.{task_type} has {len(lists[task_type])} entries",
        )
    all_entries = [entry for job in training + support for entry in lists.get(job, [])]
    no_duplicates(all_entries, name, "cluster")

    own_host = host_of_entry(lists[task_type][index], name, f"cluster.{task_type}[{index}]")
    if task_type in support:
        nodes: tuple[str, ...] = (own_host,)
        rank = 0
    else:
        nodes = tuple(
            host_of_entry(entry, name, "cluster") for job in training for entry in lists.get(job, [])
        )
        rank = sum(len(lists.get(job, [])) for job in training[: training.index(task_type)]) + index
    # Nodes sharing a host cannot be told apart by host name: no host list then, ranks only.
    hosts = nodes if len(set(nodes)) == len(nodes) else ()
    return Cluster(
        hosts=hosts,
        current_host=own_host,
        node_rank=rank,
        num_nodes=len(nodes),
        master_addr=nodes[0],
        master_port=platform_master_port(environ, ("MASTER_PORT", "PET_MASTER_PORT")),
        network_interface=None,
        nproc_per_node=platform_nproc_per_node(environ),
        source=name,
    )


def _task(config: Mapping[str, Any], name: str, known: tuple[str, ...]) -> tuple[str, int]:
    task = config.get("task")
    if not isinstance(task, dict):
        raise ConfigError.at(name, "task", f"{show(task)} is not a JSON object with type and index")
    task_type = task.get("type")
    if not isinstance(task_type, str) or task_type not in known:
        raise ConfigError.at(
            name, "task.type", f"{show(task_type)} is not a known task type {show(list(known))}"
        )
    index = task.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError.at(name, "task.index", f"{show(index)} is not a non-negative integer")
    return task_type, index


def _from_pet(environ: Mapping[str, str], hostname: str) -> Cluster | None:
    nnodes_raw = read_var(environ, "PET_NNODES")
    rank_raw = read_var(environ, "PET_NODE_RANK")
    if nnodes_raw is None and rank_raw is None:
        return None
    if nnodes_raw is None:
        raise ConfigError.at("PET_NNODES", None, "is not set, but PET_NODE_RANK is")
    low, num_nodes = nnodes(nnodes_raw)
    backend = (read_var(environ, "PET_RDZV_BACKEND") or "").lower()
    rank: int | None
    if rank_raw is not None:
        rank = non_negative_int(rank_raw, "PET_NODE_RANK")
        if rank >= num_nodes:
            raise ConfigError.at(
                "PET_NODE_RANK", None, f"{rank} is not below PET_NNODES={nnodes_raw}"
            )
    elif num_nodes == 1:
        rank = 0
    elif low != num_nodes or backend not in _STATIC_RDZV:
        rank = None  # elastic / dynamic rendezvous: ranks are assigned at run time
    else:
        raise ConfigError.at(
            "PET_NODE_RANK", None, f"is not set; PET_NNODES={nnodes_raw} with a static rendezvous needs it"
        )

    master = read_var(environ, "PET_MASTER_ADDR")
    if master is not None:
        master = host_name(master, "PET_MASTER_ADDR", None)
    elif read_var(environ, "PET_RDZV_ENDPOINT") is not None:
        master = host_of_entry(environ["PET_RDZV_ENDPOINT"].strip(), "PET_RDZV_ENDPOINT", None)
    elif read_var(environ, "MASTER_ADDR") is not None:
        master = host_name(environ["MASTER_ADDR"].strip(), "MASTER_ADDR", None)
    elif num_nodes == 1:
        master = hostname
    else:
        raise ConfigError.at(
            "PET_MASTER_ADDR", None, f"is not set (nor PET_RDZV_ENDPOINT, MASTER_ADDR) for {num_nodes} nodes"
        )
    return Cluster(
        hosts=(),
        current_host=hostname,
        node_rank=rank,
        num_nodes=num_nodes,
        master_addr=master,
        master_port=platform_master_port(environ, ("PET_MASTER_PORT", "MASTER_PORT")),
        network_interface=None,
        nproc_per_node=platform_nproc_per_node(environ),
        source="PET",
    )


def _from_master_addr(environ: Mapping[str, str], hostname: str) -> Cluster | None:
    addr, rank_raw, size_raw = (read_var(environ, k) for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE"))
    if addr is None or rank_raw is None or size_raw is None:
        return None
    master = host_name(addr, "MASTER_ADDR", None)
    world = non_negative_int(size_raw, "WORLD_SIZE")
    if world < 1:
        raise ConfigError.at("WORLD_SIZE", None, f"{world} is not a positive integer")
    rank = non_negative_int(rank_raw, "RANK")
    if rank >= world:
        raise ConfigError.at("RANK", None, f"{rank} is not below WORLD_SIZE={world}")
    nproc = platform_nproc_per_node(environ)

    group_rank, group_size = read_var(environ, "GROUP_RANK"), read_var(environ, "GROUP_WORLD_SIZE")
    if group_rank is not None and group_size is not None:
        # Inside a torchrun worker: RANK/WORLD_SIZE count processes, GROUP_* count nodes.
        num_nodes = non_negative_int(group_size, "GROUP_WORLD_SIZE")
        node_rank = non_negative_int(group_rank, "GROUP_RANK")
        if not 0 <= node_rank < num_nodes:
            raise ConfigError.at(
                "GROUP_RANK", None, f"{node_rank} is not below GROUP_WORLD_SIZE={num_nodes}"
            )
        local = read_var(environ, "LOCAL_WORLD_SIZE")
        if local is not None:
            nproc = non_negative_int(local, "LOCAL_WORLD_SIZE") or None
    else:
        num_nodes, node_rank = world, rank
        kubeflow_nproc = platform_nproc_per_node(environ, ("PET_NPROC_PER_NODE",))
        if kubeflow_nproc is not None and kubeflow_nproc > 1 and world % kubeflow_nproc == 0:
            # Kubeflow v1: WORLD_SIZE = pods x nprocPerNode, RANK = pod index.
            num_nodes = world // kubeflow_nproc
            if rank >= num_nodes:
                raise ConfigError.at(
                    "RANK",
                    None,
                    f"{rank} is not below WORLD_SIZE/PET_NPROC_PER_NODE = {world}/{kubeflow_nproc}",
                )
    return Cluster(
        hosts=(),
        current_host=hostname,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master,
        master_port=platform_master_port(environ, ("MASTER_PORT", "PET_MASTER_PORT")),
        network_interface=None,
        nproc_per_node=nproc,
        source="MASTER_ADDR",
    )


def _from_ads(environ: Mapping[str, str], hostname: str) -> Cluster | None:
    nodes = ads_nodes(environ)
    if nodes is None:
        return None
    num_nodes, rank = nodes
    master = read_var(environ, "MASTER_ADDR")
    listed = ads_node_addresses(environ, num_nodes) if master is None and num_nodes > 1 else None
    if listed is not None:
        master, hostname = listed[0], listed[rank]
    elif master is None and num_nodes > 1:
        raise ConfigError.at("NODE_COUNT", None, f"{num_nodes} nodes but no master address: set MASTER_ADDR (node 0's address) or TRAINENV_HOSTS")
    return Cluster(
        hosts=listed or (), current_host=hostname, node_rank=rank, num_nodes=num_nodes,
        master_addr=hostname if master is None else host_name(master, "MASTER_ADDR", None),
        master_port=platform_master_port(environ, ("MASTER_PORT", "PET_MASTER_PORT")), network_interface=None,
        nproc_per_node=platform_nproc_per_node(environ), source="ADS",
    )
