"""Launch settings: one table, resolved flag → ``TRAINENV_*`` variable → a platform's variable
(``trainenv.settings.platforms``) → ``trainenv.yaml`` → default.

Each row of ``SETTINGS`` is one setting: its name (also its key in ``trainenv.yaml``), its
``trainenv train`` flag, its variable, how to parse it, its default and its help. The CLI
options, the variable lookups, ``--help`` and the README table all come from this table; every
variable trainenv reads to launch a job is a row here (a few have no flag or no file key).
``resolve_settings`` returns a frozen ``LaunchSettings``. Every source that gives a value is
checked, also when a higher one wins: a bad value is a ``ConfigError`` naming where it came from
(the flag, the variable or the file and key) and the value.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping

from trainenv.errors import ConfigError, shown
from trainenv.frozen import FrozenDict, frozen
from trainenv.exports import parse_compat
from trainenv.settings.rows import Setting, boolean as _boolean, choice as _choice, number as _number, string_items, text as _text, words as _words

def _compat(value: Any) -> tuple[str, ...]:
    """A comma list or a YAML list of compat sets (``trainenv.exports``)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(string_items(value))
    return parse_compat(_text(value), source="compat")


def _command(value: Any) -> str | tuple[str, ...]:
    """A shell command string, or an argv run as is: a YAML list or a JSON list of strings."""
    if isinstance(value, (list, tuple)):
        argv = string_items(value)
    elif not _text(value).lstrip().startswith("["):
        return _text(value)
    else:
        import json  # deferred: most commands are strings

        try:
            items = json.loads(_text(value))
        except ValueError as exc:
            raise ValueError(f"starts with '[' but is not a JSON list: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("starts with '[' but is not a JSON list of strings")
        argv = tuple(items)
    if not argv or not argv[0]:
        raise ValueError("an argv list needs a program as its first item")
    return argv


def _relative_dir(value: Any) -> str:
    """A sub-dir of the code dir: relative, without ``..``."""
    path = _text(value).strip().rstrip("/")
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise ValueError("expected a sub-dir of the code dir: a relative path without '..'")
    return path


def _paths(value: Any) -> tuple[str, ...]:
    """Import paths: a colon-separated string or a YAML list (empty entries dropped)."""
    items = string_items(value) if isinstance(value, (list, tuple)) else tuple(_text(value).split(":"))
    return tuple(item.strip() for item in items if item.strip())


def _relative_file(value: Any) -> str:
    """A file in the code dir: relative, without ``..``."""
    path = _text(value).strip()
    if not path or path.startswith("/") or ".." in path.split("/") or path.endswith("/"):
        raise ValueError("expected a file in the code dir: a relative path without '..'")
    return path


def _tag_list(value: Any) -> tuple[str, ...]:
    """Notebook cell tags: a JSON list of strings (a YAML list in trainenv.yaml)."""
    if isinstance(value, (list, tuple)):
        return string_items(value)
    import json  # deferred: most jobs run no notebook

    try:
        items = json.loads(_text(value))
    except ValueError:
        raise ValueError('expected a JSON list of strings, e.g. ["skip", "slow"]') from None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('expected a JSON list of strings, e.g. ["skip", "slow"]')
    return tuple(items)


def _conda_pack(value: Any) -> str:
    """A local conda-pack archive (``trainenv.sources.conda_pack``)."""
    from trainenv.sources.conda_pack import parse_pack

    return parse_pack(_text(value))


DISTRIBUTIONS = ("none", "torchrun", "mpi", "accelerate", "deepspeed")
RDZV_BACKENDS = ("static", "c10d")
INSTALLERS = ("auto", "uv", "pip")
LOG_LEVELS = ("quiet", "info", "debug")
# Keys of trainenv.yaml that are not launch settings but cluster facts (trainenv.cluster).
CLUSTER_KEYS = ("hosts", "current_host")


SETTINGS: tuple[Setting, ...] = (
    Setting("entry_point", "--entry-point", "TRAINENV_ENTRY_POINT", _text, None,
            "What to run: train.py, '-m pkg.mod', run.sh, or an executable in the code dir or on PATH (hyperparameters are appended as arguments); "
            "or an entry function, pkg.mod:func or file.py:func, called with the hyperparameters as keyword arguments.", "ENTRY"),
    Setting("command", "--command", "TRAINENV_COMMAND", _command, None,
            "A shell command run by /bin/sh -c in the code dir (PAI style), or a JSON list (a YAML list in trainenv.yaml) exec'd as is, no shell; "
            "hyperparameters are not appended.", "CMD"),
    Setting("distribution", "--distribution", "TRAINENV_DISTRIBUTION", _choice(DISTRIBUTIONS), "none",
            "none: one process per node; torchrun: python -m torch.distributed.run on every node; mpi: mpirun from node 0; "
            "accelerate, deepspeed: that launcher on every node.", "KIND", DISTRIBUTIONS),
    Setting("nproc_per_node", "--nproc-per-node", "TRAINENV_NPROC_PER_NODE", _number(int, 1, 4096), None,
            "Processes per node (torchrun, mpi). Default: the platform's value, else GPUs on this node, else 1.", "N"),
    Setting("max_run_seconds", "--max-run-seconds", "TRAINENV_MAX_RUN_SECONDS", _number(float, 0.001), None,
            "Stop the job after this many seconds (SIGTERM, grace, SIGKILL) and exit 124.", "SECONDS"),
    Setting("grace_seconds", "--grace-seconds", "TRAINENV_GRACE_SECONDS", _number(float, 0), 30.0,
            "Seconds between SIGTERM and SIGKILL when the job is stopped.", "SECONDS"),
    Setting("compat", "--compat", "TRAINENV_COMPAT", _compat, ("pai",),
            "Extra variable sets to export: comma list of pai, sagemaker, vertex, or none.", "SETS"),
    Setting("requirements", "--requirements", "TRAINENV_REQUIREMENTS", _words, (),
            "Extra requirement specifiers installed after usercode/requirements.txt (space separated).", "SPECS"),
    Setting("install", "--install/--no-install", "TRAINENV_INSTALL", _boolean, True,
            "Install requirements before the entry point starts.", "BOOL"),
    Setting("python", "--python", "TRAINENV_PYTHON", _text, None,
            "Interpreter for Python entry points and for installing requirements (default: the one running trainenv).", "PATH"),
    Setting("conda_pack", "--conda-pack", "TRAINENV_CONDA_PACK", _conda_pack, None,
            "A conda-pack archive (a local .tar.gz or .tgz): unpacked once per node (conda-unpack run), its bin/python runs the "
            "requirements install and the job, its bin/ first on PATH.", "PACK"),
    Setting("log_prefix", "--log-prefix/--no-log-prefix", "TRAINENV_LOG_PREFIX", _boolean, False,
            "Prefix every line of the job's output with [host:rank].", "BOOL"),
    Setting("master_port", "--master-port", "TRAINENV_MASTER_PORT", _number(int, 1, 65535), None,
            "Port of the rendezvous on node 0 (default: the platform's MASTER_PORT, else 29500).", "PORT"),
    Setting("rdzv_backend", "--rdzv-backend", "TRAINENV_RDZV_BACKEND", _choice(RDZV_BACKENDS), "static",
            "torchrun rendezvous: static (fixed ranks) or c10d.", "KIND", RDZV_BACKENDS),
    Setting("max_restarts", "--max-restarts", "TRAINENV_MAX_RESTARTS", _number(int, 0, 1000), 0,
            "torchrun: restarts of the worker group before the job fails.", "N"),
    Setting("peer_timeout_seconds", "--peer-timeout-seconds", "TRAINENV_PEER_TIMEOUT_SECONDS", _number(float, 0), 600.0,
            "Several nodes: how long to wait for the master (and, for mpi, every host) to accept connections.", "SECONDS"),
    Setting("mpi_rsh_agent", "--mpi-rsh-agent", "TRAINENV_MPI_RSH_AGENT", _text, "ssh",
            "mpi: the remote shell Open MPI starts its daemons with (plm_rsh_agent).", "CMD"),
    Setting("mpi_options", "--mpi-options", "TRAINENV_MPI_OPTIONS", _words, (),
            "mpi: extra mpirun arguments (binding, interface flags), split like a shell would.", "ARGS"),
    Setting("source", "--source", "TRAINENV_SOURCE", _text, None,
            "Where the code comes from when it is not already in the code dir: an archive (.tar.gz, .tgz, .tar, .zip), an absolute dir, or a git URL "
            "(https://, ssh://, git@, file://); fetched into the code dir, replacing its contents, before requirements are installed.", "SOURCE"),
    Setting("git_ref", "--git-ref", "TRAINENV_GIT_REF", _text, None,
            "The branch, tag or commit of a git source (default: its default branch).", "REF"),
    Setting("git_ssh_key_file", "--git-ssh-key-file", "TRAINENV_GIT_SSH_KEY_FILE", _text, None,
            "A private key file for an ssh git source (ssh://, git@): git's ssh uses it and no other key; an unknown host key is accepted.", "FILE"),
    Setting("git_entry_dir", "--git-entry-dir", "TRAINENV_GIT_ENTRY_DIR", _relative_dir, None,
            "A sub-dir of the code dir to run from: the job's working dir, first on PYTHONPATH (the entry point is still named from the code dir).", "DIR"),
    Setting("python_path", "--python-path", "TRAINENV_PYTHON_PATH", _paths, (),
            "Extra import paths (colon separated), relative to the job's working dir: added to PYTHONPATH after the working dir and the code dir.", "PATHS"),
    Setting("requirements_file", "--requirements-file", "TRAINENV_REQUIREMENTS_FILE", _relative_file, None,
            "The requirements file installed before the job, relative to the code dir (default: requirements.txt).", "FILE"),
    Setting("source_max_bytes", "--source-max-bytes", "TRAINENV_SOURCE_MAX_BYTES", _number(int, 1), 10 * 1024**3,
            "An archive source is refused when its contents would take more than this many bytes.", "BYTES"),
    Setting("installer", "--installer", "TRAINENV_INSTALLER", _choice(INSTALLERS), "auto",
            "What installs the requirements: auto (uv if found, else pip), uv or pip.", "TOOL", INSTALLERS),
    Setting("notebook_exclude_tags", "--notebook-exclude-tags", "TRAINENV_NOTEBOOK_EXCLUDE_TAGS", _tag_list, (),
            "A notebook entry point (.ipynb): cells with any of these tags are skipped (a JSON list of strings; a YAML list in trainenv.yaml).", "JSON"),
    # Read before trainenv.yaml is (it governs the log of reading it): no file key.
    Setting("log_level", "--log-level", "TRAINENV_LOG_LEVEL", _choice(LOG_LEVELS), "info",
            "trainenv's own log: quiet (errors only), info or debug.", "LEVEL", LOG_LEVELS, in_file=False),
    # Where this machine keeps the launcher's files: the machine's business, not the job's code.
    Setting("run_dir", "", "TRAINENV_RUN_DIR", _text, None,
            "Directory for the launcher's own files of a run (default: $TMPDIR/trainenv-<uid>).", "DIR", in_file=False),
    # The platform names the job.
    Setting("job_name", "", "TRAINENV_JOB_NAME", _text, None,
            "The job's name (default: the platform's TRAINING_JOB_NAME or sagemaker_job_name, else trainenv-job).", "NAME", in_file=False),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
_PLATFORM = 2  # the level of a platform's variable among a setting's sources


@frozen
class LaunchSettings:
    """The resolved launch settings, and where each came from (for --dry-run and errors)."""

    entry_point: str | None = None
    command: str | tuple[str, ...] | None = None  # a tuple: an argv run without a shell
    distribution: str = "none"
    nproc_per_node: int | None = None
    max_run_seconds: float | None = None
    grace_seconds: float = 30.0
    compat: tuple[str, ...] = ("pai",)
    requirements: tuple[str, ...] = ()
    install: bool = True
    python: str | None = None
    conda_pack: str | None = None
    log_prefix: bool = False
    master_port: int | None = None
    rdzv_backend: str = "static"
    max_restarts: int = 0
    peer_timeout_seconds: float = 600.0
    mpi_rsh_agent: str = "ssh"
    mpi_options: tuple[str, ...] = ()
    source: str | None = None
    git_ref: str | None = None
    git_ssh_key_file: str | None = None
    git_entry_dir: str | None = None
    python_path: tuple[str, ...] = ()
    requirements_file: str | None = None
    source_max_bytes: int = 10 * 1024**3
    installer: str = "auto"
    notebook_exclude_tags: tuple[str, ...] = ()
    log_level: str = "info"
    run_dir: str | None = None
    job_name: str | None = None
    sources: Mapping[str, str] = FrozenDict()  # setting name → where its value came from
    _not_compared = ("sources",)

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable


def _file_key(file_settings: Mapping[str, Any], name: str) -> str | None:
    for key in (name, name.replace("_", "-")):
        if key in file_settings:
            return key
    return None


def _check_file_keys(file_settings: Mapping[str, Any], file_source: object) -> None:
    in_file = [s.name for s in SETTINGS if s.in_file]
    known = set(in_file) | {n.replace("_", "-") for n in in_file} | set(CLUSTER_KEYS)
    for key in file_settings:
        if key in known:
            continue
        setting = SETTINGS_BY_NAME.get(str(key).replace("-", "_"))
        if setting is not None:
            raise ConfigError.at(file_source, key, f"not a trainenv.yaml setting; set {setting.variable} instead")
        raise ConfigError.at(file_source, key, f"unknown setting; known settings: {', '.join(in_file)}")


def _candidates(
    setting: Setting,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_settings: Mapping[str, Any],
    file_source: object,
    platform: Mapping[str, tuple[str, str]],
) -> list[tuple[Any, object, str | None]]:
    """``(raw value, source, key)`` from each source that sets ``setting``, highest first."""
    found: list[tuple[Any, object, str | None]] = []
    if setting.flag and flags.get(setting.name) is not None:
        found.append((flags[setting.name], f"option {setting.flag.split('/')[0]}", None))
    if environ.get(setting.variable, "") != "":
        found.append((environ[setting.variable], setting.variable, None))
    if setting.name in platform:  # a platform's variable (trainenv.settings.platforms)
        found.append((*platform[setting.name], None))
    key = _file_key(file_settings, setting.name) if setting.in_file else None
    if key is not None and file_settings[key] is not None:
        found.append((file_settings[key], file_source, key))
    return found


def _parse(setting: Setting, raw: Any, source: object, key: str | None) -> Any:
    try:
        return setting.parse(raw)
    except ConfigError as exc:
        raise ConfigError.at(source, key, f"{shown(raw)}: {str(exc).split(': ', 1)[-1]}") from None
    except ValueError as exc:
        raise ConfigError.at(source, key, f"{shown(raw)}: {exc}") from None


def _one_entry(values: dict[str, Any], sources: dict[str, str], levels: Mapping[str, int]) -> None:
    """A platform's entry point (or command) meeting a command (or entry point) from another
    source: the higher source's stays, the lower one is dropped (``levels``: 2 is the platform)."""
    names = ("entry_point", "command")
    if not (values["entry_point"] and values["command"]) or _PLATFORM not in (levels.get(n) for n in names):
        return
    loser = max(names, key=lambda name: levels[name])
    values[loser], sources[loser] = SETTINGS_BY_NAME[loser].default, "default"


def resolve_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_settings: Mapping[str, Any],
    file_source: object = "trainenv.yaml",
) -> LaunchSettings:
    """Each setting from the first of: flag, variable, a platform's variable, ``trainenv.yaml``, default.

    The value of every source is parsed, so a bad one is an error even where a higher one wins.
    A platform names one entry, an entry point or a command: it gives way to the other one from a
    flag or variable, and wins over the other one from ``trainenv.yaml``.
    """
    from trainenv.settings.platforms import platform_settings

    _check_file_keys(file_settings, file_source)
    platform = platform_settings(environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    levels: dict[str, int] = {}  # the winner's level: 1 a flag or variable, 2 a platform, 3 the file
    for setting in SETTINGS:
        candidates = _candidates(setting, flags, environ, file_settings, file_source, platform)
        # Every source's value is parsed, not only the winner's: a bad one is an error either way.
        parsed = [_parse(setting, raw, source, key) for raw, source, key in candidates]
        if not candidates:
            values[setting.name] = setting.default
            sources[setting.name] = "default"
            continue
        _, source, key = candidates[0]
        from_platform = setting.name in platform and source == platform[setting.name][1]
        levels[setting.name] = 3 if key is not None else _PLATFORM if from_platform else 1
        values[setting.name] = parsed[0]
        sources[setting.name] = str(source) if key is None else f"{source}: {key}"
    _one_entry(values, sources, levels)
    if values["entry_point"] and values["command"]:
        raise ConfigError(
            f"both an entry point ({sources['entry_point']}) and a command ({sources['command']}) are set; use one"
        )
    return LaunchSettings(**values, sources=FrozenDict(sources))
