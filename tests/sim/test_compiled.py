"""The opt-in compiled build (`bench/build_compiled.sh`, mypyc) still builds, and its results are
the pure build's, digit for digit.

mypyc type-checks what it compiles, so code that runs fine in Python can stop the build (a
narrowing mypy cannot follow); and a compiled module could round or order differently. Skipped,
saying why, where mypyc, a C compiler or Python's headers are missing (the test extras install
mypy, `.ci/setup` the rest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAVE_MYPYC = subprocess.run([sys.executable, "-c", "import mypyc"], capture_output=True).returncode == 0
HAVE_CC = shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC")
                       else "cc") is not None
HAVE_HEADERS = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()

pytestmark = pytest.mark.skipif(
    not (HAVE_MYPYC and HAVE_CC and HAVE_HEADERS),
    reason="the compiled build needs mypyc (pip install mypy), a C compiler and Python's headers "
           "(apt-get install gcc python3-dev; .ci/setup installs them)")

RUN = """
import json, sys
import sim.driver
from sim.driver import run_scenario
from sim.scenario import SCENARIO_DIR, load_scenario
out = {"driver": sim.driver.__file__}
for name, over in [("small-20", {}), ("steady-10k", {"peers.count": 300, "stream.duration_s": 8.0}),
                   ("churn", {"peers.count": 200, "stream.duration_s": 20.0}),
                   # a swamped tracker: lost first packets, resends, second tries
                   ("flash-crowd", {"peers.count": 200, "stream.duration_s": 25.0,
                                    "tracker.handshake_us": 100000, "tracker.backlog_s": 1.0})]:
    r = run_scenario(load_scenario(SCENARIO_DIR / f"{name}.toml", overrides=over))
    s = r.summary()
    s.pop("wall_s")
    out[name] = [s, r.metrics.series()]
print(json.dumps(out, sort_keys=True, default=str))
"""


def _run(pythonpath: Path, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, "-c", RUN], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(900)
def test_the_compiled_build_builds_and_gives_the_pure_builds_results(tmp_path: Path) -> None:
    out = tmp_path / "compiled"
    built = subprocess.run(["bash", str(REPO / "bench" / "build_compiled.sh"), str(out)],
                           capture_output=True, text=True, timeout=800)
    assert built.returncode == 0, built.stdout + built.stderr
    pure = _run(REPO, tmp_path)
    compiled = _run(out, tmp_path)
    assert pure.pop("driver").endswith(".py")
    assert not compiled.pop("driver").endswith(".py")  # the extension module ran
    for name in pure:
        assert compiled[name] == pure[name], name
