"""`sim/_arenas.c`: Python's object arenas from memory marked for transparent huge pages.

Each case runs in a fresh process (the arena allocator is the whole process's). Whether the
kernel then backs the memory with huge pages depends on its THP setting and free memory; what
the module controls, and what is checked, is that new objects live in a mapping marked
`MADV_HUGEPAGE` (the `hg` flag in /proc/self/smaps), and that they work and are freed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim.build import build_c_module

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(),
                                reason="needs Linux's /proc/self/smaps")

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from _arenas import use_huge_pages

def flags_of(address):
    vma = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            vma = lo <= address < hi
        elif head == "VmFlags:" and vma:
            return line.split()[1:]
    raise AssertionError("no mapping holds the object")

before = [(i, float(i)) for i in range(200_000)]
if sys.argv[2] == "on":
    use_huge_pages()
    use_huge_pages()  # (twice: the second changes nothing)
after = [(i, float(i)) for i in range(200_000)]
assert sum(t[0] for t in after) == sum(range(200_000))
print("old", "hg" in flags_of(id(before[-1])), "new", "hg" in flags_of(id(after[-1])))
del before, after  # (arenas emptied: given back through the new allocator)
junk = [[i] for i in range(300_000)]
print("again", "hg" in flags_of(id(junk[-1])))
"""


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_c_module("_arenas", tmp_path_factory.mktemp("arenas")).parent
    except (RuntimeError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build sim/_arenas.c: {e}")


def _probe(module_dir: Path, mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, str(module_dir), mode],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n", 1)[0] + " " + done.stdout.split("\n")[1]


def test_objects_made_after_the_switch_live_in_memory_marked_for_huge_pages(module_dir: Path) -> None:
    assert _probe(module_dir, "on") == "old False new True again True"


def test_without_the_switch_nothing_is_marked(module_dir: Path) -> None:
    assert _probe(module_dir, "off") == "old False new False again False"
