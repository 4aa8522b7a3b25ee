"""Runtimes: small programs trainenv runs as the job's process for entry kinds that are not a
program of their own.

``function.py`` calls an entry function (``pkg.mod:func``, ``file.py:func``) with the
hyperparameters as keyword arguments.
"""

from __future__ import annotations
