"""``trainenv local``: run a job on this machine, as a platform would, with no container.

``job.py`` lays out one local job (a job dir of its own per run) and runs it with the very same
launch sequence as ``trainenv train``.
"""

from __future__ import annotations

