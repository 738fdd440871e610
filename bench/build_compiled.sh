#!/usr/bin/env bash
# Opt-in compiled build of the simulator's hot path with mypyc, for benchmarks and long runs.
#
#   pip install mypy              # once (or: pip install '.[compile]'); gcc and Python headers
#   bench/build_compiled.sh       # → build/mypyc/ (about a minute)
#   PYTHONPATH=build/mypyc python bench/sim_scale.py --peers 10000 --duration 20
#   PYTHONPATH=build/mypyc python -m meshcast.cli sim run steady-10k --peers 2000
#
# The build directory is a snapshot: a copy of the packages with the compiled modules next to
# their .py (an extension module wins over a .py of the same name, so .so files never go into
# the source tree, where they would shadow later edits). Rebuild after editing a compiled
# module; bench/sim_scale.py says "compiled: yes" and warns when the snapshot is stale.
# Nothing is installed: the normal dev loop (editable install, pytest) stays pure Python.
# Results are byte-identical to the pure build (same metrics.json and peers.csv).
#
# Usage: bench/build_compiled.sh [OUT_DIR]     (default: build/mypyc; OUT_DIR is replaced)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/build/mypyc}"
python="${PYTHON:-python}"

# The modules a simulation spends its time in. A compiled class cannot be subclassed by an
# interpreted one, so every subclass of a compiled node class is compiled too (seed, tracker).
MODULES=(
    meshcast/node.py meshcast/window.py meshcast/effects.py meshcast/messages.py meshcast/policy.py
    meshcast/crypto.py meshcast/wire.py
    peer/node.py seed/node.py
    tracker/node.py tracker/forest.py tracker/placement.py
    sim/driver.py sim/scheduler.py sim/network.py sim/metrics.py
)

if ! "$python" -c "import mypyc" 2>/dev/null; then
    echo "mypyc not found: pip install mypy (it ships mypyc)" >&2
    exit 1
fi

case "$out" in
    "$repo"/meshcast* | "$repo"/peer* | "$repo"/seed* | "$repo"/tracker* | "$repo"/sim* | "$repo")
        echo "refusing to build into the source tree: $out" >&2
        exit 1 ;;
esac
rm -rf "$out"
mkdir -p "$out"
for pkg in meshcast tracker peer seed sim; do
    cp -r "$repo/$pkg" "$out/"
done
find "$out" -name __pycache__ -prune -exec rm -rf {} +
cp "$repo/pyproject.toml" "$out/"  # [tool.mypy] settings

cd "$out"
echo "compiling ${#MODULES[@]} modules into $out (log: $out/build.log)"
if ! MYPYC_OPT_LEVEL="${MYPYC_OPT_LEVEL:-3}" "$python" -m mypyc "${MODULES[@]}" >build.log 2>&1; then
    tail -30 build.log >&2
    exit 1
fi
[ -n "${KEEP_C:-}" ] || rm -rf build  # mypyc's C sources and objects (KEEP_C=1: keep, to read)
# The C modules: the scheduler's event calendar (sim/_calendar.c; sim/scheduler.py falls back to
# Python's) and Python's object arenas on huge pages (sim/_arenas.c; sim/driver.py).
"$python" -c "import sys; from sim.build import C_MODULES, build_c_module
for name in C_MODULES: build_c_module(name, sys.argv[1])" sim
echo "built: $(find . -name '*.so' | wc -l) extension modules"
echo "run:   PYTHONPATH=$out python bench/sim_scale.py --peers 10000 --duration 20"
