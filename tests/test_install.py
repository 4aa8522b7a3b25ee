"""trainenv.install with real pip, real uv and a real target venv; no network.

Wheels are built by hand (tests/fixtures_wheels.py) into a local dir and installed with
``--no-index --find-links``. One session venv (with pip) is the target; every test installs
packages of its own name, so tests do not depend on each other.
"""

from __future__ import annotations

import ensurepip
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_wheels import build_wheel, serve_directory, simple_index
from support import free_port, need_uv, needs_uv
from trainenv.errors import ConfigError, InstallError
from trainenv.install import InstallRequest, install_requirements
from trainenv.install.installers import INSTALLER_VARIABLE, find_uv
from trainenv.install.marker import default_marker_dir
from trainenv.install.pip_to_uv import pip_settings, uv_environment
from trainenv.install.run import run_installer

INSTALLERS = ["pip", "uv"]
UV = find_uv(os.environ)


def _make_venv(path: Path, with_pip: bool) -> str:
    """A fresh venv. pip comes from ensurepip's bundled wheel through uv (0.5 s) when it can,
    else from ``python -m venv`` itself (7 s here)."""
    bundled = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    fast = not with_pip or (UV is not None and bundled)
    cmd = [sys.executable, "-m", "venv", str(path)] + (["--without-pip"] if fast else [])
    subprocess.run(cmd, check=True)
    python = str(path / "bin" / "python")
    if with_pip and fast:
        subprocess.run(
            [UV, "pip", "install", "-q", "--python", python, "--no-index", "--find-links",
             str(bundled[-1].parent), "pip"],
            check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "UV_NO_CONFIG": "1"},
        )
    return python


@pytest.fixture(scope="session")
def target_python(tmp_path_factory) -> str:
    return _make_venv(tmp_path_factory.mktemp("target") / "venv", with_pip=True)


@pytest.fixture(scope="session")
def caches(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches")


@pytest.fixture
def base_env(caches, tmp_path) -> dict:
    """An environment that keeps both installers off this machine's pip.conf, caches and network."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "XDG_CONFIG_DIRS": str(tmp_path / "no-xdg"),
        "PIP_CONFIG_FILE": os.devnull,
        "UV_NO_CONFIG": "1",
        "PIP_CACHE_DIR": str(caches / "pip"),
        "UV_CACHE_DIR": str(caches / "uv"),
        "PIP_RETRIES": "1",  # one request retry: pip only names the network error when it retries
        "UV_HTTP_RETRIES": "0",
        "PIP_DEFAULT_TIMEOUT": "5",
        "UV_HTTP_TIMEOUT": "5",
        "UV_PYTHON_DOWNLOADS": "never",
    }


class Job:
    """A code dir with a requirements.txt, a wheel dir and a private marker dir."""

    def __init__(self, tmp_path: Path, python: str, env: dict, installer: str) -> None:
        self.code = tmp_path / "code"
        self.code.mkdir()
        self.wheels = tmp_path / "wheels"
        self.wheels.mkdir()  # uv rejects a --find-links path that does not exist
        self.markers = tmp_path / "markers"
        self.python = python
        self.env = {**env, INSTALLER_VARIABLE: installer}
        self.lines: list = []

    def requirements(self, *lines: str, local_index: bool = True) -> Path:
        head = ["--no-index", f"--find-links {self.wheels}"] if local_index else []
        path = self.code / "requirements.txt"
        path.write_text("\n".join(head + list(lines)) + "\n")
        return path

    def install(self, requirements: "Path | None" = None, extras: tuple = ()):
        self.lines.clear()
        request = InstallRequest(
            python=self.python, requirements_file=requirements, extra_requirements=extras,
            cwd=self.code, env=self.env, marker_dir=self.markers,
        )
        return install_requirements(request, self.lines.append)

    def version_of(self, module: str) -> str:
        done = subprocess.run(
            [self.python, "-c", f"import {module}; print({module}.VERSION)"],
            capture_output=True, text=True, cwd="/",
        )
        return done.stdout.strip() if done.returncode == 0 else f"not importable: {done.stderr[-200:]}"


def _job(tmp_path, target_python, base_env, installer) -> Job:
    if installer in ("uv", "auto"):
        need_uv()
    return Job(tmp_path, target_python, base_env, installer)


# --- nothing to do ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [None, "", "# only a comment\n\n   # another\n", "--index-url https://example.invalid/simple\n-f /x\n"]
)
def test_nothing_to_install_runs_nothing(tmp_path, base_env, content):
    req = None
    if content is not None:
        req = tmp_path / "requirements.txt"
        req.write_text(content)
    # a python that does not exist: resolving or spawning anything would raise
    request = InstallRequest("/nonexistent/bin/python", req, (), tmp_path, base_env, tmp_path / "m")
    result = install_requirements(request, lambda line: pytest.fail(f"logged {line!r}"))
    assert result.installer == "none" and result.packages == ()
    assert not (tmp_path / "m").exists()


# --- install, skip, reinstall -------------------------------------------------------------


@pytest.mark.parametrize("installer", INSTALLERS)
def test_install_then_skip_then_reinstall_on_change(tmp_path, target_python, base_env, installer):
    job = _job(tmp_path, target_python, base_env, installer)
    name = f"tiny_{installer}_a"
    build_wheel(job.wheels, name, "1.0")
    build_wheel(job.wheels, f"tiny_{installer}_dep", "1.0")
    build_wheel(job.wheels, name, "2.0", requires=(f"tiny_{installer}_dep>=1.0",))

    req = job.requirements(f"{name}==1.0  # pinned")
    first = job.install(req)
    assert first.installer == installer
    assert first.packages == (name.replace("_", "-"),)
    assert job.version_of(name) == "1.0"
    assert any(line.startswith(f"{installer}: ") for line in job.lines)  # the installer's own lines
    assert job.lines[-1].startswith(f"requirements installed with {installer} in ")

    started = time.perf_counter()
    second = job.install(req)
    elapsed = time.perf_counter() - started
    assert second.installer == "skipped" and second.packages == ()
    assert elapsed < 0.05, f"skip took {elapsed * 1000:.1f} ms"
    assert len(job.lines) == 1 and "already installed" in job.lines[0]

    req = job.requirements(f"{name}==2.0")
    third = job.install(req)
    assert third.installer == installer
    assert set(third.packages) == {name.replace("_", "-"), f"tiny-{installer}-dep"}
    assert job.version_of(name) == "2.0"


@needs_uv
def test_reinstalls_when_site_packages_lost_the_packages(tmp_path, target_python, base_env):
    """A container restarted from its image keeps /tmp (emptyDir) but not site-packages."""
    job = _job(tmp_path, target_python, base_env, "uv")
    build_wheel(job.wheels, "tiny_reset", "1.0")
    req = job.requirements("tiny_reset")
    assert job.install(req).installer == "uv"
    assert job.install(req).installer == "skipped"
    subprocess.run([UV, "pip", "uninstall", "-q", "--python", target_python, "tiny_reset"], check=True,
                   env=job.env)
    assert job.version_of("tiny_reset").startswith("not importable")

    again = job.install(req)
    assert again.installer == "uv" and again.packages == ("tiny-reset",)
    assert any("site-packages changed" in line for line in job.lines)
    assert job.version_of("tiny_reset") == "1.0"


@needs_uv
def test_included_requirements_file_is_part_of_the_key(tmp_path, target_python, base_env):
    job = _job(tmp_path, target_python, base_env, "uv")
    build_wheel(job.wheels, "tiny_incl", "1.0")
    build_wheel(job.wheels, "tiny_incl", "2.0")
    base = job.code / "base.txt"
    base.write_text("tiny_incl==1.0\n")
    req = job.requirements("-r base.txt")
    assert job.install(req).installer == "uv"
    assert job.install(req).installer == "skipped"
    base.write_text("tiny_incl==2.0\n")
    assert job.install(req).installer == "uv"
    assert job.version_of("tiny_incl") == "2.0"


@needs_uv
def test_untrusted_marker_dir_is_not_used(tmp_path, target_python, base_env):
    job = _job(tmp_path, target_python, base_env, "uv")
    build_wheel(job.wheels, "tiny_trust", "1.0")
    job.markers.mkdir()
    job.markers.chmod(0o777)
    req = job.requirements("tiny_trust")
    assert job.install(req).installer == "uv"
    assert any("not private" in line for line in job.lines)
    assert job.install(req).installer == "uv"  # no marker was written, so no skip
    assert list(job.markers.iterdir()) == []


@needs_uv
def test_extras_alone_with_relative_path_from_cwd(tmp_path, target_python, base_env):
    job = _job(tmp_path, target_python, base_env, "uv")
    wheel = build_wheel(job.code / "dist", "tiny_extra", "1.0")
    result = job.install(None, extras=(f"./dist/{wheel.name}",))
    assert result.installer == "uv" and result.packages == ("tiny-extra",)
    assert job.version_of("tiny_extra") == "1.0"


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("installer", INSTALLERS)
def test_missing_local_file_fails_with_installers_message(tmp_path, target_python, base_env, installer):
    job = _job(tmp_path, target_python, base_env, installer)
    req = job.requirements("./vendor/not-there")
    with pytest.raises(InstallError) as caught:
        job.install(req)
    error = caught.value
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"requirements install failed ({installer} exit 1): ")
    assert message.endswith("see the log above")
    expected = "does not exist" if installer == "pip" else "Distribution not found"
    assert expected in message and expected in error.tail
    assert "not-there" in error.tail
    assert not any("retrying" in line for line in job.lines)
    assert error.exit_code == 69 and error.category == "InstallError"


@pytest.mark.parametrize("installer", INSTALLERS)
def test_unknown_package_fails_without_retry(tmp_path, target_python, base_env, installer):
    job = _job(tmp_path, target_python, base_env, installer)
    req = job.requirements("tiny_no_such_package==1.0")
    with pytest.raises(InstallError) as caught:
        job.install(req)
    assert "tiny" in caught.value.tail and "no-such-package" in caught.value.tail.replace("_", "-")
    assert "after a retry" not in str(caught.value)
    assert not any("retrying" in line for line in job.lines)


@pytest.mark.parametrize("installer", INSTALLERS)
def test_network_error_is_retried_once(tmp_path, target_python, base_env, installer):
    job = _job(tmp_path, target_python, base_env, installer)
    port = free_port()
    req = job.requirements(f"--index-url http://127.0.0.1:{port}/simple", "tiny_offline", local_index=False)
    started = time.monotonic()
    with pytest.raises(InstallError) as caught:
        job.install(req)
    elapsed = time.monotonic() - started
    retries = [line for line in job.lines if "retrying once" in line]
    assert len(retries) == 1 and "connection refused" in retries[0].lower()
    assert sum(line.startswith("installing requirements") for line in job.lines) == 1
    message = str(caught.value)
    assert f"({installer} exit " in message and "after a retry" in message
    assert "network error (Connection refused)" in message
    assert elapsed < 20


@pytest.mark.parametrize("installer", INSTALLERS)
def test_secrets_never_reach_the_log_the_message_or_the_tail(tmp_path, target_python, base_env, installer):
    job = _job(tmp_path, target_python, base_env, installer)
    port = free_port()
    job.env["PIP_EXTRA_INDEX_URL"] = f"http://alice:s3cr3t-tok-123@127.0.0.1:{port}/simple"
    job.env["HF_TOKEN"] = "hf-tok-abc-123"
    # an invalid requirement both installers echo verbatim, holding both secret values
    req = job.requirements("tiny_secret==1.0 s3cr3t-tok-123 hf-tok-abc-123")
    with pytest.raises(InstallError) as caught:
        job.install(req)
    everything = "\n".join(job.lines + [str(caught.value), caught.value.tail])
    assert "s3cr3t-tok-123" not in everything and "hf-tok-abc-123" not in everything
    assert "tiny_secret==1.0 *** ***" in caught.value.tail  # the echoed line, redacted


@needs_uv
def test_uv_specific_failure_falls_back_to_pip(tmp_path, target_python, base_env):
    job = _job(tmp_path, target_python, base_env, "auto")
    build_wheel(job.wheels, "tiny_fallback", "1.0")
    req = job.requirements("--global-option=--quiet", "tiny_fallback")  # pip accepts it, uv cannot parse it
    result = job.install(req)
    assert result.installer == "pip" and result.packages == ("tiny-fallback",)
    fallbacks = [line for line in job.lines if "falling back to pip" in line]
    assert len(fallbacks) == 1
    assert job.version_of("tiny_fallback") == "1.0"


@needs_uv
def test_forced_uv_does_not_fall_back(tmp_path, target_python, base_env):
    job = _job(tmp_path, target_python, base_env, "uv")
    build_wheel(job.wheels, "tiny_nofallback", "1.0")
    req = job.requirements("--global-option=--quiet", "tiny_nofallback")
    with pytest.raises(InstallError, match=r"\(uv exit \d\)") as caught:
        job.install(req)
    assert "set TRAINENV_INSTALLER=pip (or auto) to use pip" in str(caught.value)
    assert not any("falling back" in line for line in job.lines)


@needs_uv
def test_pip_variables_reach_uv(tmp_path, target_python, base_env):
    """PIP_FIND_LINKS and PIP_NO_INDEX are all uv gets: it installs only if they were passed on."""
    job = _job(tmp_path, target_python, base_env, "uv")
    build_wheel(job.wheels, "tiny_mapped", "1.0")
    job.env.update(PIP_FIND_LINKS=str(job.wheels), PIP_NO_INDEX="1")
    req = job.requirements("tiny_mapped", local_index=False)
    assert job.install(req).installer == "uv"
    assert any("UV_FIND_LINKS" in line and "--no-index" in line for line in job.lines)
    assert job.version_of("tiny_mapped") == "1.0"


@pytest.mark.parametrize("installer", INSTALLERS)
def test_pip_index_and_extra_indexes_keep_pips_semantics(tmp_path, target_python, base_env, installer):
    """pip takes the best match from every index; uv, by default, only looks at the first index
    that has the project (extra indexes first). Requirements that pip installs from
    PIP_INDEX_URL + PIP_EXTRA_INDEX_URL must install under uv as well."""
    job = _job(tmp_path, target_python, base_env, installer)
    name_a, name_b = f"tiny_{installer}_idx_a", f"tiny_{installer}_idx_b"
    built = tmp_path / "built"
    main = simple_index(tmp_path / "main", [build_wheel(built / "m", name_a, "1.0")])
    first = simple_index(tmp_path / "extra1", [build_wheel(built / "e1", name_a, "2.0"),
                                                build_wheel(built / "e1", name_b, "1.0")])
    second = simple_index(tmp_path / "extra2", [build_wheel(built / "e2", name_b, "2.0")])
    with serve_directory(main) as m, serve_directory(first) as e1, serve_directory(second) as e2:
        job.env.update(PIP_INDEX_URL=m, PIP_EXTRA_INDEX_URL=f"{e1} {e2}")
        # name_a 1.0 is only in the main index, name_b 2.0 only in the second extra index
        req = job.requirements(f"{name_a}==1.0", f"{name_b}==2.0", local_index=False)
        result = job.install(req)
    assert result.installer == installer
    assert job.version_of(name_a) == "1.0" and job.version_of(name_b) == "2.0"
    if installer == "uv":
        assert any("UV_INDEX_STRATEGY" in line for line in job.lines)


@needs_uv
def test_index_strategy_set_by_the_user_is_kept(tmp_path, target_python, base_env):
    job = _job(tmp_path, target_python, base_env, "uv")
    name = "tiny_uv_strategy"
    built = tmp_path / "built"
    main = simple_index(tmp_path / "main", [build_wheel(built / "m", name, "1.0")])
    extra = simple_index(tmp_path / "extra", [build_wheel(built / "e", name, "2.0")])
    with serve_directory(main) as m, serve_directory(extra) as e:
        job.env.update(PIP_INDEX_URL=m, PIP_EXTRA_INDEX_URL=e, UV_INDEX_STRATEGY="first-index")
        with pytest.raises(InstallError) as caught:
            job.install(job.requirements(f"{name}==1.0", local_index=False))
    message = str(caught.value)
    assert "(uv exit " in message
    assert "set TRAINENV_INSTALLER=pip" in message  # how to switch installer
    assert not any("UV_INDEX_STRATEGY" in line for line in job.lines if "passed on" in line)


def test_target_without_pip(tmp_path, base_env):
    python = _make_venv(tmp_path / "nopip", with_pip=False)
    wheel = build_wheel(tmp_path / "w", "tiny_nopip", "1.0")
    request = InstallRequest(python, None, (str(wheel),), tmp_path, {**base_env, INSTALLER_VARIABLE: "pip"},
                             tmp_path / "m")
    with pytest.raises(InstallError, match="has no pip module") as caught:
        install_requirements(request, lambda line: None)
    assert "\n" not in str(caught.value)
    if UV is not None:  # auto: uv installs into a venv that has no pip
        request = InstallRequest(python, None, (str(wheel),), tmp_path, base_env, tmp_path / "m")
        assert install_requirements(request, lambda line: None).installer == "uv"


def test_missing_python(tmp_path, base_env):
    request = InstallRequest("/nonexistent/bin/python", None, ("six",), tmp_path, base_env, tmp_path / "m")
    with pytest.raises(InstallError, match="/nonexistent/bin/python does not exist"):
        install_requirements(request, lambda line: None)


def test_bad_settings_are_config_errors(tmp_path, target_python, base_env):
    request = InstallRequest(target_python, None, ("six",), tmp_path, {**base_env, INSTALLER_VARIABLE: "conda"})
    with pytest.raises(ConfigError, match="TRAINENV_INSTALLER: must be one of auto, uv, pip, got 'conda'"):
        install_requirements(request, lambda line: None)
    request = InstallRequest(target_python, None, ("--index-url=https://x",), tmp_path, base_env)
    with pytest.raises(ConfigError, match="is an installer option, not a requirement"):
        install_requirements(request, lambda line: None)


def test_forced_uv_without_uv(tmp_path, target_python, base_env, monkeypatch):
    monkeypatch.setattr("trainenv.install.installers.find_uv", lambda env: None)
    request = InstallRequest(target_python, None, ("six",), tmp_path, {**base_env, INSTALLER_VARIABLE: "uv"},
                             tmp_path / "m")
    with pytest.raises(InstallError, match="TRAINENV_INSTALLER=uv but uv is neither on PATH nor importable"):
        install_requirements(request, lambda line: None)


# --- pieces -------------------------------------------------------------------------------------


def test_output_is_streamed_line_by_line(tmp_path):
    script = "import time; print('Collecting first', flush=True); time.sleep(0.6); print('Collecting second')"
    stamps = []
    finished = run_installer([sys.executable, "-c", script], str(tmp_path), dict(os.environ),
                             lambda line: stamps.append((time.monotonic(), line)))
    ended = time.monotonic()
    assert [line for _, line in stamps] == ["Collecting first", "Collecting second"]
    assert ended - stamps[0][0] > 0.4  # the first line was passed on while the process still ran
    assert finished.returncode == 0


def test_uv_on_path_is_preferred(tmp_path):
    fake = tmp_path / "uv"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert find_uv({"PATH": str(tmp_path)}) == str(fake)


def test_pip_config_is_carried_over_to_uv(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.example/simple\ntrusted-host = a.example\n    b.example:8080\n"
        "timeout = 42\n[install]\nfind-links = /w1 /w2\npre = true\nno-index = no\n"
    )
    env = {"HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none"), "PIP_CONFIG_FILE": str(conf),
           "PIP_EXTRA_INDEX_URL": "https://x.example/simple https://y.example/simple",
           "PIP_PROXY": "http://proxy:3128", "UV_HTTP_TIMEOUT": "7", "PIP_CERT": "/ca.pem"}
    assert pip_settings(env)["index-url"] == "https://mirror.example/simple"
    added, flags = uv_environment(env)
    assert added["UV_INDEX_URL"] == "https://mirror.example/simple"
    assert added["UV_EXTRA_INDEX_URL"] == "https://x.example/simple https://y.example/simple"
    assert added["UV_INSECURE_HOST"] == "a.example b.example:8080"
    assert added["UV_FIND_LINKS"] == "/w1,/w2"
    assert added["UV_PRERELEASE"] == "allow"
    assert added["HTTPS_PROXY"] == added["HTTP_PROXY"] == "http://proxy:3128"
    assert added["SSL_CERT_FILE"] == "/ca.pem"
    assert "UV_HTTP_TIMEOUT" not in added  # already set for uv: kept as is
    assert added["UV_INDEX_STRATEGY"] == "unsafe-best-match"  # pip's way with several indexes
    assert "UV_INDEX_STRATEGY" not in uv_environment({**env, "UV_INDEX_STRATEGY": "first-index"})[0]
    assert flags == []

    # PIP_* beats the file; a uv config of its own means pip.conf is not carried over
    env["PIP_INDEX_URL"] = "https://env.example/simple"
    assert uv_environment(env)[0]["UV_INDEX_URL"] == "https://env.example/simple"
    (tmp_path / ".config" / "uv").mkdir(parents=True)
    (tmp_path / ".config" / "uv" / "uv.toml").write_text("")
    added, _ = uv_environment({**env, "PIP_NO_INDEX": "1"})
    assert "UV_FIND_LINKS" not in added and added["UV_INDEX_URL"] == "https://env.example/simple"
    assert "UV_INDEX_STRATEGY" not in added  # uv's own config decides
    assert uv_environment({**env, "PIP_NO_INDEX": "1"})[1] == ["--no-index"]
    assert uv_environment({"PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path)}) == ({}, [])


def test_default_marker_dir_is_private_and_container_local():
    path = default_marker_dir()
    assert path.name == "installed" and path.parent.name == f"trainenv-{os.geteuid()}"
    assert not str(path).startswith("/ml")


def test_skip_marker_is_written_atomically_with_private_dir(tmp_path, target_python, base_env):
    need_uv()
    job = Job(tmp_path, target_python, base_env, "uv")
    build_wheel(job.wheels, "tiny_marker", "1.0")
    job.install(job.requirements("tiny_marker"))
    files = sorted(p.name for p in job.markers.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".lock")  # no temp left
    assert stat.S_IMODE(job.markers.stat().st_mode) & 0o077 == 0
