"""Where everything lives: the base dir, local mode and every path of CONTRACT §1.

The base dir is ``$TRAINENV_BASE_DIR``, default ``/ml``. When it is unset and ``/ml`` does not exist,
trainenv is in **local mode**: the same paths, rooted at ``$TRAINENV_LOCAL_DIR`` (default
``./trainenv-job`` in the current directory). Resolving a layout only looks at the
environment and checks that one directory exists; it never creates anything.
"""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping

from trainenv.frozen import frozen

DEFAULT_BASE_DIR = "/ml"
DEFAULT_LOCAL_DIR = "trainenv-job"
STANDARD_OUTPUT_CHANNELS = ("model", "checkpoints", "tensorboard")


@frozen
class Layout:
    """Every path of the container contract, below one base dir."""

    base_dir: Path
    local_mode: bool = False

    @classmethod
    def resolve(cls, environ: Mapping[str, str] = os.environ) -> "Layout":
        """``$TRAINENV_BASE_DIR`` if set; else ``/ml`` if it exists; else local mode."""
        explicit = environ.get("TRAINENV_BASE_DIR")
        if explicit:
            return cls(Path(explicit).absolute())
        if os.path.isdir(DEFAULT_BASE_DIR):
            return cls(Path(DEFAULT_BASE_DIR))
        local = environ.get("TRAINENV_LOCAL_DIR") or DEFAULT_LOCAL_DIR
        return cls(Path(local).absolute(), local_mode=True)

    @property
    def code_dir(self) -> Path:
        return self.base_dir / "usercode"

    @property
    def requirements_file(self) -> Path:
        return self.code_dir / "requirements.txt"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def config_dir(self) -> Path:
        return self.input_dir / "config"

    @property
    def hyperparameters_file(self) -> Path:
        return self.config_dir / "hyperparameters.json"

    @property
    def inputdataconfig_file(self) -> Path:
        return self.config_dir / "inputdataconfig.json"

    @property
    def resourceconfig_file(self) -> Path:
        return self.config_dir / "resourceconfig.json"

    @property
    def settings_files(self) -> tuple:
        """``trainenv.yaml`` in the config dir, then in the code dir (first found wins)."""
        return (self.config_dir / "trainenv.yaml", self.code_dir / "trainenv.yaml")

    @property
    def command_file(self) -> Path:
        return self.config_dir / "execution" / "command.sh"

    @property
    def data_dir(self) -> Path:
        return self.input_dir / "data"

    def channel_dir(self, channel: str) -> Path:
        return self.data_dir / channel

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def output_channel_dir(self, channel: str) -> Path:
        return self.output_dir / channel

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self.output_dir / "tensorboard"

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def state_dir(self) -> Path:
        """trainenv's own files for this job: the snapshot, the install marker, hostfiles."""
        return self.base_dir / ".trainenv"
