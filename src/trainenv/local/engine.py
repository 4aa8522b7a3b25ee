"""The container engine of ``trainenv local --image``: which one, the flags this host needs, and
every engine command line (pure argv builders; nothing here starts a container).

The engine is ``TRAINENV_CONTAINER_ENGINE`` when set (a command: ``podman``, ``/usr/bin/docker``,
or ``podman --root /tmp/x`` with global flags of its own; the first question put to it, the
image's inspection, tells whether it answers), else the first of docker and podman
on ``PATH`` whose engine answers ``<engine> version`` within a few seconds (a docker client
without a daemon is skipped).

Host flags, added only when this host needs them and the engine command does not set them:

- podman without systemd running (containers, CI sandboxes): ``--cgroup-manager cgroupfs``
  and ``--events-backend file`` (the defaults, systemd and journald, are not there);
- podman on a hybrid cgroup v1/v2 host with runc installed: ``--runtime runc`` (crun refuses
  such hosts);
- either engine, without ``CAP_SYS_RESOURCE``: ``--ulimit nofile=N:N`` and ``--ulimit nproc=M:M``
  no higher than this process's hard limits (the engines' defaults exceed them, and the runtime
  then refuses to start the container).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Mapping, Sequence

from trainenv.errors import ConfigError
from trainenv.frozen import frozen

ENGINE_VARIABLE = "TRAINENV_CONTAINER_ENGINE"
ENGINES = ("docker", "podman")
LABEL = "trainenv.run"
PROBE_SECONDS = 10.0
# Wanted limits inside the container, each capped at this process's hard limit.
NOFILE = 1048576
NPROC = 20000  # runc here refused higher nproc values although under the hard limit


@frozen
class Engine:
    """An engine command and the host flags it needs."""

    command: tuple[str, ...]  # the engine and any global flags of the user's, e.g. ("podman",)
    kind: str  # "docker" or "podman"
    global_flags: tuple[str, ...] = ()  # host flags before the subcommand
    run_flags: tuple[str, ...] = ()  # host flags of ``create``

    def argv(self, *args: str) -> list[str]:
        """The full command line of one engine subcommand."""
        return [*self.command, *self.global_flags, *args]


def kind_of(executable: str) -> str:
    """``podman`` when the executable's name says so, else ``docker`` (its CLI is the common one)."""
    return "podman" if "podman" in os.path.basename(executable) else "docker"


def find_engine(environ: Mapping[str, str], probe: bool = True) -> Engine:
    """The engine to use: ``TRAINENV_CONTAINER_ENGINE``, else the first on PATH that answers.
    Without ``probe`` (``--dry-run``) the same choice, but when none answers the first on PATH
    (or ``docker``) stands in, so a dry run also works where no engine runs."""
    import shlex
    import shutil

    chosen = environ.get(ENGINE_VARIABLE, "").strip()
    if chosen:
        try:
            words = shlex.split(chosen)
        except ValueError as exc:
            raise ConfigError.at(ENGINE_VARIABLE, None, f"{chosen!r}: {exc}") from None
        engine = with_host_flags(tuple(words), kind_of(words[0]))
        if not probe:
            return engine
        if shutil.which(words[0]) is None:
            raise ConfigError.at(ENGINE_VARIABLE, None, f"{words[0]!r} is not an executable on PATH")
        return engine  # not probed: the image inspection that follows asks it anyway
    tried = []
    stand_in = None
    for name in ENGINES:
        found = shutil.which(name)
        if found is None:
            tried.append(f"{name}: not on PATH")
            continue
        engine = with_host_flags((found,), name)
        problem = answers(engine)
        if not problem:
            return engine
        tried.append(f"{name}: {problem}")
        stand_in = stand_in or engine
    if not probe:
        return stand_in or with_host_flags((ENGINES[0],), ENGINES[0])
    raise ConfigError(
        f"no container engine answers ({'; '.join(tried)}): install podman or docker, "
        f"or name one in {ENGINE_VARIABLE}"
    )


def answers(engine: Engine) -> str:
    """Empty when ``<engine> version`` succeeds in time, else what went wrong (one line)."""
    import subprocess

    try:
        proc = subprocess.run(engine.argv("version"), capture_output=True, text=True, timeout=PROBE_SECONDS,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {PROBE_SECONDS:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    if proc.returncode == 0:
        return ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def with_host_flags(command: tuple[str, ...], kind: str, root: str = "/") -> Engine:
    """``command`` with the flags this host needs (see the module docstring)."""
    import shutil

    given = set(command)
    global_flags: list[str] = []
    if kind == "podman":
        if not os.path.isdir(os.path.join(root, "run/systemd/system")):
            for flag, value in (("--cgroup-manager", "cgroupfs"), ("--events-backend", "file")):
                if flag not in given:
                    global_flags += [flag, value]
        runc = shutil.which("runc")
        if runc and "--runtime" not in given and os.path.isdir(os.path.join(root, "sys/fs/cgroup/unified")):
            global_flags += ["--runtime", runc]
    return Engine(command, kind, tuple(global_flags), tuple(ulimit_flags(root)))


def ulimit_flags(root: str = "/") -> list[str]:
    """``--ulimit`` flags within this process's hard limits, when it cannot raise them."""
    import resource

    if _has_sys_resource(root):
        return []
    flags = []
    for name, kind, wanted in (("nofile", resource.RLIMIT_NOFILE, NOFILE), ("nproc", resource.RLIMIT_NPROC, NPROC)):
        hard = resource.getrlimit(kind)[1]
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def _has_sys_resource(root: str) -> bool:
    """Whether this process has ``CAP_SYS_RESOURCE`` (bit 24 of ``CapEff``)."""
    try:
        with open(os.path.join(root, "proc/self/status")) as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def gpu_flags(kind: str, gpus: str | None, node: int) -> list[str]:
    """The flags passing GPUs to node ``node`` (0-based): ``all`` to every node, or ``N`` each,
    node ``i`` getting GPUs ``i*N .. i*N+N-1`` (docker ``--gpus``, podman CDI devices)."""
    if not gpus:
        return []
    if gpus == "all":
        return ["--gpus", "all"] if kind == "docker" else ["--device", "nvidia.com/gpu=all"]
    count = int(gpus)
    indexes = [str(index) for index in range(node * count, (node + 1) * count)]
    if kind == "docker":
        return ["--gpus", gpus if node == 0 else f'"device={",".join(indexes)}"']  # quoted: docker splits at commas
    return [flag for index in indexes for flag in ("--device", f"nvidia.com/gpu={index}")]


def check_gpus(value: str | None) -> str | None:
    """``all`` or a positive count; else a ``ConfigError`` naming ``--gpus``."""
    if value is None or value == "all" or (value.isdigit() and int(value) > 0):
        return value
    raise ConfigError.at("--gpus", None, f"{value!r}: expected all or a positive number")


def inspect_entrypoint_argv(engine: Engine, image: str) -> list[str]:
    return engine.argv("image", "inspect", "--format", "{{json .Config.Entrypoint}}", image)


def network_create_argv(engine: Engine, name: str, run_id: str) -> list[str]:
    return engine.argv("network", "create", "--label", f"{LABEL}={run_id}", name)


def network_rm_argv(engine: Engine, name: str) -> list[str]:
    return engine.argv("network", "rm", "-f", name)


def start_argv(engine: Engine, name: str) -> list[str]:
    return engine.argv("start", "--attach", name)


def stop_argv(engine: Engine, names: Sequence[str], grace: float) -> list[str]:
    return engine.argv("stop", "-t", str(max(0, int(grace + 0.999))), *names)


def rm_argv(engine: Engine, names: Sequence[str]) -> list[str]:
    return engine.argv("rm", "-f", *names)


def labelled_argv(engine: Engine, run_id: str) -> list[str]:
    """The ids of every container of the run, running or not."""
    return engine.argv("ps", "-a", "-q", "--filter", f"label={LABEL}={run_id}")


def run_quietly(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120,
                on_error: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run one engine command to its end: ``(status, stdout)``; stderr's last line goes to
    ``on_error`` when it fails. A command that cannot start or hangs counts as status 125."""
    import subprocess

    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else dict(env), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if on_error:
            on_error(str(exc))
        return 125, ""
    if proc.returncode != 0 and on_error:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        on_error(lines[-1] if lines else f"exit status {proc.returncode}")
    return proc.returncode, proc.stdout
