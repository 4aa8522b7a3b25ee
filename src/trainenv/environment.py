"""``TrainingEnv`` and ``ServingEnv``: the job container as one immutable snapshot.

``training_env()`` reads the config files (``trainenv.config``), discovers the cluster
(``trainenv.cluster``) and the hardware (``trainenv.resources``, probed once per process),
and returns a frozen ``TrainingEnv``. It is a read-only mapping: ``dict(env)`` and
``env["hosts"]`` work, and ``env.to_json()`` is what the launcher writes to
``TRAINENV_ENV_FILE``. Inside a job started by ``trainenv train`` that file is loaded
instead of probing again. Building a snapshot reads files and never writes anything.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping

    from trainenv.layout import JobTree
    from trainenv.serving.config import ServingEnv

from trainenv.errors import ConfigError
from trainenv.frozen import FrozenDict, SnapshotMapping, deep_freeze, frozen

ENV_FILE_VAR = "TRAINENV_ENV_FILE"
DEFAULT_JOB_NAME = "trainenv-job"


@frozen
class TrainingEnv(SnapshotMapping):
    """Everything a training job may need to know about its container, read once.

    Paths are absolute strings; lists are tuples and mappings are read-only.
    """

    base_dir: str
    local_mode: bool
    job_name: str
    hyperparameters: Mapping[str, Any]
    framework_parameters: Mapping[str, Any]
    user_args: tuple[str, ...]
    channels: tuple[str, ...]
    channel_dirs: Mapping[str, str]
    input_data_config: Mapping[str, Any]
    output_dirs: Mapping[str, str]
    code_dir: str
    input_dir: str
    config_dir: str
    data_dir: str
    output_dir: str
    model_dir: str
    checkpoint_dir: str
    tensorboard_dir: str
    failure_file: str
    hosts: tuple[str, ...]
    current_host: str
    master_host: str
    master_port: int | None
    node_rank: int | None  # None until an elastic rendezvous assigns it
    num_nodes: int
    is_master: bool
    network_interface: str | None
    cluster_source: str
    platform_nproc_per_node: int | None
    num_cpus: int
    memory_bytes: int
    num_gpus: int
    gpus: tuple[Mapping[str, Any], ...]
    resource_config: Mapping[str, Any] | None

    def to_cmd_args(self) -> list[str]:
        """``--name value`` per hyperparameter, in the file's order."""
        return list(self.user_args)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: object = "snapshot") -> TrainingEnv:
        """The inverse of ``to_dict()`` (used to load ``TRAINENV_ENV_FILE``)."""
        names = cls._field_names()
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError.at(source, None, f"snapshot is missing fields {missing[:5]}; was it written by another trainenv version?")
        return cls(**{name: _freeze(data[name]) for name in names})


def _freeze(value: Any) -> Any:
    """A field loaded from JSON: top-level lists become tuples, and every dict and list inside read-only."""
    if isinstance(value, list):
        return tuple(deep_freeze(v) for v in value)
    return deep_freeze(value)


_hardware: dict[tuple[str, str | None, str | None], tuple[int, int, tuple[Mapping[str, Any], ...]]] = {}


def probe_hardware(environ: Mapping[str, str], root: str = "/") -> tuple[int, int, tuple[Mapping[str, Any], ...]]:
    """``(cpus, memory bytes, gpus)``, probed once per process and root."""
    key = (root, environ.get("CUDA_VISIBLE_DEVICES"), environ.get("NVIDIA_VISIBLE_DEVICES"))
    if key not in _hardware:
        from trainenv import resources

        gpus = tuple(
            FrozenDict(
                {"index": g.index, "name": g.name, "uuid": g.uuid, "memory_bytes": g.memory_bytes}
            )
            for g in resources.gpus(environ)
        )
        _hardware[key] = (*resources.cpus_and_memory(root), gpus)
    return _hardware[key]


def _output_channels(layout: JobTree) -> list[str]:
    from trainenv.config import check_channel_name, is_dir_entry, is_ignored_dir

    from trainenv.layout import STANDARD_OUTPUT_CHANNELS

    names = list(STANDARD_OUTPUT_CHANNELS)
    try:
        entries = sorted(e.name for e in os.scandir(layout.output_dir) if is_dir_entry(e) and not is_ignored_dir(e.name))
    except OSError:
        entries = []
    for name in entries:
        if name not in names:
            names.append(check_channel_name(layout.output_dir, name))
    return names


def build_training_env(
    environ: Mapping[str, str] = os.environ,
    *,
    layout: JobTree | None = None,
    settings: Mapping[str, Any] | None = None,
    settings_source: str | None = None,
    root: str = "/",
    hostname: str | None = None,
) -> TrainingEnv:
    """Read the config files, discover the cluster and the hardware; never writes.

    ``settings`` is ``trainenv.yaml`` already read, and ``settings_source`` the file it came from.
    """
    from trainenv import config
    from trainenv.cluster import discover_cluster
    from trainenv.values import normalized_names, to_cmd_args

    from trainenv.layout import JobTree

    layout = layout or JobTree.resolve(environ)
    settings_path = settings_source
    if settings is None:
        settings, settings_path = config.read_file_settings(layout.settings_files)
    hyperparameters, framework_parameters = config.read_hyperparameters(layout.hyperparameters_file)
    input_data_config = config.read_input_data_config(layout.inputdataconfig_file)
    channels = list(input_data_config)
    channels += [c for c in config.list_channel_dirs(layout.data_dir) if c not in input_data_config]
    normalized_names(hyperparameters, "hyperparameter", layout.hyperparameters_file)
    normalized_names(channels, "channel", layout.data_dir)
    resource_config = config.read_resource_config(layout.resourceconfig_file)
    cluster = discover_cluster(
        environ,
        resource_config=resource_config,
        resource_config_source=layout.resourceconfig_file,
        settings=settings,
        settings_source=settings_path or layout.settings_files[0],
        hostname=hostname or os.uname().nodename,
    )
    cpus, memory, gpus = probe_hardware(environ, root)
    network_interface = cluster.network_interface
    if network_interface is None and cluster.source == "ADS" and cluster.hosts:  # nodes listed by address
        from trainenv.resources.network import interface_with_address

        network_interface = interface_with_address(cluster.current_host)
    output_channels = _output_channels(layout)
    job_name = (
        environ.get("TRAINENV_JOB_NAME")
        or environ.get("TRAINING_JOB_NAME")
        or framework_parameters.get("sagemaker_job_name")
        or DEFAULT_JOB_NAME
    )
    return TrainingEnv(
        base_dir=layout.base_dir,
        local_mode=layout.local_mode,
        job_name=str(job_name),
        hyperparameters=deep_freeze(hyperparameters),
        framework_parameters=deep_freeze(framework_parameters),
        user_args=tuple(to_cmd_args(hyperparameters)),
        channels=tuple(channels),
        channel_dirs=FrozenDict({c: layout.channel_dir(c) for c in channels}),
        input_data_config=deep_freeze(input_data_config),
        output_dirs=FrozenDict({c: layout.output_channel_dir(c) for c in output_channels}),
        code_dir=layout.code_dir,
        input_dir=layout.input_dir,
        config_dir=layout.config_dir,
        data_dir=layout.data_dir,
        output_dir=layout.output_dir,
        model_dir=layout.model_dir,
        checkpoint_dir=layout.checkpoint_dir,
        tensorboard_dir=layout.tensorboard_dir,
        failure_file=layout.failure_file,
        hosts=cluster.hosts,
        current_host=cluster.current_host,
        master_host=cluster.master_addr,
        master_port=cluster.master_port,
        node_rank=cluster.node_rank,
        num_nodes=cluster.num_nodes,
        is_master=cluster.is_master,
        network_interface=network_interface,
        cluster_source=cluster.source,
        platform_nproc_per_node=cluster.nproc_per_node,
        num_cpus=cpus,
        memory_bytes=memory,
        num_gpus=len(gpus),
        gpus=gpus,
        resource_config=deep_freeze(resource_config) if resource_config is not None else None,
    )


def load_training_env(path: str) -> TrainingEnv:
    """Load a snapshot the launcher wrote (``TRAINENV_ENV_FILE``)."""
    from trainenv.config import MAX_DEPTH, check_depth, decode_text, parse_json, read_bytes

    data = read_bytes(path, max_bytes=256 * 1024 * 1024)
    if data is None:
        raise ConfigError.at(ENV_FILE_VAR, None, f"{path!r} does not exist")
    value = parse_json(path, decode_text(path, data))
    if not isinstance(value, dict):
        raise ConfigError.at(path, None, "a snapshot file must hold a JSON object")
    check_depth(path, value, MAX_DEPTH + 2)  # hyperparameters nest at most MAX_DEPTH below the snapshot's top
    return TrainingEnv.from_dict(value, source=path)


def training_env(environ: Mapping[str, str] | None = None) -> TrainingEnv:
    """The job's snapshot: loaded from ``TRAINENV_ENV_FILE`` when the launcher wrote one."""
    environ = os.environ if environ is None else environ
    env_file = environ.get(ENV_FILE_VAR)
    if env_file and os.path.isfile(env_file):
        return load_training_env(env_file)
    return build_training_env(environ)


def serving_env(environ: Mapping[str, str] | None = None) -> ServingEnv:
    """The serving container's snapshot (``trainenv.serving.config``)."""
    from trainenv.serving.config import resolve_serving_env

    environ = os.environ if environ is None else environ
    cpus, _, gpus = probe_hardware(environ)
    from trainenv.layout import Layout

    return resolve_serving_env(environ, Layout.resolve(environ), cpus, len(gpus))


def __getattr__(name: str) -> Any:
    if name == "ServingEnv":
        from trainenv.serving.config import ServingEnv

        return ServingEnv
    raise AttributeError(name)


__all__ = ["TrainingEnv", "ServingEnv", "training_env", "serving_env", "build_training_env", "load_training_env"]
