"""Benchmark 1: MCQ scoring throughput, rolevec's scorer against a straightforward loop.

The straightforward loop is what a user writes without rolevec (``NaiveScorer``): chat template, batches
of 8 in file order, ``model(...).logits`` over the whole vocabulary at every position. rolevec's ``score``
sorts by length, stops the forward at the final norm and multiplies only the four letter rows of the
unembedding. Both score the same questions of the paper's MMLU files, alternately, in one process.

The baseline runs in float32, as users would naively; rolevec runs in ``--dtype``. The *same-dtype* ratio
compares both in ``--dtype`` (predictions must be identical); the *cross-dtype* ratio compares rolevec in
``--dtype`` with the float32 loop (the agreement of their predictions is reported, not required).
Target: at least 3x questions/s.

    python benchmarks/bench_scoring.py [--quick] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from common import (
    Bench,
    NaiveScorer,
    accuracy,
    agreement,
    base_parser,
    cross_verdict,
    find_data,
    interleaved,
    load,
    load_questions,
    markdown_table,
    ratio,
    verdict,
)

TARGET = 3.0


def compute_ceiling(
    adapter: Any, items: Sequence[Any], batch_size: int, prepare: Any, length_batches: Any
) -> dict[str, Any]:
    """The same-dtype speed-up that work counts allow: padded tokens × weights each token passes.

    The straightforward loop pads batches of 8 in file order and runs the unembedding at every position;
    rolevec pads length-planned batches, runs the prompts' common head once per run on a CPU (one row,
    kept for every batch; accelerators read whole rows) and skips the unembedding (four rows at one
    position are free). Attention's quadratic part and fixed per-forward costs are left out.
    """
    from rolevec.model.batching import batch_overhead_tokens, shares_prefix
    from rolevec.model.prefix import PrefixMemo

    prepared, _ = prepare(adapter, items)
    share = shares_prefix(adapter.device)  # accelerators read whole rows
    lengths = [len(p.ids) for p in prepared]
    naive = sum(max(lengths[i : i + 8]) * len(lengths[i : i + 8]) for i in range(0, len(lengths), 8))
    memo = PrefixMemo([p.ids for p in prepared])
    ours = 0
    cut_rows = 0  # head tokens the rows do not run themselves
    heads: set[tuple[int, ...]] = set()
    for b in length_batches(prepared, batch_size, overhead_tokens=batch_overhead_tokens(adapter.device)):
        parts = memo.split(adapter.pad([prepared[i].ids for i in b], padding_side="right")) if share else None
        head = parts.length if parts is not None else 0
        ours += len(b) * (max(lengths[i] for i in b) - head)
        cut_rows += len(b) * head
        if head:
            heads.add(prepared[b[0]].ids[:head])
    head_tokens = sum(len(h) for h in heads)  # each distinct head runs once
    ours += head_tokens
    shared = cut_rows - head_tokens
    blocks = sum(p.numel() for blk in adapter.blocks for p in blk.parameters())
    head_weights = int(adapter.unembed.weight.numel())
    return {
        "real_tokens": sum(lengths),
        "padded_tokens_straightforward": naive,
        "padded_tokens_rolevec": ours,
        "prefix_tokens_saved": shared,
        "head_share": head_weights / (blocks + head_weights),
        "ceiling": naive * (blocks + head_weights) / (ours * blocks),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--per-domain", type=int, default=None, help="questions per domain (default 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="rolevec's batch size (default 16)")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip the batching-only variant (skipped with --quick)"
    )
    args = parser.parse_args(argv)
    bench = Bench(args, "scoring")
    data = find_data(args.data)
    per_domain = args.per_domain or (3 if args.quick else 16)

    from rolevec.evaluation.conditions import score
    from rolevec.evaluation.scoring import LetterScorer, length_batches, prepare

    items = load_questions(data, per_domain)
    n = len(items)
    print(f"{n} questions ({per_domain} per domain, file order) from {data / 'mmlu_domains'}", flush=True)
    adapters = {"float32": load("float32", args)}
    if args.dtype != "float32":
        adapters[args.dtype] = load(args.dtype, args)
    bench.mark("load")
    dtype = args.dtype
    ceiling = compute_ceiling(adapters[dtype], items, args.batch_size, prepare, length_batches)
    fast = LetterScorer(adapters[dtype])
    full = LetterScorer(adapters[dtype], fast=False)
    naive32 = NaiveScorer(adapters["float32"])

    def rolevec(scorer: LetterScorer, subset: Sequence[Any]) -> list[str]:
        return [r.pred for r in score(adapters[dtype], subset, scorer=scorer, batch_size=args.batch_size)]

    names = {
        "naive32": "straightforward, float32",
        "naive": f"straightforward, {dtype}",
        "sorted": f"rolevec batching, full logits, {dtype}",
        "rolevec": f"rolevec score(), {dtype}",
    }
    warm = items[: min(16, n)]
    methods: dict[str, Any] = {
        names["naive32"]: lambda: naive32.predict(items),
        names["rolevec"]: lambda: rolevec(fast, items),
    }
    warmup: dict[str, Any] = {
        "naive32": lambda: naive32.predict(warm),
        "rolevec": lambda: rolevec(fast, warm),  # runs the one-batch parity probe
    }
    breakdown = not args.quick and not args.no_breakdown
    if breakdown:  # how much of the gain is batching alone (length-sorted, batch 16, full logits)
        methods[names["sorted"]] = lambda: rolevec(full, items)
        warmup["sorted"] = lambda: rolevec(full, warm)
    else:
        del names["sorted"]
    if dtype != "float32":
        naive_d = NaiveScorer(adapters[dtype])
        methods[names["naive"]] = lambda: naive_d.predict(items)
        warmup["naive"] = lambda: naive_d.predict(warm)
    else:
        names["naive"] = names["naive32"]
    timings = interleaved(methods, args.repeats, warmup=warmup)
    bench.add_timings(timings)

    preds = {k: timings[v].result for k, v in names.items()}
    t = {k: timings[v] for k, v in names.items()}
    same = ratio(t["naive"].best, t["rolevec"].best)
    cross = ratio(t["naive32"].best, t["rolevec"].best)
    same_median = ratio(t["naive"].median, t["rolevec"].median)
    cross_median = ratio(t["naive32"].median, t["rolevec"].median)
    identical = preds["rolevec"] == preds["naive"]
    cross_agree = agreement(preds["rolevec"], preds["naive32"])
    same_verdict = verdict(same, TARGET, at_least=True) if identical else "MISSED (predictions differ)"
    cross_verdict_text = cross_verdict(cross_agree, verdict(cross, TARGET, at_least=True))
    rows = []
    for key in ("naive32", "naive", "sorted", "rolevec"):
        if key not in t or (key == "naive" and dtype == "float32"):
            continue
        tm = t[key]
        rows.append(
            [
                names[key],
                f"{n / tm.best:.2f}",
                f"{tm.best:.2f}",
                f"{tm.median:.2f}",
                f"{ratio(t['naive32'].best, tm.best):.2f}x",
                f"{ratio(t['naive'].best, tm.best):.2f}x",
                f"{agreement(preds[key], preds['naive']):.1%}",
                f"{accuracy(items, preds[key]):.3f}",
                f"{tm.extra_mb:.0f}",
            ]
        )
    table = markdown_table(
        [
            "method",
            "questions/s",
            "best s",
            "median s",
            "vs straightforward fp32",
            f"vs straightforward {dtype}",
            f"same preds as straightforward {dtype}",
            "accuracy",
            "extra RSS MiB",
        ],
        rows,
    )
    lines = [
        f"same-dtype ({dtype} vs {dtype}): {same:.2f}x questions/s (median {same_median:.2f}x), "
        f"target >= {TARGET:g}x: {same_verdict}; predictions identical: "
        f"{'yes' if identical else 'NO'} ({agreement(preds['rolevec'], preds['naive']):.1%})",
        f"cross-dtype (rolevec {dtype} vs straightforward float32): {cross:.2f}x "
        f"(median {cross_median:.2f}x), "
        f"target >= {TARGET:g}x with the same predictions: {cross_verdict_text}; prediction agreement "
        f"{agreement(preds['rolevec'], preds['naive32']):.1%}",
        f"scorer mode: {fast.mode}, parity probe max |difference| {fast.probe_error}",
        f"same-dtype ceiling from work counts: {ceiling['ceiling']:.2f}x (tokens run: straightforward "
        f"{ceiling['padded_tokens_straightforward']} padded, rolevec {ceiling['padded_tokens_rolevec']} "
        f"padded after sharing {ceiling['prefix_tokens_saved']} prefix tokens, "
        f"real {ceiling['real_tokens']}; "
        f"the unembedding is {ceiling['head_share']:.1%} of a token's weights)",
    ]
    table += "\n\n" + "\n".join(lines)
    bench.data.update(
        {
            "questions": n,
            "per_domain": per_domain,
            "rolevec_batch_size": args.batch_size,
            "straightforward_batch_size": naive32.batch_size,
            "methods": {k: {"label": names[k], **t[k].to_json()} for k in t},
            "questions_per_s": {k: n / t[k].best for k in t},
            "same_dtype_ratio": same,
            "same_dtype_ratio_median": same_median,
            "cross_dtype_ratio": cross,
            "cross_dtype_ratio_median": cross_median,
            "target": TARGET,
            "same_dtype_target": verdict(same, TARGET, at_least=True)
            if identical
            else "MISSED (predictions differ)",
            "cross_dtype_target": cross_verdict_text,
            "identical_predictions_same_dtype": identical,
            "agreement_same_dtype": agreement(preds["rolevec"], preds["naive"]),
            "agreement_cross_dtype": agreement(preds["rolevec"], preds["naive32"]),
            "scorer_mode": fast.mode,
            "ceiling": ceiling,
            "probe_error": fast.probe_error,
        }
    )
    bench.finish(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
