"""Build tiny, real, installable wheels for tests, without a build backend or a network.

``build_wheel(dest, "tinypkg_a", "1.0")`` writes ``dest/tinypkg_a-1.0-py3-none-any.whl``: a
zip holding ``tinypkg_a/__init__.py`` (which defines ``VERSION``) and a ``.dist-info`` with
``METADATA``, ``WHEEL`` and a ``RECORD`` whose sha256 digests are correct, which is all pip and
uv need to install it (PEP 427 / PEP 376). Writing the zip by hand takes about a millisecond,
where a setuptools build takes a second or more.

``simple_index(root, wheels)`` lays the wheels out as a PEP 503 index and ``serve_directory(root)``
serves it over HTTP on 127.0.0.1, for tests of index settings (several indexes, credentials).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import re
import shutil
import threading
import zipfile
from pathlib import Path

_FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def build_wheel(dest: Path, name: str, version: str, requires: tuple = ()) -> Path:
    """Write a pure-Python wheel for ``name`` (an importable identifier) and return its path.

    ``requires`` are ``Requires-Dist`` specifiers, so a test can build a small dependency tree.
    """
    if not name.isidentifier():
        raise ValueError(f"wheel name must be an identifier, got {name!r}")
    dest.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    metadata = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        + [f"Requires-Dist: {req}" for req in requires]
    ) + "\n"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: trainenv-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode(),
    }
    record_lines = [f"{path},{_record_hash(data)},{len(data)}" for path, data in files.items()]
    record_lines.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record_lines) + "\n").encode()

    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return wheel


def simple_index(root: Path, wheels: "list[Path]") -> Path:
    """Lay out a PEP 503 simple index under ``root``: ``<project>/index.html`` linking each
    wheel (copied next to it). Serve ``root`` over HTTP with ``serve_directory``."""
    for wheel in wheels:
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        directory = root / project
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, directory / wheel.name)
        links = "".join(f'<a href="{p.name}">{p.name}</a>\n' for p in sorted(directory.glob("*.whl")))
        (directory / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # no request log on stderr
        pass


class serve_directory:
    """A context manager: ``root`` served read-only over HTTP on 127.0.0.1 (a thread of this
    process); ``as`` gives its base URL, e.g. ``http://127.0.0.1:41234``."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
