"""The servers of the one WSGI app; each module has ``run(env, sock, new_app, log) -> exit code``.

| module | what |
|---|---|
| ``stdlib`` | trainenv's own HTTP/1.1 server, one process (the default) |
| ``prefork`` | ``workers`` > 1: a supervisor forks that many ``stdlib`` workers on the one socket |
| ``http11`` | its request parsing, request bodies and answer heads |
| ``gunicorn`` | the same app on gunicorn ``gthread`` workers (``TRAINENV_SERVER=gunicorn``) |

``trainenv.serving.startup`` binds the socket, imports the handler and picks the module; a
server knows the app only as a WSGI callable with ``load()``, ``set_failed()``,
``set_draining()`` and ``stop()``.
"""

from __future__ import annotations
