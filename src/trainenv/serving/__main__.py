"""``python -m trainenv.serving``: serve with the settings from the environment.

The same as ``trainenv serve`` without options (and without importing click): both run
``trainenv.serving.startup.main``. A bad setting is one line on stderr and exit 78.
"""

from __future__ import annotations

import sys

from trainenv.serving.startup import main

if __name__ == "__main__":
    sys.exit(main())
