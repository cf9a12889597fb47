"""scripts/setup_env.sh installs once, then does nothing until pyproject.toml or the script
changes (a stamp per Python). Run on a copy of the two files with a Python wrapper that
records pip calls instead of installing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts/setup_env.sh", tmp_path / "scripts/setup_env.sh")
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    calls = tmp_path / "pip-calls.txt"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> {calls}; exit 0; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return tmp_path / "scripts/setup_env.sh", python, calls


def _run(script: Path, python: Path, calls: Path) -> list[str]:
    before = calls.read_text().splitlines() if calls.exists() else []
    subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)}, check=True,
                   timeout=60)
    return (calls.read_text().splitlines() if calls.exists() else [])[len(before):]


def test_installs_once_then_only_when_pyproject_changes(tmp_path):
    script, python, calls = _tree(tmp_path)
    first = _run(script, python, calls)
    assert len(first) == 3 and "torch==2.13.0" in first[0] and "-e .[test]" in first[2]
    assert _run(script, python, calls) == []  # nothing changed: no pip at all
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# changed\n")
    assert len(_run(script, python, calls)) == 3
    assert _run(script, python, calls) == []
    assert len(list((tmp_path / ".setup_env").iterdir())) == 1  # one stamp: one Python
