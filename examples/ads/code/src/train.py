"""An OCI Data Science job's code: ADS calls ``train`` with the job's command-line arguments.

``helper`` lives in ``lib/``, which ``PYTHON_PATH=../lib`` (relative to ``WORKING_DIR=src``) puts
on the import path.
"""

import os

import helper


def train(*args, epochs="1", **options):
    """Every value is a string, as ADS passes them: ``--epochs 3`` is ``epochs="3"``."""
    for epoch in range(int(epochs)):
        print(f"epoch {epoch + 1}/{epochs}: loss {helper.loss(epoch):.3f}")
    print(f"args {list(args)}, options {options}, working dir {os.path.basename(os.getcwd())}")


if __name__ == "__main__":
    print("not run: ADS imports the file, so this block is skipped")
