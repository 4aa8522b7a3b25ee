"""TRAINENV_SOURCE: the job's code from an archive or a git URL, fetched by a real ``trainenv train``."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from support import make_tree, need_tool, run_train, tree_state_of

TRAIN = "import os, sys\nprint('ran', open('marker.txt').read().strip(), os.getcwd())\n"
OLD_CODE = {"train.py": "print('old code')\n", "keep/old.txt": "old\n"}


def _job(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "job", code=OLD_CODE)


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if fields.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def _tar(path: Path, members: list[tuple[str, bytes, dict]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data, fields in members:
            _add(tar, name, data, **fields)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def _train(base: Path, source: object, *args: str, **extra: str) -> subprocess.CompletedProcess:
    extra.setdefault("TRAINENV_ENTRY_POINT", "train.py")
    return run_train(base, *args, text=True, TRAINENV_SOURCE=str(source), **extra)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- archives ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_train_runs_code_from_an_archive_replacing_the_old_code(tmp_path: Path, suffix: str) -> None:
    base = _job(tmp_path)
    files = {"train.py": TRAIN.encode(), "marker.txt": f"from {suffix}".encode(), "pkg/__init__.py": b""}
    archive = tmp_path / f"sourcedir{suffix}"
    if suffix == ".zip":
        _zip(archive, files)
    else:
        _tar(archive, [(name, data, {}) for name, data in files.items()], "w" if suffix == ".tar" else "w:gz")
    out = _ok(_train(base, archive))
    assert f"ran from {suffix} {base / 'usercode'}" in out
    assert sorted(p.name for p in (base / "usercode").iterdir()) == ["marker.txt", "pkg", "train.py"]  # old code gone
    assert not [p for p in (base).iterdir() if p.name.startswith(".trainenv-source")]  # no staging dir left


def test_a_single_top_level_folder_is_kept(tmp_path: Path) -> None:
    base = _job(tmp_path)
    archive = _tar(tmp_path / "s.tar.gz", [("proj/train.py", b"print('ran', __file__)\n", {})])
    out = _ok(_train(base, archive, TRAINENV_ENTRY_POINT="proj/train.py"))
    assert f"ran {base / 'usercode' / 'proj' / 'train.py'}" in out
    assert [p.name for p in (base / "usercode").iterdir()] == ["proj"]


def _hostile(tmp_path: Path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    cases = {
        "traversal": _tar(tmp_path / "a.tar.gz", [("train.py", b"", {}), ("../outside", b"pwned", {})]),
        "absolute": _tar(tmp_path / "b.tar.gz", [("train.py", b"", {}), (str(outside), b"pwned", {})]),
        "symlink_out": _tar(tmp_path / "c.tar.gz", [("train.py", b"", {}), ("etc", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc"})]),
        "file_through_symlink": _tar(
            tmp_path / "d.tar.gz",
            [("l", b"", {"type": tarfile.SYMTYPE, "linkname": "../.."}), ("l/outside", b"pwned", {})],
        ),
        "file_through_inner_link": _tar(
            tmp_path / "d2.tar.gz",
            [("sub/x", b"", {}), ("l", b"", {"type": tarfile.SYMTYPE, "linkname": "sub"}), ("l/y", b"pwned", {})],
        ),
        "hardlink_out": _tar(tmp_path / "e.tar.gz", [("h", b"", {"type": tarfile.LNKTYPE, "linkname": "../../outside"})]),
        "device": _tar(tmp_path / "f.tar.gz", [("null", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})]),
        "fifo": _tar(tmp_path / "g.tar", [("pipe", b"", {"type": tarfile.FIFOTYPE})], "w"),
        "zip_traversal": _zip(tmp_path / "h.zip", {"train.py": b"", "../outside": b"pwned"}),
        "zip_absolute": _zip(tmp_path / "i.zip", {"train.py": b"", str(outside): b"pwned"}),
        "tar_over_cap": _tar(tmp_path / "j.tar.gz", [("train.py", b"", {}), ("big", b"\0" * 50_000, {})]),
        "zip_bomb": _zip(tmp_path / "k.zip", {"train.py": b"", "bomb": b"\0" * 5_000_000}),
        "zip_lying_bomb": _lying_zip(tmp_path / "l.zip"),
    }
    return cases


def _lying_zip(path: Path) -> Path:
    """A zip whose member declares 10 bytes and inflates to 5 MB."""
    _zip(path, {"bomb": b"\0" * 5_000_000})
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        data[at + offset : at + offset + 4] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


HOSTILE = [
    "traversal", "absolute", "symlink_out", "file_through_symlink", "file_through_inner_link", "hardlink_out",
    "device", "fifo", "zip_traversal", "zip_absolute", "tar_over_cap", "zip_bomb", "zip_lying_bomb",
]


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_archive_is_refused_whole_and_the_old_code_stays(tmp_path: Path, case: str) -> None:
    base = _job(tmp_path)
    before = tree_state_of(base / "usercode")
    done = _train(base, _hostile(tmp_path)[case], TRAINENV_SOURCE_MAX_BYTES="20000")
    assert done.returncode == 69, done.stderr
    assert (base / "output" / "failure").read_text().startswith("SourceError: TRAINENV_SOURCE: ")
    assert len([line for line in done.stderr.splitlines() if "SourceError" in line]) == 1
    assert not (tmp_path / "outside").exists() and not (base / "outside").exists()
    assert tree_state_of(base / "usercode") == before
    assert not [p for p in base.iterdir() if p.name.startswith(".trainenv-source")]


def test_a_missing_archive_is_a_source_error(tmp_path: Path) -> None:
    base = _job(tmp_path)
    done = _train(base, tmp_path / "nope.tar.gz")
    assert done.returncode == 69
    assert "nope.tar.gz" in (base / "output" / "failure").read_text()


@pytest.mark.parametrize("value", ["s3://bucket/code.tar.gz", "oci://bucket@ns/code.zip", "gs://bucket/code.tgz"])
def test_platform_urls_are_the_platforms_to_fetch(tmp_path: Path, value: str) -> None:
    base = _job(tmp_path)
    done = _train(base, value)
    assert done.returncode == 78, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_SOURCE: ") and "platform fetches" in first


def test_a_source_of_no_known_form_is_a_config_error(tmp_path: Path) -> None:
    base = _job(tmp_path)
    done = _train(base, "code.rar")
    assert done.returncode == 78
    assert "'code.rar': expected an archive" in (base / "output" / "failure").read_text()


def test_bad_max_bytes_is_a_config_error(tmp_path: Path) -> None:
    base = _job(tmp_path)
    done = _train(base, tmp_path / "x.zip", TRAINENV_SOURCE_MAX_BYTES="lots")
    assert done.returncode == 78
    assert "TRAINENV_SOURCE_MAX_BYTES: 'lots'" in (base / "output" / "failure").read_text()


def test_dry_run_shows_the_source_and_fetches_nothing(tmp_path: Path) -> None:
    base = _job(tmp_path)
    before = tree_state_of(base)
    archive = _tar(tmp_path / "s.tar.gz", [("new.py", TRAIN.encode(), {})])
    done = _train(base, archive, "--dry-run", TRAINENV_ENTRY_POINT="new.py")
    assert done.returncode == 0, done.stderr
    assert f"source        {archive}" in done.stdout
    assert tree_state_of(base) == before


def test_env_shows_the_source_redacted_and_fetches_nothing(tmp_path: Path) -> None:
    import json

    from support import job_environ, run_trainenv

    base = _job(tmp_path)
    before = tree_state_of(base)
    url = "https://user:tok3n-value-1234@127.0.0.1:9/repo.git"
    environ = job_environ(base, TRAINENV_SOURCE=url, TRAINENV_ENTRY_POINT="not_yet_there.py", TRAINENV_GIT_REF="v2")
    done = run_trainenv("env", "--format", "json", env=environ)
    assert done.returncode == 0, done.stderr
    launch = json.loads(done.stdout)["launch"]
    assert launch["settings"]["source"] == {"value": "https://***@127.0.0.1:9/repo.git", "source": "TRAINENV_SOURCE"}
    assert launch["settings"]["git_ref"]["value"] == "v2"
    assert launch["entry_point"]["target"] == str(base / "usercode" / "not_yet_there.py")
    assert "tok3n-value-1234" not in done.stdout + done.stderr
    assert tree_state_of(base) == before


# -- git -------------------------------------------------------------------------------------------

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main", *args], cwd=cwd,
                          env={**os.environ, **GIT_ENV}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _commit(repo: Path, marker: str) -> str:
    (repo / "marker.txt").write_text(marker)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", marker)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A repo with a submodule: main (v3), a tag v1, a branch feature, an older commit."""
    need_tool("git")
    root = tmp_path_factory.mktemp("git")
    lib = root / "lib"
    lib.mkdir()
    _git(lib, "init", "-q")
    (lib / "helper.py").write_text("WHO = 'submodule'\n")
    _commit(lib, "lib")
    main = root / "main"
    main.mkdir()
    _git(main, "init", "-q")
    (main / "train.py").write_text(TRAIN + "sys.path.insert(0, 'lib'); import helper; print('from', helper.WHO)\n")
    _git(main, "submodule", "add", "-q", f"file://{lib}", "lib")
    (main / "app").mkdir()
    (main / "app" / "local.txt").write_text("app dir")
    (main / "app" / "applib.py").write_text("WHERE = 'applib'\n")
    (main / "app" / "main.py").write_text(
        "import os, applib, sys\nprint('cwd', os.getcwd(), open('local.txt').read(), applib.WHERE, sys.path[1])\n"
    )
    old = _commit(main, "v1")
    _git(main, "tag", "v1")
    _commit(main, "v2")
    _git(main, "branch", "feature")
    _git(main, "checkout", "-q", "feature")
    _commit(main, "feature")
    _git(main, "checkout", "-q", "main")
    _commit(main, "v3")
    return {"url": f"file://{main}", "old": old}


@pytest.mark.parametrize("ref, marker", [(None, "v3"), ("feature", "feature"), ("v1", "v1"), ("old", "v1")])
def test_train_runs_code_cloned_from_git(tmp_path: Path, repo: dict[str, str], ref: str | None, marker: str) -> None:
    base = _job(tmp_path)
    extra = {} if ref is None else {"TRAINENV_GIT_REF": repo["old"] if ref == "old" else ref}
    out = _ok(_train(base, repo["url"], **extra))
    assert f"ran {marker} " in out and "from submodule" in out
    assert not (base / "usercode" / "keep").exists()


def test_a_ref_that_does_not_exist_is_a_source_error(tmp_path: Path, repo: dict[str, str]) -> None:
    base = _job(tmp_path)
    before = tree_state_of(base / "usercode")
    done = _train(base, repo["url"], TRAINENV_GIT_REF="no-such-ref")
    assert done.returncode == 69, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("SourceError: TRAINENV_SOURCE: cannot clone") and "'no-such-ref'" in first
    assert tree_state_of(base / "usercode") == before


def test_credentials_in_a_git_url_never_show(tmp_path: Path) -> None:
    need_tool("git")
    base = _job(tmp_path)
    token = "ghp_s3cretT0ken1234"
    url = f"https://user:{token}@127.0.0.1:9/org/repo.git"
    done = _train(base, url, TRAINENV_GIT_REF="main")
    assert done.returncode == 69, done.stderr
    failure = (base / "output" / "failure").read_text()
    assert "cannot clone https://***@127.0.0.1:9/org/repo.git" in failure
    assert token not in failure + done.stdout + done.stderr
    dry = _train(base, url, "--dry-run")
    assert dry.returncode == 0 and token not in dry.stdout + dry.stderr


def test_the_git_entry_dir_is_the_working_dir_and_first_on_the_path(tmp_path: Path, repo: dict[str, str]) -> None:
    base = _job(tmp_path)
    out = _ok(_train(base, repo["url"], TRAINENV_GIT_ENTRY_DIR="app", TRAINENV_ENTRY_POINT="app/main.py"))
    app = base / "usercode" / "app"
    assert f"cwd {app} app dir applib {app}" in out


@pytest.mark.parametrize("value, code", [("nope", 78), ("../up", 78), ("/abs", 78)])
def test_a_bad_git_entry_dir_is_a_config_error(tmp_path: Path, repo: dict[str, str], value: str, code: int) -> None:
    base = _job(tmp_path)
    done = _train(base, repo["url"], TRAINENV_GIT_ENTRY_DIR=value)
    assert done.returncode == code, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith(f"ConfigError: TRAINENV_GIT_ENTRY_DIR: '{value}'"), first


# -- trainenv local --------------------------------------------------------------------------------


def test_local_runs_code_from_an_archive_or_git(tmp_path: Path, repo: dict[str, str]) -> None:
    from support import run_trainenv

    archive = _tar(tmp_path / "s.tgz", [("train.py", TRAIN.encode(), {}), ("marker.txt", b"local archive", {})])
    done = run_trainenv("local", "--job-dir", str(tmp_path / "a"), "--source", str(archive), "--entry-point", "train.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"ran local archive {tmp_path / 'a' / 'usercode'}" in done.stdout
    done = run_trainenv(
        "local", "--job-dir", str(tmp_path / "g"), "--entry-point", "train.py", cwd=tmp_path,
        extra_env={"TRAINENV_SOURCE": repo["url"], "TRAINENV_GIT_REF": "feature"},
    )
    assert done.returncode == 0, done.stderr
    assert "ran feature " in done.stdout and "from submodule" in done.stdout


def test_local_refuses_a_hostile_archive(tmp_path: Path) -> None:
    from support import run_trainenv

    archive = _tar(tmp_path / "bad.tar.gz", [("train.py", b"", {}), ("../../outside", b"pwned", {})])
    done = run_trainenv("local", "--job-dir", str(tmp_path / "j"), "--source", str(archive), "--entry-point", "train.py", cwd=tmp_path)
    assert done.returncode == 69, done.stderr
    assert (tmp_path / "j" / "output" / "failure").read_text().startswith("SourceError: ")
    assert not (tmp_path / "outside").exists()
    assert list((tmp_path / "j" / "usercode").iterdir()) == []


def test_sigterm_stops_a_slow_fetch_at_once_and_keeps_the_old_code(tmp_path: Path) -> None:
    import signal
    import time

    from support import start_train

    need_tool("git")
    base = _job(tmp_path)
    before = tree_state_of(base / "usercode")
    pidfile = tmp_path / "ssh.pid"
    # git's "ssh" here is a shell that records its pid and sleeps: a fetch that never ends by itself.
    fake_ssh = f"sh -c 'echo $$ > {pidfile}; exec sleep 60' --"
    proc = start_train(base, TRAINENV_SOURCE="ssh://example.invalid/repo.git", TRAINENV_ENTRY_POINT="train.py", GIT_SSH_COMMAND=fake_ssh)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        sleeper = int(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert (base / "output" / "failure").read_text().startswith("Signal: ")
    assert tree_state_of(base / "usercode") == before
    assert not [p for p in base.iterdir() if p.name.startswith(".trainenv-source")]
    from support import alive

    deadline = time.monotonic() + 10
    while alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = not alive(sleeper)
    if not gone:
        os.kill(sleeper, signal.SIGKILL)
    assert gone, "git's helper outlived the fetch"


def test_the_fetched_requirements_file_is_the_one_installed(tmp_path: Path) -> None:
    base = _job(tmp_path)  # the old code has no requirements.txt: only the fetched one can fail the install
    archive = _tar(tmp_path / "s.tar.gz", [("train.py", TRAIN.encode(), {}), ("requirements.txt", b"./only-in-the-archive-dir\n", {})])
    done = _train(base, archive, TRAINENV_INSTALLER="pip")
    assert done.returncode == 69, done.stderr
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("InstallError: ") and "only-in-the-archive-dir" in failure
    assert (base / "usercode" / "requirements.txt").is_file()


@pytest.fixture
def https_repo(tmp_path: Path):
    """The test repo served read-only over HTTPS (git's "dumb" protocol: plain files, no shallow
    clone) by a server that wants Basic auth user:TOKEN; yields the URL with the credential."""
    import base64
    import functools
    import http.server
    import ssl
    import threading

    need_tool("openssl")
    need_tool("git")
    work = tmp_path / "work"
    work.mkdir()
    _git(work, "init", "-q")
    (work / "train.py").write_text(TRAIN)
    _commit(work, "main")
    _git(work, "checkout", "-q", "-b", "feature")
    _commit(work, "feature")
    bare = tmp_path / "served" / "repo.git"
    _git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    _git(bare, "update-server-info")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token = "s3cr3t-T0KEN-in-url"
    expected = "Basic " + base64.b64encode(f"user:{token}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "served")))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"https://user:{token}@127.0.0.1:{server.server_address[1]}/repo.git", "token": token}
    finally:
        server.shutdown()
        server.server_close()


def _all_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_an_https_source_with_a_token_clones_and_the_code_dir_keeps_no_token(tmp_path: Path, https_repo: dict[str, str]) -> None:
    base = _job(tmp_path)
    done = _train(base, https_repo["url"], TRAINENV_GIT_REF="feature", GIT_SSL_NO_VERIFY="1")
    out = _ok(done)
    assert "ran feature " in out
    assert https_repo["token"] not in out + done.stderr
    assert https_repo["token"] not in _all_text(base / "usercode")  # not in .git/config either


def test_a_wrong_token_fails_without_showing_it(tmp_path: Path, https_repo: dict[str, str]) -> None:
    base = _job(tmp_path)
    wrong = https_repo["url"].replace(https_repo["token"], "WRONG-token-9876")
    done = _train(base, wrong, GIT_SSL_NO_VERIFY="1")
    assert done.returncode == 69, done.stderr
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("SourceError: TRAINENV_SOURCE: cannot clone https://***@127.0.0.1:")
    assert "WRONG-token-9876" not in failure + done.stdout + done.stderr


def test_every_node_fetches_the_source_for_itself(tmp_path: Path, repo: dict[str, str]) -> None:
    from support import start_train

    procs = []
    for host in ("algo-1", "algo-2"):
        base = make_tree(tmp_path / host, code=OLD_CODE, resource_config={"current_host": host, "hosts": ["algo-1", "algo-2"]})
        procs.append((base, start_train(base, TRAINENV_SOURCE=repo["url"], TRAINENV_GIT_REF="v1", TRAINENV_ENTRY_POINT="train.py")))
    for base, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert f"ran v1 {base / 'usercode'}" in out.decode()



def test_a_code_dir_that_cannot_take_the_code_is_a_config_error(tmp_path: Path) -> None:
    from trainenv.errors import ConfigError
    from trainenv.sources import fetch_source

    archive = _tar(tmp_path / "s.tar.gz", [("train.py", TRAIN.encode(), {})])
    (tmp_path / "usercode").write_text("a file, not a dir")
    with pytest.raises(ConfigError, match=r"cannot put the fetched code in .*usercode: File exists"):
        fetch_source(str(archive), str(tmp_path / "usercode"), where="TRAINENV_SOURCE", max_bytes=10**6)
    assert (tmp_path / "usercode").read_text() == "a file, not a dir"
    with pytest.raises(ConfigError, match=r"cannot create a temporary dir in .*/missing for TRAINENV_SOURCE"):
        fetch_source(str(archive), str(tmp_path / "missing" / "usercode"), where="TRAINENV_SOURCE", max_bytes=10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar.gz", "usercode"]


# -- git over ssh, with the platform's key file ------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_repo(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd on 127.0.0.1 (root only: it runs as the machine's sshd does) serving a repo,
    and a client key it accepts, left readable by everyone as a mounted secret often is."""
    import shutil
    import socket
    import time

    from support import free_port

    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if os.geteuid() != 0 or sshd is None or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        pytest.skip("needs root, sshd and ssh (apt-get install openssh-server openssh-client)")
    need_tool("git")
    root = tmp_path_factory.mktemp("ssh")
    repo = root / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text(TRAIN)
    _commit(repo, "over-ssh")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client.pub").read_text())
    (root / "client").chmod(0o644)  # ssh ignores such a key file: trainenv uses a private copy
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    server = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")], stderr=open(root / "sshd.log", "wb"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"sshd did not start: {(root / 'sshd.log').read_text()[-500:]}")
                time.sleep(0.05)
        yield {"url": f"ssh://root@127.0.0.1:{port}{repo}", "key": str(root / "client"), "root": root}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("named_by", ["TRAINENV_GIT_SSH_KEY_FILE", "OCI__GIT_SSH_KEY_PATH"])
def test_an_ssh_source_clones_with_the_platforms_key_file(tmp_path: Path, ssh_repo: dict, named_by: str) -> None:
    base = _job(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    if named_by == "TRAINENV_GIT_SSH_KEY_FILE":
        done = _train(base, ssh_repo["url"], TRAINENV_GIT_SSH_KEY_FILE=ssh_repo["key"], TMPDIR=str(scratch), HOME=str(tmp_path))
    else:  # an OCI Data Science job: its git variables, its key file
        done = run_train(base, text=True, JOB_RUN_OCID="ocid1.datasciencejobrun.x", GIT_URL=ssh_repo["url"],
                         CODE_ENTRYPOINT="train.py", OCI__GIT_SSH_KEY_PATH=ssh_repo["key"], TMPDIR=str(scratch),
                         HOME=str(tmp_path))
    assert "ran over-ssh" in _ok(done)
    assert list(scratch.iterdir()) == []  # the private copy of the key is gone
    assert oct(os.stat(ssh_repo["key"]).st_mode & 0o777) == "0o644"  # the key file itself untouched


def test_an_ssh_source_without_the_key_fails_at_once_and_keeps_the_old_code(tmp_path: Path, ssh_repo: dict) -> None:
    base = _job(tmp_path)
    before = tree_state_of(base / "usercode")
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    done = _train(base, ssh_repo["url"], TRAINENV_GIT_SSH_KEY_FILE=str(other), HOME=str(tmp_path))
    assert done.returncode == 69, done.stderr
    assert "SourceError" in done.stderr and "Permission denied" in done.stderr
    assert tree_state_of(base / "usercode") == before


def test_a_missing_ssh_key_file_is_a_config_error_naming_it(tmp_path: Path, ssh_repo: dict) -> None:
    base = _job(tmp_path)
    done = _train(base, ssh_repo["url"], TRAINENV_GIT_SSH_KEY_FILE=str(tmp_path / "no-key"), HOME=str(tmp_path))
    assert done.returncode == 78, done.stderr
    line = [line for line in done.stderr.splitlines() if "ConfigError" in line][0]
    assert "TRAINENV_GIT_SSH_KEY_FILE" in line and "no-key" in line
    assert (base / "usercode" / "keep" / "old.txt").exists()
