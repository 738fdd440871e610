"""The `meshcast` command as a user runs it: real subprocesses, real sockets, real ffmpeg.

Covers the contract of the CLI rather than the network's internals: help everywhere, exit
status 2 for bad usage and 1 with a one-line message for runtime failures, a clean exit on
SIGTERM, and the one-process demo's figures (which need ffmpeg; skipped without it).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshcast.cli import _free_udp_port as free_udp_port

pytestmark = pytest.mark.e2e

# The installed console script when there is one (what users run); else the same `main`.
_SCRIPT = shutil.which("meshcast")
MESHCAST = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "meshcast.cli"]
MODULE = [sys.executable, "-m", "meshcast.cli"]  # needs no PATH at all


def run(args: list[str], *, timeout: float, env: dict[str, str] | None = None,
        cmd: list[str] = MESHCAST) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (killed on timeout by `subprocess.run`)."""
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit status 1 and a `meshcast: ...` line that says why; no traceback."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("meshcast: "), result.stderr
    for needle in needles:
        assert needle in last, result.stderr


@pytest.mark.parametrize("command", [[], ["tracker"], ["seed"], ["peer"], ["demo"], ["sim"]])
def test_help(command: list[str]) -> None:
    result = run([*command, "--help"], timeout=30)
    assert result.returncode == 0, result.stderr
    assert "usage: meshcast" in result.stdout


@pytest.mark.parametrize("args", [
    [],                                                       # no command
    ["peer", "--channel", "x"],                               # --tracker missing
    ["peer", "--tracker", "nowhere", "--channel", "x"],       # not HOST:PORT
    ["peer", "--tracker", "127.0.0.1:1", "--channel", "x", "--channel-key", "abc"],
    ["peer", "--tracker", "127.0.0.1:1", "--channel", "x", "--playout-delay", "-1"],
    ["demo", "--peers", "0"],
    ["tracker", "--listen", "127.0.0.1:0", "--hold", "-1"],
    ["tracker", "--listen", "127.0.0.1:0", "--per-ip-rate", "-1"],
    ["seed", "--tracker", "127.0.0.1:1", "--channel", "x", "--per-ip-burst", "0"],
])
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = run(args, timeout=30)
    assert result.returncode == 2, result
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


def test_peer_with_no_tracker_fails_clearly() -> None:
    port = free_udp_port()  # nothing listens there: each QUIC handshake times out (~5 s)
    started = time.monotonic()
    result = run(["peer", "--tracker", f"127.0.0.1:{port}", "--channel", "x",
                  "--playout-delay", "2"], timeout=60)  # a valid delay is no usage error
    assert_one_line_error(result, "tracker unreachable", str(port))
    # It tried 3 times (a swamped tracker drops first packets), saying so, then gave up.
    assert "trying again in about 2 s (1 of 3 tries failed)" in result.stderr
    assert "(3 tries)" in result.stderr
    assert time.monotonic() - started < 40


def test_tracker_rejection_ends_the_peer_and_sigterm_ends_the_tracker() -> None:
    port = free_udp_port()
    # A viewer of a channel that is not live waits for it; this tracker holds it 1 s.
    tracker = subprocess.Popen([*MESHCAST, "tracker", "--listen", f"127.0.0.1:{port}", "--hold", "1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the tracker binds at once; its log line proves nothing more
        assert tracker.poll() is None, tracker.communicate()
        result = run(["peer", "--tracker", f"127.0.0.1:{port}", "--channel", "nobody-here"],
                     timeout=30)
        assert "channel 'nobody-here' is not live yet: waiting for its broadcast" in result.stderr
        assert_one_line_error(result, "rejected by the tracker", "nobody-here",
                              "did not go live within 1 s")

        busy = run(["tracker", "--listen", f"127.0.0.1:{port}"], timeout=30)
        assert_one_line_error(busy, "cannot listen on", str(port))

        tracker.send_signal(signal.SIGTERM)
        _, err = tracker.communicate(timeout=15)
        assert tracker.returncode == 0, err
        assert "Traceback" not in err
    finally:
        stop(tracker)


def _await_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read `proc`'s stderr until a line holds `needle` (or fail after `timeout` s)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stderr], [], [], left)[0]:
            break
        line = proc.stderr.readline()
        if not line:
            break  # it exited
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout} s in:\n{''.join(seen)}")


def test_a_tracker_refuses_a_flood_from_one_address_and_keeps_serving_the_rest() -> None:
    # Two connections at once from an address, then (nearly) none: the third viewer from
    # 127.0.0.1 is dropped before its handshake, while the first two stay waiting for the
    # channel, and the tracker says which address it refuses.
    port = free_udp_port()
    tracker = subprocess.Popen([*MESHCAST, "tracker", "--listen", f"127.0.0.1:{port}",
                                "--per-ip-burst", "2", "--per-ip-rate", "0.001"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    viewers: list[subprocess.Popen[str]] = []
    try:
        _await_line(tracker, "tracker listening on", 30)
        for _ in range(2):
            viewers.append(subprocess.Popen(
                [*MESHCAST, "peer", "--tracker", f"127.0.0.1:{port}", "--channel", "later"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True))
            _await_line(viewers[-1], "is not live yet: waiting", 30)
        third = run(["peer", "--tracker", f"127.0.0.1:{port}", "--channel", "later"], timeout=60)
        assert_one_line_error(third, "tracker unreachable")
        line = _await_line(tracker, "refusing new connections from 127.0.0.1", 10)
        assert "more than 2 at once" in line
        assert all(v.poll() is None for v in viewers)  # still waiting, not refused
    finally:
        for proc in (*viewers, tracker):
            stop(proc)


@pytest.mark.parametrize("command", [["tracker", "--listen", "127.0.0.1:0"],
                                     ["peer", "--tracker", "127.0.0.1:9", "--channel", "x"]])
def test_an_unwritable_stats_file_fails_at_once(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "no-such-dir" / "stats.jsonl"
    result = run([*command, "--stats", str(path)], timeout=30)
    assert_one_line_error(result, "cannot write the stats file", str(path))


def test_seed_fails_clearly_on_missing_input_and_bad_key(tmp_path: Path) -> None:
    tracker = f"127.0.0.1:{free_udp_port()}"
    missing = run(["seed", "--tracker", tracker, "--channel", "c", "--key", str(tmp_path / "k.pem"),
                   "--input", str(tmp_path / "absent.ts")], timeout=30)
    assert_one_line_error(missing, "absent.ts")
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key\n")
    result = run(["seed", "--tracker", tracker, "--channel", "c", "--key", str(bad_key),
                  "--input", str(tmp_path / "absent.ts")], timeout=30)
    assert_one_line_error(result, "bad.pem")


def test_tracker_fails_clearly_on_a_bad_key(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key\n")
    result = run(["tracker", "--listen", f"127.0.0.1:{free_udp_port()}", "--key", str(bad_key)],
                 timeout=30)
    assert_one_line_error(result, "bad.pem", "not a PEM private key")


def test_demo_without_ffmpeg_says_how_to_install(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no ffmpeg anywhere
    result = run(["demo", "--peers", "2", "--duration", "5"], timeout=30, env=env, cmd=MODULE)
    assert_one_line_error(result, "apt-get install ffmpeg", "brew install ffmpeg")


@pytest.mark.timeout(120)
def test_demo_json_figures() -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed: the demo's live source")
    result = run(["demo", "--peers", "4", "--duration", "12", "--json", "--http-port", "0"],
                 timeout=90)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    print(json.dumps(figures, indent=1))
    assert figures["peers"] == 4 and figures["rejected"] == 0
    assert figures["chunks_sent"] >= 40  # ~5 chunks/s for 12 s
    assert figures["delivered_ratio"] >= 0.95
    assert figures["offload"] > 0.5
    assert figures["latency_ms"]["p50"] < 500
    assert figures["max_depth"] >= 2
    assert figures["startup_ms"]["p50"] is not None


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sim_compare_in_parallel_stops_its_workers_on_ctrl_c_and_sigterm(sig: int) -> None:
    """`sim compare --jobs 2` runs each strategy in a worker process; Ctrl-C (SIGINT to the
    whole process group) or a SIGTERM to the command alone must end every one of them."""
    proc = subprocess.Popen(
        [*MODULE, "sim", "compare", "steady-10k", "--peers", "2000", "--duration", "30",
         "--strategies", "tree,random", "--jobs", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        # A terminal's default; a test runner may start us with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers: list[int] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the workers are running once they report progress
            if "events," in line:
                break
        workers = [p for p in _children(proc.pid)
                   if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(timeout=20) == 128 + sig
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the OS to reap them, bounded
        assert all(_gone(p) for p in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in workers:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
        stop(proc)


def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (its parent was killed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_tracker_with_fronts_serves_through_them_and_leaves_none_behind(
        sig: int, tmp_path: Path) -> None:
    """`meshcast tracker --fronts 2`: a viewer is answered through the fronts, which its stats
    list; a SIGTERM (a clean stop) or a SIGKILL of the tracker (no goodbye) ends both."""
    port = free_udp_port()
    stats = tmp_path / "stats.jsonl"
    tracker = subprocess.Popen([*MESHCAST, "tracker", "--listen", f"127.0.0.1:{port}", "--hold", "1",
                                "--fronts", "2", "--stats", str(stats)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    fronts: list[int] = []
    try:
        line = _await_line(tracker, "front processes serve QUIC", 30)
        fronts = [int(p) for p in line.rsplit("(pids ", 1)[1].strip().rstrip(")").split()]
        assert len(fronts) == 2 and fronts == sorted(_children(tracker.pid))
        result = run(["peer", "--tracker", f"127.0.0.1:{port}", "--channel", "nobody-here"],
                     timeout=30)
        assert_one_line_error(result, "rejected by the tracker", "did not go live within 1 s")
        listed = json.loads(stats.read_text().splitlines()[-1])["fronts"]
        assert [(f["up"], f["pid"]) for f in listed] == [(True, pid) for pid in fronts]
        tracker.send_signal(sig)
        tracker.wait(timeout=15)
        deadline = time.monotonic() + 10
        while not all(_ended(p) for p in fronts) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_ended(p) for p in fronts), [p for p in fronts if not _ended(p)]
    finally:
        stop(tracker)
        for pid in fronts:
            if not _ended(pid):
                os.kill(pid, signal.SIGKILL)
