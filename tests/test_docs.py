"""The docs stay true: the README's tables match the code, its install and demo commands work,
and nothing points outside the repository."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from trainenv.settings import SETTINGS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_every_launch_setting_is_in_the_readme_table():
    for setting in SETTINGS:
        flag = f"`{setting.flag}`" if setting.flag else "—"
        row = f"| `{setting.name}` | {flag} | `{setting.variable}` |"
        assert row in README, f"README settings table lacks: {row}"


def test_readme_names_the_two_commands_and_they_exist():
    root = Path(__file__).parent.parent
    for command in ("scripts/demo", "scripts/test"):
        assert f"{command}   #" in README
        assert (root / command).stat().st_mode & 0o111
    assert "scripts/test" in (root / ".ci" / "run").read_text()


# --- the newcomer path: install, scripts/demo ------------------------------------------------

FAKE_PYTHON = """#!/bin/sh
# Stands in for .venv/bin/python: logs each call; `-m pip` does nothing, the rest runs for real.
echo "$*" >>"{log}"
if [ "$1 $2" = "-m pip" ]; then exit 0; fi
exec "{python}" "$@"
"""


def _demo_checkout(root: Path) -> Path:
    """The files scripts/demo uses, and a .venv whose python logs calls and fakes pip."""
    checkout = root / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("demo", "_venv.sh"):
        if (REPO / "scripts" / name).exists():
            shutil.copy2(REPO / "scripts" / name, checkout / "scripts" / name)
    shutil.copy2(REPO / "pyproject.toml", checkout / "pyproject.toml")
    shutil.copytree(REPO / "examples" / "quickstart", checkout / "examples" / "quickstart",
                    ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON.format(log=root / "calls.log", python=sys.executable))
    trainenv = bin_dir / "trainenv"
    trainenv.write_text(f'#!/bin/sh\nexec "{Path(sys.executable).parent / "trainenv"}" "$@"\n')
    python.chmod(0o755)
    trainenv.chmod(0o755)
    return checkout


def _run_demo(checkout: Path, env: dict) -> list:
    """Run scripts/demo; the pip calls it made."""
    log = checkout.parent / "calls.log"
    log.write_text("")
    proc = subprocess.run([str(checkout / "scripts" / "demo")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model: {" in proc.stdout  # the demo prints the model it wrote
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip")]


def test_demo_installs_once_until_pyproject_changes(tmp_path: Path, clean_environ: dict) -> None:
    checkout = _demo_checkout(tmp_path)
    first = _run_demo(checkout, clean_environ)
    assert len(first) == 1 and first[0].endswith("-e ."), first
    assert _run_demo(checkout, clean_environ) == []  # warm: no pip run at all
    with open(checkout / "pyproject.toml", "a") as handle:
        handle.write("\n# changed\n")
    assert len(_run_demo(checkout, clean_environ)) == 1


def test_readme_install_works_from_a_checkout_and_a_wheel() -> None:
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "pip install trainenv" not in README  # the package is on no index
    for command in ("pip install .", "pip install -e .", "python -m build --wheel",
                    "pip install dist/trainenv-", "[serve]"):
        assert command in install, f"README's Install section lacks {command!r}"


def test_wheel_builds_as_the_readme_says_and_its_metadata_stands_alone(tmp_path: Path) -> None:
    """``python -m build --wheel`` (offline here) gives a wheel with the serve extra; its long
    description (the README) links nothing outside the repository."""
    tree = tmp_path / "src-copy"
    shutil.copytree(REPO / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    # This venv's setuptools when it has one (offline); else build fetches it, as for a user.
    local = importlib.util.find_spec("setuptools") is not None
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", *(["--no-isolation"] if local else []),
         "--outdir", str(tmp_path / "dist"), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("trainenv-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
        assert "trainenv/cli.py" in archive.namelist()
    assert "Provides-Extra: serve" in metadata
    assert not OUTSIDE.search(metadata) and "CONTRACT" not in metadata


# --- the repository stands alone ------------------------------------------------------------

# Built from pieces so this file does not match itself.
OUTSIDE = re.compile("|".join(re.escape(p) for p in (
    "../" + "shared", "CONTRACT" + " §", "shared/" + "research", "STYLE" + " rule",
)))


def test_nothing_refers_to_documents_outside_the_repository() -> None:
    """Docs, docstrings, help and package metadata point only at files in this repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    offending = []
    for name in filter(None, listed):
        path = REPO / name
        if name.startswith(".ci/") or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        offending += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                      for m in OUTSIDE.finditer(text)]
    assert not offending, "references outside the repository:\n" + "\n".join(offending)


def test_contract_page_is_linked_and_names_every_exit_code() -> None:
    from trainenv import errors

    contract = (REPO / "docs" / "contract.md").read_text()
    assert "(docs/contract.md)" in README
    for code in (errors.EXIT_CONFIG, errors.EXIT_INSTALL, errors.EXIT_INTERNAL,
                 errors.EXIT_TIMEOUT):
        assert f"| {code} |" in contract, f"docs/contract.md's outcome table lacks exit {code}"
    for link in re.findall(r"\]\(([^)#]+)\)", contract):
        assert (REPO / "docs" / link).resolve().exists(), f"docs/contract.md links {link}"


def test_readme_states_the_offline_container_route_and_the_run_flags() -> None:
    """The commands the README gives for a host with no registry and low limits exist."""
    import image_support

    for text in (README, (REPO / "docker" / "README.md").read_text()):
        assert "tests/image_support.py" in text
        assert "--ulimit nofile=20000:20000 --ulimit nproc=20000:20000" in text
    assert callable(image_support.main)
