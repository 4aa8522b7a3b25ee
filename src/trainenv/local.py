"""``trainenv local``: lay out a job tree on this machine, as a platform would, and run it.

The tree (``--job-dir``, default ``./trainenv-job``) gets:

- ``usercode`` → a symlink to ``--source-dir`` (edits show up at once);
- ``input/data/<channel>`` → a symlink to each ``--input channel=PATH`` (a file input gets a
  real channel dir holding a symlink to the file); inputs are linked, never copied;
- ``input/config/hyperparameters.json`` from ``--hps-file`` and ``--hp name=value``, every value
  written as a string, as PAI and SageMaker write them.

Then the very same launch sequence as ``trainenv train`` runs with ``TRAINENV_BASE_DIR`` set
to the job dir. Only symlinks trainenv made are ever replaced or removed; a real file or
directory in the way is an error, never deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Tuple

from trainenv.config import check_channel_name, check_hyperparameter_name, read_json_object
from trainenv.errors import ConfigError
from trainenv.layout import Layout


def parse_pairs(values: Iterable[str], what: str, option: str) -> list:
    pairs = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError.at(option, None, f"{item!r}: expected {what}=VALUE")
        pairs.append((name, value))
    return pairs


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target``, replacing only a symlink (never real data)."""
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
        link.unlink()
    elif link.exists():
        raise ConfigError(f"{link} exists and is not a symlink trainenv made; move it away or choose another --job-dir")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def hyperparameters_from(hps_file: Optional[str], hp_pairs: Iterable[Tuple[str, str]]) -> dict:
    """Hyperparameters as a platform writes them: every value a string."""
    values: dict = {}
    if hps_file:
        loaded = read_json_object(Path(hps_file))
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
    job_dir: Path,
    source_dir: Optional[Path],
    inputs: Iterable[Tuple[str, str]],
    hyperparameters: Mapping[str, str],
) -> Layout:
    """Create or refresh the job tree below ``job_dir``; returns its layout."""
    layout = Layout(job_dir.absolute())
    checked = []
    for channel, path in inputs:
        check_channel_name("--input", channel)
        target = Path(path).expanduser().absolute()
        if not target.exists():
            raise ConfigError.at("--input", channel, f"{path!r} does not exist")
        checked.append((channel, target))
    if source_dir is not None:
        source = source_dir.expanduser().absolute()
        if not source.is_dir():
            raise ConfigError.at("--source-dir", None, f"{str(source_dir)!r} is not a directory")
        _link(layout.code_dir, source)
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    wanted = {channel for channel, _ in checked}
    for entry in layout.data_dir.iterdir():
        if entry.is_symlink() and entry.name not in wanted:
            entry.unlink()  # a channel of an earlier local run; only the link goes
    for channel, target in checked:
        channel_dir = layout.channel_dir(channel)
        if target.is_dir():
            _link(channel_dir, target)
        else:
            if channel_dir.is_symlink():
                channel_dir.unlink()
            channel_dir.mkdir(parents=True, exist_ok=True)
            _link(channel_dir / target.name, target)
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    temporary = layout.hyperparameters_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(dict(hyperparameters), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, layout.hyperparameters_file)
    return layout
