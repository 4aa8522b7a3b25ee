"""Where everything lives: the base dir, local mode, every path of the job's tree and of
trainenv's own files (run dir, snapshot file, hostfile, local job dirs).

The base dir is ``$TRAINENV_BASE_DIR``, default ``/ml``. When it is unset and ``/ml`` does not exist,
trainenv is in **local mode**: the same paths, rooted at ``$TRAINENV_LOCAL_DIR`` (default
``./trainenv-job`` in the current directory). Resolving a layout only looks at the
environment and checks that one directory exists; it never creates anything (only
``new_local_job_dir``, called by ``trainenv local``, creates a dir).

``JobTree`` spells every path as a string (``os.path``): the launch path and the snapshot never
import ``pathlib``. ``Layout`` is the same tree as ``pathlib.Path`` objects, for the code that
works with paths as objects (serving, ``trainenv local``).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path
    from typing import Mapping

from trainenv.frozen import frozen

DEFAULT_BASE_DIR = "/ml"
DEFAULT_LOCAL_DIR = "trainenv-job"
LOCAL_JOBS_DIR = "trainenv-jobs"  # trainenv local: one fresh job dir per run below it
STANDARD_OUTPUT_CHANNELS = ("model", "checkpoints", "tensorboard")

join = os.path.join


@frozen
class JobTree:
    """Every path of the container contract, below one base dir (absolute), as strings."""

    base_dir: str
    local_mode: bool = False

    @classmethod
    def resolve(cls, environ: Mapping[str, str] = os.environ) -> JobTree:
        """``$TRAINENV_BASE_DIR`` if set; else ``/ml`` if it exists; else local mode."""
        explicit = environ.get("TRAINENV_BASE_DIR")
        if explicit:
            return cls(absolute_path(explicit))
        if os.path.isdir(DEFAULT_BASE_DIR):
            return cls(DEFAULT_BASE_DIR)
        local = environ.get("TRAINENV_LOCAL_DIR") or DEFAULT_LOCAL_DIR
        return cls(absolute_path(local), local_mode=True)

    @property
    def code_dir(self) -> str:
        return join(self.base_dir, "usercode")

    @property
    def requirements_file(self) -> str:
        return join(self.code_dir, "requirements.txt")

    @property
    def input_dir(self) -> str:
        return join(self.base_dir, "input")

    @property
    def config_dir(self) -> str:
        return join(self.input_dir, "config")

    @property
    def hyperparameters_file(self) -> str:
        return join(self.config_dir, "hyperparameters.json")

    @property
    def inputdataconfig_file(self) -> str:
        return join(self.config_dir, "inputdataconfig.json")

    @property
    def resourceconfig_file(self) -> str:
        return join(self.config_dir, "resourceconfig.json")

    @property
    def settings_files(self) -> tuple[str, str]:
        """``trainenv.yaml`` in the config dir, then in the code dir (first found wins)."""
        return (join(self.config_dir, "trainenv.yaml"), join(self.code_dir, "trainenv.yaml"))

    @property
    def command_file(self) -> str:
        return join(self.config_dir, "execution", "command.sh")

    @property
    def data_dir(self) -> str:
        return join(self.input_dir, "data")

    def channel_dir(self, channel: str) -> str:
        return join(self.data_dir, channel)

    @property
    def output_dir(self) -> str:
        return join(self.base_dir, "output")

    def output_channel_dir(self, channel: str) -> str:
        return join(self.output_dir, channel)

    @property
    def model_dir(self) -> str:
        return join(self.output_dir, "model")

    @property
    def checkpoint_dir(self) -> str:
        return join(self.output_dir, "checkpoints")

    @property
    def tensorboard_dir(self) -> str:
        return join(self.output_dir, "tensorboard")

    @property
    def failure_file(self) -> str:
        return join(self.output_dir, "failure")

    # -- trainenv's own files ------------------------------------------------------------

    @property
    def local_run_parent(self) -> str:
        """Where ``trainenv local`` keeps the run dir of the job laid out in this base dir."""
        return join(self.base_dir, "run")

    def run_dir(self, job_name: str, host: str, environ: Mapping[str, str] = os.environ) -> str:
        """Where one launch keeps its own files (snapshot, hostfile): never in an output channel.

        ``$TRAINENV_RUN_DIR`` (default ``$TMPDIR/trainenv-<uid>``, container-local) /
        ``<job>-<host>``; in local mode the name also carries a checksum of the base dir, so
        two local jobs in different dirs never share one.
        """
        # $TMPDIR as tempfile.gettempdir() reads it, without importing tempfile (and random) at start-up.
        temporary = environ.get("TMPDIR") or "/tmp"
        parent = environ.get("TRAINENV_RUN_DIR") or join(temporary, f"trainenv-{os.getuid()}")
        name = f"{job_name}-{host}"
        if self.local_mode:
            from binascii import crc32

            name += f"-{crc32(os.fsencode(self.base_dir)):08x}"
        return join(parent, name.replace(os.sep, "_"))


class Layout:
    """The job's tree as ``pathlib.Path`` objects: the paths serving and ``trainenv local`` use."""

    def __init__(self, base_dir: str | Path, local_mode: bool = False) -> None:
        self.tree = JobTree(os.fspath(base_dir), local_mode)

    @classmethod
    def resolve(cls, environ: Mapping[str, str] = os.environ) -> Layout:
        tree = JobTree.resolve(environ)
        return cls(tree.base_dir, tree.local_mode)

    @property
    def local_mode(self) -> bool:
        return self.tree.local_mode

    @property
    def base_dir(self) -> Path:
        return _path(self.tree.base_dir)

    @property
    def code_dir(self) -> Path:
        return _path(self.tree.code_dir)

    @property
    def config_dir(self) -> Path:
        return _path(self.tree.config_dir)

    @property
    def hyperparameters_file(self) -> Path:
        return _path(self.tree.hyperparameters_file)

    @property
    def data_dir(self) -> Path:
        return _path(self.tree.data_dir)

    def channel_dir(self, channel: str) -> Path:
        return _path(self.tree.channel_dir(channel))

    @property
    def output_dir(self) -> Path:
        return _path(self.tree.output_dir)

    @property
    def model_dir(self) -> Path:
        return _path(self.tree.model_dir)

    @property
    def local_run_parent(self) -> Path:
        return _path(self.tree.local_run_parent)


def absolute_path(path: str) -> str:
    """``path`` made absolute as ``pathlib`` does: ``.`` and doubled ``/`` dropped, ``..`` kept (a link may be below it)."""
    if not os.path.isabs(path):
        path = join(os.getcwd(), path)
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def _path(text: str) -> Path:
    from pathlib import Path

    return Path(text)


def snapshot_file(run_dir: str) -> str:
    """The full snapshot as JSON (``TRAINENV_ENV_FILE``), readable by the job's user only."""
    return join(run_dir, "env.json")


def hostfile(run_dir: str) -> str:
    """The MPI hostfile node 0 writes for ``mpirun``."""
    return join(run_dir, "hostfile")


def new_local_job_dir(parent: Path) -> Path:
    """Create and return a fresh job dir for one local run: ``<parent>/<UTC time>-<pid>``."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = parent / (f"{stamp}-{os.getpid()}" + (f"-{attempt}" if attempt > 1 else ""))
        try:
            path.mkdir()  # exclusive: a dir another run made is never taken
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free job dir name under {parent}")
