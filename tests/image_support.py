"""Build and run the trainenv image with podman, offline, with every bit of state in one dir.

No registry is reachable from the test machine, so ``python:3.11-slim`` cannot be pulled.
``write_python_rootfs`` makes a stand-in from this machine's own files instead: the
interpreter behind the running venv (``sys.base_prefix``: pyenv's, python.org's or the
distro's) at the same paths as here, its standard library without tests and GUI modules, the
venv's pip in the interpreter's ``purelib``, ``sh``, ``bash`` and the everyday tools of
coreutils, grep, sed, findutils and procps (``sleep``, ``cat``, ``ls``, ``ps``, ...), every shared
library those load (``ldd``) plus the manylinux baseline libraries, and ``python``/``python3``
links in ``/usr/local/bin``. It is a plain tarball (~100 MB, written in ~1 s) that ``podman import``
turns into an image in ~3 s, with the interpreter's scripts dir on ``PATH``. The image under
test is then built from ``docker/Dockerfile.cpu`` unchanged, with ``--build-arg BASE=``
naming that local image and ``--build-arg PIP_NO_INDEX=true`` so pip installs from the
wheels in the build context only. ``build_image_offline`` does all of it; run as a script
(``python tests/image_support.py [TAG]``), this module builds the image into podman's own
storage, the offline route the README gives.
``build_torch_image`` derives an image with torch CPU from one built this way: the wheel from
``/opt/wheels``, its dependencies' wheels fetched beforehand with ``pip download`` (from PyPI).

``Podman`` runs podman with ``--root``/``--runroot``/``--tmpdir`` (and ``TMPDIR``) under one
state directory, the cgroupfs manager and the file events backend, and ``Podman.reset``
removes it all. One exception: podman 4.3 keeps its blob-info cache in
``/var/lib/containers/cache`` whatever ``--root`` says (the test removes that dir when it
was not there before). Containers get ``--network none`` (a server is asked from inside with
``podman exec``: no bridge, no traffic beyond the container's loopback)
and explicit ``nofile``/``nproc`` limits no higher than this process's hard limits: without
``CAP_SYS_RESOURCE`` (as in the CI sandbox) podman's defaults exceed them and runc refuses to
start the container. The runtime is runc (required): crun refuses hosts with hybrid cgroup
v1/v2, as the CI machine has.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

BASE_IMAGE = "localhost/trainenv-test-base:latest"
PATH_VALUE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Standard-library directories an image never needs (any depth) and files to leave out.
_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "tkinter",
    "turtledemo", "lib2to3", "ensurepip",
}
_SKIP_DIR_PREFIXES = ("config-",)  # libpythonX.Y.a and the build's Makefile
_SKIP_FILE_SUFFIXES = (".opt-1.pyc", ".opt-2.pyc")
# Extension modules for GUIs and CPython's own test suite: they pull in X11, Tk and more.
_SKIP_FILE_PREFIXES = ("_tkinter", "_test", "_ctypes_test", "_xxtestfuzz", "xx")
_SKIP_FILES = {"EXTERNALLY-MANAGED"}  # PEP 668 marker of a distro python: pip would refuse
# A shell and the everyday tools, as a slim Debian image has them: the Dockerfile's RUN and the
# shims need sh, rm and chmod; jobs and debugging sessions use bash, sleep and the rest.
_REQUIRED_TOOLS = ("sh", "bash", "sleep", "rm", "chmod", "cat", "env")
_TOOLS = _REQUIRED_TOOLS + (
    "ls", "cp", "mv", "mkdir", "rmdir", "ln", "touch", "id", "head", "tail", "tee", "wc", "sort",
    "uniq", "cut", "tr", "date", "dirname", "basename", "readlink", "realpath", "true", "false",
    "test", "[", "echo", "printf", "kill", "sed", "grep", "find", "xargs", "ps", "stat", "du",
    "df", "uname", "hostname", "whoami", "nproc", "timeout", "mktemp", "seq", "tar", "gzip",
)
# The manylinux baseline (PEP 600): libraries a binary wheel may assume every Linux has, as
# Debian's slim images do. psutil's wheel, for one, links libpthread.so.0 (no longer a
# dependency of anything else since glibc 2.34).
_MANYLINUX_LIBS = (
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libutil.so.1",
    "libresolv.so.2", "libnsl.so.1", "libcrypt.so.1", "libgcc_s.so.1", "libstdc++.so.6",
    "libz.so.1", "libexpat.so.1", "libnss_files.so.2", "libnss_dns.so.2",
)
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


class PodmanUnavailable(Exception):
    """podman cannot build or run containers on this machine (the reason is the message)."""


def _limit(kind: int, wanted: int) -> str:
    """``soft:hard`` for ``--ulimit``: ``wanted``, capped at this process's hard limit."""
    _soft, hard = resource.getrlimit(kind)
    value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    return f"{value}:{value}"


class Podman:
    """podman with all of its state (images, containers, temp files) under ``state_dir``, or in
    podman's own storage when ``state_dir`` is None."""

    def __init__(self, state_dir: Optional[Path]) -> None:
        self.state_dir = state_dir
        self.executable = shutil.which("podman")
        if self.executable is None:
            raise PodmanUnavailable("podman is not installed (apt-get install podman)")
        self.runtime = shutil.which("runc")
        if self.runtime is None:
            raise PodmanUnavailable("runc is not installed (apt-get install runc)")
        self.env = dict(os.environ)
        self.state_args: List[str] = []
        if state_dir is not None:
            for sub in ("root", "run", "tmp", "libpod-tmp"):
                (state_dir / sub).mkdir(parents=True, exist_ok=True)
            self.env["TMPDIR"] = str(state_dir / "tmp")
            self.state_args = ["--root", str(state_dir / "root"), "--runroot", str(state_dir / "run"),
                               "--tmpdir", str(state_dir / "libpod-tmp")]
        self.limits = [
            "--ulimit", "nofile=" + _limit(resource.RLIMIT_NOFILE, 20000),
            "--ulimit", "nproc=" + _limit(resource.RLIMIT_NPROC, 20000),
        ]

    def argv(self, *args: str) -> List[str]:
        """The full podman command line for ``args``."""
        return [
            str(self.executable),
            *self.state_args,
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--runtime", str(self.runtime),
            *args,
        ]

    def __call__(self, *args: str, timeout: float = 120,
                 check: bool = True) -> subprocess.CompletedProcess:
        """Run podman and capture its output; ``check`` raises with podman's stderr."""
        proc = subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:2])} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
        return proc

    def run_argv(self, image: str, *command: str, options: Sequence[str] = ()) -> List[str]:
        """``podman run`` argv for ``image`` with the limits and no network."""
        return self.argv("run", "--rm", "--network", "none", *self.limits, *options,
                         image, *command)

    def run(self, image: str, *command: str, options: Sequence[str] = (),
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run one container to completion; never raises on its exit status."""
        return subprocess.run(
            self.run_argv(image, *command, options=options), env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )

    def build(self, context: Path, dockerfile: Path, tag: str,
              build_args: Iterable[Tuple[str, str]] = ()) -> subprocess.CompletedProcess:
        """Build ``dockerfile`` offline: no pulls, no network in RUN steps."""
        args = ["build", "--pull=never", "--network", "none", *self.limits,
                "-f", str(dockerfile), "-t", tag]
        for name, value in build_args:
            args += ["--build-arg", f"{name}={value}"]
        return self(*args, str(context), timeout=300)

    def reset(self) -> None:
        """Remove every image, container and file podman made, then the state dir itself."""
        assert self.state_dir is not None, "reset() would wipe podman's own storage"
        try:
            self("system", "reset", "--force", timeout=120, check=False)
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _ldd_closure(paths: Sequence[str]) -> List[str]:
    """Every shared library (and the loader) that the ELF files in ``paths`` load."""
    proc = subprocess.run(["ldd", *paths], capture_output=True, text=True, check=False)
    found = []
    for line in proc.stdout.splitlines():
        match = _LDD_PATH.search(line)
        if match and not line.rstrip().endswith(":") and match.group(1) not in found:
            found.append(match.group(1))
    return found


class _RootfsWriter:
    """Adds files to a tarball as root-owned entries, creating each parent dir once."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.dirs = {""}
        self.entries: set = set()

    def directory(self, arcname: str, mode: int = 0o755) -> None:
        arcname = arcname.strip("/")
        if arcname in self.dirs:
            return
        self.directory(os.path.dirname(arcname))
        info = tarfile.TarInfo(arcname)
        info.type, info.mode = tarfile.DIRTYPE, mode
        self.tar.addfile(info)
        self.dirs.add(arcname)

    def _new(self, arcname: str) -> bool:
        """Whether ``arcname`` is not in the tarball yet (podman rejects duplicate paths)."""
        if arcname in self.entries:
            return False
        self.entries.add(arcname)
        self.directory(os.path.dirname(arcname))
        return True

    def symlink(self, arcname: str, target: str) -> None:
        arcname = arcname.strip("/")
        if not self._new(arcname):
            return
        info = tarfile.TarInfo(arcname)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self.tar.addfile(info)

    def file(self, src: str, arcname: str) -> None:
        arcname = arcname.strip("/")
        if not self._new(arcname):
            return
        real = os.path.realpath(src)
        info = self.tar.gettarinfo(real, arcname)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with open(real, "rb") as handle:
            self.tar.addfile(info, handle)

    def text(self, arcname: str, content: str, mode: int = 0o644) -> None:
        arcname = arcname.strip("/")
        if not self._new(arcname):
            return
        data = content.encode()
        info = tarfile.TarInfo(arcname)
        info.size, info.mode = len(data), mode
        self.tar.addfile(info, io.BytesIO(data))

    def tree(self, src: Path, arcname: str) -> None:
        for path, dirs, files in os.walk(src):
            dirs[:] = sorted(
                d for d in dirs if d not in _SKIP_DIRS and not d.startswith(_SKIP_DIR_PREFIXES)
            )
            rel = os.path.relpath(path, src)
            dest = arcname if rel == "." else f"{arcname}/{rel}"
            self.directory(dest)
            for name in sorted(files):
                if _skipped(name):
                    continue
                full = os.path.join(path, name)
                if os.path.exists(full):  # skip dangling symlinks
                    self.file(full, f"{dest}/{name}")


def _skipped(name: str) -> bool:
    """Whether a file of the standard library stays out of the image."""
    return (
        name in _SKIP_FILES
        or name.endswith(_SKIP_FILE_SUFFIXES)
        or name.startswith(_SKIP_FILE_PREFIXES)
    )


class Interpreter:
    """The interpreter behind this venv, and where it keeps things (asked, not guessed)."""

    def __init__(self) -> None:
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        candidates = [getattr(sys, "_base_executable", ""),
                      os.path.join(sys.base_prefix, "bin", version)]
        found = next((c for c in candidates if c and os.path.isfile(c)), None)
        if found is None:
            raise PodmanUnavailable(f"no base interpreter found for {sys.executable}")
        self.executable = os.path.realpath(found)
        proc = subprocess.run(
            [self.executable, "-I", "-c",
             "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
            capture_output=True, text=True, timeout=60,
        )
        if proc.returncode != 0:
            raise PodmanUnavailable(f"{self.executable} does not run: {proc.stderr[-300:]}")
        paths = json.loads(proc.stdout)
        self.stdlib = os.path.realpath(paths["stdlib"])
        self.purelib = paths["purelib"]  # where pip installs, on the interpreter's sys.path
        self.scripts = paths["scripts"]  # where console scripts (``trainenv``) land


def _pip_sources() -> Iterator[Tuple[Path, str]]:
    """The running venv's pip package and its dist-info directory."""
    import pip

    package = Path(pip.__file__).resolve().parent
    yield package, "pip"
    for info in package.parent.glob("pip-*.dist-info"):
        yield info, info.name


def write_python_rootfs(dest: Path) -> Interpreter:
    """Write a root filesystem tarball holding this machine's python and what it needs."""
    python = Interpreter()
    missing = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise PodmanUnavailable(f"missing {', '.join(missing)} on this machine")
    tools = [found for found in map(shutil.which, _TOOLS) if found]
    dynload = sorted(
        str(p) for p in Path(python.stdlib, "lib-dynload").glob("*.so") if not _skipped(p.name)
    )
    libs = _ldd_closure([python.executable, *tools, *dynload])
    if not libs:
        raise PodmanUnavailable("ldd found no shared libraries (is ldd installed?)")
    libc_dir = next((os.path.dirname(os.path.realpath(l)) for l in libs if "/libc.so" in l), "/lib")
    for name in _MANYLINUX_LIBS:
        path = os.path.join(libc_dir, name)
        if os.path.exists(path) and path not in libs:
            libs.append(path)

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        out = _RootfsWriter(tar)
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            if os.path.islink("/" + top):  # merged-/usr hosts: keep the same shape
                out.symlink(top, os.readlink("/" + top))
        # Every file at its own path (realpath'd directories, the name the loader asks for),
        # so the interpreter finds its prefix, and libpython through its RUNPATH, as it does here.
        for path in [*libs, *tools, python.executable]:
            out.file(path, f"{os.path.realpath(os.path.dirname(path))}/{os.path.basename(path)}")
        for name in ("python", "python3"):
            out.symlink(f"usr/local/bin/{name}", python.executable)
        out.tree(Path(python.stdlib), python.stdlib)
        for src, name in _pip_sources():
            out.tree(src, f"{python.purelib}/{name}")
        out.text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                               "nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
        out.text("etc/group", "root:x:0:\nnogroup:x:65534:\n")
        out.directory("root", 0o700)  # no-op when the interpreter lives under /root (pyenv)
        out.directory("tmp", 0o1777)
        out.directory("var/tmp", 0o1777)
    return python


def import_base_image(podman: Podman, rootfs: Path, python: Interpreter,
                      tag: str = BASE_IMAGE) -> str:
    """``podman import`` the rootfs as ``tag``, with ``python``'s scripts dir on ``PATH``.

    Raises ``PodmanUnavailable`` when podman cannot store an image here (its storage driver).
    """
    path = PATH_VALUE
    if python.scripts not in PATH_VALUE.split(":"):
        path = f"{python.scripts}:{PATH_VALUE}"
    proc = podman("import", "--change", f"ENV PATH={path}", "--change", "ENV LANG=C.UTF-8",
                  "--change", 'CMD ["python3"]', str(rootfs), tag, timeout=120, check=False)
    if proc.returncode != 0:
        raise PodmanUnavailable(f"podman cannot import an image here: {proc.stderr.strip()[-500:]}")
    return tag


def build_wheels(source: Path, dest: Path) -> List[Path]:
    """trainenv's wheel plus its dependencies' wheels, as `pip wheel -w dist .` makes them.

    The source is copied first so the build leaves no ``build/`` in the working tree.
    """
    tree = dest.parent / "trainenv-src"
    shutil.copytree(source / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (source / name).exists():
            shutil.copy2(source / name, tree / name)
    # Build with this venv's setuptools and wheel when it has both (no download, as in the
    # test extra); else pip fetches the build backend into an isolated env.
    local = all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel"))
    isolation = ["--no-build-isolation"] if local else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         *isolation, "-w", str(dest), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    shutil.rmtree(tree)
    if proc.returncode != 0:
        raise AssertionError(f"pip wheel exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return sorted(dest.glob("*.whl"))


SHIMS = ("docker-entrypoint", "train", "serve")


def build_image_offline(podman: Podman, work: Path, repo: Path, tag: str,
                        seconds: Optional[Dict[str, float]] = None) -> None:
    """Build ``docker/Dockerfile.cpu`` unchanged, with no registry: the base is this machine's
    python (``write_python_rootfs``), pip installs from the wheels in the build context only.

    Raises ``PodmanUnavailable`` when podman cannot import or run an image here.
    """
    import time

    seconds = {} if seconds is None else seconds
    start = time.monotonic()
    python = write_python_rootfs(work / "rootfs.tar")
    import_base_image(podman, work / "rootfs.tar", python)
    probe = podman.run(BASE_IMAGE, "sh", "-c", "exit 0")
    if probe.returncode != 0:
        raise PodmanUnavailable(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    probe = podman.run(BASE_IMAGE, "python", "-m", "pip", "--version")
    if probe.returncode != 0:  # an interpreter whose layout write_python_rootfs misses
        raise PodmanUnavailable(f"this machine's python does not work as a base image: "
                                f"{probe.stderr.strip()[-500:]}")
    seconds["base image"] = time.monotonic() - start

    start = time.monotonic()
    context = work / "context"
    (context / "entrypoints").mkdir(parents=True)
    for shim in SHIMS:
        shutil.copy2(repo / "entrypoints" / shim, context / "entrypoints" / shim)
    # podman reads only the context's .dockerignore, BuildKit the one beside the Dockerfile:
    # install that allowlist here so the build proves it lets through enough.
    shutil.copy2(repo / "docker" / "Dockerfile.cpu.dockerignore", context / ".dockerignore")
    wheels = build_wheels(repo, context / "dist")
    assert any(w.name.startswith("trainenv-") for w in wheels), wheels
    seconds["wheels"] = time.monotonic() - start

    start = time.monotonic()
    podman.build(context, repo / "docker" / "Dockerfile.cpu", tag,
                 [("BASE", BASE_IMAGE), ("PIP_NO_INDEX", "true")])
    seconds["image build"] = time.monotonic() - start


TORCH_WHEELS = "/opt/wheels/torch-*+cpu-cp311-cp311-manylinux*_x86_64.whl"
TORCH_CONTAINERFILE = """\
ARG BASE
FROM ${BASE}
COPY wheels/ /tmp/wheels/
RUN python -m pip install --no-index --find-links /tmp/wheels --no-cache-dir --disable-pip-version-check \\
        /tmp/wheels/torch-*.whl && rm -rf /tmp/wheels
"""


def build_torch_image(podman: Podman, work: Path, base: str, tag: str) -> None:
    """Build ``tag``: ``base`` (a CPython 3.11 image) with torch CPU from the wheel on disk
    (``TORCH_WHEELS``) and its dependencies' wheels, downloaded here first (``pip download``:
    the build itself has no network).

    Raises ``PodmanUnavailable`` (the reason) when there is no torch wheel, ``base``'s python
    is not 3.11 (the wheel's), or pip cannot fetch the dependencies.
    """
    import glob

    found = sorted(glob.glob(TORCH_WHEELS))
    if not found:
        raise PodmanUnavailable(f"no torch CPU wheel for CPython 3.11 at {TORCH_WHEELS}")
    probe = podman.run(base, "python", "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    if probe.stdout.strip() != "3.11":
        raise PodmanUnavailable(f"{base}'s python is {probe.stdout.strip() or probe.stderr.strip()[-200:]!r}, "
                                f"not 3.11 as {os.path.basename(found[-1])} needs")
    context = work / "torch-context"
    (context / "wheels").mkdir(parents=True)
    wheel = context / "wheels" / os.path.basename(found[-1])
    try:
        os.link(found[-1], wheel)  # 190 MB: no copy when on the same file system
    except OSError:
        shutil.copy2(found[-1], wheel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "--only-binary=:all:", "--dest", str(context / "wheels"), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        shutil.rmtree(context)
        raise PodmanUnavailable(f"pip cannot download torch's dependencies: {proc.stderr.strip()[-500:]}")
    (context / "Containerfile").write_text(TORCH_CONTAINERFILE)
    try:
        podman.build(context, context / "Containerfile", tag, [("BASE", base)])
    finally:
        shutil.rmtree(context)


@contextlib.contextmanager
def offline_image(prefix: str, repo: Path, tag: str, seconds: Optional[Dict[str, float]] = None) -> Iterator[Podman]:
    """A podman with a state dir of its own holding ``tag``, built offline from ``repo``; on
    exit every bit of that state is removed (and podman 4.3's blob-info cache, which ignores
    ``--root``, when it was not there before). Raises ``PodmanUnavailable`` with the reason."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    had_var_lib = os.path.exists("/var/lib/containers")
    podman: Optional[Podman] = None
    try:
        podman = Podman(work / "podman")
        build_image_offline(podman, work, repo, tag, seconds)
        yield podman
    finally:
        if podman is not None:
            podman.reset()
        shutil.rmtree(work, ignore_errors=True)
        if not had_var_lib:
            shutil.rmtree("/var/lib/containers", ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """``python tests/image_support.py [TAG]``: build the CPU image offline into podman's own
    storage (default tag ``localhost/trainenv:cpu``) and print how to run it."""
    import tempfile

    tag = argv[0] if argv else "localhost/trainenv:cpu"
    work = Path(tempfile.mkdtemp(prefix="trainenv-image-"))
    try:
        podman = Podman(None)
        build_image_offline(podman, work, Path(__file__).resolve().parent.parent, tag)
    except PodmanUnavailable as exc:
        print(f"cannot build the image here: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"built {tag} (base {BASE_IMAGE}); run it with:\n"
          f"  podman run --rm {' '.join(podman.limits)} -v \"$PWD/job:/ml\" {tag} train")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
