"""``python -m trainenv``: the same as the ``trainenv`` command."""

from trainenv.cli import main

main()
