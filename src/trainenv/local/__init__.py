"""``trainenv local``: run a job on this machine, as a platform would, in-process or in an image.

``job.py`` lays out one local job (a job dir of its own per run) and runs it with the very same
launch sequence as ``trainenv train``. With ``--image``, ``engine.py`` finds docker or podman and
builds its command lines, ``image.py`` plans the containers over the laid-out job dir, and
``containers.py`` runs them.
"""

from __future__ import annotations
