"""Which network interface carries an address of this node (OCI Data Science's node list names
each node by address; NCCL and gloo need the interface's name)."""

from __future__ import annotations


def interface_with_address(address: str) -> str | None:
    """The name of the interface that has ``address`` (IPv4 or IPv6, a zone suffix ignored), or
    ``None`` when none has it or the interfaces cannot be listed. Only reads (``psutil``)."""
    try:
        import psutil

        interfaces = psutil.net_if_addrs()
    except (ImportError, OSError):
        return None
    wanted = address.strip("[]").split("%", 1)[0]
    for name, addresses in sorted(interfaces.items()):
        if any(str(entry.address).split("%", 1)[0] == wanted for entry in addresses):
            return name
    return None
