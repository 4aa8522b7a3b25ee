"""Platform variables read as launch settings: SageMaker's and OCI Data Science's (ADS).

``platform_settings(environ)`` maps a job's environment to ``{setting name: (raw value,
variable)}``; ``resolve_settings`` takes these below the ``TRAINENV_*`` variables and above
``trainenv.yaml``, parses each with its row's parser (a bad value is a ``ConfigError`` naming the
variable and the value) and keeps the variable as the value's origin, which ``trainenv env`` and
``--dry-run`` show. It reads the mapping it is given (and, for ``SAGEMAKER_SUBMIT_DIRECTORY``,
whether that path is a dir) and writes nothing.

SageMaker (always read):

- ``SAGEMAKER_PROGRAM`` → ``entry_point``;
- ``SAGEMAKER_SUBMIT_DIRECTORY`` → ``source``: an archive, or a local dir (the code dir itself
  needs no fetch); ``s3://`` is the platform's to fetch (``ConfigError``);
- ``SAGEMAKER_REQUIREMENTS`` → ``requirements_file`` (a file name in the code dir).

ADS, read only when one of its markers is set (``JOB_RUN_OCID``, ``JOB_RUN_ENTRYPOINT`` or any
``OCI__*`` variable; ``trainenv.cluster_values.is_ads``), so a generic ``WORKING_DIR`` or
``NODE_RANK`` elsewhere changes nothing:

- ``OCI__LAUNCH_CMD`` → ``command`` (launcher-aware; then no entry point is read);
- else the entry file: ``GIT_ENTRYPOINT`` (from the repository root), ``CODE_ENTRYPOINT`` (from
  ``WORKING_DIR``; it wins over ``JOB_RUN_ENTRYPOINT``, which then names ADS's own driver),
  ``JOB_RUN_NOTEBOOK``, ``JOB_RUN_ENTRYPOINT`` (from ``WORKING_DIR``), in that order; with
  ``ENTRY_FUNCTION`` the entry point is ``file.py:func`` → ``entry_point``;
- ``WORKING_DIR`` → ``git_entry_dir`` (the job's working dir); ``PYTHON_PATH`` → ``python_path``;
- ``NOTEBOOK_EXCLUDE_TAGS`` → ``notebook_exclude_tags``;
- ``GIT_URL`` → ``source``; ``GIT_COMMIT``, else ``GIT_BRANCH`` → ``git_ref``; ``OCI__GIT_SSH_KEY_PATH`` → ``git_ssh_key_file``;
- ``OCI__PIP_REQUIREMENTS`` (from ``WORKING_DIR``) → ``requirements_file``; ``OCI__PIP_PKG`` →
  ``requirements``;
- ``OCI__DEEPSPEED`` (true, without ``OCI__LAUNCH_CMD``) → ``distribution`` ``deepspeed``.

The cluster variables (``NODE_COUNT``, ``OCI__WORKER_COUNT``, ``NODE_RANK``) are read by
``trainenv.cluster``. Under ``OCI__LAUNCH_CMD`` the plan also sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` for a command that is not a launcher (``ads_command_env``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping

from trainenv.cluster_values import is_ads, read_var
from trainenv.errors import ConfigError, shown
from trainenv.redact import redact_urls

LAUNCH_COMMAND = "OCI__LAUNCH_CMD"


def platform_settings(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{setting: (raw value, variable)}`` from SageMaker's and (with its markers) ADS's variables."""
    found = _sagemaker(environ)
    if is_ads(environ):
        found.update(_ads(environ))
    return found


def _sagemaker(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    program = read_var(environ, "SAGEMAKER_PROGRAM")
    if program is not None:
        found["entry_point"] = (program, "SAGEMAKER_PROGRAM")
    submit = _submit_directory(environ)
    if submit is not None:
        found["source"] = (submit, "SAGEMAKER_SUBMIT_DIRECTORY")
    requirements = read_var(environ, "SAGEMAKER_REQUIREMENTS")
    if requirements is not None:
        found["requirements_file"] = (requirements, "SAGEMAKER_REQUIREMENTS")
    return found


def _submit_directory(environ: Mapping[str, str]) -> str | None:
    """``SAGEMAKER_SUBMIT_DIRECTORY`` as a source: an archive or a dir, None when it is the code dir."""
    import os

    from trainenv.layout import JobTree
    from trainenv.sources import ARCHIVE_SUFFIXES, PLATFORM_SCHEMES

    name = "SAGEMAKER_SUBMIT_DIRECTORY"
    submit = read_var(environ, name)
    if submit is None or os.path.realpath(submit) == os.path.realpath(JobTree.resolve(environ).code_dir):
        return None  # the code is where the job runs: nothing to fetch
    if submit.lower().startswith(PLATFORM_SCHEMES):
        scheme = submit.split(":", 1)[0]
        raise ConfigError.at(name, None, f"{shown(redact_urls(submit))}: SageMaker fetches {scheme}:// code itself "
                                         "(into the code dir); trainenv takes only a local dir or archive")
    if not (submit.lower().endswith(ARCHIVE_SUFFIXES) or (os.path.isabs(submit) and os.path.isdir(submit))):
        raise ConfigError.at(name, None, f"{shown(submit)}: expected an existing dir (an absolute path) "
                                         f"or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    return submit


def _under(working_dir: str | None, path: str) -> str:
    """``path`` named from ADS's ``WORKING_DIR`` (itself under the code dir), as a code-dir path."""
    return path if working_dir is None or path.startswith("/") else f"{working_dir}/{path}"


def _ads(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    working_dir = read_var(environ, "WORKING_DIR")
    if working_dir is not None:
        working_dir = working_dir.rstrip("/") or "/"
        found["git_entry_dir"] = (working_dir, "WORKING_DIR")
    command = read_var(environ, LAUNCH_COMMAND)
    if command is not None:
        found["command"] = (command, LAUNCH_COMMAND)
    else:
        entry = _ads_entry(environ, working_dir)
        if entry is not None:
            found["entry_point"] = entry
        deepspeed = read_var(environ, "OCI__DEEPSPEED")
        if deepspeed is not None:
            from trainenv.settings.rows import boolean

            try:
                on = boolean(deepspeed)
            except ValueError as exc:
                raise ConfigError.at("OCI__DEEPSPEED", None, f"{shown(deepspeed)}: {exc}") from None
            if on:
                found["distribution"] = ("deepspeed", "OCI__DEEPSPEED")
    for name, variable in (("python_path", "PYTHON_PATH"), ("notebook_exclude_tags", "NOTEBOOK_EXCLUDE_TAGS"),
                           ("source", "GIT_URL"), ("requirements", "OCI__PIP_PKG"),
                           ("git_ssh_key_file", "OCI__GIT_SSH_KEY_PATH")):
        value = read_var(environ, variable)
        if value is not None:
            found[name] = (value, variable)
    for variable in ("GIT_COMMIT", "GIT_BRANCH"):  # a commit wins, as in ADS
        value = read_var(environ, variable)
        if value is not None:
            found["git_ref"] = (value, variable)
            break
    pip_file = read_var(environ, "OCI__PIP_REQUIREMENTS")
    if pip_file is not None:
        found["requirements_file"] = (_under(working_dir, pip_file), "OCI__PIP_REQUIREMENTS")
    return found


def _ads_entry(environ: Mapping[str, str], working_dir: str | None) -> tuple[str, str] | None:
    """The entry point ADS names, and the variable it came from (``ENTRY_FUNCTION`` appended)."""
    git_entry, code_entry = read_var(environ, "GIT_ENTRYPOINT"), read_var(environ, "CODE_ENTRYPOINT")
    notebook, run_entry = read_var(environ, "JOB_RUN_NOTEBOOK"), read_var(environ, "JOB_RUN_ENTRYPOINT")
    if git_entry is not None:
        path, variable = git_entry, "GIT_ENTRYPOINT"
    elif code_entry is not None:
        path, variable = _under(working_dir, code_entry), "CODE_ENTRYPOINT"
    elif notebook is not None:
        path, variable = notebook, "JOB_RUN_NOTEBOOK"
    elif run_entry is not None:
        path, variable = _under(working_dir, run_entry), "JOB_RUN_ENTRYPOINT"
    else:
        return None
    function = read_var(environ, "ENTRY_FUNCTION")
    if function is None:
        return path, variable
    if not path.endswith(".py") or not function.isidentifier():
        raise ConfigError.at("ENTRY_FUNCTION", None, f"{shown(function)}: expected a function name in a .py file "
                                                     f"({variable} is {shown(path)})")
    return f"{path}:{function}", f"{variable}, ENTRY_FUNCTION"


def ads_command_env(num_nodes: int, node_rank: int | None, processes: int, master: str, port: int) -> dict[str, str]:
    """What ADS sets for an ``OCI__LAUNCH_CMD`` that is not a launcher: ``WORLD_SIZE`` (the job's
    process count, at least 1), ``MASTER_ADDR``, ``MASTER_PORT``, and ``RANK`` (the node's)."""
    env = {"WORLD_SIZE": str(max(1, processes * num_nodes)), "MASTER_ADDR": master, "MASTER_PORT": str(port)}
    if node_rank is not None:
        env["RANK"] = str(node_rank)
    return env
