"""``python -m trainenv.serving``: serve with the settings from the environment (like ``trainenv serve``).

Uses ``trainenv.serving_env()`` when the package provides it (CPUs and GPUs discovered there);
otherwise resolves the settings here with the CPUs of this process's affinity and no GPUs.
Exits with ``run_server``'s code; a bad setting is one line on stderr and exit 78.
"""

from __future__ import annotations

import os
import sys

from trainenv.errors import ConfigError
from trainenv.serving.config import ServingEnv, resolve_serving_env


def _serving_env() -> ServingEnv:
    try:
        from trainenv.environment import serving_env  # type: ignore[attr-defined]
    except ImportError:
        serving_env = None
    if serving_env is not None:
        return serving_env()
    from trainenv.layout import Layout

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return resolve_serving_env(os.environ, Layout.resolve(os.environ), cpus, 0)


def main() -> int:
    try:
        env = _serving_env()
    except ConfigError as exc:
        sys.stderr.write(f"trainenv serve: ERROR {exc}\n")
        return exc.exit_code
    from trainenv.serving.server import run_server

    return run_server(env)


if __name__ == "__main__":
    sys.exit(main())
