"""Analysis (issue 18): does the last-token projection on a role vector predict the answer's correctness?

For each role: its vector is extracted from the paper's role prompts against Alpaca base prompts (``--n``
each, sampled with seed 42), taken at one site (``--layer``, position -1); the role's own MMLU domain
(a seeded sample of ``--questions``) is scored unsteered and with the role's addition (α ``--alpha`` at
that site); then the AUROC for correctness of each question's projection at the input of ``--layer``,
last prompt token, on the role's unit vector is set against ``--n-random`` seeded Gaussian unit directions
(the same ones for every role and reading), in two readings (rolevec.analysis.correctness):

- unsteered: baseline correctness, projections of the unsteered model;
- steered: the addition's correctness, projections read with the addition applied.

Not a speed benchmark: one run, timed by stage. Prints one table and writes JSON to the results folder.

    python benchmarks/bench_correctness_auroc.py [--roles doctor,mathematician,economist] [--questions 150]
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from common import Bench, base_parser, find_data, load

DOMAIN = {"doctor": "medicine", "mathematician": "math", "economist": "econ", "lawyer": "law"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--roles", default="doctor,mathematician,economist", help="roles (default 3)")
    parser.add_argument("--n", type=int, default=32, help="role and base prompts per vector (default 32)")
    parser.add_argument("--layer", type=int, default=15, help="the site's layer (default 15 of 30)")
    parser.add_argument("--alpha", type=float, default=3.0, help="α of the steered reading (default 3)")
    parser.add_argument("--questions", type=int, default=150, help="questions per domain (default 150)")
    parser.add_argument("--n-random", type=int, default=32, help="random directions (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="the random directions' seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.questions, args.n_random = 8, 40, 16
    bench = Bench(args, "correctness-auroc", repeats=1)
    data = find_data(args.data)

    from rolevec.analysis.correctness import correctness_auroc
    from rolevec.data.mcq import load_mcq
    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.evaluation.conditions import Condition, score
    from rolevec.evaluation.scoring import LetterScorer, PromptFormat
    from rolevec.vectors.extraction import extract_role_vectors

    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = [r for r in roles if r not in DOMAIN]
    if unknown:
        sys.exit(f"benchmark: error: no domain for {unknown}: pass roles among {', '.join(DOMAIN)}")
    adapter = load(args.dtype, args)
    bench.mark("load")
    times: dict[str, float] = {}
    start = time.perf_counter()
    sets = {r: sample(load_role_prompts(r, data / "roles"), args.n, 42) for r in roles}
    base = sample(load_base(data / "base" / "alpaca_train.json"), args.n, 42)
    vectors = extract_role_vectors(adapter, sets, base, batch_size=args.batch_size, progress=False)
    times["extract"] = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper's files repeat some questions; each copy is kept
        mcq = load_mcq(data / "mmlu_domains", sorted({DOMAIN[r] for r in roles}))
    fmt, scorer = PromptFormat(), LetterScorer(adapter)
    rows: list[dict[str, Any]] = []
    for role in roles:
        domain = DOMAIN[role]
        pool = mcq.items[domain]
        items = random.Random(0).sample(pool, min(args.questions, len(pool)))
        add = Condition.make("add", role=role, layer=args.layer, position=-1, alpha=args.alpha)
        t = time.perf_counter()
        base_ok = [r.correct for r in score(adapter, items, "baseline", scorer=scorer, batch_size=16)]
        add_ok = [
            r.correct
            for r in score(adapter, items, add, vectors=vectors, scorer=scorer, batch_size=args.batch_size)
        ]
        times[f"score {role}"] = time.perf_counter() - t
        vector = vectors.vector(role, args.layer, -1)
        t = time.perf_counter()
        readings = {
            "unsteered": correctness_auroc(
                adapter, items, base_ok, vector, args.layer, prompt_format=fmt, n_random=args.n_random,
                seed=args.seed, batch_size=args.batch_size,
            ),
            "steered": correctness_auroc(
                adapter, items, add_ok, vector, args.layer, prompt_format=fmt, n_random=args.n_random,
                seed=args.seed, batch_size=args.batch_size, steering=add.steering(vectors),
            ),
        }  # fmt: skip
        times[f"project {role}"] = time.perf_counter() - t
        print(f"{role} ({domain}, {len(items)} questions, |v| {float(vector.norm()):.2f}):", flush=True)
        for result in readings.values():
            print(f"  {result.line()}", flush=True)
            rows.append({"role": role, "domain": domain, "norm": float(vector.norm()), **result.to_json()})
    times["total"] = time.perf_counter() - start
    bench.mark("analysis")
    table = [
        "| role (domain) | reading | n | correct | role AUROC | random mean ± sd | random 5–95% | "
        "exceeded by | p (two-sided) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["random_quantiles"]
        table.append(
            f"| {r['role']} ({r['domain']}) | {r['reading']} | {r['n']} | {r['n_correct']} | "
            f"{r['role_auroc']:.3f} | {r['random_mean']:.3f} ± {r['random_sd']:.3f} | "
            f"{q['5']:.3f}–{q['95']:.3f} | {r['exceeded_by']}/{r['n_random']} | {r['p_value']:.3f} |"
        )
    bench.data["settings"] = {
        "roles": roles,
        "n_prompts": args.n,
        "layer": args.layer,
        "position": -1,
        "alpha": args.alpha,
        "questions_per_domain": args.questions,
        "question_sample_seed": 0,
        "n_random": args.n_random,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    bench.data["results"] = rows
    bench.data["seconds"] = {k: round(v, 1) for k, v in times.items()}
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    bench.finish("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
