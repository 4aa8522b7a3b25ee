"""The launch plan: exactly what will run (argv, environment, working dir), resolved once.

``build_plan(env, settings, environ)`` turns a ``TrainingEnv`` and ``LaunchSettings`` into a
``LaunchPlan``. Every derived value is decided here and nowhere else: the entry point, the
processes per node, the master port, the compat names, the final argv (``trainenv.launchers``)
and the child's environment. It reads the code dir to check the entry point but writes nothing
and starts nothing. ``trainenv env`` and ``trainenv train --dry-run`` print the plan (the
same values, redacted the same way: ``view``, ``describe``, and ``environment`` for the shell
format); the runner runs it.

The entry point is the ``entry_point`` setting (SageMaker's ``SAGEMAKER_PROGRAM`` and OCI Data
Science's entry variables among its sources: ``trainenv.settings.platforms``), else ``command``,
else PAI's ``command.sh``, else ``sagemaker_program`` in the hyperparameters. The child's
environment is the inherited one, plus the snapshot's variables (``trainenv.exports``;
``TRAINENV_*`` always set, every other name only where the platform did not set it),
``TRAINENV_ENV_FILE``, ``PYTHONUNBUFFERED=1`` and ``PYTHONPATH`` = the working dir, the code dir
and the ``python_path`` setting's dirs before the inherited value (never the launcher's
``sys.path``). A command from OCI Data Science's ``OCI__LAUNCH_CMD`` that is not a launcher also
gets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``settings.platforms``).
A job interpreter in a virtual environment whose ``bin`` is not on ``PATH`` is activated as
``activate`` would (``venv_activation``), a conda pack as ``conda activate`` would.

Size: argv and environment together stay well under what ``exec`` accepts
(``exports.kernel_arg_limit``). Once the inherited environment and a reserve for the
launcher's own arguments are counted, the hyperparameter arguments get at most half of what is
left and the exported names the rest (half of it under ``mpi``, whose ``-x NAME`` arguments
repeat every name). A hyperparameter whose value is over the 32 KiB cap (or the largest ones,
when all together would pass their half) is left out of argv, with a warning naming it; the
entry point still finds it in ``training_env()`` (the snapshot file). A plan that would still
not fit (an inherited environment near the limit) is a ``ConfigError``, never an ``exec`` error.
"""

from __future__ import annotations

import json
import os
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping

    from trainenv.environment import TrainingEnv
    from trainenv.settings import LaunchSettings
    from trainenv.sources.conda_pack import CondaPack

from trainenv.errors import ConfigError, shown
from trainenv.exports import DEFAULT_MASTER_PORT, MAX_ARG_STRLEN, MAX_VAR_BYTES, arg_bytes, cap_args, environ_bytes, kernel_arg_limit, to_env_vars
from trainenv.frozen import fields, frozen, plain
from trainenv.layout import JobTree, absolute_path, snapshot_file
from trainenv.launchers import EntryPoint, Launch, plan_launch
from trainenv.redact import is_secret_name, known_secrets, redact_data
from trainenv.settings.platforms import LAUNCH_COMMAND, ads_command_env

_MODULE_NAME = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"  # compiled on first use (re caches it)
RESERVED_BYTES = 64 * 1024  # interpreter paths, launcher flags, the few names added after export
ENV_FILE_NAME = "TRAINENV_ENV_FILE"


@frozen
class LaunchPlan:
    """What the supervisor runs, and what it needs around the run."""

    argv: tuple[str, ...]  # the final argv, launcher included; () when no entry point is set
    env: Mapping[str, str]  # the child's whole environment
    cwd: str
    entry: EntryPoint | None
    settings: LaunchSettings
    nproc_per_node: int
    master_port: int
    env_file: str
    snapshot_json: str
    install_python: str
    requirements_file: str | None
    dirs_to_create: tuple[str, ...]
    failure_file: str
    log_prefix: str | None = None
    hostfile: str | None = None
    hostfile_text: str | None = None
    peers: tuple[tuple[str, int], ...] = ()
    launcher: str | None = None  # the launcher the argv starts: torchrun, accelerate, deepspeed
    conda_pack: CondaPack | None = None  # its bin/python is ``install_python`` and the job's
    exported: tuple[str, ...] = ()  # the names trainenv sets in ``env``, in order
    omitted_args: tuple[str, ...] = ()  # hyperparameters left out of argv (too large)
    secrets: tuple[str, ...] = ()
    _hidden = ("secrets",)
    _not_compared = ("exported", "secrets")

    @property
    def warnings(self) -> tuple[str, ...]:
        """One line per hyperparameter left out of argv."""
        return tuple(
            f"hyperparameter {name!r} is left out of the arguments: its value is over {MAX_VAR_BYTES // 1024} KiB "
            "or the arguments would not fit; the entry point finds it in training_env() (TRAINENV_ENV_FILE)"
            for name in self.omitted_args
        )

    @property
    def python_source(self) -> str:
        """Where the job's interpreter (``install_python``) comes from, for messages."""
        if self.conda_pack is not None:
            return self.conda_pack.source
        if self.settings.python:
            return self.settings.sources.get("python", "TRAINENV_PYTHON")
        return "the interpreter running trainenv"

    def environment(self) -> dict[str, str]:
        """``{name: value}`` of every name trainenv sets (the platform's value where it set one)."""
        return {name: self.env.get(name, "") for name in self.exported}

    def view(self, show_secrets: bool = False) -> dict[str, Any]:
        """The plan as data (``trainenv env --format json``), redacted unless ``show_secrets``."""
        settings = self.settings
        data: dict[str, Any] = {
            "entry_point": None if self.entry is None else {"kind": self.entry.kind, "target": self.entry.target, "source": self.entry.source},
            "distribution": settings.distribution,
            "argv": list(self.argv),
            "cwd": self.cwd,
            "nproc_per_node": self.nproc_per_node,
            "master_port": self.master_port,
            "env_file": self.env_file,
            "hostfile": self.hostfile,
            "requirements": {"file": self.requirements_file, "extra": list(settings.requirements), "install": settings.install},
            "python": self.install_python,
            "conda_pack": None if self.conda_pack is None else {"archive": self.conda_pack.archive, "prefix": self.conda_pack.prefix},
            "grace_seconds": settings.grace_seconds,
            "max_run_seconds": settings.max_run_seconds,
            "dirs_to_create": list(self.dirs_to_create),
            "omitted_args": list(self.omitted_args),
            "settings": {
                name: {"value": plain(getattr(settings, name)), "source": settings.sources.get(name, "default")}
                for name in fields(settings)
                if name != "sources"
            },
            "environment": self.environment(),
        }
        if show_secrets:
            return data
        redacted: dict[str, Any] = redact_data(data, self.secrets)
        return redacted

    def describe(self, show_secrets: bool = False) -> str:
        """The plan for a reader (``trainenv train --dry-run``): the same values as ``view``."""
        data = self.view(show_secrets)
        entry = data["entry_point"]
        requirements = data["requirements"]
        lines = [
            f"entry point   {entry['kind']}: {entry['target']}  ({entry['source']})" if entry else "entry point   (none)",
            f"distribution  {data['distribution']}, {data['nproc_per_node']} per node, master port {data['master_port']}",
            f"argv          {json.dumps(data['argv'], ensure_ascii=False)}",
            f"cwd           {data['cwd']}",
            *([f"source        {data['settings']['source']['value']} (fetched into the code dir at launch)"] if self.settings.source else []),
            *([f"conda pack    {data['conda_pack']['archive']} -> {data['conda_pack']['prefix']} (unpacked at launch; "
               f"{data['python']} runs the install and the job)"] if data["conda_pack"] else []),
            f"env file      {data['env_file']}",
            f"requirements  {requirements['file'] or '(none)'}"
            + (f" + {' '.join(requirements['extra'])}" if requirements["extra"] else "")
            + ("" if requirements["install"] else " (install disabled)"),
            f"grace         {data['grace_seconds']:g} s"
            + (f", time limit {data['max_run_seconds']:g} s" if data["max_run_seconds"] else ""),
        ]
        if data["hostfile"]:
            lines.append(f"hostfile      {data['hostfile']}")
        platform = [f"{name} from {source}" for name, source in self.settings.sources.items() if _from_platform(source)]
        if platform:
            lines.append(f"platform      {'; '.join(platform)}")
        lines += [f"warning: {line}" for line in self.warnings]
        lines.append("environment (set by trainenv):")
        true_values = self.environment()
        for name, value in data["environment"].items():
            if value == true_values[name]:
                lines.append(f"  {name}={value}")
            else:
                lines.append(f"  # {name}: {_secret_kind(name)}, not shown (--show-secrets shows it)")
        return "\n".join(lines)


def _from_platform(source: str) -> bool:
    """A setting's source that is a platform's variable (not a flag, ``TRAINENV_*``, a file or the default)."""
    return source != "default" and ": " not in source and not source.startswith(("option ", "TRAINENV_"))


def _secret_kind(name: str) -> str:
    return "secret" if is_secret_name(name) else "holds a secret"


_NO_ENTRY = (
    "no entry point: set TRAINENV_ENTRY_POINT (or --entry-point, or entry_point in trainenv.yaml), "
    "TRAINENV_COMMAND, or write {command_file}"
)


def _resolve_entry(env: TrainingEnv, settings: LaunchSettings, environ: Mapping[str, str], code_fetched: bool) -> EntryPoint | None:
    if settings.entry_point:
        entry, source = settings.entry_point.strip(), settings.sources.get("entry_point", "entry_point")
        try:
            return _classify(env, entry, source, environ)
        except ConfigError:
            if not settings.source or code_fetched or entry.startswith("-m"):
                raise
            return _pending(env, entry, source)
    if isinstance(settings.command, tuple):  # a list: exec'd as is, no shell
        shown_list = json.dumps(settings.command, ensure_ascii=False)
        return EntryPoint("command", shown_list, settings.sources.get("command", "command"), argv=settings.command)
    if settings.command:
        return EntryPoint("command", settings.command, settings.sources.get("command", "command"))
    command_file = JobTree(env.base_dir).command_file
    if os.path.isfile(command_file):
        from trainenv.config import decode_text, read_bytes

        data = read_bytes(command_file)  # a ConfigError naming the file when unreadable or huge
        return EntryPoint("command", decode_text(command_file, data or b""), command_file)
    program = env.framework_parameters.get("sagemaker_program")
    if program:
        return _classify(env, str(program), "sagemaker_program", environ)
    return None


def _classify(env: TrainingEnv, entry: str, source: str, environ: Mapping[str, str]) -> EntryPoint:
    if ":" in entry:
        function = _classify_function(env, entry, source)
        if function is not None:
            return function
    if entry.startswith("-m"):
        module = entry[2:].strip()
        if not re.fullmatch(_MODULE_NAME, module):
            raise ConfigError.at(source, None, f"{shown(entry)}: expected '-m package.module'")
        return EntryPoint("module", module, source, entry)
    path = absolute_path(os.path.join(env.code_dir, entry))  # an absolute entry stays itself
    if entry.endswith((".py", ".sh", ".ipynb")) or os.sep in entry:
        if os.path.isdir(path):
            raise ConfigError.at(source, None, f"{shown(entry)}: {path} is a directory, expected a file")
        if not os.path.isfile(path):
            raise ConfigError.at(source, None, f"{shown(entry)}: {path} does not exist")
        if entry.endswith(".py"):
            return EntryPoint("script", path, source, entry)
        if entry.endswith(".sh"):
            return EntryPoint("shell", path, source, entry)
        if entry.endswith(".ipynb"):  # trainenv.runtimes.notebook
            return EntryPoint("notebook", path, source, entry)
    if os.path.isdir(path):
        raise ConfigError.at(source, None, f"{shown(entry)}: {path} is a directory, expected a file")
    if os.path.isfile(path):
        if not os.access(path, os.X_OK):
            raise ConfigError.at(source, None, f"{shown(entry)}: {path} is not executable (chmod +x it, or name a .py/.sh file)")
        return EntryPoint("executable", path, source, entry)
    import shutil

    found = shutil.which(entry, path=environ.get("PATH", os.defpath))
    if found:
        return EntryPoint("executable", found, source, entry)
    raise ConfigError.at(source, None, f"{shown(entry)}: not found in {env.code_dir} nor on PATH")


def _pending(env: TrainingEnv, entry: str, source: str) -> EntryPoint:
    """An entry point in code not fetched yet (``TRAINENV_SOURCE``, before the launch): by its name alone."""
    where, _, name = entry.rpartition(":") if ":" in entry else (entry, "", "")
    path = absolute_path(os.path.join(env.code_dir, where))
    if name:
        return EntryPoint("function", f"{path}:{name}", source, entry)
    kind = "script" if entry.endswith(".py") else "shell" if entry.endswith(".sh") else "notebook" if entry.endswith(".ipynb") else "executable"
    return EntryPoint(kind, path, source, entry)


def _classify_function(env: TrainingEnv, entry: str, source: str) -> EntryPoint | None:
    """``pkg.mod:func`` or ``path/file.py:func`` (``trainenv.runtimes.function``), else None."""
    from trainenv.runtimes.function import parse_target

    target = parse_target(entry)
    if target is None:
        return None
    where, name = target
    if not where.endswith(".py"):
        return EntryPoint("function", entry, source, entry)
    path = absolute_path(os.path.join(env.code_dir, where))
    if not os.path.isfile(path):
        problem = "is a directory, expected a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError.at(source, None, f"{shown(entry)}: {path} {problem}")
    return EntryPoint("function", f"{path}:{name}", source, entry)


def _requirements_file(env: TrainingEnv, settings: LaunchSettings, code_fetched: bool) -> str:
    """``requirements.txt`` in the code dir, or the ``requirements_file`` setting's file there
    (which must exist once the code is there, when requirements are installed)."""
    if not settings.requirements_file:
        return JobTree(env.base_dir).requirements_file
    path = os.path.join(env.code_dir, settings.requirements_file)
    if settings.install and (code_fetched or not settings.source) and not os.path.isfile(path):
        where = settings.sources.get("requirements_file", "requirements_file")
        raise ConfigError.at(where, None, f"{shown(settings.requirements_file)}: {path} is not a file")
    return path


def _workdir(env: TrainingEnv, settings: LaunchSettings, code_fetched: bool) -> str:
    """The job's working dir: the code dir, or its ``git_entry_dir`` (checked once the code is there)."""
    if not settings.git_entry_dir:
        return env.code_dir
    path = os.path.join(env.code_dir, settings.git_entry_dir)
    if (code_fetched or not settings.source) and not os.path.isdir(path):
        where = settings.sources.get("git_entry_dir", "git_entry_dir")
        raise ConfigError.at(where, None, f"{shown(settings.git_entry_dir)}: {path} is not a directory")
    return path


def run_dir(env: TrainingEnv, environ: Mapping[str, str]) -> str:
    """Where this launch keeps its own files (``JobTree.run_dir``): never an output channel."""
    return JobTree(env.base_dir, env.local_mode).run_dir(env.job_name, env.current_host, environ)


def child_environ(
    environ: Mapping[str, str], exported: Mapping[str, str], code_dir: str, extra: Mapping[str, str]
) -> dict[str, str]:
    """What the child gets: inherited env + exported names (platform values kept) + Python hygiene.

    ``code_dir`` goes first on ``PYTHONPATH``: the code dir, or ``entry dir:code dir``.
    """
    child = dict(environ)
    for names in (exported, extra):
        for name, value in names.items():
            if name.startswith("TRAINENV_") or name not in child:
                child[name] = value
    inherited = environ.get("PYTHONPATH", "")
    child["PYTHONPATH"] = code_dir + (os.pathsep + inherited if inherited else "")
    child["PYTHONUNBUFFERED"] = "1"
    return child


def venv_activation(python: str, path: str) -> dict[str, str]:
    """``PATH`` (and ``VIRTUAL_ENV``) as ``activate`` would set them, when the job's interpreter is
    a virtual environment's and its ``bin`` is not on ``path``: so ``python``, ``pip`` or
    ``torchrun`` in a command are the job's own. Empty otherwise (a system interpreter, an
    activated venv)."""
    bin_dir = os.path.dirname(python)
    home = os.path.dirname(bin_dir)
    if not os.path.isabs(python) or not os.path.isfile(os.path.join(home, "pyvenv.cfg")):
        return {}
    entries = path.split(os.pathsep) if path else []
    if any(os.path.normpath(entry) == os.path.normpath(bin_dir) for entry in entries if entry):
        return {}
    return {"PATH": bin_dir + (os.pathsep + path if path else ""), "VIRTUAL_ENV": home}


def build_plan(
    env: TrainingEnv,
    settings: LaunchSettings,
    environ: Mapping[str, str],
    require_entry: bool = True,
    job_args: tuple[str, ...] = (),
    code_fetched: bool = False,
) -> LaunchPlan:
    """Everything ``trainenv train`` will do, as data.

    Without an entry point this is a ``ConfigError``, unless ``require_entry`` is false (what
    ``trainenv env`` shows before the code is there): then ``argv`` is empty. ``job_args``
    (``trainenv train -- ARGS``) follow the hyperparameter arguments; an entry function reads
    them instead of the hyperparameters; a command refuses them. With a ``source`` setting the code is
    fetched at launch: until then (``code_fetched`` false: ``env``, ``--dry-run``) an entry point
    not found in the code dir is taken by its name.
    """
    entry = _resolve_entry(env, settings, environ, code_fetched)
    if entry is None and require_entry:
        raise ConfigError(_NO_ENTRY.format(command_file=JobTree(env.base_dir).command_file))
    if job_args and (entry is None or entry.kind == "command"):
        kind = "no entry point" if entry is None else "a command, which takes no arguments"
        raise ConfigError(
            f"arguments after -- ({shown(' '.join(job_args))}) go to an entry point (a script, module, executable or "
            f"entry function), but this job has {kind}: put them in the command itself"
        )
    if job_args and entry is not None and entry.kind == "notebook":
        raise ConfigError.at(
            entry.source, None, f"arguments after -- ({shown(' '.join(job_args))}) cannot reach a notebook, which has no "
            "argv: give the values as hyperparameters (injected as a cell after the one tagged 'parameters')"
        )
    pack = None
    if settings.conda_pack:  # the pack's bin/python runs the install and the job (trainenv.sources.conda_pack)
        from trainenv.sources.conda_pack import plan_pack

        python_source = settings.sources.get("python", "python") if settings.python else None
        source = settings.sources.get("conda_pack", "conda_pack")
        pack = plan_pack(settings.conda_pack, source, python_source, os.path.dirname(run_dir(env, environ)))
    python = pack.python if pack is not None else settings.interpreter
    venv = venv_activation(python, environ.get("PATH", os.defpath)) if pack is None else {}
    activated = ("PATH", "CONDA_PREFIX") if pack is not None else tuple(venv)
    nproc = settings.nproc_per_node or env.platform_nproc_per_node or env.num_gpus or 1
    port = int(settings.master_port or env.master_port or DEFAULT_MASTER_PORT)
    limit = kernel_arg_limit()
    room = max(0, limit - RESERVED_BYTES - environ_bytes(environ))
    args: tuple[str, ...] = ()
    omitted_args: tuple[str, ...] = ()
    args_size = 0
    if entry is not None and entry.kind == "function":  # hyperparameters from the snapshot, or ARGS by ADS's rules
        args = ("--", *job_args) if job_args else ()
    elif entry is not None and entry.kind == "notebook":  # hyperparameters from the snapshot, as a cell
        from trainenv.runtimes.notebook import runtime_args

        args = runtime_args(entry.target, env.output_dir, settings.notebook_exclude_tags, settings.grace_seconds)
    elif entry is not None and entry.kind != "command":  # the hyperparameter arguments, then the job's own ARGS
        args, omitted_args, args_size = cap_args(env.user_args, room // 2)
        args += tuple(job_args)
    args_size += sum(arg_bytes(arg) for arg in job_args)
    exported = to_env_vars(
        env,
        settings.compat,
        nproc_per_node=nproc,
        master_port=port,
        entry_point=entry.given if entry is not None else None,
        training_job_name=environ.get("TRAINING_JOB_NAME"),
        total_budget=(room - args_size) // (2 if settings.distribution == "mpi" else 1),
    )
    directory = run_dir(env, environ)
    env_file = snapshot_file(directory)
    names = (*exported, ENV_FILE_NAME, "PYTHONPATH", "PYTHONUNBUFFERED", *activated)
    launch = Launch(argv=())
    if entry is not None:
        launch = plan_launch(env, settings, entry, python, args, nproc, port, directory, environ, names)
    extra = {ENV_FILE_NAME: env_file, **launch.env}
    if settings.sources.get("command") == LAUNCH_COMMAND and launch.launcher is None:  # as ADS sets them
        extra.update(ads_command_env(env.num_nodes, env.node_rank if env.num_nodes == 1 else None, nproc, env.master_host, port))
    rank = "?" if env.node_rank is None else env.node_rank
    requirements = _requirements_file(env, settings, code_fetched)
    dirs = list(env.output_dirs.values())
    if "SM_OUTPUT_DATA_DIR" in exported:  # SageMaker scripts write there without creating it
        dirs.append(exported["SM_OUTPUT_DATA_DIR"])
    workdir = _workdir(env, settings, code_fetched)
    if workdir == env.code_dir:
        dirs.append(workdir)  # a command job may come with no code at all: it still runs in the code dir
    extra_paths = (os.path.normpath(os.path.join(workdir, path)) for path in settings.python_path)
    paths = os.pathsep.join(dict.fromkeys((workdir, env.code_dir, *extra_paths)))
    child = child_environ(environ, exported, paths, extra)
    if pack is not None:  # as `conda activate` would: its bin/ first on PATH, CONDA_PREFIX
        child.update(pack.environ(child.get("PATH", os.defpath)))
    child.update(venv)
    too_long = [arg for arg in launch.argv if len(arg.encode("utf-8", "surrogateescape")) >= MAX_ARG_STRLEN]
    if too_long:
        where = entry.source if entry is not None else "the command"
        raise ConfigError(
            f"{where}: one argument of the job is {len(too_long[0].encode('utf-8', 'surrogateescape'))} bytes, over the "
            f"{MAX_ARG_STRLEN // 1024} KiB the kernel takes for a single argument; put long text in a file under the code dir"
        )
    size = environ_bytes(child) + sum(arg_bytes(arg) for arg in launch.argv)
    if size > limit:
        raise ConfigError(
            f"the job's arguments and environment take {size} bytes, over the {limit} bytes exec accepts here; "
            f"the inherited environment alone takes {environ_bytes(environ)}: unset large variables or raise the stack limit (ulimit -s)"
        )
    return LaunchPlan(
        argv=tuple(launch.argv),
        env=child,
        cwd=workdir,
        entry=entry,
        settings=settings,
        nproc_per_node=nproc,
        master_port=port,
        env_file=env_file,
        snapshot_json=env.to_json(),
        install_python=python,
        requirements_file=requirements if settings.requirements_file or os.path.isfile(requirements) else None,
        dirs_to_create=tuple(dict.fromkeys(dirs)),
        failure_file=env.failure_file,
        log_prefix=f"[{env.current_host}:{rank}] " if settings.log_prefix else None,
        hostfile=launch.hostfile,
        hostfile_text=launch.hostfile_text,
        peers=launch.peers,
        launcher=launch.launcher,
        conda_pack=pack,
        exported=tuple(dict.fromkeys((*exported, *extra, "PYTHONPATH", "PYTHONUNBUFFERED", *activated))),
        omitted_args=omitted_args,
        secrets=tuple(known_secrets(environ, env.hyperparameters)),
    )


def read_plan(flags: Mapping[str, object], environ: Mapping[str, str]) -> tuple[TrainingEnv, LaunchPlan]:
    """The snapshot and the plan ``trainenv env`` prints; reads files, writes nothing.

    Inside a launched job the snapshot is the launcher's (``TRAINENV_ENV_FILE``).
    """
    from trainenv import config
    from trainenv.environment import training_env
    from trainenv.settings import resolve_settings

    file_settings, settings_path = config.read_file_settings(JobTree.resolve(environ).settings_files)
    settings = resolve_settings(flags, environ, file_settings, settings_path or "trainenv.yaml")
    env = training_env(environ)
    return env, build_plan(env, settings, environ, require_entry=False)
