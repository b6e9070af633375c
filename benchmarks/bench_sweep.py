"""Benchmark 2: a validation sweep over k candidate layers, against k independent evaluations.

Three ways to score the baseline plus every addition candidate (layer × α, one position) of one role on
the validation questions of its domain, from the paper's data, alternately in one process:

* straightforward, independent: per candidate an addition hook and the straightforward loop (batches of
  8 in file order, full logits), i.e. k + 1 full evaluations;
* rolevec fast scorer, independent: ``score()`` per candidate (length-sorted, four letter rows);
* rolevec ``run_sweep``: the unsteered residual is advanced layer by layer per question batch and each
  candidate runs only the blocks from its layer up (reuse), within the ``max_cache_bytes`` bound.

Target: the sweep in at most 0.35x the time of the independent evaluations. The sweep's one-time
mid-stack parity probe (kept on the scorer for every later sweep) falls in the first round. The
theoretical ceiling of reuse against the fast independent runs is computed from block counts for the
chosen layers and printed beside the measured figure. A single extra run with a tight cache bound
shows that the cache stays within the bound (batches shrink) and what that costs.

    python benchmarks/bench_sweep.py [--quick] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common import (
    Bench,
    NaiveScorer,
    Timing,
    agreement,
    base_parser,
    cross_verdict,
    find_data,
    interleaved,
    load,
    markdown_table,
    ratio,
    timed,
    verdict,
)

TARGET = 0.35
Candidate = tuple[int, int, float]


def theoretical(n_layers: int, cands: Sequence[Candidate]) -> dict[str, float]:
    """Block evaluations of independent runs and of the reusing sweep (baseline included in both).

    Independent: (k + 1) full stacks. Reuse, as implemented: one full stack for the baseline, the
    unsteered residual advanced again up to the highest candidate layer, and n_layers − l blocks per
    candidate at layer l. The lower bound of the approach keeps the baseline's own residuals instead of
    advancing them again (not a floor for this implementation). The parity probe (4 questions) and the
    unembedding are left out.
    """
    independent = (len(cands) + 1) * n_layers
    tails = sum(n_layers - c[0] for c in cands)
    reuse = n_layers + max(c[0] for c in cands) + tails
    only_cands = tails / (len(cands) * n_layers)
    return {
        "independent_blocks_per_question": independent,
        "reuse_blocks_per_question": reuse,
        "ceiling_speedup": independent / reuse,
        "ceiling_time_ratio": reuse / independent,
        "lower_bound_time_ratio": (n_layers + tails) / independent,
        "candidate_block_fraction": only_cands,
    }


def cache_bound_report(result: dict[str, Any], bound: int) -> dict[str, Any]:
    """What the sweep itself measured: the most residual bytes it held at once (a cache group's cached
    residuals plus one forward's stacked copies), against the bound it was given."""
    stats = result["stats"]
    return {
        "bound_bytes": bound,
        "largest_cache_bytes": stats["largest_cache_bytes"],
        "within_bound": stats["largest_cache_bytes"] <= bound,
        "cache_groups": stats["cache_groups"],
        "forwards": stats["forwards"],
        "prefix_runs": stats["prefix_runs"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--role", default="lawyer", help="role whose vector is swept (default lawyer)")
    parser.add_argument("--questions", type=int, default=None, help="validation questions (default 16)")
    parser.add_argument("--layer-step", type=int, default=None, help="every n-th layer (default 4)")
    parser.add_argument("--alphas", default="1,3")
    parser.add_argument("--position", type=int, default=-1)
    parser.add_argument("--n-prompts", type=int, default=None, help="prompts per set for the vector")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-cache-mb", type=float, default=None, help="run_sweep's bound (default 512)")
    parser.add_argument("--tight-cache-mb", type=float, default=4.0, help="bound of the extra bounded run")
    parser.add_argument(
        "--cross", action="store_true", help="also time the straightforward loop in float32 (bfloat16 runs)"
    )
    args = parser.parse_args(argv)
    bench = Bench(args, "sweep", quick_repeats=2)
    data = find_data(args.data)

    from rolevec.core.records import RecordStore, read_records
    from rolevec.data.mcq import load_mcq, make_split
    from rolevec.data.sources import load_base, load_role_prompts, role_domain, sample
    from rolevec.evaluation.conditions import Condition, score
    from rolevec.evaluation.scoring import LetterScorer
    from rolevec.evaluation.sweep import DEFAULT_MAX_CACHE_BYTES, default_layers, run_sweep
    from rolevec.steering.interventions import add
    from rolevec.vectors.extraction import extract_role_vectors

    dtype = args.dtype
    adapter = load(dtype, args)
    adapter32 = load("float32", args) if args.cross and dtype != "float32" else None
    bench.mark("load")
    n_layers = adapter.n_layers
    domain = str(role_domain(args.role))
    mcq = load_mcq(data / "mmlu_domains", [domain])
    n_q = args.questions or (6 if args.quick else 16)
    items = make_split(mcq, seed=0).select(mcq, domain, "val", n_q)
    n_prompts = args.n_prompts or (16 if args.quick else 32)
    role_set = sample(load_role_prompts(args.role, data / "roles"), n_prompts, 42)
    base_set = sample(load_base(data / "base" / "alpaca_train.json"), n_prompts, 42)
    vectors = extract_role_vectors(adapter, {args.role: role_set}, base_set, seed=42, progress=False)

    a, b = default_layers(n_layers)
    step = args.layer_step or (8 if args.quick else 4)
    layers = list(range(a, b, step))
    alphas = tuple(float(x) for x in args.alphas.split(","))
    pos = args.position
    cands: list[Candidate] = [(layer, pos, al) for layer in layers for al in alphas]
    theory = theoretical(n_layers, cands)
    bound = int(args.max_cache_mb * 2**20) if args.max_cache_mb else DEFAULT_MAX_CACHE_BYTES
    has_step = "layer_step" in inspect.signature(run_sweep).parameters
    print(
        f"role {args.role} ({domain}), {len(items)} validation questions, layers {layers} of {n_layers} "
        f"(first 80%: {a}..{b - 1}), α {alphas}, position {pos}: k = {len(cands)} candidates + baseline",
        flush=True,
    )

    scorer = LetterScorer(adapter)
    naive = NaiveScorer(adapter)

    def vec(layer: int) -> torch.Tensor:
        return vectors.vector(args.role, layer, pos)

    def straightforward(scorer_: NaiveScorer, adapter_: Any) -> dict[Any, list[str]]:
        out: dict[Any, list[str]] = {"baseline": scorer_.predict(items)}
        for c in cands:
            with add(adapter_, vec(c[0]), layers=c[0], alpha=c[2]):
                out[c] = scorer_.predict(items)
        return out

    def fast_independent() -> dict[Any, list[str]]:
        out: dict[Any, list[str]] = {"baseline": [r.pred for r in score(adapter, items, scorer=scorer)]}
        for c in cands:
            cond = Condition.make("add", role=args.role, layer=c[0], position=c[1], alpha=c[2])
            out[c] = [r.pred for r in score(adapter, items, cond, vectors=vectors, scorer=scorer)]
        return out

    def sweep(max_cache: int) -> dict[Any, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "records.jsonl"
            kwargs: dict[str, Any] = {
                "domain": domain,
                "positions": [pos],
                "alphas": alphas,
                "batch_size": args.batch_size,
                "max_cache_bytes": max_cache,
                "ablate_scope": "none",
                "scorer": scorer,
                "progress": False,
            }
            if has_step:
                kwargs.update(layers=(layers[0], layers[-1] + 1), layer_step=step)
            else:  # an older run_sweep: a contiguous range of the same size
                kwargs.update(layers=(a, a + len(layers)))
            with RecordStore(path) as store:
                result = run_sweep(adapter, vectors, args.role, items, store, **kwargs)
            by: dict[Any, dict[str, str]] = {}
            for r in read_records(path):
                key = "baseline" if r["condition"] == "baseline" else (r["layer"], r["position"], r["alpha"])
                by.setdefault(key, {})[r["qid"]] = r["pred"]
        preds = {k: [v[it.qid] for it in items] for k, v in by.items()}
        return {
            "preds": preds,
            "mode": result.reuse,
            "probe_error": result.probe_error,
            "stats": result.stats,
        }

    names = {
        "naive": f"straightforward, k+1 independent, {dtype}",
        "fast": f"rolevec score(), k+1 independent, {dtype}",
        "sweep": f"rolevec run_sweep (reuse), {dtype}",
    }
    methods: dict[str, Any] = {
        names["naive"]: lambda: straightforward(naive, adapter),
        names["fast"]: fast_independent,
        names["sweep"]: lambda: sweep(bound),
    }
    warm = items[:4]
    warmup: dict[str, Any] = {"naive": lambda: naive.predict(warm), "fast": lambda: score(adapter, warm)}
    if adapter32 is not None:
        naive32 = NaiveScorer(adapter32)
        names["naive32"] = "straightforward, k+1 independent, float32"
        methods[names["naive32"]] = lambda: straightforward(naive32, adapter32)
        warmup["naive32"] = lambda: naive32.predict(warm)
    timings = interleaved(methods, args.repeats, warmup=warmup)
    t = {k: timings[v] for k, v in names.items()}

    print(f"  one more run with a tight cache bound of {args.tight_cache_mb:g} MiB", flush=True)
    tight_bytes = int(args.tight_cache_mb * 2**20)
    t["tight"] = Timing(f"rolevec run_sweep (reuse), cache bound {args.tight_cache_mb:g} MiB, {dtype}")
    timed(t["tight"], lambda: sweep(tight_bytes))
    names["tight"] = t["tight"].name
    bench.add_timings({k: v for k, v in t.items()})

    preds: dict[str, dict[Any, list[str]]] = {
        "naive": t["naive"].result,
        "fast": t["fast"].result,
        "sweep": t["sweep"].result["preds"],
        "tight": t["tight"].result["preds"],
    }
    if "naive32" in t:
        preds["naive32"] = t["naive32"].result
    keys = ["baseline", *cands] if has_step else None

    def agree(x: str, y: str) -> float:
        # with the contiguous fallback, compare what both hold
        common_keys = [k for k in preds[x] if k in preds[y]] if keys is None else keys
        a_ = [p for k in common_keys for p in preds[x][k]]
        b_ = [p for k in common_keys for p in preds[y][k]]
        return agreement(a_, b_)

    cache = cache_bound_report(t["sweep"].result, bound)
    cache_tight = cache_bound_report(t["tight"].result, tight_bytes)
    rows = []
    for key in ("naive32", "naive", "fast", "sweep", "tight"):
        if key not in t:
            continue
        tm = t[key]
        rows.append(
            [
                names[key],
                f"{tm.best:.2f}",
                f"{tm.median:.2f}",
                f"{ratio(tm.best, t['naive'].best):.3f}x",
                f"{ratio(tm.best, t['fast'].best):.3f}x",
                f"{agree(key, 'naive'):.1%}",
                f"{tm.extra_mb:.0f}",
            ]
        )
    table = markdown_table(
        [
            "method",
            "best s",
            "median s",
            f"time vs straightforward {dtype}",
            "time vs rolevec independent",
            "same preds as straightforward",
            "extra RSS MiB",
        ],
        rows,
    )
    vs_naive = ratio(t["sweep"].best, t["naive"].best)
    vs_fast = ratio(t["sweep"].best, t["fast"].best)
    lines = [
        f"k = {len(cands)} candidates ({len(layers)} layers × {len(alphas)} α) + baseline, "
        f"{len(items)} questions, reuse mode: {t['sweep'].result['mode']}"
        + ("" if has_step else " (run_sweep has no layer_step: contiguous layers used)"),
        f"sweep vs straightforward independent ({dtype}): {vs_naive:.3f}x the time "
        f"(median {ratio(t['sweep'].median, t['naive'].median):.3f}x), target <= {TARGET}: "
        f"{verdict(vs_naive, TARGET, at_least=False)}",
        f"sweep vs rolevec-fast independent ({dtype}): {vs_fast:.3f}x the time "
        f"(median {ratio(t['sweep'].median, t['fast'].median):.3f}x), target <= {TARGET}: "
        f"{verdict(vs_fast, TARGET, at_least=False)}; this implementation's block count "
        f"{theory['ceiling_time_ratio']:.3f}x (lower bound with the baseline's residuals kept "
        f"{theory['lower_bound_time_ratio']:.3f}x; "
        f"the candidates alone run {theory['candidate_block_fraction']:.1%} of the blocks)",
    ]
    if "naive32" in t:
        cross = ratio(t["sweep"].best, t["naive32"].best)
        lines.append(
            f"cross-dtype: sweep in {dtype} vs straightforward float32: {cross:.3f}x the time, target <= "
            f"{TARGET} with the same predictions: "
            f"{cross_verdict(agree('sweep', 'naive32'), verdict(cross, TARGET, at_least=False))}; "
            f"prediction agreement {agree('sweep', 'naive32'):.1%}"
        )
    lines.append(
        f"cache bound {bound / 2**20:g} MiB: largest cached residual + stacked copies "
        f"{cache['largest_cache_bytes'] / 2**20:.2f} MiB ({cache['cache_groups']} cache group(s), "
        f"{cache['forwards']} forwards); tight bound {args.tight_cache_mb:g} MiB: largest "
        f"{cache_tight['largest_cache_bytes'] / 2**20:.2f} MiB ({cache_tight['cache_groups']} group(s), "
        f"{cache_tight['forwards']} forwards), within bound: {cache_tight['within_bound']} (as the sweep "
        "measured it)"
    )
    table += "\n\n" + "\n".join(lines)
    bench.data.update(
        {
            "role": args.role,
            "domain": domain,
            "questions": len(items),
            "layers": layers,
            "alphas": list(alphas),
            "position": pos,
            "k_candidates": len(cands),
            "n_layers": n_layers,
            "methods": {k: {"label": names[k], **t[k].to_json()} for k in t},
            "time_ratio_vs_straightforward": vs_naive,
            "time_ratio_vs_fast_independent": vs_fast,
            "target": TARGET,
            "target_vs_straightforward": verdict(vs_naive, TARGET, at_least=False),
            "target_vs_fast_independent": verdict(vs_fast, TARGET, at_least=False),
            "theory": theory,
            "agreement": {k: agree(k, "naive") for k in preds},
            "identical_predictions_sweep_vs_straightforward": agree("sweep", "naive") == 1.0,
            "reuse_mode": t["sweep"].result["mode"],
            "probe_error": t["sweep"].result["probe_error"],
            "cache": cache,
            "cache_tight": cache_tight,
            "layer_step_supported": has_step,
        }
    )
    if "naive32" in t:
        cross = ratio(t["sweep"].best, t["naive32"].best)
        bench.data["cross_dtype_time_ratio"] = cross
        bench.data["cross_dtype_target"] = cross_verdict(
            agree("sweep", "naive32"), verdict(cross, TARGET, at_least=False)
        )
    bench.finish(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
