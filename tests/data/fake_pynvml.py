"""A fake pynvml (tests only; this machine has no GPU): FAKE_NVML_GPUS GPUs, default 2."""
import os

NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, total):
        self.total = total


class _Handle:
    def __init__(self, index):
        self.index = index


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return int(os.environ.get("FAKE_NVML_GPUS", "2"))


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError("Invalid Argument")
    return _Handle(index)


def nvmlDeviceGetUUID(handle):
    return "GPU-%08d-1111-2222-3333-444444444444" % handle.index


def nvmlDeviceGetName(handle):
    return "Fake GPU 80GB"


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory(80 * 1024 ** 3)


def nvmlDeviceGetMigMode(handle):
    raise NVMLError("Not Supported")
