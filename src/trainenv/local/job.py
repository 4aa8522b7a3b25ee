"""Lay out and run one local job (``trainenv local``).

Every run gets a job dir of its own: ``--job-dir`` when it is new or empty, else a fresh
``./trainenv-jobs/<UTC time>-<pid>``; its path is printed. Two runs started together never
share a file: each has its own tree, snapshot (``env.json``), hostfile and output. The job dir
gets, as a platform lays it out:

- ``usercode``: a copy of ``--source-dir`` (links kept as links; an empty dir without one), so
  the job may write next to its code and the source dir is never written to;
- ``input/data/<channel>`` → a symlink to each ``--input channel=PATH`` dir (a file input gets a
  real channel dir holding a symlink to the file, and ``PAI_INPUT_<CHANNEL>`` names that file,
  as PAI's local job sets it); inputs are linked, never copied;
- ``input/config/hyperparameters.json`` from ``--hps-file`` and ``--hp name=value``, every value
  written as a string, as PAI and SageMaker write them;
- ``run/``: trainenv's own files for the run (``TRAINENV_RUN_DIR``).

Then ``trainenv train``'s launch sequence runs with ``TRAINENV_BASE_DIR`` set to the job dir.
Every input is checked before anything is created, and nothing outside the job dir is
written or removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Iterable, Mapping

from trainenv.errors import ConfigError
from trainenv.files import write_atomic
from trainenv.layout import LOCAL_JOBS_DIR, Layout, new_local_job_dir


def parse_pairs(values: Iterable[str], what: str, option: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` options as ``(name, value)`` pairs; a malformed one is a ``ConfigError``."""
    pairs = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError.at(option, None, f"{item!r}: expected {what}=VALUE")
        pairs.append((name, value))
    return pairs


def hyperparameters_from(hps_file: str | None, hp_pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Hyperparameters as a platform writes them: every value a string."""
    from trainenv.config import check_hyperparameter_name, read_json_object

    values: dict[str, str] = {}
    if hps_file:
        loaded = read_json_object(str(hps_file))
        if loaded is None:
            raise ConfigError.at("--hps-file", None, f"{hps_file!r} does not exist")
        for name, value in loaded.items():
            values[name] = value if isinstance(value, str) else json.dumps(value)
    for name, value in hp_pairs:
        values[name] = value
    for name in values:
        check_hyperparameter_name("--hp" if not hps_file else "hyperparameters", name)
    return values


def lay_out_job(
    job_dir: Path | None,
    source_dir: Path | None,
    inputs: Iterable[tuple[str, str]],
    hyperparameters: Mapping[str, str],
) -> Layout:
    """Check every input, claim a job dir of this run's own, lay the job out in it."""
    checked = check_inputs(inputs)
    source = None
    if source_dir is not None:
        source = source_dir.expanduser().absolute()
        if not source.is_dir():
            raise ConfigError.at("--source-dir", None, f"{str(source_dir)!r} is not a directory")
    path = job_dir if job_dir is not None else Path(LOCAL_JOBS_DIR)
    try:
        layout = Layout(_claim(job_dir).absolute())
        path = layout.base_dir
        if source is not None:
            _copy_source(source, layout.code_dir, layout.base_dir)
        else:
            layout.code_dir.mkdir()
        layout.data_dir.mkdir(parents=True)
        for channel, target in checked:
            channel_dir = layout.channel_dir(channel)
            if target.is_dir():
                channel_dir.symlink_to(target)
            else:
                channel_dir.mkdir()
                (channel_dir / target.name).symlink_to(target)
        layout.config_dir.mkdir(parents=True)
        write_atomic(layout.hyperparameters_file, json.dumps(dict(hyperparameters), indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot lay out the job in {exc.filename or path}: {exc.strerror or exc}") from None
    return layout


def check_inputs(inputs: Iterable[tuple[str, str]]) -> list[tuple[str, Path]]:
    """Each ``--input`` as (channel, absolute path); a bad name or a missing path is a ``ConfigError``."""
    from trainenv.config import check_channel_name

    checked = []
    for channel, given in inputs:
        check_channel_name("--input", channel)
        target = Path(given).expanduser().absolute()
        if not target.exists():
            raise ConfigError.at("--input", channel, f"{given!r} does not exist")
        checked.append((channel, target))
    return checked


def _copy_source(source: Path, code_dir: Path, job_dir: Path) -> None:
    """Copy the source dir to the code dir, links as links; the job runs in the copy.

    When the job dir lies inside the source dir (``--source-dir .``), the top-level entry that
    holds it (``./trainenv-jobs``) is left out, so no run copies the runs before it.
    """
    import shutil

    try:
        inside = job_dir.resolve().relative_to(source.resolve())
    except ValueError:
        inside = None
    skip = str(source / inside.parts[0]) if inside is not None and inside.parts else None

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [name for name in names if os.path.join(directory, name) == skip]

    shutil.copytree(source, code_dir, symlinks=True, ignore=ignore)


def _claim(job_dir: Path | None) -> Path:
    """The given ``--job-dir`` if it is new or empty, else a fresh dir under ``./trainenv-jobs``."""
    if job_dir is None:
        return new_local_job_dir(Path(LOCAL_JOBS_DIR).absolute())
    job_dir.mkdir(parents=True, exist_ok=True)
    if any(job_dir.iterdir()):
        raise ConfigError.at(
            "--job-dir", None,
            f"{str(job_dir)!r} is not empty: each run needs a job dir of its own (a new or empty one; "
            f"without --job-dir, trainenv makes one under ./{LOCAL_JOBS_DIR})",
        )
    return job_dir


def file_input_variables(layout: Layout) -> dict[str, str]:
    """``PAI_INPUT_<CH>`` = the file, for each file input (the channel dir ``lay_out_job`` made for a
    file: a real dir holding one link), as PAI's local job sets it; a dir input keeps the channel dir."""
    from trainenv.values import normalized_names

    files: dict[str, str] = {}
    data_dir = layout.data_dir
    for channel in sorted(os.listdir(data_dir)) if data_dir.is_dir() else ():
        channel_dir = data_dir / channel
        entries = [] if channel_dir.is_symlink() or not channel_dir.is_dir() else list(channel_dir.iterdir())
        if len(entries) == 1 and entries[0].is_symlink():
            files[channel] = str(entries[0])
    return {f"PAI_INPUT_{key}": files[channel] for channel, key in normalized_names(files, "channel").items()}


def run_job(
    layout: Layout,
    flags: Mapping[str, Any],
    dry_run: bool = False,
    environ: Mapping[str, str] = os.environ,
    say: Callable[[str], None] = lambda line: None,
) -> int:
    """Run the laid-out job with ``trainenv train``'s launch sequence; returns its exit status."""
    from trainenv.runner import run_training

    say(f"job dir:    {layout.base_dir}")
    job_environ = dict(environ, TRAINENV_BASE_DIR=str(layout.base_dir), TRAINENV_RUN_DIR=str(layout.local_run_parent))
    job_environ.update(file_input_variables(layout))
    status = run_training(flags, job_environ, dry_run=dry_run)
    if not dry_run:
        say(f"model dir:  {layout.model_dir}")
        say(f"output dir: {layout.output_dir}")
    return status
