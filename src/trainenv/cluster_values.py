"""Parsers for the values the cluster sources hold: host names, ``host:port`` entries, host
lists, ranks, sizes, ports and JSON variables (``trainenv.cluster`` reads the sources).

Each takes the raw value and where it came from (a variable, or a file and key) and returns the
typed value, or raises a one-line ``ConfigError`` naming that source, the key and the value (URL
credentials hidden). An empty or blank variable counts as unset.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Sequence

from trainenv.errors import ConfigError, shown
from trainenv.redact import redact_urls

NPROC_KEYWORDS = ("auto", "gpu", "cpu", "xpu")
DIGITS = re.compile(r"[0-9]+")
HOST_CHARS = re.compile(r"[A-Za-z0-9._:%\[\]-]{1,255}")
MAX_PORT = 65535
MAX_DIGITS = 9  # ranks and sizes beyond 10**9 nodes are typos


def read_var(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value stripped, or ``None`` when unset or blank."""
    value = environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def is_ads(environ: Mapping[str, str]) -> bool:
    """An OCI Data Science job run: ``JOB_RUN_OCID``, ``JOB_RUN_ENTRYPOINT`` or any ``OCI__*`` set."""
    return any(read_var(environ, name) for name in ("JOB_RUN_OCID", "JOB_RUN_ENTRYPOINT")) or any(
        name.startswith("OCI__") and read_var(environ, name) for name in environ
    )


def ads_nodes(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """``(num_nodes, node_rank)`` of an ADS job that names its nodes: ``INITIAL_CLUSTER_SIZE``, else
    ``NODE_COUNT``, else ``OCI__WORKER_COUNT`` + 1, and ``NODE_RANK`` (default 0); else None."""
    if not is_ads(environ):
        return None
    count: int | None = None
    for name in ("INITIAL_CLUSTER_SIZE", "NODE_COUNT", "OCI__WORKER_COUNT"):
        raw = read_var(environ, name)
        if raw is not None:
            count = non_negative_int(raw, name) + (name == "OCI__WORKER_COUNT")
            if count < 1:
                raise ConfigError.at(name, None, f"{show(raw)} is not a positive node count")
            break
    rank_raw = read_var(environ, "NODE_RANK")
    if count is None and rank_raw is None:
        return None
    rank = 0 if rank_raw is None else non_negative_int(rank_raw, "NODE_RANK")
    if rank >= (count or 1):
        raise ConfigError.at("NODE_RANK", None, f"{rank} is not below the node count {count or 1} (NODE_COUNT)")
    return count or 1, rank


ADS_NODES_FILE = "CLUSTER_NODES_METADATA_FILE"
ADS_NODES_FILE_LIMIT = 1024 * 1024


class NodesNotListed(ConfigError):
    """ADS's node list does not name every node yet: the service writes it as the nodes come up."""


def ads_node_addresses(environ: Mapping[str, str], num_nodes: int) -> tuple[str, ...] | None:
    """The nodes' addresses by rank, from the file ``CLUSTER_NODES_METADATA_FILE`` names (OCI Data
    Science's distributed training: a JSON list of ``{"Rank": n, "IPAddress": "a.b.c.d"}``);
    ``None`` when the variable is unset. ``NodesNotListed`` while the file is missing or lacks a
    rank below ``num_nodes`` (the runner waits for it); any other flaw is a ``ConfigError``."""
    path = read_var(environ, ADS_NODES_FILE)
    if path is None:
        return None
    source = f"{ADS_NODES_FILE}={show(path)}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(ADS_NODES_FILE_LIMIT + 1)
    except FileNotFoundError:
        raise NodesNotListed.at(source, None, f"the node list does not exist yet (0 of {num_nodes} nodes)") from None
    except OSError as exc:
        raise ConfigError.at(source, None, f"cannot read the node list: {exc.strerror or exc}") from None
    if len(data) > ADS_NODES_FILE_LIMIT:
        raise ConfigError.at(source, None, f"the node list is over {ADS_NODES_FILE_LIMIT // 1024} KiB")
    try:
        entries = json.loads(data) if data.strip() else []
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ConfigError.at(source, None, f"the node list is not valid JSON ({reason})") from None
    if not isinstance(entries, list):
        raise ConfigError.at(source, None, f"expected a JSON list of {{\"Rank\": n, \"IPAddress\": ...}}, got {type(entries).__name__}")
    addresses: dict[int, str] = {}
    for index, entry in enumerate(entries):
        key = f"[{index}]"
        rank = entry.get("Rank") if isinstance(entry, dict) else None
        if isinstance(rank, str) and DIGITS.fullmatch(rank) and len(rank) <= MAX_DIGITS:
            rank = int(rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError.at(source, key, f"{show(entry)} has no Rank that is a non-negative integer")
        address = host_name(entry.get("IPAddress"), source, f"{key}.IPAddress")
        if addresses.setdefault(rank, address) != address:
            raise ConfigError.at(source, key, f"rank {rank} is listed as {show(addresses[rank])} and as {show(address)}")
    missing = [rank for rank in range(num_nodes) if rank not in addresses]
    if missing:
        raise NodesNotListed.at(source, None, f"{num_nodes - len(missing)} of {num_nodes} nodes listed (rank {missing[0]} missing)")
    return tuple(addresses[rank] for rank in range(num_nodes))


def show(value: Any) -> str:
    """A short repr for an error message, with URL credentials hidden."""
    if isinstance(value, str):
        return shown(redact_urls(value))
    text = repr(value)
    clean = redact_urls(text)
    return shown(value) if clean == text else shown(clean)


def load_json(text: str, source: str) -> Any:
    """The variable's JSON, nested at most ``MAX_DEPTH`` levels like every config file."""
    from trainenv.config import TOO_DEEP, check_depth

    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError.at(source, None, TOO_DEEP) from None
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ConfigError.at(source, None, f"{show(text)} is not valid JSON ({reason})") from None
    check_depth(source, value)
    return value


def non_negative_int(raw: str, name: str) -> int:
    if not DIGITS.fullmatch(raw) or len(raw) > MAX_DIGITS:
        raise ConfigError.at(name, None, f"{show(raw)} is not a non-negative integer")
    return int(raw)


def platform_master_port(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        raw = read_var(environ, name)
        if raw is not None:
            port = int(raw) if DIGITS.fullmatch(raw) and len(raw) <= 5 else 0
            if not 1 <= port <= MAX_PORT:
                raise ConfigError.at(name, None, f"{show(raw)} is not a port (1-{MAX_PORT})")
            return port
    return None


def platform_nproc_per_node(
    environ: Mapping[str, str], names: tuple[str, ...] = ("PET_NPROC_PER_NODE", "NPROC_PER_NODE")
) -> int | None:
    for name in names:
        raw = read_var(environ, name)
        if raw is None:
            continue
        if raw.lower() in NPROC_KEYWORDS:
            return None
        count = non_negative_int(raw, name)
        if count < 1:
            raise ConfigError.at(name, None, f"{count} is not a positive process count")
        return count
    return None


def is_host_name(text: str) -> bool:
    """Letters, digits and ``-._:%[]`` (names, IPv4, ``[v6]`` with a zone, ``host:port``): never
    quotes, ``$(...)``, spaces or slashes, which no platform puts in a host name."""
    return bool(HOST_CHARS.fullmatch(text))


def host_name(value: Any, source: str, key: str | None) -> str:
    if not isinstance(value, str) or not is_host_name(value):
        raise ConfigError.at(source, key, f"{show(value)} is not a host name")
    return value


def host_of_entry(value: Any, source: str, key: str | None) -> str:
    """``host``, ``host:port`` or ``[v6]:port`` -> host; a bare IPv6 address is kept."""
    entry = host_name(value, source, key)
    if entry.startswith("["):
        end = entry.find("]")
        rest = entry[end + 1 :] if end > 1 else ""
        if end <= 1 or (rest and not (rest[0] == ":" and DIGITS.fullmatch(rest[1:]))):
            raise ConfigError.at(source, key, f"{show(entry)} is not [address]:port")
        return entry[1:end]
    if entry.count(":") == 1:
        host, port = entry.split(":")
        if not host or not DIGITS.fullmatch(port):
            raise ConfigError.at(source, key, f"{show(entry)} is not host:port")
        return host
    return entry


def host_list(value: Any, source: str, key: str | None) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError.at(source, key, f"{show(value)} is not a list of host names")
    if not value:
        raise ConfigError.at(source, key, "is an empty host list")
    return tuple(host_name(host, source, f"{key or ''}[{i}]") for i, host in enumerate(value))


def no_duplicates(items: Sequence[str], source: str, key: str | None) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ConfigError.at(source, key, f"{show(item)} is listed twice")
        seen.add(item)
def instance_group_hosts(groups: Any, source: str) -> tuple[str, ...]:
    if not isinstance(groups, list) or not groups:
        raise ConfigError.at(source, "instance_groups", f"{show(groups)} is not a list of groups")
    hosts: list[str] = []
    for i, group in enumerate(groups):
        key = f"instance_groups[{i}].hosts"
        if not isinstance(group, Mapping) or "hosts" not in group:
            raise ConfigError.at(source, f"instance_groups[{i}]", f"{show(group)} has no hosts")
        hosts.extend(host_list(group["hosts"], source, key))
    return tuple(hosts)


def check_sparse(sparse: Any, name: str, key: str) -> None:
    """Validate Kubeflow's sparse cluster: ``{"worker": {"1": addr}, "ps": [addr]}``."""
    if not isinstance(sparse, dict):
        raise ConfigError.at(name, key, f"{show(sparse)} is not a JSON object")
    for job, entries in sparse.items():
        where = f"{key}.{job}"
        if isinstance(entries, dict):
            for index, entry in entries.items():
                if not DIGITS.fullmatch(index):
                    raise ConfigError.at(name, where, f"{show(index)} is not a task index")
                host_of_entry(entry, name, f"{where}.{index}")
        elif isinstance(entries, list):
            for i, entry in enumerate(entries):
                host_of_entry(entry, name, f"{where}[{i}]")
        else:
            raise ConfigError.at(name, where, f"{show(entries)} is not a list or an index map")


def nnodes(raw: str) -> tuple[int, int]:
    """``N`` -> (N, N); ``MIN:MAX`` -> (MIN, MAX)."""
    parts = raw.split(":")
    if len(parts) > 2 or not all(DIGITS.fullmatch(p.strip()) for p in parts):
        raise ConfigError.at("PET_NNODES", None, f"{show(raw)} is not N or MIN:MAX")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1 or high < low:
        raise ConfigError.at("PET_NNODES", None, f"{show(raw)} needs 1 <= MIN <= MAX")
    return low, high
