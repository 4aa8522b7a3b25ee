"""``ServingEnv``: everything ``trainenv serve`` needs, resolved once from the serving table.

``resolve_serving_env(environ, layout, num_cpus, num_gpus, flags={}, is_dir=os.path.isdir)``
resolves each row of ``trainenv.settings.serving.SERVING`` (flag → variables → default; the
table lists every variable, its platform fallbacks and its default) and fills in what depends
on the machine: ``workers`` defaults to 1, and with gunicorn to the GPUs, else ``min(CPUs, 4)``; ``model_dir`` to
``<base>/model``, else ``<base>/output/model`` when only that exists (``is_dir`` is its only
look at the filesystem). ``sources`` says where each value came from. A bad value raises
``ConfigError`` naming the flag or variable and the value.

The handler is a file (``inference.py``, ``sub/handler.py``, an absolute path) or a dotted module
name (``my_pkg.serving``). A relative file is looked for in ``<model_dir>/code`` then the code dir
(``handler_files``); both dirs go on ``sys.path`` before the import (``handler_dirs``).
"""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping

from trainenv.frozen import FrozenDict, SnapshotMapping, frozen
from trainenv.layout import Layout
from trainenv.settings.serving import MIB, SERVING_BY_NAME, resolve_serving_settings

DEFAULT_HANDLER_FILE = "inference.py"

__all__ = ["MIB", "ServingEnv", "resolve_serving_env", "default_model_dir"]


def _default(name: str) -> Any:
    return SERVING_BY_NAME[name].default


@frozen
class ServingEnv(SnapshotMapping):
    """The resolved serving settings (rows of ``trainenv.settings.serving``) and what follows from them."""

    host: str = _default("host")
    port: int = _default("port")
    server: str = _default("server")
    workers: int = 1
    threads: int = _default("threads")
    timeout_s: float = _default("timeout_s")
    startup_timeout_s: float | None = None
    grace_s: float = _default("grace_s")
    max_request_bytes: int = _default("max_request_bytes")
    max_queue: int = _default("max_queue")
    max_batch_size: int = _default("max_batch_size")
    max_batch_delay_ms: float = _default("max_batch_delay_ms")
    max_connections: int = _default("max_connections")
    backlog: int = _default("backlog")
    keepalive_s: float = _default("keepalive_s")
    read_timeout_s: float = _default("read_timeout_s")
    default_accept: str = _default("default_accept")
    model_dir: Path = Path("/ml/model")
    handler: str | None = None
    model_name: str = _default("model_name")
    vertex_health_route: str | None = None
    vertex_predict_route: str | None = None
    log_level: str = _default("log_level")
    access_log: bool = _default("access_log")
    code_dir: Path = Path("/ml/usercode")
    handler_files: tuple[Path, ...] = ()
    handler_dirs: tuple[Path, ...] = ()
    sources: Mapping[str, str] = FrozenDict()  # setting name → option, variable or "default"
    _not_compared = ("sources",)

    @property
    def port_source(self) -> str:
        return self.sources.get("port", "default")

    @property
    def handler_source(self) -> str:
        return self.sources.get("handler", "default")

    @property
    def handler_module(self) -> str | None:
        """The dotted module name to import, when the handler is not a file."""
        return None if self.handler is None or _is_file_name(self.handler) else self.handler


def _is_file_name(handler: str) -> bool:
    return handler.endswith(".py") or "/" in handler


def default_model_dir(layout: Layout, is_dir: Callable[[Path], bool]) -> Path:
    """``<base>/model``, else ``<base>/output/model`` when only that exists (training wrote it)."""
    serving, trained = layout.base_dir / "model", layout.model_dir
    return trained if not is_dir(serving) and is_dir(trained) else serving


def _handler_files(handler: str | None, dirs: tuple[Path, ...]) -> tuple[Path, ...]:
    if handler is None:
        return tuple(d / DEFAULT_HANDLER_FILE for d in dirs)
    if not _is_file_name(handler):
        return ()
    path = Path(handler)
    return (path,) if path.is_absolute() else tuple(d / path for d in dirs)


def resolve_serving_env(
    environ: Mapping[str, str],
    layout: Layout,
    num_cpus: int,
    num_gpus: int,
    flags: Mapping[str, Any] = {},
    is_dir: Callable[[Path], bool] = os.path.isdir,
) -> ServingEnv:
    """The serving settings (see the module docstring); raises ``ConfigError``."""
    values, sources = resolve_serving_settings(flags, environ)
    if values["workers"] is None:  # gunicorn is for several processes; the stdlib server runs one
        values["workers"] = (num_gpus if num_gpus > 0 else max(1, min(num_cpus, 4))) if values["server"] == "gunicorn" else 1
    if values["model_dir"] is None:
        values["model_dir"] = default_model_dir(layout, is_dir)
    dirs = (values["model_dir"] / "code", layout.code_dir)
    return ServingEnv(
        **values,
        code_dir=layout.code_dir,
        handler_files=_handler_files(values["handler"], dirs),
        handler_dirs=dirs,
        sources=FrozenDict(sources),
    )
