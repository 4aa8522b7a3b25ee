"""Where the job's code comes from (``TRAINENV_SOURCE``): an archive or a git URL.

``fetch_source`` picks the form from the value: a path ending in ``.tar.gz``, ``.tgz``,
``.tar`` or ``.zip`` is an archive (``trainenv.sources.archive``); an ``https://``,
``ssh://``, ``git@`` or ``file://`` URL is a git repository (``trainenv.sources.git``);
an absolute path of a directory (SageMaker's ``SAGEMAKER_SUBMIT_DIRECTORY``) is copied, links as links;
``s3://``, ``oci://`` and ``gs://`` are the platform's to fetch (a ``ConfigError``). The code is
fetched into a temporary dir beside the code dir, and replaces the code dir's contents only
once the fetch is complete: a failed fetch leaves the previous code as it was.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable

from trainenv.errors import ConfigError, SourceError, shown
from trainenv.redact import redact_urls

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
GIT_PREFIXES = ("https://", "ssh://", "git@", "file://")
PLATFORM_SCHEMES = ("s3://", "oci://", "gs://")


def source_form(source: str, where: str) -> str:
    """``archive`` or ``git``; anything else is a ``ConfigError`` naming ``where`` and the value."""
    value = source.strip()
    if value.lower().startswith(PLATFORM_SCHEMES):
        raise ConfigError.at(where, None, f"{shown(redact_urls(value))}: the platform fetches {value.split(':', 1)[0]}:// sources, "
                                          "not trainenv; point TRAINENV_SOURCE at the local copy it made")
    if value.startswith(GIT_PREFIXES):
        return "git"
    if value.lower().endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if os.path.isabs(value) and os.path.isdir(value):  # SageMaker's SAGEMAKER_SUBMIT_DIRECTORY: a dir it filled
        return "directory"
    raise ConfigError.at(where, None, f"{shown(redact_urls(value))}: expected an archive ({', '.join(ARCHIVE_SUFFIXES)}), "
                                      f"a git URL ({', '.join(GIT_PREFIXES)}) or an absolute path of a directory")


def fetch_source(
    source: str,
    code_dir: str,
    *,
    where: str,
    git_ref: str | None = None,
    ssh_key: tuple[str, str] | None = None,
    max_bytes: int,
    info: Callable[[str], None] = lambda line: None,
) -> None:
    """Fetch ``source`` and make it the contents of ``code_dir`` (``SourceError`` on failure).

    ``ssh_key``: a private key file for a git source over ssh, and the setting that named it.
    """
    import shutil
    import tempfile

    form = source_form(source, where)
    value = source.strip()
    parent = os.path.dirname(os.path.abspath(code_dir))
    try:
        staging = tempfile.mkdtemp(prefix=".trainenv-source-", dir=parent)
    except OSError as exc:
        raise ConfigError(f"cannot create a temporary dir in {parent} for {where}: {exc.strerror or exc}") from None
    try:
        fetched = os.path.join(staging, "code")
        if form == "archive":
            from trainenv.sources.archive import extract_archive

            info(f"extracting {value} into {code_dir}")
            extract_archive(value, fetched, max_bytes)
        elif form == "directory":
            real, code = os.path.realpath(value), os.path.realpath(code_dir)
            if os.path.commonpath((real, code)) in (real, code):
                raise ConfigError.at(where, None, f"{shown(value)}: holds the code dir or lies in it ({code_dir}); name a dir apart from it")
            info(f"copying {value} into {code_dir}")
            try:
                shutil.copytree(value, fetched, symlinks=True)
            except (OSError, shutil.Error) as exc:
                raise SourceError(f"{where}: cannot copy {value}: {exc}") from None
        else:
            from trainenv.sources.git import clone

            info(f"cloning {redact_urls(value)}{f' at {git_ref}' if git_ref else ''} into {code_dir}")
            clone(value, fetched, git_ref, ssh_key)
        _replace_contents(code_dir, fetched)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_contents(code_dir: str, fetched: str) -> None:
    """Empty ``code_dir`` (kept itself: it may be a mount point) and move the fetched entries in.

    An ``OSError`` here (a file where the code dir should be) is a ``ConfigError`` naming the path.
    """
    import shutil

    try:
        os.makedirs(code_dir, exist_ok=True)
        for name in os.listdir(code_dir):
            path = os.path.join(code_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        for name in os.listdir(fetched):
            shutil.move(os.path.join(fetched, name), os.path.join(code_dir, name))
    except OSError as exc:
        raise ConfigError(f"cannot put the fetched code in {exc.filename or code_dir}: {exc.strerror or exc}") from None
