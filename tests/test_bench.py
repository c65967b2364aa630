"""The bench suite: regression-gate logic on synthetic result files, harness helpers, and a smoke
run of every bench script (tiny shapes, one rep) checking that each provider runs or is skipped
with a reason and that every row is well-formed. No timing is asserted here."""
import json
import math
import os

import pytest
import torch

from bench import common, regress, run_all

SHAPE = {"benchmark": "bench_decode", "shape": "criteo", "kind": "scalar", "B": 4096, "N": 39, "D": 16}


def _row(provider, ms, literal_ms=100.0, status="ok", iqr=0.01, reps=5, **extra):
    """A result row; ``iqr`` is relative to the median (tight by default: the noise band stays small)."""
    row = {**SHAPE, "provider": provider, "status": status, **extra}
    if status == "ok":
        row.update(median_ms=ms, iqr_ms=iqr * ms, reps=reps, ratio_vs_literal=ms / literal_ms)
    else:
        row["reason"] = "synthetic reason"
    return row


def _steady(scale=1.0, iqr=0.01, reps=5):
    """Reference rows (implementations this project does not own) whose time only follows the machine:
    they pin the run's speed factor to ``scale``."""
    return [_row(name, ms * scale, 100.0 * scale, iqr=iqr, reps=reps)
            for name, ms in (("literal+compile", 50.0), ("fbgemm-tbe", 7.0), ("torchrec-ebc", 9.0))]


def _write(path, rows, mode="quick"):
    path.write_text(json.dumps({"benchmark": "suite", "env": {"device": "cpu", "mode": mode, "threads": 2},
                                "rows": rows}))
    return str(path)


# ---------------------------------------------------------------- regression gate

def test_gate_passes_within_tolerance_even_when_absolute_times_drift():
    base = [_row("literal", 100.0), _row("torch", 10.0)] + _steady()
    # Whole machine twice as slow: the speed factor takes it, so no regression.
    cur = [_row("literal", 200.0, 200.0), _row("torch", 22.0, 200.0)] + _steady(2.0)
    result = regress.compare(base, cur, tolerance=0.25)
    assert result["passed"] and result["speed_factor"] == pytest.approx(2.0) and result["factor_from_references"]
    assert len(result["checked"]) == 1 and not result["regressions"]
    assert result["checked"][0]["change"] == pytest.approx(1.1)


def test_one_noisy_literal_neither_hides_nor_fakes_a_regression():
    """Dividing by a per-shape literal time let a literal twice as slow (a busy host) hide a provider twice
    as slow; the run-wide speed factor does not move with one row."""
    base = [_row("literal", 100.0), _row("torch", 10.0)] + _steady()
    cur = [_row("literal", 200.0, 200.0), _row("torch", 20.0, 200.0)] + _steady()
    result = regress.compare(base, cur, tolerance=0.25)
    assert result["speed_factor"] == pytest.approx(1.0)
    assert [r["key"].split("provider=")[1] for r in result["regressions"]] == ["torch"]
    # and a literal alone slower flags nothing
    cur = [_row("literal", 200.0, 200.0), _row("torch", 10.0, 200.0)] + _steady()
    assert regress.compare(base, cur)["passed"]


def test_gate_flags_a_provider_slower_than_tolerance():
    base = [_row("literal", 100.0), _row("torch", 10.0), _row("torch+compile", 8.0)]
    cur = [_row("literal", 100.0), _row("torch", 13.0), _row("torch+compile", 8.0)]
    result = regress.compare(base, cur, tolerance=0.25)
    assert not result["passed"]
    assert [r["key"].split("provider=")[1] for r in result["regressions"]] == ["torch"]
    assert result["regressions"][0]["change"] == pytest.approx(1.3)
    # The same numbers pass a looser gate.
    assert regress.compare(base, cur, tolerance=0.35)["passed"]


def test_gate_reports_improvements_and_ignores_reference_rows_themselves():
    base = [_row("literal", 100.0), _row("torch", 10.0)] + _steady()
    cur = [_row("literal", 50.0, 50.0), _row("torch", 2.0, 50.0)] + _steady(0.5)
    result = regress.compare(base, cur)
    assert result["passed"] and len(result["improved"]) == 1
    assert [c["key"].split("provider=")[1] for c in result["checked"]] == ["torch"]


def test_gate_fails_on_error_rows_literal_ones_included():
    base = [_row("literal", 100.0), _row("torch", 10.0)]
    errored = [_row("literal", 100.0), _row("torch", 0, status="error")]
    assert not regress.compare(base, errored)["passed"]
    no_literal = [_row("literal", 0, status="error"), {**_row("torch", 10.0), "ratio_vs_literal": None}]
    result = regress.compare(base, no_literal)
    assert not result["passed"] and "provider=literal" in result["errors"][0]["key"]


def test_gate_missing_provider_fails_only_when_strict():
    base = [_row("literal", 100.0), _row("torch", 10.0), _row("ext-cpu", 5.0)]
    cur = [_row("literal", 100.0), _row("torch", 10.0), _row("ext-cpu", 0, status="skipped")]
    assert regress.compare(base, cur)["passed"]
    strict = regress.compare(base, cur, strict=True)
    assert not strict["passed"] and len(strict["missing"]) == 1


def test_gate_fails_when_the_current_run_shares_no_measurement_with_the_baseline(tmp_path, capsys):
    # A result file of another benchmark (or shape) must not pass the gate by comparing nothing.
    base = [_row("literal", 100.0), _row("torch", 10.0)]
    other = [{**r, "benchmark": "bench_lookup"} for r in base]
    result = regress.compare(base, other)
    assert not result["checked"] and result["nothing_compared"] and not result["passed"]
    base_file = _write(tmp_path / "base.json", base)
    other_file = _write(tmp_path / "other.json", other)
    assert regress.main(["--baseline", base_file, "--current", other_file]) == 1
    assert "nothing was checked" in capsys.readouterr().out
    # A baseline without any gated row (another kind of result file) checks nothing either: refused.
    assert not regress.compare([_row("literal", 100.0)], other)["passed"]
    lone = _write(tmp_path / "lone.json", [_row("literal", 100.0)])
    assert regress.main(["--baseline", lone, "--current", other_file]) == 2
    assert "nothing could be gated" in capsys.readouterr().err


def test_gate_refuses_runs_from_another_device_or_mode(tmp_path, capsys):
    """Rows of a CPU and a GPU run share shape keys, but their ratios compare machines, not code."""
    rows = [_row("literal", 100.0), _row("torch", 10.0)]
    base_file = _write(tmp_path / "base.json", rows)
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"benchmark": "suite", "env": {"device": "cuda", "mode": "quick", "threads": 2},
                               "rows": rows}))
    assert regress.main(["--baseline", base_file, "--current", str(gpu)]) == 2
    assert "device 'cpu' vs 'cuda'" in capsys.readouterr().err
    full = _write(tmp_path / "full.json", rows, mode="full")
    assert regress.main(["--baseline", base_file, "--current", full]) == 2
    assert regress.main(["--baseline", base_file, "--current", base_file]) == 0


def test_gate_matches_rows_by_shape_not_by_order():
    other = {"B": 1024}
    base = [_row("literal", 100.0), _row("torch", 10.0),
            {**_row("literal", 30.0, 30.0), **other}, {**_row("torch", 3.0, 30.0), **other}]
    cur = list(reversed([_row("literal", 100.0), _row("torch", 10.0),
                         {**_row("literal", 30.0, 30.0), **other}, {**_row("torch", 6.0, 30.0), **other}]))
    result = regress.compare(base, cur)
    assert [("B=1024" in r["key"]) for r in result["regressions"]] == [True]


def test_gate_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        regress.compare([], [], tolerance=-0.1)
    with pytest.raises(ValueError, match="z must"):
        regress.compare([], [], z=-1.0)


def test_median_noise_follows_iqr_and_repetitions():
    row = _row("torch", 10.0, iqr=0.2, reps=9)
    assert regress.median_noise(row) == pytest.approx(1.2533 * (0.2 / 1.349) / 3.0)
    # four times the repetitions halve the standard error
    assert regress.median_noise(_row("torch", 10.0, iqr=0.2, reps=36)) == pytest.approx(regress.median_noise(row) / 2)
    assert regress.median_noise({"median_ms": 10.0}) == 0.0   # no spread recorded: no noise assumed


def test_gate_does_not_flag_a_slowdown_the_noise_explains_but_does_flag_it_when_measured_tightly():
    # +30% relative to literal, past the 25% tolerance. With IQRs of 60% over 5 reps (a quick run on a
    # busy host) that is well within noise: inconclusive, a pass unless --strict.
    noisy_base = [_row("literal", 100.0, iqr=0.6), _row("torch", 10.0, iqr=0.6)] + _steady()
    noisy_cur = [_row("literal", 100.0, iqr=0.6), _row("torch", 13.0, iqr=0.6)] + _steady()
    result = regress.compare(noisy_base, noisy_cur, tolerance=0.25)
    assert result["passed"] and not result["regressions"]
    assert [i["change"] for i in result["inconclusive"]] == [pytest.approx(1.3)]
    assert result["speed_factor"] == pytest.approx(1.0)
    assert result["inconclusive"][0]["threshold"] > 1.3
    assert not regress.compare(noisy_base, noisy_cur, tolerance=0.25, strict=True)["passed"]
    # z = 0: the tolerance alone decides, as a noise-free gate would
    assert not regress.compare(noisy_base, noisy_cur, tolerance=0.25, z=0.0)["passed"]
    # The same +30% measured with 2% IQRs over 15 reps is a regression.
    tight_base = [_row("literal", 100.0, iqr=0.02, reps=15), _row("torch", 10.0, iqr=0.02, reps=15)] + _steady()
    tight_cur = [_row("literal", 100.0, iqr=0.02, reps=15), _row("torch", 13.0, iqr=0.02, reps=15)] + _steady()
    result = regress.compare(tight_base, tight_cur, tolerance=0.25)
    assert not result["passed"] and len(result["regressions"]) == 1
    # A slow-down far past the noise band fails even a noisy run.
    very_slow = [_row("literal", 100.0, iqr=0.6), _row("torch", 40.0, iqr=0.6)] + _steady()
    assert regress.compare(noisy_base, very_slow)["regressions"]


def test_gate_noise_is_that_of_the_two_medians_and_the_factor():
    # A noisy literal no longer widens the band of the other providers' comparisons; the factor's own
    # spread (the references' changes disagree) does
    base = [_row("literal", 100.0), _row("torch", 10.0)] + _steady()
    cur = [_row("literal", 100.0, iqr=1.0), _row("torch", 13.0, iqr=0.2)] + _steady()
    result = regress.compare(base, cur)
    item = result["checked"][0]
    assert result["factor_noise"] == 0.0
    expected = math.sqrt(regress.median_noise(base[1]) ** 2 + regress.median_noise(cur[1]) ** 2)
    assert item["noise"] == pytest.approx(expected)
    assert item["threshold"] == pytest.approx(1.25 * math.exp(2.0 * expected))


def test_gate_reports_its_resolution(tmp_path, capsys):
    base = _write(tmp_path / "base.json", [_row("literal", 100.0, iqr=0.3), _row("torch", 10.0, iqr=0.3)])
    cur = _write(tmp_path / "cur.json", [_row("literal", 100.0, iqr=0.3), _row("torch", 10.0, iqr=0.3)])
    assert regress.main(["--baseline", base, "--current", cur]) == 0
    out = capsys.readouterr().out
    assert "resolution: half of the comparisons would flag a slow-down of" in out
    result = regress.compare(*(run_all.load_rows(f)[0] for f in (base, cur)))
    assert result["resolution"] == pytest.approx(result["checked"][0]["threshold"])
    assert regress.compare([], [])["resolution"] is None


def test_merge_runs_takes_medians_and_pools_repetitions():
    runs = [[_row("literal", lit), _row("torch", t, lit)] for lit, t in ((100.0, 10.0), (120.0, 30.0), (90.0, 9.0))]
    merged = {r["provider"]: r for r in regress.merge_runs(runs)}
    assert merged["literal"]["median_ms"] == 100.0 and merged["literal"]["reps"] == 15
    assert merged["torch"]["median_ms"] == 10.0 and merged["torch"]["runs"] == 3
    # the median of the runs' own ratios (0.1, 0.25, 0.1), not the ratio of the merged medians
    assert merged["torch"]["ratio_vs_literal"] == pytest.approx(0.1)
    # an error in any run stays an error; a row missing from a run is not compared
    runs[1][1] = _row("torch", 0, status="error")
    runs[2].append(_row("fbgemm-tbe", 5.0))
    merged = {r["provider"]: r for r in regress.merge_runs(runs)}
    assert merged["torch"]["status"] == "error"
    assert merged["fbgemm-tbe"]["status"] == "skipped" and "1 of 3" in merged["fbgemm-tbe"]["reason"]
    assert regress.merge_runs([]) == []


def test_regress_cli_rejects_bad_noise_options(tmp_path):
    base = _write(tmp_path / "base.json", [_row("literal", 100.0), _row("torch", 10.0)])
    for bad in (["--z", "-1"], ["--repeat", "0"], ["--current", base, "--repeat", "2"]):
        with pytest.raises(SystemExit) as exc:
            regress.main(["--baseline", base] + bad)
        assert exc.value.code == 2


def test_fresh_run_uses_the_baselines_mode_and_repetitions(monkeypatch):
    seen = {}

    def fake_collect(args):
        seen.update(vars(args))
        return [], {}, []
    monkeypatch.setattr(run_all, "collect", fake_collect)
    baseline = [_row("literal", 100.0), _row("torch", 10.0)]
    regress.fresh_run({"device": "cpu", "mode": "quick", "reps": 15, "threads": 2}, baseline, None)
    assert seen["reps"] == 15 and seen["quick"] and seen["only"] == "decode" and seen["no_write"]


def test_regress_cli_exit_codes(tmp_path, capsys):
    base = _write(tmp_path / "base.json", [_row("literal", 100.0), _row("torch", 10.0)] + _steady())
    good = _write(tmp_path / "good.json", [_row("literal", 90.0, 90.0), _row("torch", 9.5, 90.0)] + _steady(0.9))
    bad = _write(tmp_path / "bad.json", [_row("literal", 100.0), _row("torch", 20.0)] + _steady())
    assert regress.main(["--baseline", base, "--current", good]) == 0
    assert "PASS" in capsys.readouterr().out
    assert regress.main(["--baseline", base, "--current", bad]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert regress.main(["--baseline", base, "--current", bad, "--tolerance", "1.5"]) == 0
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert regress.main(["--baseline", base, "--current", str(tmp_path / "junk.json")]) == 2
    assert regress.main(["--baseline", str(tmp_path / "absent.json"), "--current", good]) == 2


def test_stored_baselines_are_usable():
    folder = os.path.join(common.ROOT, "bench", "baselines")
    files = [f for f in os.listdir(folder) if f.endswith(".json")] if os.path.isdir(folder) else []
    assert files, "bench/baselines/ holds no baseline"
    for name in files:
        rows, env = run_all.load_rows(os.path.join(folder, name))
        assert env.get("device") and env.get("git_sha") and env.get("torch")
        gated = [r for r in rows if r["status"] == "ok" and r["provider"] != "literal"]
        assert gated and all(r["ratio_vs_literal"] > 0 for r in gated)
        # A baseline compared with itself passes.
        assert regress.compare(rows, rows)["passed"]


# ---------------------------------------------------------------- harness helpers

def test_make_ids_in_range_int64_and_zipf_is_skewed():
    dims = [3, 1000, 2_000_000]
    uni = common.make_ids(20000, dims, "uniform", seed=1)
    zipf = common.make_ids(20000, dims, "zipf", seed=1)
    for ids in (uni, zipf):
        assert ids.dtype == torch.int64 and ids.shape == (20000, 3)
        for f, n in enumerate(dims):
            assert int(ids[:, f].min()) >= 0 and int(ids[:, f].max()) < n
    # Hot ids: the most frequent id of the 1000-row field is far above the uniform 1/1000 share.
    top_zipf = torch.bincount(zipf[:, 1]).max().item() / 20000
    top_uni = torch.bincount(uni[:, 1]).max().item() / 20000
    assert top_zipf > 10 * top_uni
    with pytest.raises(ValueError, match="dist"):
        common.make_ids(4, dims, "normal")


def test_field_dims_for_criteo_scale():
    full = common.field_dims_for(39, 1.0)
    assert len(full) == 39 and 30e6 < sum(full) < 40e6
    small = common.field_dims_for(39, 0.01)
    assert all(x >= 2 for x in small) and sum(small) < sum(full) / 50
    assert len(common.field_dims_for(64, 0.01)) == 64


def test_peak_alloc_bytes_sees_a_temporary():
    size = 8 * 2 ** 20

    def fn():
        t = torch.ones(size // 4)          # fp32: exactly `size` bytes, freed on return
        return float(t[0])
    peak = common.peak_alloc_bytes(fn, "cpu")
    assert size <= peak < 2 * size


def test_time_interleaved_returns_stats_per_callable():
    out = common.time_interleaved({"a": lambda: sum(range(100)), "b": lambda: None}, warmup=0, reps=4)
    assert set(out) == {"a", "b"}
    for stats in out.values():
        assert stats["reps"] == 4 and stats["median_ms"] >= 0 and stats["iqr_ms"] >= 0


def test_markdown_and_files(tmp_path):
    env = {"device": "cpu", "device_name": "test cpu", "threads": 1, "torch": torch.__version__, "triton": None,
           "sfg_fast": "0", "git_sha": "abc", "date": "2026-01-01T00:00:00+00:00", "mode": "smoke"}
    rows = [_row("literal", 100.0), _row("torch", 10.0), _row("triton", 0, status="skipped")]
    md = common.summary_markdown("t", rows, env)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| shape"))
    column = [c.strip() for c in header.strip("|").split("|")].index("provider")
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| criteo")]
    assert [cells[column] for cells in table] == ["literal", "torch"]     # skipped rows stay out of the table
    assert "Not measured" in md
    assert "synthetic reason" in md
    path = common.write_results("unit", rows, env, md, str(tmp_path), command="python -m bench.unit --quick")
    loaded, loaded_env = run_all.load_rows(path)
    assert loaded == rows and loaded_env["git_sha"] == "abc"
    assert os.path.exists(path[:-5] + ".md")
    assert json.loads(open(path).read())["command"] == "python -m bench.unit --quick"


def test_quartiles_stay_inside_the_samples_and_command_lines_follow_the_argv():
    # "exclusive" quartiles of [1, 2, 3, 4, 100] give an IQR of 50.5: one outlier in five would make the
    # regression gate blind; interpolated between the samples it is 2
    assert common.median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == {"median_ms": 3.0, "iqr_ms": 2.0, "reps": 5}
    args = common.parse_args("t", ["--smoke", "--no-write"])
    assert common.command_line("bench_x", args) == "python -m bench.bench_x --smoke --no-write"


def test_git_sha_marks_untracked_files_and_a_given_sha(monkeypatch, tmp_path):
    import shutil
    import subprocess
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(cmd, cwd=repo, check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "a.py"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "one"], cwd=repo, check=True)
    monkeypatch.setattr(common, "ROOT", str(repo))
    monkeypatch.delenv("SFG_FAST_GIT_SHA", raising=False)
    assert not common.git_sha().endswith("-dirty")
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "bench" / "results" / "run.json").write_text("{}")      # a benchmark's own output
    assert not common.git_sha().endswith("-dirty")
    (repo / "new_module.py").write_text("y = 2\n")                  # untracked code changes what runs
    assert common.git_sha().endswith("-dirty")
    monkeypatch.setenv("SFG_FAST_GIT_SHA", "abc123")
    assert common.git_sha() == "abc123 (given)"


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots
    rows = []
    for b in (1024, 4096):
        rows += [{**_row("literal", b / 10.0, b / 10.0), "B": b}, {**_row("torch", b / 100.0, b / 10.0), "B": b}]
    for n in (8, 16, 32):
        rows += [{**_row("literal", n * 1.0, n * 1.0), "shape": "sweep-N", "N": n},
                 {**_row("torch", 1.0, n * 1.0), "shape": "sweep-N", "N": n}]
    written = plots.decode_plots(rows, str(tmp_path / "decode"))
    assert len(written) == 2
    for png in written:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- smoke run of every script

SMOKE_ARGV = ["--smoke", "--no-compile", "--threads", "1", "--no-write"]
ALWAYS_RUN = {"literal", "torch"}


@pytest.fixture(scope="module")
def smoke_env():
    args = common.parse_args("test", SMOKE_ARGV)
    return args, common.bench_env(args)


@pytest.mark.parametrize("script", run_all.SCRIPTS + ("foundation",))
def test_smoke_every_provider_runs_or_says_why(script, smoke_env):
    import importlib
    args, env = smoke_env
    module = importlib.import_module(f"bench.bench_{script}")
    if script == "foundation":
        args = common.parse_args("test", SMOKE_ARGV)
        args.batch, args.fields, args.dim = 4096, 39, 16   # ignored in smoke mode (tiny shape)
        rows = module.run(args)
    else:
        rows = module.run(args, env)
    assert rows
    errors = [(r["provider"], r.get("reason")) for r in rows if r["status"] == "error"]
    assert not errors, errors
    for r in rows:
        assert r["status"] in ("ok", "skipped")
        assert r["device"] == "cpu" and r["git_sha"] and r["torch"] == torch.__version__
        if r["status"] == "skipped":
            assert r["reason"] and isinstance(r["reason"], str)
            assert r["provider"] not in ALWAYS_RUN
            continue
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["reps"] >= 1
        assert r["ratio_vs_literal"] > 0
        if "saved_mb" in r:
            assert r["saved_mb"] >= 0
    by_case = {}
    for r in rows:
        by_case.setdefault(regress.row_key({k: v for k, v in r.items() if k != "provider"}), set()).add(r["provider"])
    for providers in by_case.values():
        assert ALWAYS_RUN <= providers
    ok_literal = [r for r in rows if r["provider"] == "literal"]
    assert ok_literal and all(r["status"] == "ok" and r["ratio_vs_literal"] == 1.0 for r in ok_literal)
    if script != "foundation":
        # Compile providers are left out by --no-compile; every other provider appears in every case.
        names = set().union(*by_case.values())
        assert {"triton", "ext-cpu"} <= names
    assert not [r["provider"] for r in rows if "compile" in r["provider"].split("+")]


def test_gate_warns_when_the_runs_were_measured_under_different_machine_conditions(tmp_path, capsys):
    rows = [_row("literal", 100.0), _row("torch", 10.0)] + _steady()     # enough references: calibrated
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"env": {"device": "cpu", "copy_gbps": 8.0}, "rows": rows}))
    for gbps, warned in ((25.0, True), (12.0, False)):
        cur = tmp_path / "cur.json"
        cur.write_text(json.dumps({"env": {"device": "cpu", "copy_gbps": gbps}, "rows": rows}))
        assert regress.main(["--baseline", str(base), "--current", str(cur)]) == 0
        assert ("WARNING the baseline was measured at 8.0 GB/s" in capsys.readouterr().out) == warned
    cur.write_text(json.dumps({"env": {"device": "cpu", "copy_gbps": 12.0}, "rows": rows}))
    assert regress.main(["--baseline", str(base), "--current", str(cur), "--strict"]) == 0
    cur.write_text(json.dumps({"env": {"device": "cpu", "copy_gbps": 25.0}, "rows": rows}))
    assert regress.main(["--baseline", str(base), "--current", str(cur), "--strict"]) == 1
    assert regress.conditions_warning({}, {"copy_gbps": 3.0}) is None


def test_buffer_pool_bench_runs_both_variants_in_separate_processes(capsys):
    from sfg_fast.ops import cpu_ext
    if not cpu_ext.available():
        pytest.skip("sfg_fast._C is not built")
    from bench import bench_buffer_pool
    assert bench_buffer_pool.main(["--runs", "1", "--steps", "6", "--kinds", "scalar", "--precisions", "fp32",
                                   "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| train_step[scalar, adagrad, fp32] | pool |" in out
    assert "| train_step[scalar, adagrad, fp32] | no pool |" in out


def test_a_regression_of_every_provider_of_this_project_is_caught():
    """The factor comes from reference rows only: a regression common to all of this project's providers
    (a shared kernel) cannot divide itself out, as a median over the providers themselves would."""
    ours = ("torch", "torch+compile", "ext-cpu", "triton")
    base = [_row("literal", 100.0)] + [_row(p, 10.0) for p in ours] + _steady()
    cur = [_row("literal", 100.0)] + [_row(p, 20.0) for p in ours] + _steady()
    result = regress.compare(base, cur)
    assert result["speed_factor"] == pytest.approx(1.0) and len(result["regressions"]) == 4
    # too few reference rows: the factor falls back to every row, and the result says so
    thin = regress.compare(base[:5], cur[:5])
    assert not thin["factor_from_references"]


def test_gate_refuses_duplicate_rows_and_reports_a_timeless_ok_row():
    base = [_row("literal", 100.0), _row("torch", 10.0)] + _steady()
    with pytest.raises(ValueError, match="more than once"):
        regress.compare(base, base + [_row("torch", 30.0)])
    broken = [_row("literal", 100.0), {**_row("torch", 10.0), "median_ms": None}] + _steady()
    result = regress.compare(base, broken)
    assert not result["passed"] and "no positive time" in result["errors"][0]["reason"]
    assert regress.median_noise({"median_ms": 10.0, "iqr_ms": 1.0, "reps": "9"}) > 0


def test_saved_bytes_leave_out_persistent_tensors():
    """saved_mb counts activations: a weight (or a view of it) saved by reference costs no memory."""
    from bench.common import saved_tensor_bytes
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    fn = lambda: (x @ w[:, :8]).sum()     # noqa: E731  (saves x and a view of w)
    both = saved_tensor_bytes(fn)
    assert both == (4 * 8 + 8 * 8) * 4
    assert saved_tensor_bytes(fn, [w]) == 4 * 8 * 4


def test_time_gpu_times_a_slow_call_more_than_once(monkeypatch):
    """do_bench fits rep / (one call's time) calls: a ~100 ms literal reference in a 20 ms window would be
    timed once and its "median" be one sample. time_gpu stretches the window to at least min_calls calls
    (do_bench replaced by a stand-in with its fitting rule: no GPU here)."""
    triton_testing = pytest.importorskip("triton.testing")
    windows = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        windows.append(rep)
        return [100.0 + i for i in range(max(1, int(rep / 100.0)))]
    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    slow = common.time_gpu(lambda: None, warmup=25, rep=20)
    assert slow["reps"] >= 5 and windows[0] == 20 and windows[1] >= 500
    windows.clear()
    fast = common.time_gpu(lambda: None, warmup=25, rep=1000)      # 10 calls fit: timed once
    assert fast["reps"] == 10 and windows == [1000]


def test_a_strict_gate_refuses_a_factor_from_its_own_rows():
    """Without 3 shared reference rows the factor is the median of this project's own rows, where a
    uniform slow-down hides: it passes the default gate (as documented) and fails a strict one."""
    base = [_row("literal", 100.0), _row("torch", 10.0), _row("ext-cpu", 5.0), _row("torch+compile", 8.0)]
    cur = [_row("literal", 0, status="skipped"), _row("torch", 30.0), _row("ext-cpu", 15.0),
           _row("torch+compile", 24.0)]
    result = regress.compare(base, cur)
    assert result["passed"] and not result["factor_from_references"] and result["speed_factor"] == pytest.approx(3.0)
    assert not regress.compare(base, cur, strict=True)["passed"]


def test_cpu_table_gradient_ab_runs_both_ways():
    from bench import ab_cpu_table_grad
    rows = ab_cpu_table_grad.main(["--reps", "2", "--batch", "64", "--models", "fwfm", "--no-save"])
    assert {r["provider"] for r in rows} == {"aten embedding backward", "index_add_"}
    assert all(r["median_ms"] > 0 and r["reps"] == 2 for r in rows)


@pytest.mark.skipif(not __import__("sfg_fast.ops.cpu_ext", fromlist=["x"]).available(),
                    reason="sfg_fast._C is not built")
def test_extension_builds_ab_runs_each_tree_in_its_own_processes():
    """Both trees' workers import their own sfg_fast (the worker refuses to time another tree's); here the
    baseline is this tree itself."""
    import os

    from bench import ab_cpu_ext_builds
    root = os.path.dirname(os.path.dirname(os.path.abspath(ab_cpu_ext_builds.__file__)))
    rows = ab_cpu_ext_builds.main(["--baseline", root, "--threads", "1", "--kinds", "scalar,matrix", "--batch", "64",
                                   "--fields", "4", "--rounds", "1", "--reps", "1", "--no-save"])
    assert [(r["kind"], r["tree"]) for r in rows] == [("scalar", "baseline"), ("scalar", "this tree"),
                                                      ("matrix", "baseline"), ("matrix", "this tree")]
    assert all(r["median_ms"] > 0 and len(r["process_medians_ms"]) == 1 for r in rows)
