"""Benchmark 4: generation tokens/s, unsteered vs steered with hooks vs steered by folded weights.

rolevec's decoding loop (KV cache, greedy, batch of one: interactive use) runs a fixed number of new
tokens per prompt (end-of-sequence ignored, so every method decodes exactly the same number of tokens)
on the unsteered model, on the same model with an addition hook (one layer, α·d at every position), and
on a deep copy with the addition folded into an MLP bias. Alternately, in one process; the unsteered run
is timed twice per round (A and B) so the A/B difference shows the noise floor.
Targets: hooks at most 5% slower than unsteered; folded within noise of unsteered.

    python benchmarks/bench_generation.py [--quick] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from common import Bench, base_parser, find_data, interleaved, load, markdown_table, ratio

HOOK_TARGET = 0.05


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--role", default="mathematician")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per run (default 4, quick 2)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 64)")
    args = parser.parse_args(argv)
    bench = Bench(args, "generation", repeats=5, quick_repeats=3)
    data = find_data(args.data)

    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.model.loading import ModelAdapter
    from rolevec.steering.folding import fold
    from rolevec.steering.generation import _decode
    from rolevec.steering.interventions import resolve_steering
    from rolevec.vectors.extraction import extract_role_vectors

    adapter = load(args.dtype, args)
    bench.mark("load")
    role_set = sample(load_role_prompts(args.role, data / "roles"), 32, 42)
    base_set = sample(load_base(data / "base" / "alpaca_train.json"), 32, 42)
    vectors = extract_role_vectors(adapter, {args.role: role_set}, base_set, seed=42, progress=False)
    steer = resolve_steering(vectors, args.role, layers=args.layer, alpha=args.alpha, adapter=adapter)
    fold_error = None
    try:
        folded = fold(adapter, steer)
    except Exception as exc:  # a fold refused on this model/dtype is reported, not hidden
        folded, fold_error = None, f"{type(exc).__name__}: {exc}"
        print(f"fold failed: {fold_error}")
    # The folded model is a deep copy; an unsteered deep copy shows what a second allocation of the same
    # weights alone does to speed, so the folded weights are compared with a copy like themselves.
    plain_copy = ModelAdapter(
        copy.deepcopy(adapter.model), adapter.tokenizer, name=adapter.name, source=dict(adapter.source)
    )
    bench.mark("fold")
    n_prompts = args.prompts or (2 if args.quick else 4)
    tokens = args.tokens or (32 if args.quick else 64)
    prompts = list(sample(load_role_prompts("teacher", data / "roles"), n_prompts, 7).prompts)
    tok = adapter.tokenizer
    rows = [
        list(tok(adapter.render(p), add_special_tokens=adapter.chat.add_special_tokens)["input_ids"])
        for p in prompts
    ]
    print(f"{n_prompts} prompts × {tokens} new tokens, batch 1, greedy; steering: {steer.describe()}")

    def run(model_adapter: Any) -> list[list[int]]:
        out = []
        for r in rows:
            ids, _ = _decode(
                model_adapter,
                [r],
                max_new_tokens=tokens,
                temperature=0.0,
                seed=0,
                use_cache=True,
                stop_ids=set(),
                on_token=None,
                progress=False,
            )
            out.append(ids[0])
        return out

    def hooked_run() -> list[list[int]]:
        with steer.apply(adapter):
            return run(adapter)

    names = {
        "plain_a": f"unsteered (A), {args.dtype}",
        "plain_b": f"unsteered (B), {args.dtype}",
        "hooks": f"steered, hooks, {args.dtype}",
    }
    methods: dict[str, Any] = {
        names["plain_a"]: lambda: run(adapter),
        names["hooks"]: hooked_run,
        names["plain_b"]: lambda: run(adapter),
    }
    if folded is not None:
        names["folded"] = f"steered, folded weights, {args.dtype}"
        methods[names["folded"]] = lambda: run(folded)
        names["copy"] = f"unsteered, deep copy, {args.dtype}"
        methods[names["copy"]] = lambda: run(plain_copy)
    timings = interleaved(methods, args.repeats, warmup={"plain": lambda: run(adapter)})
    bench.add_timings(timings)
    t = {k: timings[v] for k, v in names.items()}
    total = n_prompts * tokens
    # the noise floor: how far two timings of the very same thing fall apart, best and median
    plain_best = min(t["plain_a"].best, t["plain_b"].best)
    plain_all = t["plain_a"].wall + t["plain_b"].wall
    noise = max(
        abs(ratio(t["plain_a"].best, t["plain_b"].best) - 1),
        abs(ratio(t["plain_a"].median, t["plain_b"].median) - 1),
    )
    spread = statistics.pstdev(plain_all) / statistics.mean(plain_all)
    band = max(noise, spread)
    hook_slow = ratio(t["hooks"].best, plain_best) - 1
    same_tokens = None
    folded_diff = None
    copy_diff = None
    extra_biases = 0
    if folded is not None:
        extra_biases = sum(n.endswith(".bias") for n, _ in folded.model.named_parameters()) - sum(
            n.endswith(".bias") for n, _ in adapter.model.named_parameters()
        )
    if "folded" in t:
        folded_diff = ratio(t["folded"].best, t["copy"].best) - 1
        copy_diff = ratio(t["copy"].best, plain_best) - 1
        same_tokens = t["folded"].result == t["hooks"].result
    table_rows = []
    for k in t:
        tm = t[k]
        table_rows.append(
            [
                names[k],
                f"{total / tm.best:.1f}",
                f"{tm.best:.2f}",
                f"{tm.median:.2f}",
                f"{ratio(tm.best, plain_best) - 1:+.1%}",
                f"{tm.extra_mb:.0f}",
            ]
        )
    table = markdown_table(
        ["method", "tokens/s", "best s", "median s", "time vs unsteered (best)", "extra RSS MiB"], table_rows
    )
    lines = [
        f"noise floor (unsteered A vs B, and the spread of all unsteered runs): ±{band:.1%}",
        f"hooks: {hook_slow:+.1%} time vs unsteered, target <= +{HOOK_TARGET:.0%}: "
        f"{'met' if hook_slow <= HOOK_TARGET else 'MISSED'}",
    ]
    if folded_diff is not None:
        within = abs(folded_diff) <= band
        lines.append(
            f"folded: {folded_diff:+.1%} time vs an unsteered deep copy, target within noise "
            f"(±{band:.1%}): {'met' if within else 'MISSED'}; folded tokens identical to hooked tokens: "
            f"{same_tokens}; the unsteered copy itself: {copy_diff:+.1%} vs the original"
        )
        lines.append(
            f"the fold added {extra_biases} bias vectors: a config switch such as mlp_bias gives every "
            "projection it governs a bias (zeros except one), so plain transformers reloads the checkpoint"
        )
    else:
        lines.append(f"folded: not measured ({fold_error})")
    table += "\n\n" + "\n".join(lines)
    bench.data.update(
        {
            "prompts": n_prompts,
            "new_tokens_per_prompt": tokens,
            "steering": steer.describe(),
            "methods": {k: {"label": names[k], **t[k].to_json()} for k in t},
            "tokens_per_s": {k: total / t[k].best for k in t},
            "noise_band": band,
            "hook_slowdown": hook_slow,
            "hook_target": HOOK_TARGET,
            "hook_target_verdict": "met" if hook_slow <= HOOK_TARGET else "MISSED",
            "folded_difference": folded_diff,
            "folded_target_verdict": None
            if folded_diff is None
            else ("met" if abs(folded_diff) <= band else "MISSED"),
            "folded_tokens_identical_to_hooks": same_tokens,
            "unsteered_copy_difference": copy_diff,
            "folded_extra_bias_vectors": extra_biases,
            "fold_error": fold_error,
        }
    )
    bench.finish(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
