"""``python -m trainenv``: the same as the ``trainenv`` command."""

from __future__ import annotations

from trainenv.cli import main

main()
