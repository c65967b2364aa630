"""Run the whole bench suite and write one JSON + one markdown summary (+ plots).

    python -m bench.run_all                 # every script, full shapes
    python -m bench.run_all --quick         # Criteo shape only (B=1024 where the literal path is slow), 5 reps
    python -m bench.run_all --smoke         # tiny shapes, one rep: checks every provider runs
    python -m bench.run_all --only decode,step --foundation

Output: bench/results/<device>/suite-<stamp>.json (+ .md) and bench/results/<device>/SUMMARY.md.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from . import common, plots

SCRIPTS = ("lookup", "encode", "decode", "cross", "loss", "step", "train")
TITLES = {"lookup": "embedding lookup (fwd; fwd+bwd+update)", "encode": "sfg_encode fwd+bwd",
          "decode": "pairwise_decode fwd+bwd", "cross": "generative_cross fwd+bwd",
          "loss": "bce_with_logits fwd+bwd", "step": "SFG step (lookup+encode+decode+BCE) fwd+bwd",
          "train": "training throughput, SFG vs base", "foundation": "factored torch vs literal (Criteo shape)"}
PLOTS = {"decode": plots.decode_plots, "lookup": plots.batch_plots("embedding lookup", ["mode", "dist"]),
         "step": plots.batch_plots("SFG step fwd+bwd", ["model"]), "encode": plots.batch_plots("sfg_encode", ["N"])}


def _extra(p) -> None:
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--foundation", action="store_true",
                   help="also run bench_foundation (factored vs literal at the Criteo shape; CPU)")
    p.add_argument("--models", default="", help="bench_train: comma-separated model names")


def collect(args) -> Tuple[List[Dict], Dict, List[Tuple[str, List[Dict]]]]:
    """Run the selected scripts; returns (all rows, env, [(script, rows)])."""
    names = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SCRIPTS)
    bad = [s for s in names if s not in SCRIPTS]
    if bad:
        raise SystemExit(f"--only: unknown script(s) {bad}; choose from {list(SCRIPTS)}")
    if getattr(args, "foundation", False):
        names.append("foundation")
    env = common.bench_env(args)
    parts = []
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        print(f"== bench_{name}", flush=True)
        if name == "foundation":
            if args.device != "cpu":
                continue
            for key, default in (("batch", 4096), ("fields", 39), ("dim", 16)):
                if not hasattr(args, key):
                    setattr(args, key, default)
            rows = module.run(args)
        else:
            rows = module.run(args, env)
        parts.append((name, rows))
    return [r for _, rows in parts for r in rows], env, parts


def suite_markdown(parts, env, command: str) -> str:
    md = [f"# sfg_fast benchmark summary ({env.get('device')})", "",
          "Times are medians (IQR) of forward + backward unless the table says otherwise; "
          "ratio_vs_literal = provider time / literal time in the same run (below 1 is faster). "
          "gbps / gflops use each workload's minimum-work model; pct_copy_bw is against the device-to-device "
          "copy bandwidth measured in the same run (the nominal H100 HBM figure of bench/common.py only when "
          "none was measured); pct_peak_flops (GPU) is against the H100/H200 SXM fp32 peak of bench/common.py, "
          "also for rows that may run TF32 or bf16.", "",
          f"command: `{command}`", ""]
    for name, rows in parts:
        if rows:
            md.append(common.summary_markdown(f"bench_{name}: {TITLES.get(name, name)}", rows, env))
    return "\n".join(md)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv, _extra)
    rows, env, parts = collect(args)
    command = common.command_line("run_all", args)
    md = suite_markdown(parts, env, command)
    print(md)
    errors = [r for r in rows if r["status"] == "error"]
    if args.no_write:
        return 1 if errors else 0
    path = common.write_results("suite", rows, env, md, args.out_dir, command)
    out_dir = os.path.dirname(path)
    with open(os.path.join(out_dir, "SUMMARY.md"), "w") as fh:
        fh.write(md)
    if not args.no_plots and not args.smoke:
        for name, part_rows in parts:
            if name in PLOTS:
                try:
                    for png in PLOTS[name](part_rows, os.path.join(out_dir, f"bench_{name}-{os.path.basename(path)[6:-5]}")):
                        print(f"plot: {png}")
                except ImportError as exc:
                    print(f"plots skipped: {exc}")
    print(f"results: {path}")
    if errors:
        print(f"{len(errors)} provider run(s) failed; see the 'error' rows", file=sys.stderr)
    return 1 if errors else 0


def load_rows(path: str) -> Tuple[List[Dict], Dict]:
    """Rows and env of a result JSON written by any bench script or by run_all."""
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not a bench result file (no 'rows')")
    return data["rows"], data.get("env", {})


if __name__ == "__main__":
    raise SystemExit(main())
