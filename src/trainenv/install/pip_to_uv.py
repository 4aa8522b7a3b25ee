"""pip's settings, carried over to uv (reads config files; runs nothing).

uv reads neither ``PIP_*`` variables nor ``pip.conf``. So that an image or platform configured
for pip (a private index, a mirror, a CA bundle) behaves the same under uv, the installer's
environment gets, for each pip setting below that is set and whose uv counterpart is not set
in ``env``:

| pip setting (``PIP_*`` variable or ``pip.conf``) | uv gets |
|---|---|
| ``index-url`` | ``UV_INDEX_URL`` (unless ``UV_INDEX_URL``/``UV_DEFAULT_INDEX`` is set) |
| ``extra-index-url`` | ``UV_EXTRA_INDEX_URL``, space-separated (unless it or ``UV_INDEX`` is set) |
| ``find-links`` | ``UV_FIND_LINKS``, comma-separated |
| ``trusted-host`` | ``UV_INSECURE_HOST`` |
| ``constraint`` | ``UV_CONSTRAINT`` |
| ``timeout`` / ``default-timeout``, ``retries`` | ``UV_HTTP_TIMEOUT``, ``UV_HTTP_RETRIES`` |
| ``cert``, ``client-cert`` | ``SSL_CERT_FILE``, ``SSL_CLIENT_CERT`` |
| ``proxy`` | ``HTTPS_PROXY`` and ``HTTP_PROXY`` (unless any proxy variable is set) |
| ``pre``, ``break-system-packages`` (true) | ``UV_PRERELEASE=allow``, ``UV_BREAK_SYSTEM_PACKAGES=1`` |
| ``no-index`` (true) | the ``--no-index`` flag |

**Several indexes, pip's way.** pip takes the best matching version from every index it knows
(``--index-url``, every ``--extra-index-url``, ``--find-links``); uv, by default, takes a
project from the first index that has it at all, trying extra indexes before the main one, so
a pin found only on a later index fails. uv therefore also gets
``UV_INDEX_STRATEGY=unsafe-best-match`` (pip's behaviour, for pip's settings and for index
options in requirements.txt alike) unless ``UV_INDEX_STRATEGY`` is set or a uv config file
exists. Like pip, this trusts every configured index with every project name.

pip's own precedence is kept: ``[install]`` over ``[global]``, ``PIP_*`` over the files, the
files in pip's order (``$XDG_CONFIG_DIRS/pip/pip.conf``, ``/etc/pip.conf``, ``~/.pip/pip.conf``,
``~/.config/pip/pip.conf``, ``<prefix>/pip.conf``, ``$PIP_CONFIG_FILE``; ``PIP_CONFIG_FILE=/dev/null``
means no files). When a uv config exists (``UV_CONFIG_FILE``, ``~/.config/uv/uv.toml``,
``/etc/uv/uv.toml``, ``$XDG_CONFIG_DIRS/uv/uv.toml``) only the ``PIP_*`` variables are carried
over, not ``pip.conf``. Not carried over: pip's ``--only-binary``/``--no-binary``; a project
``uv.toml`` above the code dir is uv's business.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping

_TRUE = ("1", "true", "yes", "on", "y", "t")
_PIP_ALIASES = {"default-timeout": "timeout"}
INDEX_STRATEGY = "unsafe-best-match"
# pip option, uv-side variables it fills, variables whose presence means "already set for uv",
# kind: "one" (single value), a separator for lists, or "flag:<value>" (true/false)
_PIP_TO_UV = (
    ("index-url", ("UV_INDEX_URL",), ("UV_INDEX_URL", "UV_DEFAULT_INDEX"), "one"),
    ("extra-index-url", ("UV_EXTRA_INDEX_URL",), ("UV_EXTRA_INDEX_URL", "UV_INDEX"), " "),
    ("find-links", ("UV_FIND_LINKS",), ("UV_FIND_LINKS",), ","),
    ("trusted-host", ("UV_INSECURE_HOST",), ("UV_INSECURE_HOST",), " "),
    ("constraint", ("UV_CONSTRAINT",), ("UV_CONSTRAINT",), " "),
    ("timeout", ("UV_HTTP_TIMEOUT",), ("UV_HTTP_TIMEOUT",), "one"),
    ("retries", ("UV_HTTP_RETRIES",), ("UV_HTTP_RETRIES",), "one"),
    ("cert", ("SSL_CERT_FILE",), ("SSL_CERT_FILE",), "one"),
    ("client-cert", ("SSL_CLIENT_CERT",), ("SSL_CLIENT_CERT",), "one"),
    (
        "proxy",
        ("HTTPS_PROXY", "HTTP_PROXY"),
        ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"),
        "one",
    ),
    ("pre", ("UV_PRERELEASE",), ("UV_PRERELEASE",), "flag:allow"),
    ("break-system-packages", ("UV_BREAK_SYSTEM_PACKAGES",), ("UV_BREAK_SYSTEM_PACKAGES",), "flag:1"),
)


def uv_environment(env: Mapping[str, str], prefix: str | None = None) -> tuple[dict[str, str], list[str]]:
    """What to add to uv's environment so it honours pip's settings, and extra uv flags.

    Returns ``(variables, flags)``; a variable is only added when neither it nor an equivalent
    uv setting is in ``env`` (the table in the module docstring). ``prefix`` is the target
    interpreter's ``sys.prefix``.
    """
    uv_config = _uv_config_present(env)
    settings = pip_settings(env, prefix, files=not uv_config)
    added: dict[str, str] = {}
    for option, targets, blockers, kind in _PIP_TO_UV:
        value = settings.get(option)
        if value is None or any(name in env for name in blockers):
            continue
        if kind.startswith("flag:"):
            if value.strip().lower() not in _TRUE:
                continue
            converted = kind[len("flag:"):]
        elif kind == "one":
            converted = value.strip()
        else:
            converted = kind.join(value.split())
        if converted:
            for target in targets:
                added[target] = converted
    if not uv_config and "UV_INDEX_STRATEGY" not in env:
        added["UV_INDEX_STRATEGY"] = INDEX_STRATEGY
    flags = ["--no-index"] if settings.get("no-index", "").strip().lower() in _TRUE else []
    return added, flags


def pip_settings(env: Mapping[str, str], prefix: str | None = None, files: bool = True) -> dict[str, str]:
    """pip's effective install settings: config files (``[global]`` then ``[install]``), then
    ``PIP_*`` variables. Keys are pip option names (``index-url``); values are raw strings.

    ``prefix`` is the target interpreter's ``sys.prefix`` (its site ``pip.conf``).
    """
    import configparser

    sections: dict[str, dict[str, str]] = {"global": {}, "install": {}}
    for path in _pip_config_files(env, prefix) if files else []:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section, values in sections.items():
            if parser.has_section(section):
                values.update((_pip_key(k), v) for k, v in parser.items(section))
    settings = dict(sections["global"])
    settings.update(sections["install"])
    for name, value in env.items():
        if name.startswith("PIP_") and len(name) > 4:
            settings[_pip_key(name[4:])] = value
    return settings


def _pip_key(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _PIP_ALIASES.get(key, key)


def _config_home(env: Mapping[str, str]) -> tuple[str, str, list[str]]:
    home = env.get("HOME") or os.path.expanduser("~")
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    config_dirs = [d for d in (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep) if d]
    return home, config_home, config_dirs


def _pip_config_files(env: Mapping[str, str], prefix: str | None) -> list[str]:
    """pip's config files in pip's load order (later ones win)."""
    config_file = env.get("PIP_CONFIG_FILE")
    if config_file == os.devnull:
        return []
    home, config_home, config_dirs = _config_home(env)
    files = [os.path.join(d, "pip", "pip.conf") for d in config_dirs] + ["/etc/pip.conf"]
    if not (config_file and os.path.exists(config_file)):
        files += [os.path.join(home, ".pip", "pip.conf"), os.path.join(config_home, "pip", "pip.conf")]
    if prefix:
        files.append(os.path.join(prefix, "pip.conf"))
    if config_file:
        files.append(config_file)
    return files


def _uv_config_present(env: Mapping[str, str]) -> bool:
    if env.get("UV_NO_CONFIG"):
        return False
    if env.get("UV_CONFIG_FILE"):
        return True
    _, config_home, config_dirs = _config_home(env)
    candidates = [os.path.join(config_home, "uv", "uv.toml"), "/etc/uv/uv.toml"]
    candidates += [os.path.join(d, "uv", "uv.toml") for d in config_dirs]
    return any(os.path.isfile(path) for path in candidates)
