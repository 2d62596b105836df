"""``scripts/install`` on a fresh copy of the repository, as a newcomer runs the README's two commands.

``scripts/serve &`` then ``scripts/test`` used to run two installs into one
``.venv`` at once, and the second failed (``No module named pip``). Each
test here copies the repository to a temporary folder and runs the real
scripts there, with the machine's Python (not this suite's ``.venv``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT

INSTALL_TIMEOUT = 600  # a fresh install takes about a minute here; fail rather than hang


def fresh_copy(dest: Path) -> Path:
    """The repository's files (committed or not, minus ignored ones such as .venv) copied to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def script_env() -> dict[str, str]:
    """The environment of a shell without this suite's virtualenv."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return {**env, "PATH": path, "PYTHON": str(base)}


def run(repo: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=repo, env=script_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT
    )


@pytest.mark.slow
def test_two_concurrent_installs_on_a_fresh_copy_both_succeed_and_a_third_is_skipped(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path / "authsvc")
    both = [
        subprocess.Popen(
            ["scripts/install"], cwd=repo, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in both:
        try:
            outputs.append(proc.communicate(timeout=INSTALL_TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs.append(proc.communicate()[0])
    assert [proc.returncode for proc in both] == [0, 0], "\n---\n".join(outputs)
    # The result is usable, and is this copy's code (editable), not the suite's.
    imported = run(repo, ".venv/bin/python", "-c", "import authsvc, authsvc_client; print(authsvc.__file__)")
    assert imported.returncode == 0 and imported.stdout.startswith(str(repo)), imported.stderr
    stamp = (repo / ".venv" / ".install-stamp").read_text()

    started = time.monotonic()
    again = run(repo, "scripts/install")
    assert again.returncode == 0 and time.monotonic() - started < 5, again.stderr  # nothing changed: skipped
    started = time.monotonic()
    serve = run(repo, "scripts/serve", "--help")  # what a second `scripts/serve` start goes through
    assert serve.returncode == 0 and "--listen" in serve.stdout, serve.stderr
    assert time.monotonic() - started < 10

    with (repo / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a changed dependency list\n")
    changed = run(repo, "scripts/install")
    assert changed.returncode == 0, changed.stderr
    assert (repo / ".venv" / ".install-stamp").read_text() != stamp  # written only after a real install
