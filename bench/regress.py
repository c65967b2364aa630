"""Regression gate: compare a run with a stored baseline, each time divided by the run's speed factor.

Absolute times drift between machines and runs, so every measurement's change ``current time /
baseline time`` is divided by the speed factor: the median change of the REFERENCE rows timed in both
runs (the authors' literal form, torch.compile of it, FBGEMM's and TorchRec's lookups: implementations
this project's code does not touch). A machine twice as slow moves the factor, not the verdicts; one
noisy reference row does not move a median over dozens; and a regression of this project's code, even
one that slows every provider of a shape or of the whole run, cannot move it (a median over this
project's own rows could). With fewer than 3 reference rows the factor is the median over all rows, and
the report says so (and ``--strict`` fails: a slow-down of every row alike would hide in it). A provider regresses when its change exceeds ``1 + --tolerance`` (default 0.25)
AND by more than the measurements' own noise explains: each row's median carries a standard error
estimated from its IQR and repetition count, plus the run-to-run jitter of code that did not change (the
spread of the reference rows' changes: on a shared host memory-bound rows move together between runs,
which no within-run IQR shows), and the slow-down must clear the tolerance by ``--z`` (default 2) of
those errors added in quadrature.
A slow-down past the tolerance but inside that band is reported as ``inconclusive`` (it fails only with
``--strict``): on a shared, noisy CPU a single quick run cannot tell it from noise, so rerun with
``--repeat``. Every report states the smallest slow-down the run could have detected (its resolution).
Reference rows are status-gated only (an error fails), never timed.

A provider that ran in the baseline but errors now also fails the gate; one missing from the
current run is reported (and fails with ``--strict``). A current run that shares no measurement
with the baseline (another benchmark, shape or device) fails: a gate that compared nothing has
checked nothing.

    python -m bench.regress --baseline bench/baselines/cpu.json                 # runs a fresh suite
    python -m bench.regress --baseline bench/baselines/cpu.json --repeat 3      # 3 runs, merged
    python -m bench.regress --baseline bench/baselines/cpu.json --current FILE  # compares two files

Exit status: 0 pass, 1 regression, 2 unusable input.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

# Row fields that identify a measurement (shape and provider); everything else is a result.
KEY_FIELDS = ("benchmark", "shape", "part", "mode", "dist", "kind", "model", "sfg", "B", "N", "D", "provider")
DEFAULT_TOLERANCE = 0.25
DEFAULT_Z = 2.0


def median_noise(row: Dict) -> float:
    """Relative standard error of a row's median time: 1.253 * sigma / sqrt(reps) / median, with the
    spread sigma = IQR / 1.349 (both exact for normal samples). 0 when the row does not say."""
    med, iqr, reps = row.get("median_ms"), row.get("iqr_ms"), row.get("reps")
    try:
        med, iqr, reps = float(med), float(iqr), int(reps)
    except (TypeError, ValueError):
        return 0.0
    if not med > 0 or not iqr >= 0 or reps < 1:
        return 0.0
    return 1.2533 * (iqr / 1.349) / math.sqrt(reps) / med


REFERENCE_PROVIDERS = ("fbgemm-tbe", "torchrec-ebc")
MIN_REFERENCE_ROWS = 3


def is_reference(row: Dict) -> bool:
    """A row of an implementation this project does not own: the comparison's baselines."""
    provider = str(row.get("provider", ""))
    return provider.startswith("literal") or provider in REFERENCE_PROVIDERS


def change_noise(base: Dict, cur: Dict, jitter: float = 0.0) -> float:
    """Standard error of log(change), change = (cur / base) / factor: the two medians' relative errors and
    the run-to-run jitter of unchanged code (see :func:`speed_factor`), added in quadrature."""
    return math.sqrt(median_noise(base) ** 2 + median_noise(cur) ** 2 + jitter ** 2)


def _timed(row: Optional[Dict]) -> bool:
    median = None if row is None else row.get("median_ms")
    return (row is not None and row.get("status") == "ok" and isinstance(median, (int, float))
            and not isinstance(median, bool) and math.isfinite(median) and median > 0)


def speed_factor(baseline: List[Dict], current: List[Dict]) -> Tuple[float, float, int, bool]:
    """``(factor, jitter, rows, from_references)``: the median current/baseline time over the reference
    rows both runs timed (over all such rows when fewer than MIN_REFERENCE_ROWS are references; 1.0 when
    fewer than 2 are shared), and the run-to-run jitter of one measurement: the spread (1.4826 x the
    median absolute deviation) of those rows' log changes. Code that did not change moved that much
    between the two runs, so a change of ours must clear it too."""
    cur = {row_key(r): r for r in current}
    pairs = [(b, cur.get(row_key(b))) for b in baseline]
    shared = [(b, c) for b, c in pairs if _timed(b) and _timed(c)]
    refs = [(b, c) for b, c in shared if is_reference(b)]
    chosen, from_refs = (refs, True) if len(refs) >= MIN_REFERENCE_ROWS else (shared, False)
    if len(chosen) < 2:
        return 1.0, 0.0, len(chosen), from_refs
    logs = [math.log(c["median_ms"] / b["median_ms"]) for b, c in chosen]
    center = statistics.median(logs)
    mad = statistics.median(abs(x - center) for x in logs)
    return math.exp(center), 1.4826 * mad, len(chosen), from_refs


def row_key(row: Dict) -> Tuple:
    return tuple((k, row[k]) for k in KEY_FIELDS if k in row)


def describe(key: Tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in key)


def compare(baseline: List[Dict], current: List[Dict], tolerance: float = DEFAULT_TOLERANCE,
            strict: bool = False, z: float = DEFAULT_Z) -> Dict:
    """Return {"regressions", "inconclusive", "errors", "missing", "improved", "checked"} (lists of
    dicts), "passed", "nothing_compared" (the baseline had gated rows but none of them could be
    compared), "speed_factor" (see the module docstring) and "resolution" (the median over checked rows
    of the smallest slow-down each could flag; None when nothing was checked). ``z = 0`` ignores the
    noise (the tolerance alone decides)."""
    if not (tolerance >= 0):
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if not (z >= 0):
        raise ValueError(f"z must be >= 0, got {z}")
    for name, rows in (("baseline", baseline), ("current", current)):
        keys = [row_key(r) for r in rows]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"the {name} run holds {describe(dup)} more than once: which one counts is undefined")
    cur = {row_key(r): r for r in current}
    factor, factor_noise, shared, from_refs = speed_factor(baseline, current)
    out = {"regressions": [], "inconclusive": [], "errors": [], "missing": [], "improved": [], "checked": [],
           "speed_factor": factor, "factor_noise": factor_noise, "shared": shared, "factor_from_references": from_refs}
    for b in baseline:
        if not _timed(b):
            continue
        key = row_key(b)
        c = cur.get(key)
        reference = is_reference(b)
        if c is None or c.get("status") == "skipped":
            if not reference:
                out["missing"].append({"key": describe(key), "reason": None if c is None else c.get("reason")})
            continue
        if c.get("status") != "ok":
            out["errors"].append({"key": describe(key), "reason": c.get("reason")})
            continue
        if not _timed(c):
            out["errors"].append({"key": describe(key), "reason": f"status ok but no positive time ({c.get('median_ms')!r})"})
            continue
        if reference:
            continue
        change = c["median_ms"] / b["median_ms"] / factor
        noise = change_noise(b, c, factor_noise)
        # the smallest change this comparison flags: past the tolerance by z standard errors
        threshold = (1.0 + tolerance) * math.exp(z * noise)
        item = {"key": describe(key), "baseline_ms": b["median_ms"], "current_ms": c["median_ms"],
                "change": change, "noise": noise, "threshold": threshold}
        out["checked"].append(item)
        if change > threshold:
            out["regressions"].append(item)
        elif change > 1.0 + tolerance:
            out["inconclusive"].append(item)
        elif change * threshold < 1.0:
            out["improved"].append(item)
    # a baseline with no gated rows (another kind of result file) or a run sharing none of them checked nothing
    out["nothing_compared"] = not out["checked"]
    out["resolution"] = (statistics.median(i["threshold"] for i in out["checked"]) if out["checked"] else None)
    # --strict also refuses a factor taken from this project's own rows (too few references shared): a
    # regression of every row alike would move that factor, not the verdicts
    out["passed"] = (not out["regressions"] and not out["errors"] and not out["nothing_compared"]
                     and not (strict and (out["missing"] or out["inconclusive"] or not from_refs)))
    return out


CONDITIONS_FACTOR = 2.0
# what must match between the baseline and the current run for their ratios to be comparable
ENV_FIELDS = ("device", "device_name", "mode", "vocab_scale", "threads")


def environment_mismatch(base_env: Dict, cur_env: Dict) -> Optional[str]:
    """A sentence naming the environment fields (device, mode, shape scale, threads) in which the two
    runs differ, or None. Ratios to literal shift with the device and the mode, so rows that share a
    shape key across them would compare different machines, not two versions of the code."""
    diffs = [f"{k} {base_env.get(k)!r} vs {cur_env.get(k)!r}" for k in ENV_FIELDS
             if k in base_env and k in cur_env and base_env.get(k) != cur_env.get(k)]
    return "; ".join(diffs) if diffs else None


def conditions_warning(base_env: Dict, cur_env: Dict, factor: float = CONDITIONS_FACTOR) -> Optional[str]:
    """A sentence when the two runs were measured under visibly different machine conditions: their
    measured copy bandwidths differ by more than ``factor``. Load on a shared host does not slow every
    provider alike (the long, memory-bound literal paths suffer most), so ratios to literal from such
    a pair shift by more than any noise band; the baseline should be re-taken. None when comparable
    or unknown."""
    a, b = base_env.get("copy_gbps"), cur_env.get("copy_gbps")
    if not a or not b or a <= 0 or b <= 0:
        return None
    if max(a, b) / min(a, b) <= factor:
        return None
    return (f"the baseline was measured at {a:.1f} GB/s copy bandwidth and this run at {b:.1f} GB/s: the machine "
            f"was in a different state (load), which shifts ratios to literal beyond their noise; re-take the "
            f"baseline on a quiet machine before trusting this verdict")


def merge_runs(runs: List[List[Dict]]) -> List[Dict]:
    """One row list from several runs of the same suite: per measurement the median of the runs'
    medians, the median IQR, the summed repetitions (so the noise model sees the larger sample) and
    the median of the runs' own ratios to literal. A measurement that is not "ok" in every run keeps
    its first non-ok row (an error stays an error)."""
    if not runs:
        return []
    grouped: Dict[Tuple, List[Dict]] = {}
    order: List[Tuple] = []
    for rows in runs:
        for r in rows:
            k = row_key(r)
            if k not in grouped:
                grouped[k] = []
                order.append(k)
            grouped[k].append(r)
    merged = []
    for k in order:
        rows = grouped[k]
        bad = [r for r in rows if r.get("status") != "ok"]
        if bad or len(rows) < len(runs):
            merged.append(dict(bad[0]) if bad else {**rows[0], "status": "skipped",
                                                  "reason": f"measured in {len(rows)} of {len(runs)} runs"})
            continue
        row = dict(rows[0])
        row["median_ms"] = statistics.median(r["median_ms"] for r in rows)
        row["iqr_ms"] = statistics.median(r.get("iqr_ms") or 0.0 for r in rows)
        row["reps"] = sum(int(r.get("reps") or 0) for r in rows)
        ratios = [r["ratio_vs_literal"] for r in rows if r.get("ratio_vs_literal") is not None]
        row["ratio_vs_literal"] = statistics.median(ratios) if len(ratios) == len(rows) else None
        row["runs"] = len(rows)
        merged.append(row)
    return merged


def report(result: Dict, tolerance: float, z: float = DEFAULT_Z) -> str:
    lines = [f"checked {len(result['checked'])} provider measurements against the baseline "
             f"(tolerance {100 * tolerance:.0f}% on time / the speed factor, plus {z:g} standard errors of "
             f"the runs' own noise)",
             f"speed factor {result.get('speed_factor', 1.0):.3f} (run-to-run jitter {100 * result.get('factor_noise', 0.0):.0f}%): the "
             f"median current/baseline time of {result.get('shared', 0)} "
             + ("reference rows (literal, literal+compile, FBGEMM, TorchRec)" if result.get("factor_from_references", True)
                else "rows (too few reference rows: this project's own rows take part, so a regression common to "
                     "most of them would be divided out)")]
    if result.get("resolution") is not None:
        lines.append(f"resolution: half of the comparisons would flag a slow-down of "
                     f"{100 * (result['resolution'] - 1):.0f}% or less")
    for item in result["regressions"]:
        lines.append(f"REGRESSION {item['key']}: {item['baseline_ms']:.4g} -> {item['current_ms']:.4g} ms "
                     f"({100 * (item['change'] - 1):+.0f}% after the speed factor, flagged above "
                     f"{100 * (item['threshold'] - 1):+.0f}%)")
    for item in result["inconclusive"]:
        lines.append(f"inconclusive {item['key']}: {item['baseline_ms']:.4g} -> {item['current_ms']:.4g} ms "
                     f"({100 * (item['change'] - 1):+.0f}%, within the noise band up to "
                     f"{100 * (item['threshold'] - 1):+.0f}%; rerun with --repeat)")
    for item in result["errors"]:
        lines.append(f"ERROR {item['key']}: {item['reason']}")
    for item in result["missing"]:
        lines.append(f"missing {item['key']}" + (f": {item['reason']}" if item["reason"] else ""))
    for item in result["improved"]:
        lines.append(f"improved {item['key']}: {item['baseline_ms']:.4g} -> {item['current_ms']:.4g} ms")
    if result.get("nothing_compared"):
        lines.append("ERROR no baseline measurement has a match in the current run (different benchmark, "
                     "shape or mode?): nothing was checked")
    if result["regressions"]:
        lines.append("(regressions from one run on a shared host can be load: confirm with --repeat 3 on a quiet "
                     "machine before acting)")
    lines.append("PASS" if result["passed"] else "FAIL")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="baseline result JSON (bench/baselines/<device>.json)")
    p.add_argument("--current", default=None, help="result JSON to check (default: run the suite now)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="allowed relative slow-down of (current / baseline time) / the run's speed factor "
                        "(default 0.25)")
    p.add_argument("--z", type=float, default=DEFAULT_Z,
                   help="standard errors of measurement noise a slow-down must clear beyond the tolerance "
                        "(default 2; 0 = tolerance only)")
    p.add_argument("--strict", action="store_true",
                   help="also fail when a baseline provider is missing or a slow-down is inconclusive")
    p.add_argument("--threads", type=int, default=None, help="fresh run: CPU threads (default: the baseline's)")
    p.add_argument("--repeat", type=int, default=1,
                   help="fresh run: run the suite this many times and merge them (less noise)")
    args = p.parse_args(argv)
    if not (args.tolerance >= 0):
        p.error(f"--tolerance must be >= 0, got {args.tolerance}")
    if not (args.z >= 0):
        p.error(f"--z must be >= 0, got {args.z}")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.current and args.repeat != 1:
        p.error("--repeat applies to a fresh run, not to --current")
    from .run_all import load_rows
    try:
        baseline, base_env = load_rows(args.baseline)
    except (OSError, ValueError) as exc:
        print(f"cannot read --baseline: {exc}", file=sys.stderr)
        return 2
    if not any(_timed(r) and not is_reference(r) for r in baseline):
        print(f"--baseline {args.baseline} has no timed provider rows (is it a suite result, from "
              "bench.run_all?): nothing could be gated", file=sys.stderr)
        return 2
    if args.current:
        try:
            current, cur_env = load_rows(args.current)
        except (OSError, ValueError) as exc:
            print(f"cannot read --current: {exc}", file=sys.stderr)
            return 2
        mismatch = environment_mismatch(base_env, cur_env)
        if mismatch:
            print(f"the runs are not comparable: {mismatch}", file=sys.stderr)
            return 2
    else:
        cur_env: Dict = {}
        current = merge_runs([fresh_run(base_env, baseline, args.threads, env_out=cur_env)
                              for _ in range(args.repeat)])
        mismatch = environment_mismatch(base_env, cur_env)   # e.g. --threads other than the baseline's
        if mismatch:
            print(f"the runs are not comparable: {mismatch}", file=sys.stderr)
            return 2
    try:
        result = compare(baseline, current, args.tolerance, args.strict, args.z)
    except ValueError as exc:
        print(f"cannot compare: {exc}", file=sys.stderr)
        return 2
    warning = conditions_warning(base_env, cur_env)
    if warning:
        print(f"WARNING {warning}" + (" (fails under --strict)" if not args.strict else ""))
        if args.strict:
            result["passed"] = False
    print(report(result, args.tolerance, args.z))
    return 0 if result["passed"] else 1


def fresh_run(base_env: Dict, baseline: List[Dict], threads: Optional[int],
              env_out: Optional[Dict] = None) -> List[Dict]:
    """Run the suite in the baseline's mode, device and scripts, writing nothing (the run's env goes
    into ``env_out`` when given)."""
    from . import common, run_all
    mode = base_env.get("mode", "quick")
    scripts = sorted({r["benchmark"][len("bench_"):] for r in baseline
                      if r.get("benchmark", "").startswith("bench_")} & set(run_all.SCRIPTS))
    argv = ["--device", base_env.get("device", "cpu"), "--no-write",
            "--threads", str(threads or base_env.get("threads", 2))]
    if mode in ("quick", "smoke"):
        argv.append(f"--{mode}")
    if base_env.get("reps"):   # the baseline's repetitions, so both runs have the same noise
        argv += ["--reps", str(base_env["reps"])]
    if base_env.get("vocab_scale"):
        argv += ["--vocab-scale", str(base_env["vocab_scale"])]
    if scripts:
        argv += ["--only", ",".join(scripts)]
    if not any(r.get("provider", "").endswith("+compile") and r.get("status") == "ok" for r in baseline):
        argv.append("--no-compile")
    args = common.parse_args("fresh run for bench.regress", argv, run_all._extra)
    rows, env, _ = run_all.collect(args)
    if env_out is not None:
        env_out.update(env)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
