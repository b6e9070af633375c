"""Run every benchmark, each in a fresh process (a clean peak-memory figure per benchmark and dtype).

Writes each script's JSON into the results folder, then ``latest.json`` (all of them, with the machine)
and ``latest.md`` (one summary table with targets met or missed).

    python benchmarks/run_all.py [--quick] [--dtypes float32,bfloat16] [--only scoring,sweep] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    cross_verdict,
    find_data,
    machine_info,
    markdown_table,
    model_label,
    run_tag,
    write_json,
)

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("scoring", "sweep", "extraction", "generation", "cost")


def sweep_lower_bound(r: dict[str, Any]) -> float:
    """Blocks of a sweep that keeps the baseline's residuals, over independent runs (older files lack it)."""
    if "lower_bound_time_ratio" in r["theory"]:
        return float(r["theory"]["lower_bound_time_ratio"])
    from bench_sweep import theoretical

    cands = [(int(layer), int(r["position"]), float(a)) for layer in r["layers"] for a in r["alphas"]]
    return theoretical(int(r["n_layers"]), cands)["lower_bound_time_ratio"]


def summary_rows(name: str, dtype: str, r: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: benchmark, dtype, rolevec, baseline, ratio, target, verdict, peak RSS,
    and when the row was measured (a summary may gather runs of several days)."""
    rows = _rows(name, dtype, r)
    return [[*row, str(r.get("created", ""))[:16].replace("T", " ")] for row in rows]


def _rows(name: str, dtype: str, r: dict[str, Any]) -> list[list[str]]:
    peak = f"{r['peak_rss_mb']:.0f}" + (f" / GPU {r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "")
    m = r["methods"]
    if name == "scoring":
        q = r["questions_per_s"]
        rows = [
            [
                f"1. MCQ scoring, {r['questions']} q (same dtype)",
                dtype,
                f"{q['rolevec']:.2f} q/s",
                f"{q['naive']:.2f} q/s",
                f"{r['same_dtype_ratio']:.2f}x",
                ">= 3x",
                (
                    f"{r['same_dtype_target']} (identical preds: True)"
                    if r["identical_predictions_same_dtype"]
                    else f"MISSED (predictions differ: agreement {r['agreement_same_dtype']:.1%})"
                ),
                peak,
            ]
        ]
        if dtype != "float32":
            rows.append(
                [
                    "1. MCQ scoring (rolevec vs straightforward fp32)",
                    f"{dtype} vs float32",
                    f"{q['rolevec']:.2f} q/s",
                    f"{q['naive32']:.2f} q/s",
                    f"{r['cross_dtype_ratio']:.2f}x",
                    ">= 3x, same predictions",
                    cross_verdict(
                        r["agreement_cross_dtype"], "met" if r["cross_dtype_ratio"] >= 3 else "MISSED"
                    ),
                    peak,
                ]
            )
        return rows
    if name == "sweep":
        k = r["k_candidates"]
        rows = [
            [
                f"2. sweep of {k} candidates + baseline vs straightforward",
                dtype,
                f"{m['sweep']['best_s']:.1f} s",
                f"{m['naive']['best_s']:.1f} s",
                f"{r['time_ratio_vs_straightforward']:.3f}x time",
                "<= 0.35x",
                r["target_vs_straightforward"],
                peak,
            ],
            [
                "2. sweep vs rolevec fast independent",
                dtype,
                f"{m['sweep']['best_s']:.1f} s",
                f"{m['fast']['best_s']:.1f} s",
                f"{r['time_ratio_vs_fast_independent']:.3f}x time",
                f"<= 0.35x (this implementation's block count {r['theory']['ceiling_time_ratio']:.3f}x, "
                f"lower bound {sweep_lower_bound(r):.3f}x)",
                r["target_vs_fast_independent"],
                peak,
            ],
        ]
        if "cross_dtype_time_ratio" in r:
            rows.append(
                [
                    "2. sweep vs straightforward fp32",
                    f"{dtype} vs float32",
                    f"{m['sweep']['best_s']:.1f} s",
                    f"{m['naive32']['best_s']:.1f} s",
                    f"{r['cross_dtype_time_ratio']:.3f}x time",
                    "<= 0.35x, same predictions",
                    (
                        r["cross_dtype_target"]
                        if "predictions" in str(r["cross_dtype_target"])
                        else "no verdict (another dtype: predictions differ)"
                    ),
                    peak,
                ]
            )
        c = r["cache_tight"]
        rows.append(
            [
                "2. sweep cache bound (tight run)",
                dtype,
                f"largest cache {c['largest_cache_bytes'] / 2**20:.2f} MiB",
                f"bound {c['bound_bytes'] / 2**20:g} MiB",
                f"{m['tight']['best_s'] / m['sweep']['best_s']:.2f}x time of default bound",
                "within bound",
                "met" if c["within_bound"] else "MISSED",
                peak,
            ]
        )
        return rows
    if name == "extraction":
        p = r["prompts_per_s"]
        return [
            [
                f"3. extraction, {r['prompts']} prompts vs bare forward",
                dtype,
                f"{p['rolevec']:.1f} prompts/s",
                f"{p['full']:.1f} prompts/s",
                f"{r['ratio_vs_full_forward']:.3f}x",
                ">= 0.9x",
                r["target_vs_full_forward"],
                peak,
            ],
            [
                "3. extraction vs bare decoder stack (no unembedding)",
                dtype,
                f"{p['rolevec']:.1f} prompts/s",
                f"{p['backbone']:.1f} prompts/s",
                f"{r['ratio_vs_backbone']:.3f}x",
                ">= 0.9x",
                r["target_vs_backbone"],
                peak,
            ],
        ]
    if name == "generation":
        tps = r["tokens_per_s"]
        plain = max(tps["plain_a"], tps["plain_b"])
        rows = [
            [
                "4. generation, hooks vs unsteered",
                dtype,
                f"{tps['hooks']:.1f} tok/s",
                f"{plain:.1f} tok/s",
                f"{r['hook_slowdown']:+.1%} time",
                "<= +5%",
                r["hook_target_verdict"],
                peak,
            ]
        ]
        same = r.get("folded_tokens_identical_to_hooks", True)
        folded_note = "" if same else " (speed; its tokens differ from hooked steering)"
        if r.get("folded_difference") is not None:
            rows.append(
                [
                    "4. generation, folded vs unsteered deep copy",
                    dtype,
                    f"{tps['folded']:.1f} tok/s",
                    f"{tps.get('copy', plain):.1f} tok/s",
                    f"{r['folded_difference']:+.1%} time",
                    f"within noise (±{r['noise_band']:.1%})",
                    r["folded_target_verdict"] + folded_note,
                    peak,
                ]
            )
        return rows
    if name == "cost":
        h = r["projected_hours"]
        return [
            [
                f"5. paper preset, {r['total_inferences']:,} inferences, {r.get('hours_on', 'CPU')} hours",
                f"{dtype} vs float32",
                f"{h['rolevec']:.1f} h",
                f"{h['straightforward_float32']:.1f} h",
                f"{h['straightforward_float32'] / h['rolevec']:.1f}x cheaper",
                "order of magnitude",
                "met" if h["straightforward_float32"] / h["rolevec"] >= 10 else "MISSED",
                peak,
            ]
        ]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--rebuild", action="store_true", help="run nothing: rebuild latest.md/json from the result files"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument("--model", default=None, help="as in each script (default: the embedded model)")
    parser.add_argument("--tokenizer", default=None, help="as in each script, for --model random:SHAPE")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rolevec's batch size where a script takes one"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds each script may run before it is stopped"
    )
    parser.add_argument(
        "--skip", default="", help="NAME:DTYPE pairs to leave out, e.g. generation:float32 (large models)"
    )
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be positive seconds, not {args.timeout:g}")
    tag = run_tag(args.device, args.model)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    data = find_data(args.data)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in BENCHMARKS]
    if unknown:
        sys.exit(f"run_all: error: unknown benchmark(s) {unknown}: pick from {', '.join(BENCHMARKS)}")
    results = Path(args.results)
    collected: dict[str, Any] = {}
    failures: list[str] = []
    for name in [] if args.rebuild else only:
        for dtype in dtypes:
            if f"{name}:{dtype}" in skip:
                continue
            cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--dtype", dtype, "--data", str(data)]
            cmd += ["--threads", str(args.threads), "--results", str(results), "--device", args.device]
            if args.model:
                cmd += ["--model", args.model]
            if args.tokenizer:
                cmd += ["--tokenizer", args.tokenizer]
            if args.batch_size and name != "generation":
                cmd += ["--batch-size", str(args.batch_size)]
            if args.quick:
                cmd.append("--quick")
            if args.repeats:
                cmd += ["--repeats", str(args.repeats)]
            if name == "sweep" and dtype != "float32" and not args.quick:
                cmd.append("--cross")
            print(f"\n=== {name} ({dtype}) ===", flush=True)
            start = time.perf_counter()
            try:
                code = subprocess.call(cmd, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                failures.append(f"{name} ({dtype}): stopped after {args.timeout:g} s (--timeout)")
                continue
            elapsed = time.perf_counter() - start
            path = results / f"{name}-{dtype}{tag}{'-quick' if args.quick else ''}.json"
            if code != 0 or not path.exists():
                failures.append(f"{name} ({dtype}): exit status {code}")
                continue
            result = json.loads(path.read_text(encoding="utf-8"))
            result["wall_s_total"] = round(elapsed, 1)
            collected[f"{name}-{dtype}"] = result
    for name in BENCHMARKS:  # results of benchmarks not rerun now stay in the summary, marked as older
        for dtype in dtypes:
            path = results / f"{name}-{dtype}{tag}{'-quick' if args.quick else ''}.json"
            if f"{name}-{dtype}" not in collected and path.exists():
                older = json.loads(path.read_text(encoding="utf-8"))
                older["from_earlier_run"] = True
                collected[f"{name}-{dtype}"] = older
    collected = {
        f"{n}-{d}": collected[f"{n}-{d}"] for n in BENCHMARKS for d in dtypes if f"{n}-{d}" in collected
    }
    rows = [row for r in collected.values() for row in summary_rows(r["benchmark"], r["machine"]["dtype"], r)]
    info = machine_info(args.threads, ",".join(dtypes), args.device, args.model)
    gpu = f"GPU: {info['gpu']} ({args.device}); " if args.device != "cpu" else ""
    head = (
        f"Machine: {gpu}{info['cpu']}, {info['cores']} cores ({', '.join(info['cpu_flags'])}), torch "
        f"{info['torch']}, transformers {info['transformers']}, {args.threads} thread(s); model: "
        f"{model_label(args.model)}; {'quick' if args.quick else 'default'} sizes; table rebuilt "
        f"{time.strftime('%Y-%m-%d')} (each row's run time is in its last column)."
    )
    memory = "peak RSS MiB" + (" / GPU MiB" if args.device != "cpu" else "")
    table = markdown_table(
        ["benchmark", "dtype", "rolevec", "baseline", "ratio", "target", "verdict", memory, "measured"], rows
    )
    md = head + "\n\n" + table + "\n"
    if failures:
        md += "\nFailed: " + "; ".join(failures) + "\n"
    suffix = tag + ("-quick" if args.quick else "")
    write_json(results / f"latest{suffix}.json", {"machine": info, "results": collected, "failed": failures})
    tmp = results / f".latest{suffix}.md.tmp"
    tmp.write_text(md, encoding="utf-8")
    tmp.replace(results / f"latest{suffix}.md")
    print("\n" + md)
    print(f"wrote {results / f'latest{suffix}.json'} and {results / f'latest{suffix}.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
