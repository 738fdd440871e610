"""The whole tree type-checks (mypy, as `pyproject.toml` configures it).

The compiled build checks only the modules it compiles; the runtime, the services and the
scenario loader are plain Python, where a wrong type shows up only on the path that runs it.
Skipped, saying so, where mypy is not installed (the test extras install it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_MYPY = subprocess.run([sys.executable, "-c", "import mypy"], capture_output=True).returncode == 0


@pytest.mark.skipif(not HAVE_MYPY, reason="needs mypy (pip install -e .[test])")
def test_the_packages_type_check(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "meshcast", "tracker",
         "peer", "seed", "sim"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
