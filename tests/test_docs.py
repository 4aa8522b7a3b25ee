"""The README's reference tables stay true to the code they describe."""

from __future__ import annotations

from pathlib import Path

from trainenv.settings import SETTINGS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_launch_setting_is_in_the_readme_table():
    for setting in SETTINGS:
        row = f"| `{setting.name}` | `{setting.flag}` | `{setting.variable}` |"
        assert row in README, f"README settings table lacks: {row}"


def test_readme_names_the_two_commands_and_they_exist():
    root = Path(__file__).parent.parent
    for command in ("scripts/demo", "scripts/test"):
        assert f"{command}   #" in README
        assert (root / command).stat().st_mode & 0o111
    assert "scripts/test" in (root / ".ci" / "run").read_text()
