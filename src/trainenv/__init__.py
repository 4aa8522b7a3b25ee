"""trainenv: the job container's configuration as one immutable snapshot, and its launcher.

User code reads the snapshot::

    from trainenv import training_env
    env = training_env()
    env.hyperparameters["lr"], env.channel_dirs["train"], env.model_dir, env.num_gpus

Importing this package is cheap and has no side effects: it reads no file, sets no
variable and imports neither click, yaml, psutil nor pynvml. Everything is loaded on first use.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs milliseconds
__version__ = "0.1.0"

__all__ = [
    "training_env",
    "serving_env",
    "TrainingEnv",
    "ServingEnv",
    "TrainenvError",
    "ConfigError",
    "InstallError",
    "SourceError",
    "__version__",
]

_LAZY = {
    "training_env": "trainenv.environment",
    "serving_env": "trainenv.environment",
    "TrainingEnv": "trainenv.environment",
    "ServingEnv": "trainenv.environment",
    "TrainenvError": "trainenv.errors",
    "ConfigError": "trainenv.errors",
    "InstallError": "trainenv.errors",
    "SourceError": "trainenv.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from trainenv.environment import ServingEnv, TrainingEnv, serving_env, training_env
    from trainenv.errors import ConfigError, InstallError, SourceError, TrainenvError


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trainenv' has no attribute {name!r}")
    # __import__, not importlib.import_module: importlib (and warnings) cost ~0.3 ms of every training_env()
    value = getattr(__import__(module_name, fromlist=[name]), name)
    globals()[name] = value
    return value
