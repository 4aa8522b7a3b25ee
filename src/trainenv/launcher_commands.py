"""Launcher-aware commands: the node arguments a user's own launcher command is missing; pure.

A command (string or list) that starts with ``torchrun``, ``<python> -m torch.distributed.run``,
``accelerate launch`` or ``deepspeed`` gets, right after the launcher's words, the node
arguments it does not give itself, from the cluster trainenv discovered. An option the user
gave is never added again nor changed; an option counts as given in either spelling
(``--nproc-per-node`` or ``--nproc_per_node``), as ``--name=value`` and as an unambiguous
prefix (the launchers' argument parsers accept ``--nnode``). Only the launcher's own options
count, the ones before the program: ``torchrun train.py --nnodes 3`` gives ``--nnodes`` to
``train.py``, not to torchrun.

========================  ====================================================================
launcher                  added when missing
========================  ====================================================================
torchrun, several nodes   ``--nnodes N --node_rank R --nproc_per_node P --master_addr HOST
                          --master_port PORT``; when the user chose ``--rdzv_backend``:
                          ``--nnodes --nproc_per_node --rdzv_endpoint HOST:PORT --rdzv_id JOB``
                          (and ``--node_rank`` for ``static``)
torchrun, one node        ``--standalone --nnodes 1 --nproc_per_node P`` (a free local port;
                          no ``--standalone`` when the user named a rendezvous or master)
torchrun, no node rank    ``--nnodes --nproc_per_node --rdzv_backend c10d --rdzv_endpoint
                          --rdzv_id`` (elastic: the platform's ``PET_NNODES`` and
                          ``PET_RDZV_ENDPOINT`` when set)
accelerate launch         ``--num_machines N --num_processes N*P``; several nodes also
                          ``--machine_rank R --main_process_ip HOST --main_process_port PORT``
deepspeed, several nodes  ``--hostfile FILE --num_nodes N --num_gpus P --node_rank R
                          --master_addr HOST --master_port PORT --no_ssh``: every node runs its
                          own launcher, none logs into another; FILE (``HOST slots=P`` a node,
                          written by the runner) only tells DeepSpeed the shape of the job
deepspeed, one node       ``--num_gpus P --master_port PORT``
========================  ====================================================================

HOST is the master (the first host), PORT the job's master port, P the processes per node, N
the nodes, R this node's rank. DeepSpeed's ``--num_nodes``/``--num_gpus`` are left out when the
user gave ``--include`` or ``--exclude`` (DeepSpeed refuses both together). A string command is
split like a shell would only to recognise and extend the launcher: the result runs as a list,
without a shell, unless the string uses shell syntax (``$VAR``, ``&&``, redirections, globs,
quotes are fine): then the extended string still runs through ``/bin/sh -c``.
"""

from __future__ import annotations

import os
import re

from trainenv.errors import ConfigError
from trainenv.frozen import frozen

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping, Sequence

DEEPSPEED_NO_SSH = "0.14.5"  # the first DeepSpeed whose launcher has --no_ssh
# How trainenv itself starts each launcher for an entry point (TRAINENV_DISTRIBUTION).
MODULES = {"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.launch", "deepspeed": "deepspeed.launcher.runner"}

# Each launcher's options (underscore spelling, no dashes) and which of them take no value;
# tests/test_launcher_commands.py checks both lists against the launchers' real parsers.
_TORCHRUN_FLAGS = frozenset({"standalone", "module", "no_python", "run_path", "virtual_local_rank", "help"})
_TORCHRUN = frozenset({
    "nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "max_restarts",
    "monitor_interval", "start_method", "event_log_handler", "role", "log_dir", "redirects", "tee",
    "local_ranks_filter", "duplicate_stdout_filters", "duplicate_stderr_filters", "node_rank", "master_addr",
    "master_port", "local_addr", "logs_specs", "numa_binding", "signals_to_handle", "shutdown_timeout",
}) | _TORCHRUN_FLAGS
_ACCELERATE_FLAGS = frozenset({
    "help", "quiet", "cpu", "multi_gpu", "tpu", "enable_cpu_affinity", "dynamo_use_fullgraph", "dynamo_use_dynamic",
    "dynamo_use_regional_compilation", "use_deepspeed", "use_fsdp", "use_parallelism_config", "use_megatron_lm",
    "same_network", "module", "no_python", "tpu_cluster", "no_tpu_cluster", "tpu_use_sudo", "downcast_bf16",
    "fp8_use_autocast_during_eval", "debug",
})
_ACCELERATE = frozenset({
    "config_file", "mixed_precision", "num_processes", "num_machines", "num_cpu_threads_per_process", "dynamo_backend",
    "dynamo_mode", "gpu_ids", "machine_rank", "main_process_ip", "main_process_port", "tee", "log_dir", "role",
    "rdzv_backend", "rdzv_conf", "max_restarts", "monitor_interval", "vm", "env", "main_training_function",
    "deepspeed_config_file", "zero_stage", "offload_optimizer_device", "offload_param_device",
    "offload_optimizer_nvme_path", "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
    "zero3_init_flag", "zero3_save_16bit_model", "deepspeed_hostfile", "deepspeed_exclusion_filter",
    "deepspeed_inclusion_filter", "deepspeed_multinode_launcher", "deepspeed_moe_layer_cls_names", "fsdp_version",
    "fsdp_offload_params", "fsdp_min_num_params", "fsdp_sharding_strategy", "fsdp_reshard_after_forward",
    "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap", "fsdp_backward_prefetch", "fsdp_state_dict_type",
    "fsdp_forward_prefetch", "fsdp_use_orig_params", "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states",
    "fsdp_activation_checkpointing", "fsdp_activation_checkpointing_offload", "fp8_backend", "fp8_margin",
    "fp8_interval", "fp8_format", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_override_linear_precision",
    "fp8_enable_fsdp_float8_all_gather", "fp8_pad_inner_dim", "aws_access_key_id", "aws_secret_access_key",
    "mpirun_hostfile",
}) | _ACCELERATE_FLAGS  # and the megatron_lm_* and parallelism_config_* ones, all with a value
_DEEPSPEED_FLAGS = frozenset({
    "help", "module", "no_python", "no_local_rank", "no_ssh", "no_ssh_check", "force_multi", "save_pid",
    "bind_cores_to_rank", "quiet",
})
_DEEPSPEED = frozenset({
    "hostfile", "include", "exclude", "num_nodes", "num_gpus", "num_accelerators", "master_port", "master_addr",
    "node_rank", "launcher", "launcher_args", "enable_each_rank_log", "autotuning", "bind_core_list", "ssh_port",
    "venv_script", "log_level",
}) | _DEEPSPEED_FLAGS
_SHORT = {
    "torchrun": {"-m": "module", "-r": "redirects", "-t": "tee", "-h": "help"},
    "accelerate": {"-m": "module", "-q": "quiet", "-t": "tee", "-h": "help"},
    "deepspeed": {"-H": "hostfile", "-i": "include", "-e": "exclude", "-q": "quiet", "-h": "help"},
}
_ALIASES = {"deepspeed": {"num_accelerators": "num_gpus"}}
_PYTHON = re.compile(r"python[0-9.]*\Z")
_SHELL_SYNTAX = re.compile(r"[$`;&|<>()*?\[~#\n]")


@frozen
class NodeFacts:
    """What the node arguments are made of (the plan's resolved values)."""

    num_nodes: int
    node_rank: int | None
    nproc: int
    master_host: str
    port: int
    job_name: str
    hosts: tuple[str, ...] = ()
    hostfile: str = ""  # where a DeepSpeed hostfile goes when one is needed
    elastic_nnodes: str = ""  # no node rank: the platform's ``MIN:MAX`` (``PET_NNODES``)
    elastic_endpoint: str = ""  # no node rank: the platform's rendezvous (``PET_RDZV_ENDPOINT``)


@frozen
class Extended:
    """A launcher command with its node arguments: the argv, and a hostfile to write first."""

    launcher: str
    argv: tuple[str, ...]
    hostfile: str | None = None
    hostfile_text: str | None = None


def recognise(argv: Sequence[str]) -> tuple[str, int] | None:
    """``(launcher, number of words naming it)`` when ``argv`` starts a known launcher, else None."""
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program in ("torchrun", "deepspeed"):
        return program, 1
    if program == "accelerate" and tuple(argv[1:2]) == ("launch",):
        return "accelerate", 2
    if _PYTHON.match(program) and tuple(argv[1:3]) == ("-m", MODULES["torchrun"]):
        return "torchrun", 3
    return None


def _known(launcher: str) -> tuple[frozenset[str], frozenset[str]]:
    if launcher == "torchrun":
        return _TORCHRUN, _TORCHRUN_FLAGS
    if launcher == "deepspeed":
        return _DEEPSPEED, _DEEPSPEED_FLAGS
    return _ACCELERATE, _ACCELERATE_FLAGS


def _option(launcher: str, word: str) -> str | None:
    """The canonical name of the option ``word`` (``--nproc-per-node=2`` → ``nproc_per_node``)."""
    if word in _SHORT[launcher]:
        return _SHORT[launcher][word]
    name = word[2:].split("=", 1)[0].replace("-", "_")
    known, _ = _known(launcher)
    if name not in known:
        matches = [option for option in known if option.startswith(name)] if name else []
        if len(matches) != 1:
            return None
        name = matches[0]
    return _ALIASES.get(launcher, {}).get(name, name)


def given_options(launcher: str, words: Sequence[str]) -> dict[str, str | None]:
    """The launcher's options in ``words`` (its arguments), up to the program: ``{name: value}``."""
    _, flags = _known(launcher)
    given: dict[str, str | None] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--" or not word.startswith("-") or word == "-":
            break  # the program starts here
        name = _option(launcher, word)
        index += 1
        value: str | None = None
        if "=" in word or name in flags:
            value = word.split("=", 1)[1] if "=" in word else None
        elif index < len(words):  # any other option (also one trainenv does not know) takes a value
            value = words[index]
            index += 1
        if name is not None:
            given[name] = value
    return given


def _missing(given: Mapping[str, str | None], pairs: Sequence[tuple[str, object]]) -> list[str]:
    added: list[str] = []
    for name, value in pairs:
        if name in given:
            continue
        added += [f"--{name}"] if value is None else [f"--{name}", str(value)]
    return added


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _no_rank(launcher: str, option: str) -> ConfigError:
    return ConfigError(
        f"{launcher} on several nodes needs {option}, but the cluster names no rank for this node: "
        f"give {option} in the command or set the node rank (NODE_RANK, resourceconfig.json)"
    )


def node_arguments(launcher: str, given: Mapping[str, str | None], facts: NodeFacts) -> tuple[list[str], str | None]:
    """The arguments to add after the launcher's words, and the DeepSpeed hostfile text if one is needed."""
    several = facts.num_nodes > 1
    if launcher == "torchrun":
        return _torchrun(given, facts), None
    if launcher == "accelerate":
        pairs: list[tuple[str, object]] = [("num_machines", facts.num_nodes), ("num_processes", facts.num_nodes * facts.nproc)]
        if several:
            if facts.node_rank is None and "machine_rank" not in given:
                raise _no_rank("accelerate launch", "--machine_rank")
            pairs += [("machine_rank", facts.node_rank), ("main_process_ip", facts.master_host), ("main_process_port", facts.port)]
        return _missing(given, pairs), None
    filtered = "include" in given or "exclude" in given
    if not several:
        return _missing(given, [] if filtered else [("num_gpus", facts.nproc)]) + _missing(given, [("master_port", facts.port)]), None
    if facts.node_rank is None and "node_rank" not in given:
        raise _no_rank("deepspeed", "--node_rank")
    text = None
    pairs = []
    if "hostfile" not in given:
        hosts = facts.hosts or tuple(f"node{rank}" for rank in range(facts.num_nodes))
        text = "".join(f"{host} slots={facts.nproc}\n" for host in hosts)
        pairs.append(("hostfile", facts.hostfile))
    if not filtered:
        pairs += [("num_nodes", facts.num_nodes), ("num_gpus", facts.nproc)]
    pairs += [("node_rank", facts.node_rank), ("master_addr", facts.master_host), ("master_port", facts.port), ("no_ssh", None)]
    return _missing(given, pairs), text


def _torchrun(given: Mapping[str, str | None], facts: NodeFacts) -> list[str]:
    if "standalone" in given:
        return _missing(given, [("nproc_per_node", facts.nproc)])
    backend = given.get("rdzv_backend")
    if "rdzv_backend" in given:
        pairs: list[tuple[str, object]] = [("nnodes", facts.num_nodes), ("nproc_per_node", facts.nproc)]
        if backend == "static" and facts.node_rank is not None:
            pairs.append(("node_rank", facts.node_rank))
        pairs += [("rdzv_endpoint", _endpoint(facts.master_host, facts.port)), ("rdzv_id", facts.job_name)]
        return _missing(given, pairs)
    named = {"rdzv_endpoint", "master_addr", "master_port", "node_rank"} & set(given)
    if facts.num_nodes <= 1 and not named:
        return _missing(given, [("standalone", None), ("nnodes", 1), ("nproc_per_node", facts.nproc)])
    if facts.node_rank is None:  # elastic: the rendezvous assigns the node ranks
        return _missing(given, [
            ("nnodes", facts.elastic_nnodes or facts.num_nodes), ("nproc_per_node", facts.nproc), ("rdzv_backend", "c10d"),
            ("rdzv_endpoint", facts.elastic_endpoint or _endpoint(facts.master_host, facts.port)), ("rdzv_id", facts.job_name),
        ])
    return _missing(given, [
        ("nnodes", facts.num_nodes), ("node_rank", facts.node_rank), ("nproc_per_node", facts.nproc),
        ("master_addr", facts.master_host), ("master_port", facts.port),
    ])


def extend_argv(argv: Sequence[str], facts: NodeFacts) -> Extended | None:
    """``argv`` with the node arguments it misses, when it starts a known launcher; else None."""
    found = recognise(argv)
    if found is None:
        return None
    launcher, words = found
    added, text = node_arguments(launcher, given_options(launcher, argv[words:]), facts)
    return Extended(
        launcher, (*argv[:words], *added, *argv[words:]),
        hostfile=facts.hostfile if text is not None else None, hostfile_text=text,
    )


def _words(command: str, count: int | None = None) -> tuple[list[str], int]:
    """The shell words of ``command`` (the first ``count`` of them), and where they end in it."""
    import io
    import shlex

    stream = io.StringIO(command)
    lexer = shlex.shlex(stream, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    words: list[str] = []
    while count is None or len(words) < count:
        word = lexer.get_token()
        if word is None:
            break
        words.append(word)
    return words, stream.tell()


def extend_string(command: str, shell: str, facts: NodeFacts) -> Extended | None:
    """A command string whose first words start a known launcher, extended; else None.

    Without shell syntax the result is the list of its words; with it, the extended string
    under ``shell -c`` (the added arguments quoted, the rest of the string as written).
    """
    import shlex

    try:
        words, _ = _words(command)
    except ValueError:  # an unbalanced quote: the shell reports it
        return None
    extended = extend_argv(words, facts)
    if extended is None:
        return None
    if not _SHELL_SYNTAX.search(command):
        return extended
    _, count = recognise(words) or ("", 0)
    _, end = _words(command, count)
    rest = command[end:].lstrip()  # what follows the launcher's words, as written
    added = extended.argv[count:len(extended.argv) - (len(words) - count)]
    text = shlex.join([*words[:count], *added]) + (" " + rest if rest else "")
    return Extended(extended.launcher, (shell, "-c", text), extended.hostfile, extended.hostfile_text)


def program_argv(launcher: str, kind: str, argv: Sequence[str]) -> list[str]:
    """The launcher's program arguments for an entry point's argv (``python train.py ...``)."""
    if kind == "script":
        return list(argv[1:])  # the launcher runs the script with its own interpreter
    if kind in ("module", "function"):
        return ["--module", *argv[2:]]
    return ["--no_python", *argv]

