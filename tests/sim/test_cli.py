"""`meshcast sim run|compare` end to end, in-process (argparse → driver → files)."""

from __future__ import annotations

import argparse
import json

import pytest

from sim import batch, cli
from sim.build import is_compiled


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshcast")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["sim", *argv])
    return args.func(args)


def test_run_json_has_the_documented_keys(capsys):
    assert run_cli(["run", "small-20", "--duration", "8", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # stdout holds the JSON alone
    assert "100%" in captured.err  # the progress still shows, on stderr
    assert set(cli.JSON_KEYS) <= set(out)
    assert out["peers"] == 20
    assert set(out["latency_ms"]) == {"p50", "p95", "p99"}
    assert out["continuity"] > 0.95
    assert out["max_depth"] >= 1


def test_out_dir_is_identical_for_the_same_seed(tmp_path):
    for name in ("a", "b"):
        assert run_cli(["run", "small-20", "--duration", "6", "--quiet", "--out",
                        str(tmp_path / name)]) == 0
    a = (tmp_path / "a" / "metrics.json").read_bytes()
    assert a == (tmp_path / "b" / "metrics.json").read_bytes()
    for f in ("peers.csv", "latency_cdf.png", "timeseries.png", "depth_histogram.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0


def test_compare_writes_side_by_side(tmp_path, capsys):
    assert run_cli(["compare", "small-20", "--duration", "6", "--strategies", "tree,mesh",
                    "--quiet", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "tree" in table and "mesh" in table and "latency p95" in table
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert set(data) == {"tree", "mesh"}
    assert (tmp_path / "comparison_latency_cdf.png").exists()


def test_parallel_runs_write_the_same_files_as_runs_one_after_another(tmp_path, monkeypatch):
    """--jobs 2 runs each strategy in its own worker process (the machine's CPUs are the
    default); the results must not depend on it."""
    for jobs in ("1", "2"):
        if jobs == "2":  # the runs must happen in the (freshly spawned) workers, not here
            monkeypatch.setattr(batch, "run_scenario", _not_here)
        assert run_cli(["compare", "small-20", "--duration", "6", "--strategies", "tree,random",
                        "--quiet", "--jobs", jobs, "--out", str(tmp_path / jobs)]) == 0
    for f in ("comparison.json", "tree/metrics.json", "random/metrics.json", "random/peers.csv"):
        assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes(), f


def _not_here(*args, **kwargs):
    raise AssertionError("ran in the parent process")


def test_seeds_runs_the_scenario_once_per_seed_side_by_side(tmp_path, capsys):
    assert run_cli(["run", "small-20", "--duration", "6", "--seeds", "1-2", "--jobs", "2",
                    "--quiet", "--json", "--out", str(tmp_path / "many")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"1", "2"}
    assert data["1"]["latency_ms"] != data["2"]["latency_ms"]  # different draws, same scenario
    assert run_cli(["run", "small-20", "--duration", "6", "--seed", "2", "--quiet",
                    "--out", str(tmp_path / "one")]) == 0
    many, one = tmp_path / "many", tmp_path / "one"
    assert (many / "seed-2" / "metrics.json").read_bytes() == (one / "metrics.json").read_bytes()
    assert set(json.loads((many / "comparison.json").read_text())) == {"1", "2"}
    assert (many / "seed-1" / "latency_cdf.png").stat().st_size > 0
    for argv, why in ((["--seeds", "1-2", "--seed", "3"], "not both"),
                      (["--seeds", "1,x"], "expected seeds like"),
                      (["--seeds", "1,1"], "distinct seeds"),
                      (["--seeds", "1-2", "--jobs", "0"], "at least 1")):
        with pytest.raises(SystemExit) as exc:
            run_cli(["run", "small-20", "--quiet", *argv])
        assert why in str(exc.value)


def test_malformed_scenario_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[stream]\nbitrate_kbps = "fast"\n')
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", str(bad)])
    assert "stream.bitrate_kbps" in str(exc.value)


def test_unknown_scenario_and_strategy_are_clear_errors():
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", "no-such-scenario"])
    assert "no scenario file" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        run_cli(["compare", "small-20", "--strategies", "tree,bogus"])
    assert "bogus" in str(exc.value)


def test_a_directory_named_like_a_shipped_scenario_does_not_hide_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "small-20").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_cli(["run", "small-20", "--duration", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peers"] == 20
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", str(tmp_path)])  # a directory given as a path: a clear error
    assert "no scenario file" in str(exc.value)


def test_set_overrides_any_key_and_names_a_bad_one(tmp_path):
    assert run_cli(["run", "small-20", "--duration", "4", "--quiet", "--out", str(tmp_path),
                    "--set", "peers.count=12", "--set", "stream.chunk_ms = 100"]) == 0
    out = json.loads((tmp_path / "metrics.json").read_text())
    assert out["peers"] == 12
    # 100 ms chunks for 4 s: up to 40 per peer; the scenario's own 200 ms would give up to 20.
    assert 12 * 25 <= out["chunks"]["verified"] <= 12 * 40
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", "small-20", "--set", "stream.chunk_ms=fast"])
    assert "stream.chunk_ms" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", "small-20", "--set", "stream.chunk_ms"])
    assert "expected KEY=VALUE" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        run_cli(["run", "small-20", "--set", "stream.chunk_size=50"])
    assert "stream.chunk_size" in str(exc.value)


def test_a_big_run_in_pure_python_says_a_compiled_build_exists(capsys):
    """100k viewers take ~40 min in pure Python and half that compiled: a big run says so on
    stderr, a small one does not (the runs themselves are cut short here)."""
    if is_compiled():
        pytest.skip("running the compiled build")
    assert run_cli(["run", "steady-10k", "--peers", str(cli.BIG_RUN), "--duration", "0.2",
                    "--json"]) == 0
    assert "compiled one runs" in capsys.readouterr().err
    assert run_cli(["run", "steady-10k", "--peers", "2000", "--duration", "0.2", "--json"]) == 0
    assert "compiled" not in capsys.readouterr().err
