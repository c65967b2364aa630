"""Regression gate: compare a run with a stored baseline, by ratio to the literal provider.

Absolute times drift between machines and runs; the ratio ``provider time / literal time`` measured
in the SAME run does much less, so that is what is compared. A provider regresses when its current
ratio exceeds the baseline ratio by more than ``--tolerance`` (default 0.25 = 25% slower relative
to literal). A provider that ran in the baseline but errors now also fails the gate; one missing
from the current run is reported (and fails with ``--strict``). A current run that shares no
measurement with the baseline (another benchmark, shape or device) fails: a gate that compared
nothing has checked nothing.

    python -m bench.regress --baseline bench/baselines/cpu.json                 # runs a fresh suite
    python -m bench.regress --baseline bench/baselines/cpu.json --current FILE  # compares two files

Exit status: 0 pass, 1 regression, 2 unusable input.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

# Row fields that identify a measurement (shape and provider); everything else is a result.
KEY_FIELDS = ("benchmark", "shape", "part", "mode", "dist", "kind", "model", "sfg", "B", "N", "D", "provider")
DEFAULT_TOLERANCE = 0.25


def row_key(row: Dict) -> Tuple:
    return tuple((k, row[k]) for k in KEY_FIELDS if k in row)


def describe(key: Tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in key)


def compare(baseline: List[Dict], current: List[Dict], tolerance: float = DEFAULT_TOLERANCE,
            strict: bool = False) -> Dict:
    """Return {"regressions", "errors", "missing", "improved", "checked"} (lists of dicts), "passed" and
    "nothing_compared" (the baseline had gated rows but none of them could be compared)."""
    if not (tolerance >= 0):
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    cur = {}
    for r in current:
        cur[row_key(r)] = r
    out = {"regressions": [], "errors": [], "missing": [], "improved": [], "checked": []}
    gated = 0
    for b in baseline:
        if b.get("status") != "ok" or b.get("provider") == "literal" or b.get("ratio_vs_literal") is None:
            continue
        gated += 1
        key = row_key(b)
        c = cur.get(key)
        if c is None or c.get("status") == "skipped":
            out["missing"].append({"key": describe(key), "reason": None if c is None else c.get("reason")})
            continue
        if c.get("status") != "ok":
            out["errors"].append({"key": describe(key), "reason": c.get("reason")})
            continue
        if c.get("ratio_vs_literal") is None:
            out["errors"].append({"key": describe(key), "reason": "no literal measurement in the current run"})
            continue
        change = c["ratio_vs_literal"] / b["ratio_vs_literal"]
        item = {"key": describe(key), "baseline_ratio": b["ratio_vs_literal"],
                "current_ratio": c["ratio_vs_literal"], "change": change}
        out["checked"].append(item)
        if change > 1.0 + tolerance:
            out["regressions"].append(item)
        elif change < 1.0 / (1.0 + tolerance):
            out["improved"].append(item)
    out["nothing_compared"] = gated > 0 and not out["checked"]
    out["passed"] = (not out["regressions"] and not out["errors"] and not out["nothing_compared"]
                     and not (strict and out["missing"]))
    return out


def report(result: Dict, tolerance: float) -> str:
    lines = [f"checked {len(result['checked'])} provider measurements against the baseline "
             f"(tolerance {100 * tolerance:.0f}% on time / literal time)"]
    for item in result["regressions"]:
        lines.append(f"REGRESSION {item['key']}: ratio {item['baseline_ratio']:.4g} -> {item['current_ratio']:.4g} "
                     f"({100 * (item['change'] - 1):+.0f}%)")
    for item in result["errors"]:
        lines.append(f"ERROR {item['key']}: {item['reason']}")
    for item in result["missing"]:
        lines.append(f"missing {item['key']}" + (f": {item['reason']}" if item["reason"] else ""))
    for item in result["improved"]:
        lines.append(f"improved {item['key']}: ratio {item['baseline_ratio']:.4g} -> {item['current_ratio']:.4g}")
    if result.get("nothing_compared"):
        lines.append("ERROR no baseline measurement has a match in the current run (different benchmark, "
                     "shape or mode?): nothing was checked")
    lines.append("PASS" if result["passed"] else "FAIL")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="baseline result JSON (bench/baselines/<device>.json)")
    p.add_argument("--current", default=None, help="result JSON to check (default: run the suite now)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="allowed relative slow-down of time/literal (default 0.25)")
    p.add_argument("--strict", action="store_true", help="also fail when a baseline provider is missing")
    p.add_argument("--threads", type=int, default=None, help="fresh run: CPU threads (default: the baseline's)")
    args = p.parse_args(argv)
    if not (args.tolerance >= 0):
        p.error(f"--tolerance must be >= 0, got {args.tolerance}")
    from .run_all import load_rows
    try:
        baseline, base_env = load_rows(args.baseline)
    except (OSError, ValueError) as exc:
        print(f"cannot read --baseline: {exc}", file=sys.stderr)
        return 2
    if args.current:
        try:
            current, _ = load_rows(args.current)
        except (OSError, ValueError) as exc:
            print(f"cannot read --current: {exc}", file=sys.stderr)
            return 2
    else:
        current = fresh_run(base_env, baseline, args.threads)
    result = compare(baseline, current, args.tolerance, args.strict)
    print(report(result, args.tolerance))
    return 0 if result["passed"] else 1


def fresh_run(base_env: Dict, baseline: List[Dict], threads: Optional[int]) -> List[Dict]:
    """Run the suite in the baseline's mode, device and scripts, writing nothing."""
    from . import common, run_all
    mode = base_env.get("mode", "quick")
    scripts = sorted({r["benchmark"][len("bench_"):] for r in baseline
                      if r.get("benchmark", "").startswith("bench_")} & set(run_all.SCRIPTS))
    argv = ["--device", base_env.get("device", "cpu"), "--no-write",
            "--threads", str(threads or base_env.get("threads", 2))]
    if mode in ("quick", "smoke"):
        argv.append(f"--{mode}")
    if base_env.get("vocab_scale"):
        argv += ["--vocab-scale", str(base_env["vocab_scale"])]
    if scripts:
        argv += ["--only", ",".join(scripts)]
    if not any(r.get("provider", "").endswith("+compile") and r.get("status") == "ok" for r in baseline):
        argv.append("--no-compile")
    args = common.parse_args("fresh run for bench.regress", argv, run_all._extra)
    rows, _, _ = run_all.collect(args)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
