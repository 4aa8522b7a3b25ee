"""Every variable and argument the entry point receives as pure functions.

``to_env_vars(env)`` turns a ``TrainingEnv`` into ``{NAME: value}``; ``to_cmd_args(hps)`` into
argv. Name sets:

- **always** – ``TRAINENV_BASE_DIR``, ``TRAINENV_HPS`` (JSON), ``TRAINENV_HP_<NAME>``,
  ``TRAINENV_USER_ARGS`` (JSON list), ``TRAINENV_CHANNELS`` (JSON list),
  ``TRAINENV_CHANNEL_<NAME>``, ``TRAINENV_MODEL_DIR``, ``TRAINENV_CHECKPOINT_DIR``,
  ``TRAINENV_OUTPUT_DIR``, ``TRAINENV_CODE_DIR``, ``TRAINENV_HOSTS`` (JSON list),
  ``TRAINENV_CURRENT_HOST``, ``TRAINENV_MASTER_HOST``, ``TRAINENV_NODE_RANK``,
  ``TRAINENV_NUM_NODES``, ``TRAINENV_NUM_CPUS``, ``TRAINENV_NUM_GPUS``; the launcher adds
  ``TRAINENV_ENV_FILE``.
- **compat ``pai``** (default) – ``PAI_HPS``, ``PAI_HPS_<NAME>``, ``PAI_USER_ARGS`` (each
  token shell-quoted once), ``PAI_INPUT_<CH>``, ``PAI_OUTPUT_<CH>``, ``PAI_WORKING_DIR``,
  ``PAI_CONFIG_DIR``.
- **compat ``sagemaker``** – the ``SM_*`` set of AWS's sagemaker-training toolkit, name for
  name, with two deliberate differences: ``<NAME>`` is normalized (``SM_HP_LEARNING_RATE``, not
  the invalid ``SM_HP_LEARNING-RATE``) and argv values are JSON (``true``, ``[1,2]``), not
  Python ``str()`` (``True``, ``[1, 2]``).
- **compat ``vertex``** – ``AIP_MODEL_DIR``, ``AIP_CHECKPOINT_DIR``, ``AIP_TENSORBOARD_LOG_DIR``,
  ``AIP_TRAINING_DATA_URI`` / ``AIP_VALIDATION_DATA_URI`` / ``AIP_TEST_DATA_URI`` for the
  channels ``train``/``validation``/``test``, and ``CLUSTER_SPEC`` on several nodes.
- **several nodes only** – ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``NNODES``,
  ``NPROC_PER_NODE``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NODE_RANK``,
  ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``TF_CONFIG`` (one worker per node), and
  ``NCCL_SOCKET_IFNAME``/``GLOO_SOCKET_IFNAME`` when the cluster names its interface.

``<NAME>`` is the name upper-cased with every character outside ``[A-Z0-9_]`` replaced by
``_``; two names that normalize alike are a ``ConfigError``. Values: strings as they are,
everything else compact JSON. No ``NAME=value`` is longer than 32 KiB: a longer one is left
out (it stays in the snapshot file, ``TRAINENV_ENV_FILE``), and so are the largest ones when
all together would pass the total budget (``cap_sizes``); ``TRAINENV_OMITTED`` lists the names
left out, so a job never fails with "Argument list too long".

Arguments are capped the same way (``cap_args``): a hyperparameter whose value is over 32 KiB
is left out of argv (it stays in the snapshot file), and so are the largest when all together
would pass their budget. ``kernel_arg_limit`` is what ``exec`` accepts for argv and environment
together, from ``sysconf(ARG_MAX)``; no single string may pass ``MAX_ARG_STRLEN`` (128 KiB).

Which of these the platform already set is the launcher's business: it never overwrites a
name other than ``TRAINENV_*``.
"""

from __future__ import annotations

import os
import shlex

from trainenv.errors import ConfigError
from trainenv.values import env_value, normalized_names, to_json

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable, Mapping, Sequence

    from trainenv.environment import TrainingEnv

MAX_VAR_BYTES = 32 * 1024  # one NAME=value, and one argument value
MAX_ARG_STRLEN = 128 * 1024  # the kernel's limit on one argv or environment string, NUL included
# Linux caps argv + environment at a quarter of the stack limit (what sysconf(ARG_MAX) reports),
# and never above 3/4 of its 8 MiB stack ceiling, whatever the limit.
KERNEL_CEILING = 6 * 1024 * 1024
# The exported names get half of the usual 2 MiB by default; ``plan`` passes the exact remainder.
DEFAULT_TOTAL_BUDGET = 1024 * 1024
COMPAT_SETS = ("pai", "sagemaker", "vertex")
DEFAULT_COMPAT = ("pai",)
DEFAULT_MASTER_PORT = 29500
TF_CONFIG_PORT = 2222
OMITTED_NAME = "TRAINENV_OMITTED"

def parse_compat(value: str, source: str = "TRAINENV_COMPAT") -> tuple[str, ...]:
    """``"pai,sagemaker"`` → ``("pai", "sagemaker")``; ``"none"`` → ``()``."""
    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    if parts == ["none"]:
        return ()
    for part in parts:
        if part not in COMPAT_SETS:
            raise ConfigError.at(source, None, f"unknown compat set {part!r}: use a comma list of {', '.join(COMPAT_SETS)} or none")
    return tuple(dict.fromkeys(parts))


def _text(value: Any, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError.at(source, key, f"must be a string, got {type(value).__name__}")
    return value


def _texts(value: Any, source: str, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError.at(source, key, f"must be a list of strings, got {type(value).__name__}")
    return [_text(item, source, key) for item in value]


def _sagemaker_vars(env: TrainingEnv, entry_point: str | None, training_job_name: str | None) -> dict[str, str]:
    """The ``SM_*`` names AWS's toolkit writes (its ``Environment.to_env_vars``).

    ``training_job_name`` is the platform's ``TRAINING_JOB_NAME``: AWS's ``job_name`` is that
    variable or null, whatever else names the job.
    """
    rc = dict(env.resource_config or {})
    rc_source = f"{env.config_dir}/resourceconfig.json"
    groups = rc.get("instance_groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ConfigError.at(rc_source, "instance_groups", "must be a list of objects")
    for group in groups:
        _text(group.get("instance_group_name"), rc_source, "instance_group_name")
        _texts(group.get("hosts") or [], rc_source, "instance_groups.hosts")
    group_names = [g.get("instance_group_name") for g in groups]
    current_group = rc.get("current_group_name")
    if current_group is not None:
        _text(current_group, rc_source, "current_group_name")
    groups_dict = {g.get("instance_group_name"): g for g in groups}
    current_group_hosts = list((groups_dict.get(current_group) or {}).get("hosts") or [])
    distributed_flags = (
        "sagemaker_mpi_enabled",
        "sagemaker_parameter_server_enabled",
        "sagemaker_distributed_dataparallel_enabled",
        "sagemaker_pytorch_ddp_enabled",
        "sagemaker_pytorch_xla_multi_worker_enabled",
        "sagemaker_multi_worker_mirrored_strategy_enabled",
        "sagemaker_torch_distributed_enabled",
    )
    fw = dict(env.framework_parameters)
    dist_groups = fw.get("sagemaker_distribution_instance_groups")
    if dist_groups is None:
        dist_groups = [current_group] if current_group and any(fw.get(f) for f in distributed_flags) else []
    _texts(dist_groups, f"{env.config_dir}/hyperparameters.json", "sagemaker_distribution_instance_groups")
    if groups:
        dist_hosts = [h for g in dist_groups for h in (groups_dict.get(g) or {}).get("hosts") or []]
    else:
        dist_hosts = list(env.hosts)
    known = {
        "sagemaker_program", "sagemaker_submit_directory", "sagemaker_enable_cloudwatch_metrics",
        "sagemaker_region", "sagemaker_container_log_level", "sagemaker_job_name",
        "default_user_module_name", "_tuning_objective_metric", "sagemaker_s3_output",
    }
    additional = {k: v for k, v in fw.items() if k not in known}
    program = entry_point or fw.get("sagemaker_program") or ""
    module_name = program[:-3] if program.endswith(".py") else program
    output_data_dir = f"{env.output_dir}/data"
    output_intermediate_dir = f"{env.output_dir}/intermediate"
    hps = dict(env.hyperparameters)
    training_env = {
        "additional_framework_parameters": additional,
        "channel_input_dirs": dict(env.channel_dirs),
        "current_host": env.current_host,
        "current_instance_group": current_group,
        "current_instance_group_hosts": current_group_hosts,
        "current_instance_type": rc.get("current_instance_type", "local"),
        "distribution_hosts": dist_hosts,
        "distribution_instance_groups": dist_groups,
        "framework_module": None,
        "hosts": list(env.hosts),
        "hyperparameters": hps,
        "input_config_dir": env.config_dir,
        "input_data_config": dict(env.input_data_config),
        "input_dir": env.input_dir,
        "instance_groups": group_names,
        "instance_groups_dict": groups_dict,
        "is_hetero": len(groups) > 1,
        "is_master": env.is_master,
        "is_modelparallel_enabled": None,
        "is_smddpmprun_installed": False,
        "is_smddprun_installed": False,
        "job_name": training_job_name,
        "log_level": 20,
        "master_hostname": dist_hosts[0] if dist_hosts else (env.hosts[0] if env.hosts else env.master_host),
        "model_dir": env.model_dir,
        "module_dir": env.code_dir,
        "module_name": module_name,
        "network_interface_name": rc.get("network_interface_name", env.network_interface or "eth0"),
        "num_cpus": env.num_cpus,
        "num_gpus": env.num_gpus,
        "num_neurons": 0,
        "output_data_dir": output_data_dir,
        "output_dir": env.output_dir,
        "output_intermediate_dir": output_intermediate_dir,
        "resource_config": rc,
        "topology": rc.get("topology") or [],
        "user_entry_point": program,
    }
    out = {
        "SM_HOSTS": list(env.hosts),
        "SM_NETWORK_INTERFACE_NAME": training_env["network_interface_name"],
        "SM_HPS": hps,
        "SM_USER_ENTRY_POINT": program,
        "SM_FRAMEWORK_PARAMS": additional,
        "SM_RESOURCE_CONFIG": rc,
        "SM_INPUT_DATA_CONFIG": dict(env.input_data_config),
        "SM_OUTPUT_DATA_DIR": output_data_dir,
        "SM_CHANNELS": list(env.channels),
        "SM_CURRENT_HOST": env.current_host,
        "SM_CURRENT_INSTANCE_TYPE": training_env["current_instance_type"],
        "SM_CURRENT_INSTANCE_GROUP": current_group,
        "SM_CURRENT_INSTANCE_GROUP_HOSTS": current_group_hosts,
        "SM_INSTANCE_GROUPS": group_names,
        "SM_INSTANCE_GROUPS_DICT": groups_dict,
        "SM_DISTRIBUTION_INSTANCE_GROUPS": dist_groups,
        "SM_IS_HETERO": training_env["is_hetero"],
        "SM_MODULE_NAME": module_name,
        "SM_LOG_LEVEL": 20,
        "SM_FRAMEWORK_MODULE": None,
        "SM_INPUT_DIR": env.input_dir,
        "SM_INPUT_CONFIG_DIR": env.config_dir,
        "SM_OUTPUT_DIR": env.output_dir,
        "SM_NUM_CPUS": env.num_cpus,
        "SM_NUM_GPUS": env.num_gpus,
        "SM_NUM_NEURONS": 0,
        "SM_MODEL_DIR": env.model_dir,
        "SM_MODULE_DIR": env.code_dir,
        "SM_TRAINING_ENV": training_env,
        "SM_USER_ARGS": list(env.user_args),
        "SM_OUTPUT_INTERMEDIATE_DIR": output_intermediate_dir,
    }
    if training_env["topology"]:
        out["SM_TOPOLOGY"] = training_env["topology"]
    for channel, key in normalized_names(env.channels, "channel").items():
        out[f"SM_CHANNEL_{key}"] = env.channel_dirs[channel]
    for name, key in normalized_names(hps, "hyperparameter").items():
        out[f"SM_HP_{key}"] = hps[name]
    return {name: env_value(value) for name, value in out.items()}


def _pai_vars(env: TrainingEnv) -> dict[str, str]:
    hps = env.hyperparameters
    out = {
        # PAI writes every value as a string.
        "PAI_HPS": to_json({k: env_value(v) for k, v in hps.items()}),
        "PAI_USER_ARGS": " ".join(shlex.quote(arg) for arg in env.user_args),
        "PAI_WORKING_DIR": env.code_dir,
        "PAI_CONFIG_DIR": env.config_dir,
    }
    for name, key in normalized_names(hps, "hyperparameter").items():
        out[f"PAI_HPS_{key}"] = env_value(hps[name])
    for channel, key in normalized_names(env.channels, "channel").items():
        out[f"PAI_INPUT_{key}"] = env.channel_dirs[channel]
    for channel, key in normalized_names(env.output_dirs, "output channel").items():
        out[f"PAI_OUTPUT_{key}"] = env.output_dirs[channel]
    return out


def _worker_addresses(env: TrainingEnv) -> list[str]:
    return [f"{host}:{TF_CONFIG_PORT}" for host in env.hosts]


def _vertex_vars(env: TrainingEnv) -> dict[str, str]:
    out = {
        "AIP_MODEL_DIR": env.model_dir,
        "AIP_CHECKPOINT_DIR": env.checkpoint_dir,
        "AIP_TENSORBOARD_LOG_DIR": env.tensorboard_dir,
    }
    for channel, name in (("train", "AIP_TRAINING_DATA_URI"), ("validation", "AIP_VALIDATION_DATA_URI"), ("test", "AIP_TEST_DATA_URI")):
        if channel in env.channel_dirs:
            out[name] = env.channel_dirs[channel]
    if env.num_nodes > 1 and env.hosts and env.node_rank is not None:
        workers = _worker_addresses(env)
        pool = "workerpool0" if env.node_rank == 0 else "workerpool1"
        out["CLUSTER_SPEC"] = to_json(
            {
                "cluster": {"workerpool0": workers[:1], "workerpool1": workers[1:]},
                "task": {"type": pool, "index": 0 if env.node_rank == 0 else env.node_rank - 1},
                "environment": "cloud",
            }
        )
    return out


def cluster_env_vars(env: TrainingEnv, nproc_per_node: int, master_port: int | None) -> dict[str, str]:
    """Node-level names for several nodes (torchrun, Kubeflow, TF); empty on one node."""
    if env.num_nodes <= 1:
        return {}
    port = str(master_port or env.master_port or DEFAULT_MASTER_PORT)
    out = {
        "MASTER_ADDR": env.master_host,
        "MASTER_PORT": port,
        "NODE_RANK": str(env.node_rank),
        "NNODES": str(env.num_nodes),
        "NPROC_PER_NODE": str(nproc_per_node),
        "PET_MASTER_ADDR": env.master_host,
        "PET_MASTER_PORT": port,
        "PET_NODE_RANK": str(env.node_rank),
        "PET_NNODES": str(env.num_nodes),
        "PET_NPROC_PER_NODE": str(nproc_per_node),
    }
    if env.node_rank is None:  # elastic: the rendezvous assigns ranks, so none is exported
        for name in ("NODE_RANK", "PET_NODE_RANK"):
            del out[name]
        return out
    if env.hosts:
        out["TF_CONFIG"] = to_json(
            {"cluster": {"worker": _worker_addresses(env)}, "task": {"type": "worker", "index": env.node_rank}, "environment": "cloud"}
        )
    if env.network_interface:
        out["NCCL_SOCKET_IFNAME"] = env.network_interface
        out["GLOO_SOCKET_IFNAME"] = env.network_interface
    return out


def trainenv_vars(env: TrainingEnv) -> dict[str, str]:
    hps = env.hyperparameters
    out = {
        "TRAINENV_BASE_DIR": env.base_dir,
        "TRAINENV_HPS": to_json(dict(hps)),
        "TRAINENV_USER_ARGS": to_json(list(env.user_args)),
        "TRAINENV_CHANNELS": to_json(list(env.channels)),
        "TRAINENV_MODEL_DIR": env.model_dir,
        "TRAINENV_CHECKPOINT_DIR": env.checkpoint_dir,
        "TRAINENV_OUTPUT_DIR": env.output_dir,
        "TRAINENV_CODE_DIR": env.code_dir,
        "TRAINENV_HOSTS": to_json(list(env.hosts)),
        "TRAINENV_CURRENT_HOST": env.current_host,
        "TRAINENV_MASTER_HOST": env.master_host,
        "TRAINENV_NUM_NODES": str(env.num_nodes),
        "TRAINENV_NUM_CPUS": str(env.num_cpus),
        "TRAINENV_NUM_GPUS": str(env.num_gpus),
    }
    if env.node_rank is not None:
        out["TRAINENV_NODE_RANK"] = str(env.node_rank)
    for name, key in normalized_names(hps, "hyperparameter").items():
        out[f"TRAINENV_HP_{key}"] = env_value(hps[name])
    for channel, key in normalized_names(env.channels, "channel").items():
        out[f"TRAINENV_CHANNEL_{key}"] = env.channel_dirs[channel]
    return out


def fits(name: str, value: str) -> bool:
    """Whether ``NAME=value`` stays within the per-variable cap (bytes, as the kernel counts)."""
    size = len(name) + 1 + len(value)
    if size <= MAX_VAR_BYTES // 4:  # fast path: even 4-byte UTF-8 characters fit
        return True
    return len(name) + 1 + len(value.encode("utf-8", "surrogateescape")) <= MAX_VAR_BYTES


def entry_bytes(name: str, value: str) -> int:
    """What one variable costs the kernel: ``NAME=value``, its NUL and its pointer."""
    return len(name) + len(value.encode("utf-8", "surrogateescape")) + 2 + 8


def cap_sizes(values: Mapping[str, str], total_budget: int = DEFAULT_TOTAL_BUDGET) -> dict[str, str]:
    """Drop every variable over the per-variable cap, then the largest until the total fits.

    The dropped names are listed in ``TRAINENV_OMITTED``; their values stay in the snapshot file.
    """
    kept = {}
    omitted = []
    for name, value in values.items():
        if fits(name, value):
            kept[name] = value
        else:
            omitted.append(name)
    total = sum(entry_bytes(n, v) for n, v in kept.items())
    # Compat copies go before trainenv's own names; within each, the largest first.
    order = sorted(kept, key=lambda n: (n.startswith("TRAINENV_"), -entry_bytes(n, kept[n])))
    for name in order:
        if total + _omitted_bytes(omitted) <= total_budget:
            break
        total -= entry_bytes(name, kept.pop(name))
        omitted.append(name)
    if omitted:
        kept[OMITTED_NAME] = _omitted_value(omitted)
    return kept


def _omitted_value(omitted: list[str]) -> str:
    value = to_json(omitted)
    return value if fits(OMITTED_NAME, value) else to_json(omitted[:100] + ["..."])


def _omitted_bytes(omitted: list[str]) -> int:
    return entry_bytes(OMITTED_NAME, _omitted_value(omitted)) if omitted else entry_bytes(OMITTED_NAME, "[]") + 64


def to_env_vars(
    env: TrainingEnv,
    compat: Sequence[str] = DEFAULT_COMPAT,
    *,
    nproc_per_node: int | None = None,
    master_port: int | None = None,
    entry_point: str | None = None,
    training_job_name: str | None = None,
    total_budget: int = DEFAULT_TOTAL_BUDGET,
) -> dict[str, str]:
    """The snapshot as environment variables (see the module docstring for the name sets).

    ``entry_point`` (as configured) and ``training_job_name`` (the platform's
    ``TRAINING_JOB_NAME``) are for the ``sagemaker`` set; ``total_budget`` caps all names together.
    """
    out = trainenv_vars(env)
    if "pai" in compat:
        out.update(_pai_vars(env))
    if "sagemaker" in compat:
        out.update(_sagemaker_vars(env, entry_point, training_job_name))
    if "vertex" in compat:
        out.update(_vertex_vars(env))
    nproc = nproc_per_node or env.num_gpus or 1
    out.update(cluster_env_vars(env, nproc, master_port))
    return cap_sizes(out, total_budget)


def kernel_arg_limit() -> int:
    """What ``exec`` accepts for argv + environment together (bytes, pointers included)."""
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (OSError, ValueError):
        limit = -1
    return MAX_ARG_STRLEN if limit <= 0 else max(MAX_ARG_STRLEN, min(limit, KERNEL_CEILING))


def environ_bytes(environ: Mapping[str, str]) -> int:
    """What an environment costs ``exec`` (see ``entry_bytes``)."""
    return sum(entry_bytes(name, value) for name, value in environ.items())


def arg_bytes(arg: str) -> int:
    """What one argument costs ``exec``: its bytes, its NUL and its pointer."""
    return len(arg.encode("utf-8", "surrogateescape")) + 1 + 8


def cap_args(args: Sequence[str], budget: int) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """``(kept args, left-out names, kept bytes)`` for ``--name value`` pairs (``to_cmd_args``).

    A pair whose value is over ``MAX_VAR_BYTES`` is left out, then the largest until the rest
    fits ``budget``; the order of the others is kept.
    """
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args) - 1, 2)]
    sizes = [arg_bytes(flag) + arg_bytes(value) for flag, value in pairs]
    dropped = {i for i, (_, value) in enumerate(pairs) if len(value.encode("utf-8", "surrogateescape")) > MAX_VAR_BYTES}
    total = sum(size for i, size in enumerate(sizes) if i not in dropped)
    for i in sorted(range(len(pairs)), key=lambda i: -sizes[i]):
        if total <= budget:
            break
        if i not in dropped:
            dropped.add(i)
            total -= sizes[i]
    kept = tuple(part for i, pair in enumerate(pairs) if i not in dropped for part in pair)
    return kept, tuple(pairs[i][0][2:] for i in sorted(dropped)), total


def shell_lines(variables: Mapping[str, str], secrets: Iterable[str] = (), show_secrets: bool = False) -> str:
    """``export NAME='value'`` lines, safe to ``eval``.

    Unless ``show_secrets``, a value that redacting changes (a secret name, a secret inside,
    URL credentials) is not printed as if it were the value: a comment line says it is left out.
    """
    from trainenv.redact import is_secret_name, redact_data

    secrets = tuple(secrets)
    lines = []
    for name, value in variables.items():
        if not show_secrets and redact_data(value, secrets, name) != value:
            kind = "secret" if is_secret_name(name) else "holds a secret"
            lines.append(f"# {name}: {kind}, left out (--show-secrets shows it)\n")
        else:
            lines.append(f"export {name}={shlex.quote(value)}\n")
    return "".join(lines)
