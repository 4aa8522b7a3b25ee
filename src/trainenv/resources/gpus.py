"""GPUs through NVML, filtered by the visibility variables (see the package docstring)."""

from __future__ import annotations

import os
import re
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping, Sequence

from trainenv.errors import ConfigError, InternalError, shown
from trainenv.frozen import frozen
from trainenv.resources.cgroups import DIGITS, debug

# The kernel driver's device nodes: without any of them NVML cannot load, so pynvml
# (tens of milliseconds to import) is not even imported.
NVIDIA_DRIVER_MARKERS = ("dev/nvidiactl", "proc/driver/nvidia", "dev/dxg")


def nvidia_driver_present(root: str = "/") -> bool:
    return any(os.path.exists(os.path.join(root, marker)) for marker in NVIDIA_DRIVER_MARKERS)


@frozen
class Gpu:
    """One GPU the job may use.

    ``index`` is the position among the visible GPUs (``cuda:<index>`` in the job's code),
    not NVML's physical index; ``uuid`` is NVML's (``GPU-...`` or, for a MIG device,
    ``MIG-...``) and identifies the device either way.
    """

    index: int
    name: str
    uuid: str
    memory_bytes: int


_NO_GPUS = ("none", "void", "")
_LEGACY_MIG = r"MIG-(GPU-[^/]+)/([0-9]+)/([0-9]+)"  # compiled on first use (re caches it)


def _visibility(environ: Mapping[str, str]) -> tuple[str, str] | None:
    for variable in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if variable in environ:
            return variable, environ[variable]
    return None


def _entries(variable: str, value: str) -> list[str] | None:
    """The visibility list's entries (syntax checked); ``None`` for all GPUs, ``[]`` for none."""
    whole = value.strip().lower()
    if whole == "all" or (variable == "NVIDIA_VISIBLE_DEVICES" and value.strip().startswith("/")):
        return None
    if whole in _NO_GPUS:
        return []
    entries = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if re.fullmatch(r"-[0-9]+", entry, re.ASCII):
            break  # CUDA stops at a negative index: "-1" hides every GPU
        if not (DIGITS.fullmatch(entry) or entry.startswith(("GPU-", "MIG-"))):
            raise ConfigError.at(variable, shown(entry), "not a GPU index, GPU-<uuid> or MIG-<uuid>")
        entries.append(entry)
    return entries


def _text(value: Any) -> str:
    """NVML strings: ``str`` in current nvidia-ml-py, ``bytes`` in old versions."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Nvml:
    """The NVML queries ``gpus`` needs, on an initialised ``pynvml`` module."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self.handles]
        self._migs: list[tuple[Any, str, str]] | None = None

    def mig_handles(self, handle: Any) -> list[Any]:
        """The MIG devices of ``handle``; ``[]`` when MIG is off or unsupported."""
        nvml = self.nvml
        try:
            current = nvml.nvmlDeviceGetMigMode(handle)[0]
        except (nvml.NVMLError, AttributeError):
            return []
        if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        found = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                found.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            except nvml.NVMLError:  # an empty slot: NVML_ERROR_NOT_FOUND
                continue
        return found

    def migs(self) -> list[tuple[Any, str, str]]:
        """Every MIG device as (handle, uuid, legacy id ``MIG-GPU-<uuid>/<gi>/<ci>``)."""
        if self._migs is None:
            self._migs = []
            for handle, parent_uuid in zip(self.handles, self.uuids):
                for mig in self.mig_handles(handle):
                    try:
                        legacy = "MIG-{}/{}/{}".format(
                            parent_uuid,
                            self.nvml.nvmlDeviceGetGpuInstanceId(mig),
                            self.nvml.nvmlDeviceGetComputeInstanceId(mig),
                        )
                    except (self.nvml.NVMLError, AttributeError):
                        legacy = ""
                    self._migs.append((mig, _text(self.nvml.nvmlDeviceGetUUID(mig)), legacy))
        return self._migs

    def describe(self, index: int, handle: Any) -> Gpu:
        nvml = self.nvml
        return Gpu(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        )


def _listing(names: Sequence[str]) -> str:
    shown_names = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"this node has {len(names)}" + (f": {shown_names}" if names else "")


def _by_uuid(variable: str, entry: str, candidates: Sequence[tuple[Any, str]]) -> Any:
    """The one handle whose UUID starts with ``entry`` (CUDA accepts unique prefixes)."""
    wanted = entry.lower()
    matches = [handle for handle, uuid in candidates if uuid.lower().startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    kind = "MIG device" if entry.startswith("MIG-") else "GPU"
    uuids = [uuid for _, uuid in candidates]
    if not matches:
        raise ConfigError.at(variable, shown(entry), f"no such {kind} ({_listing(uuids)})")
    raise ConfigError.at(variable, shown(entry), f"matches {len(matches)} {kind}s; give more of the UUID")


def _resolve(variable: str, entries: list[str] | None, nvml: _Nvml) -> list[Any]:
    """The handles the visibility list names, in its order."""
    count = len(nvml.handles)
    if entries is None:
        handles: list[Any] = []
        for handle in nvml.handles:
            handles.extend(nvml.mig_handles(handle) or [handle])
        return handles
    if (
        variable == "NVIDIA_VISIBLE_DEVICES"
        and entries
        and all(DIGITS.fullmatch(e) for e in entries)
        and len(entries) == count
    ):
        return list(nvml.handles)  # the container runtime already injected exactly these
    handles = []
    named: dict[int, str] = {}  # id(handle) -> the entry that named it
    for entry in entries:
        if DIGITS.fullmatch(entry):
            index = int(entry)
            if index >= count:
                names = [str(i) for i in range(count)]
                raise ConfigError.at(variable, shown(entry), f"no such GPU ({_listing(names)})")
            handle = nvml.handles[index]
        elif entry.startswith("GPU-"):
            handle = _by_uuid(variable, entry, list(zip(nvml.handles, nvml.uuids)))
        elif re.fullmatch(_LEGACY_MIG, entry, re.ASCII):
            matches = [mig for mig, _, ident in nvml.migs() if ident.lower() == entry.lower()]
            if not matches:
                idents = [ident for _, _, ident in nvml.migs() if ident]
                raise ConfigError.at(variable, shown(entry), f"no such MIG device ({_listing(idents)})")
            handle = matches[0]
        else:
            handle = _by_uuid(variable, entry, [(mig, uuid) for mig, uuid, _ in nvml.migs()])
        # Each device's handle is made once per call, so identity means the same device.
        if id(handle) in named:
            raise ConfigError.at(variable, shown(entry), f"names the same GPU as {named[id(handle)]!r}")
        named[id(handle)] = entry
        handles.append(handle)
    return handles


def gpus(environ: Mapping[str, str]) -> tuple[Gpu, ...]:
    """The GPUs the job may use, in ``CUDA_VISIBLE_DEVICES`` order; ``()`` without NVML."""
    visibility = _visibility(environ)
    variable, entries = (None, None) if visibility is None else (visibility[0], _entries(*visibility))
    if entries == []:
        return ()
    if "pynvml" not in sys.modules and not nvidia_driver_present():
        debug("no GPUs: no NVIDIA driver (none of /%s)", ", /".join(NVIDIA_DRIVER_MARKERS))
        return ()
    try:
        import pynvml
    except ImportError as exc:
        debug("no GPUs: cannot import pynvml (install nvidia-ml-py): %s", exc)
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        debug("no GPUs: NVML is not available: %s", exc)
        return ()
    try:
        nvml = _Nvml(pynvml)
        handles = _resolve(variable or "CUDA_VISIBLE_DEVICES", entries, nvml)
        return tuple(nvml.describe(i, handle) for i, handle in enumerate(handles))
    except pynvml.NVMLError as exc:
        raise InternalError(f"NVML failed while listing GPUs: {exc}") from exc
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            debug("nvmlShutdown failed: %s", exc)
