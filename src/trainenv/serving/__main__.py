"""``python -m trainenv.serving``: serve with the settings from the environment.

The same as ``trainenv serve`` without the CLI (and without importing click): the settings
come from ``trainenv.serving_env()`` (CPUs and GPUs discovered there), and the exit code is
``run_server``'s. A bad setting is one line on stderr and exit 78.
"""

from __future__ import annotations

import sys

from trainenv.errors import ConfigError


def main() -> int:
    from trainenv.environment import serving_env
    from trainenv.serving.server import run_server

    try:
        env = serving_env()
    except ConfigError as exc:
        sys.stderr.write(f"trainenv serve: ERROR {exc}\n")
        return exc.exit_code
    return run_server(env)


if __name__ == "__main__":
    sys.exit(main())
