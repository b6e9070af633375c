"""Benchmark 3: extraction throughput (prompts/s) against a bare forward pass of the same prompts.

rolevec's ``extract_role_vectors`` renders and tokenises every prompt, reads the residual at all layers and
post-instruction positions with hooks, accumulates float64 sums per set, and stops the forward at the
final norm. The bare forward renders and tokenises the same prompts with the tokenizer alone and runs
``model(...)`` on the same length-sorted batches (full model with logits), and, as a stricter reference,
the decoder stack alone (``model.base_model``, no unembedding). Alternately, in one process.
Target: rolevec at least 0.9x the bare forward's prompts/s.

    python benchmarks/bench_extraction.py [--quick] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from common import Bench, base_parser, find_data, interleaved, load, markdown_table, ratio, verdict

TARGET = 0.9


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--roles", default="lawyer,mathematician", help="roles to extract (default 2)")
    parser.add_argument("--n", type=int, default=None, help="prompts per set (default 64, quick 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    bench = Bench(args, "extraction")
    data = find_data(args.data)

    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.vectors.extraction import extract_role_vectors

    n = args.n or (16 if args.quick else 64)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    sets = {r: sample(load_role_prompts(r, data / "roles"), n, 42) for r in roles}
    base = sample(load_base(data / "base" / "alpaca_train.json"), n, 42)
    prompts = [p for ps in (*sets.values(), base) for p in ps.prompts]
    adapter = load(args.dtype, args)
    bench.mark("load")
    tok = adapter.tokenizer
    add_special = adapter.chat.add_special_tokens
    print(f"{len(prompts)} prompts ({len(roles)} roles + base, {n} each), batch size {args.batch_size}")

    def batches() -> list[dict[str, torch.Tensor]]:
        texts = [
            str(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
            )
            for p in prompts
        ]
        ids = [tok(t, add_special_tokens=add_special)["input_ids"] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = []
        for s in range(0, len(order), args.batch_size):
            chunk = [{"input_ids": ids[i]} for i in order[s : s + args.batch_size]]
            out.append(
                tok.pad(chunk, padding=True, padding_side="right", return_tensors="pt").to(adapter.device)
            )
        return out

    def bare(module: Any) -> int:
        count = 0
        with torch.inference_mode():
            for enc in batches():
                module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                count += enc["input_ids"].shape[0]
        return count

    def rolevec() -> Any:
        return extract_role_vectors(adapter, sets, base, batch_size=args.batch_size, progress=False)

    names = {
        "rolevec": f"rolevec extract_role_vectors, {args.dtype}",
        "full": f"bare forward, model(...) with logits, {args.dtype}",
        "backbone": f"bare forward, decoder stack only, {args.dtype}",
    }
    methods = {
        names["full"]: lambda: bare(adapter.model),
        names["backbone"]: lambda: bare(adapter.model.base_model),
        names["rolevec"]: rolevec,
    }
    timings = interleaved(
        methods, args.repeats, warmup={"rolevec": rolevec, "full": lambda: bare(adapter.model)}
    )
    bench.add_timings(timings)
    t = {k: timings[v] for k, v in names.items()}
    vs_full = ratio(t["full"].best, t["rolevec"].best)
    vs_backbone = ratio(t["backbone"].best, t["rolevec"].best)
    rows = [
        [
            names[k],
            f"{len(prompts) / t[k].best:.1f}",
            f"{t[k].best:.2f}",
            f"{t[k].median:.2f}",
            f"{ratio(t[k].best, t['rolevec'].best):.3f}x",
            f"{t[k].extra_mb:.0f}",
        ]
        for k in ("full", "backbone", "rolevec")
    ]
    table = markdown_table(
        ["method", "prompts/s", "best s", "median s", "rolevec speed relative to it", "extra RSS MiB"], rows
    )
    table += (
        f"\n\nrolevec vs bare forward (full model): {vs_full:.3f}x the prompts/s (median "
        f"{ratio(t['full'].median, t['rolevec'].median):.3f}x), target >= {TARGET}: "
        f"{verdict(vs_full, TARGET, at_least=True)}"
        f"\nrolevec vs bare decoder stack (no unembedding): {vs_backbone:.3f}x (median "
        f"{ratio(t['backbone'].median, t['rolevec'].median):.3f}x), target >= {TARGET}: "
        f"{verdict(vs_backbone, TARGET, at_least=True)}"
    )
    bench.data.update(
        {
            "prompts": len(prompts),
            "roles": roles,
            "per_set": n,
            "batch_size": args.batch_size,
            "methods": {k: {"label": names[k], **t[k].to_json()} for k in t},
            "prompts_per_s": {k: len(prompts) / t[k].best for k in t},
            "ratio_vs_full_forward": vs_full,
            "ratio_vs_backbone": vs_backbone,
            "target": TARGET,
            "target_vs_full_forward": verdict(vs_full, TARGET, at_least=True),
            "target_vs_backbone": verdict(vs_backbone, TARGET, at_least=True),
        }
    )
    bench.finish(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
