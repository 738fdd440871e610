"""Which build of the simulator is running: pure Python, or the opt-in compiled copy.

`bench/build_compiled.sh` copies the packages, with the simulator's hot modules compiled
(mypyc) next to their .py; with that copy first on PYTHONPATH, the same commands run it and
give identical results, about 3 times as fast.
"""

from __future__ import annotations

import importlib
import subprocess
import sysconfig
from pathlib import Path

__all__ = ["C_MODULES", "HOT_MODULES", "build_c_module", "is_compiled", "status"]

HOT_MODULES = ("sim.driver", "sim.scheduler", "peer.node", "meshcast.node")
"""Modules a simulation spends its time in; the compiled build always compiles them."""


def _files() -> list[Path]:
    return [Path(importlib.import_module(name).__file__ or "") for name in HOT_MODULES]


def is_compiled() -> bool:
    """True if every hot module was loaded from an extension module."""
    return all(f.suffix == ".so" for f in _files())


def status(repo: Path) -> str:
    """"yes (DIR)", "partly (N of M)" or "no"; with a warning when the compiled copy's sources
    differ from `repo`'s (a stale build)."""
    files = _files()
    so = [f for f in files if f.suffix == ".so"]
    if not so:
        return "no"
    state = "yes" if len(so) == len(files) else f"partly ({len(so)} of {len(files)})"
    stale = []
    for name, f in zip(HOT_MODULES, files):
        rel = Path(*name.split(".")).with_suffix(".py")
        built, here = f.parent / rel.name, repo / rel
        if here.is_file() and (not built.is_file() or built.read_bytes() != here.read_bytes()):
            stale.append(str(rel))
    where = so[0].parent.parent
    if stale:
        return f"{state}, STALE: {', '.join(stale)} changed since the build in {where}"
    return f"{state} ({where})"


C_MODULES = ("_calendar", "_arenas")
"""The simulator's optional C modules (`sim/NAME.c`), built into the compiled copy: the
scheduler's event calendar, and Python's object arenas on huge pages."""


def build_c_module(name: str, dest: Path) -> Path:
    """Compile `sim/NAME.c` into directory `dest`, as `NAME<EXT_SUFFIX>`; return its path.
    Needs a C compiler and Python's headers."""
    cfg = sysconfig.get_config_vars()
    out = Path(dest) / f"{name}{cfg['EXT_SUFFIX']}"
    cc = str(cfg.get("CC") or "gcc").split()[0]
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                        str(Path(__file__).with_name(f"{name}.c")), "-o", str(out)], check=True)
    except FileNotFoundError:
        raise RuntimeError(f"no C compiler {cc!r} to build sim/{name}.c (apt install gcc)") from None
    return out

