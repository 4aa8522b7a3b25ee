"""The launch plan: exactly what will run (argv, environment, working dir), computed purely.

``build_plan(env, settings, environ)`` turns a ``TrainingEnv`` and ``LaunchSettings`` into a
``LaunchPlan``. It reads the code dir to check the entry point but writes nothing and starts
nothing; ``trainenv train --dry-run`` prints it, and the supervisor runs it.

Entry points (``entry_point`` setting, else ``command``, else PAI's ``command.sh``, else
SageMaker's ``SAGEMAKER_PROGRAM``):

| entry point        | argv                                              |
|--------------------|---------------------------------------------------|
| ``train.py``       | ``<python> train.py <hyperparameter args>``        |
| ``-m pkg.mod``     | ``<python> -m pkg.mod <hyperparameter args>``      |
| ``run.sh``         | ``/bin/sh run.sh <hyperparameter args>``           |
| ``tool``           | ``<code dir>/tool`` or ``tool`` on PATH, ``<args>`` |
| command string     | ``/bin/sh -c <command>`` (no args appended)        |

The child's environment is the inherited one, plus the snapshot's variables
(``trainenv.exports``; ``TRAINENV_*`` always set, every other name only where the platform
did not set it), ``TRAINENV_ENV_FILE``, ``PYTHONUNBUFFERED=1`` and ``PYTHONPATH`` = the code
dir before the inherited value (never the launcher's ``sys.path``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping, Optional, Tuple

from trainenv.environment import TrainingEnv
from trainenv.errors import ConfigError, shown
from trainenv.frozen import frozen
from trainenv.redact import redact_text, redact_value, secret_values
from trainenv.settings import LaunchSettings

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
SHELL = "/bin/sh"


@frozen
class EntryPoint:
    kind: str  # "script", "module", "shell", "executable", "command"
    target: str  # the path, module or command string
    source: str  # where it was configured


@frozen
class LaunchPlan:
    """What the supervisor runs, and what it needs around the run."""

    argv: Tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    entry: EntryPoint
    settings: LaunchSettings
    env_file: str
    snapshot_json: str
    install_python: str
    requirements_file: Optional[str]
    dirs_to_create: Tuple[str, ...]
    failure_file: str
    log_prefix: Optional[str] = None
    hostfile: Optional[str] = None
    hostfile_text: Optional[str] = None
    peers: Tuple[Tuple[str, int], ...] = ()
    exported: Tuple[str, ...] = ()
    secrets: Tuple[str, ...] = ()
    _hidden = ("secrets",)
    _not_compared = ("exported", "secrets")

    def describe(self) -> str:
        """A readable, redacted view of the plan (``trainenv train --dry-run``)."""
        lines = [
            f"entry point   {self.entry.kind}: {self.entry.target}  ({self.entry.source})",
            f"distribution  {self.settings.distribution}",
            f"argv          {json.dumps(list(self.argv), ensure_ascii=False)}",
            f"cwd           {self.cwd}",
            f"env file      {self.env_file}",
            f"requirements  {self.requirements_file or '(none)'}"
            + (f" + {' '.join(self.settings.requirements)}" if self.settings.requirements else "")
            + ("" if self.settings.install else " (install disabled)"),
            f"grace         {self.settings.grace_seconds:g} s"
            + (f", time limit {self.settings.max_run_seconds:g} s" if self.settings.max_run_seconds else ""),
        ]
        if self.hostfile:
            lines.append(f"hostfile      {self.hostfile}")
        lines.append("environment (set by trainenv):")
        for name in self.exported:
            lines.append(f"  {name}={redact_value(name, self.env.get(name, ''))}")
        return redact_text("\n".join(lines), self.secrets)


def _resolve_entry(env: TrainingEnv, settings: LaunchSettings, environ: Mapping[str, str]) -> EntryPoint:
    if settings.entry_point:
        return _classify(env, settings.entry_point.strip(), settings.sources.get("entry_point", "entry_point"), environ)
    if settings.command:
        return EntryPoint("command", settings.command, settings.sources.get("command", "command"))
    command_file = Path(env.config_dir) / "execution" / "command.sh"
    if command_file.is_file():
        return EntryPoint("command", command_file.read_text(encoding="utf-8", errors="replace"), str(command_file))
    program = environ.get("SAGEMAKER_PROGRAM") or env.framework_parameters.get("sagemaker_program")
    if program:
        return _classify(env, str(program), "SAGEMAKER_PROGRAM", environ)
    raise ConfigError(
        "no entry point: set TRAINENV_ENTRY_POINT (or --entry-point, or entry_point in trainenv.yaml), "
        f"TRAINENV_COMMAND, or write {command_file}"
    )


def _classify(env: TrainingEnv, entry: str, source: str, environ: Mapping[str, str]) -> EntryPoint:
    if entry.startswith("-m"):
        module = entry[2:].strip()
        if not _MODULE_NAME.match(module):
            raise ConfigError.at(source, None, f"{shown(entry)}: expected '-m package.module'")
        return EntryPoint("module", module, source)
    path = Path(entry) if os.path.isabs(entry) else Path(env.code_dir) / entry
    if entry.endswith((".py", ".sh")) or os.sep in entry:
        if path.is_dir():
            raise ConfigError.at(source, None, f"{shown(entry)}: {path} is a directory, expected a file")
        if not path.is_file():
            raise ConfigError.at(source, None, f"{shown(entry)}: {path} does not exist")
        if entry.endswith(".py"):
            return EntryPoint("script", str(path), source)
        if entry.endswith(".sh"):
            return EntryPoint("shell", str(path), source)
    if path.is_dir():
        raise ConfigError.at(source, None, f"{shown(entry)}: {path} is a directory, expected a file")
    if path.is_file():
        if not os.access(path, os.X_OK):
            raise ConfigError.at(source, None, f"{shown(entry)}: {path} is not executable (chmod +x it, or name a .py/.sh file)")
        return EntryPoint("executable", str(path), source)
    import shutil

    found = shutil.which(entry, path=environ.get("PATH", os.defpath))
    if found:
        return EntryPoint("executable", found, source)
    raise ConfigError.at(source, None, f"{shown(entry)}: not found in {env.code_dir} nor on PATH")


def entry_argv(entry: EntryPoint, python: str, args: Tuple[str, ...]) -> Tuple[str, ...]:
    """The argv of one process of the job."""
    if entry.kind == "script":
        return (python, entry.target, *args)
    if entry.kind == "module":
        return (python, "-m", entry.target, *args)
    if entry.kind == "shell":
        return (SHELL, entry.target, *args)
    if entry.kind == "executable":
        return (entry.target, *args)
    return (SHELL, "-c", entry.target)


KERNEL_ARG_LIMIT = 2 * 1024 * 1024
RESERVED_BYTES = 64 * 1024  # interpreter paths, launcher flags, the few names added after export


def export_budget(args: Tuple[str, ...], environ: Mapping[str, str]) -> int:
    """What is left for the exported names once argv and the inherited environment are counted."""
    from trainenv.exports import entry_bytes

    used = sum(len(a.encode("utf-8", "surrogateescape")) + 9 for a in args)
    used += sum(entry_bytes(k, v) for k, v in environ.items())
    return max(64 * 1024, KERNEL_ARG_LIMIT - RESERVED_BYTES - used)


def run_dir(env: TrainingEnv, environ: Mapping[str, str]) -> str:
    """Where this launch keeps its own files: container-local, never an output channel."""
    # $TMPDIR as tempfile.gettempdir() reads it, without importing tempfile (and random) at start-up.
    temporary = environ.get("TMPDIR") or "/tmp"
    base = environ.get("TRAINENV_RUN_DIR") or os.path.join(temporary, f"trainenv-{os.getuid()}")
    return os.path.join(base, f"{env.job_name}-{env.current_host}".replace(os.sep, "_"))


def child_environment(
    environ: Mapping[str, str], exported: Mapping[str, str], code_dir: str, extra: Mapping[str, str]
) -> dict:
    """Inherited env + exported names (platform values kept) + Python hygiene."""
    child = dict(environ)
    for name, value in exported.items():
        if name.startswith("TRAINENV_") or name not in child:
            child[name] = value
    for name, value in extra.items():
        if name.startswith("TRAINENV_") or name not in child:
            child[name] = value
    inherited = environ.get("PYTHONPATH", "")
    child["PYTHONPATH"] = code_dir + (os.pathsep + inherited if inherited else "")
    child["PYTHONUNBUFFERED"] = "1"
    return child


def build_plan(env: TrainingEnv, settings: LaunchSettings, environ: Mapping[str, str]) -> LaunchPlan:
    """Everything ``trainenv train`` will do, as data."""
    entry = _resolve_entry(env, settings, environ)
    python = settings.interpreter
    args = tuple(env.user_args) if entry.kind != "command" else ()
    nproc = settings.nproc_per_node or env.platform_nproc_per_node or env.num_gpus or 1
    exported = env.to_env_vars(
        settings.compat,
        nproc_per_node=nproc,
        master_port=settings.master_port,
        entry_point=settings.entry_point,
        total_budget=export_budget(args, environ),
    )
    directory = run_dir(env, environ)
    env_file = os.path.join(directory, "env.json")
    extra = {"TRAINENV_ENV_FILE": env_file}
    hostfile = hostfile_text = None
    peers: Tuple[Tuple[str, int], ...] = ()
    if env.num_nodes > 1 and settings.distribution == "none" and env.node_rank is not None:
        # One process per node: the process-level names equal the node-level ones.
        extra.update(
            RANK=str(env.node_rank),
            WORLD_SIZE=str(env.num_nodes),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
    argv = entry_argv(entry, python, args)
    if settings.distribution != "none":
        from trainenv import distributed

        launch = distributed.plan_launch(env, settings, entry, python, args, nproc, directory, environ)
        argv, hostfile, hostfile_text, peers = launch.argv, launch.hostfile, launch.hostfile_text, launch.peers
        extra.update(launch.env)
    child_env = child_environment(environ, exported, env.code_dir, extra)
    rank = "?" if env.node_rank is None else env.node_rank
    prefix = f"[{env.current_host}:{rank}] " if settings.log_prefix else None
    requirements = Path(env.code_dir) / "requirements.txt"
    return LaunchPlan(
        argv=tuple(argv),
        env=child_env,
        cwd=env.code_dir,
        entry=entry,
        settings=settings,
        env_file=env_file,
        snapshot_json=env.to_json(),
        install_python=python,
        requirements_file=str(requirements) if requirements.is_file() else None,
        dirs_to_create=tuple(env.output_dirs.values()),
        failure_file=env.failure_file,
        log_prefix=prefix,
        hostfile=hostfile,
        hostfile_text=hostfile_text,
        peers=peers,
        exported=tuple(sorted(set(exported) | set(extra) | {"PYTHONPATH", "PYTHONUNBUFFERED"})),
        secrets=plan_secrets(env, environ),
    )


def plan_secrets(env: TrainingEnv, environ: Mapping[str, str]) -> Tuple[str, ...]:
    """Values to scrub from anything printed: secret-named variables and hyperparameters."""
    from trainenv.redact import nested_secrets

    named = dict(environ)
    named.update({f"secret:{path}": text for path, text in nested_secrets(env.hyperparameters).items()})
    return tuple(secret_values(named))
