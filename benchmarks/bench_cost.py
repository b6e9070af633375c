"""Benchmark 5: what the paper preset costs on this machine, from measured per-question costs.

Measured here, alternately in one process, on questions of every domain of the paper's MMLU files:

* a question scored by the straightforward loop (float32, full logits, batch 8, file order);
* a question scored by rolevec's fast scorer, baseline / persona / ablation (ablation hooks every block);
* an addition candidate scored inside ``run_sweep`` with reuse, as equivalent fast forwards (the sweep's
  measured time over a subset of the grid, divided by the time of one fast forward per question);
* the test stage's addition α 1, α 3 and random control of one role at one site, as ``rolevec run`` scores
  them (``evaluate_conditions``, a whole domain per call: from a shared residual of the lower layers), as
  equivalent fast forwards of the same questions;
* an extraction prompt.

These costs are multiplied by the paper preset's grid for this model (``rolevec run --preset paper``):
29 roles; the validation sweep over the first 80% of the layers (layer 0 left out, every layer), every
post-instruction position, α ∈ {1, 3}, ablation at every site, on the role's own domain's validation
split (seed 0, 20%); then the test split of all 8 domains: baseline once, and per role persona, addition
with both α at the chosen site, ablation and the random control; 128 prompts per role and 128 base
prompts for extraction. The paper reports about 213 million inferences and 4,500 GPU-hours for its study.

    python benchmarks/bench_cost.py [--quick] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import Bench, NaiveScorer, base_parser, find_data, interleaved, load, markdown_table, ratio

PAPER_INFERENCES = 213e6
PAPER_GPU_HOURS = 4500.0
TEST_CONDITIONS_PER_ROLE = 5  # persona, add α=1, add α=3, ablate, random
N_PROMPTS = 128


def grid(adapter: Any, data: Path, positions: int) -> dict[str, Any]:
    """Counts of the paper preset's inferences for this model (see the module docstring)."""
    from rolevec.data.mcq import load_mcq, make_split
    from rolevec.data.sources import domain_roles
    from rolevec.evaluation.sweep import default_layers

    mcq = load_mcq(data / "mmlu_domains")
    split = make_split(mcq, seed=0, val_fraction=0.2)
    roles = domain_roles()
    n = adapter.n_layers
    a, b = default_layers(n)
    layers = list(range(a, b))
    val = {d: len(split.qids(d, "val")) for d in mcq.domains}
    test = sum(len(split.qids(d, "test")) for d in mcq.domains)
    role_val = sum(val[d] * len(rs) for d, rs in roles.items())
    n_roles = sum(len(rs) for rs in roles.values())
    cands = len(layers) * positions * 2
    sites = len(layers) * positions
    return {
        "n_layers": n,
        "layers": [a, b],
        "n_sweep_layers": len(layers),
        "positions": positions,
        "alphas": [1.0, 3.0],
        "roles": n_roles,
        "val_questions_per_domain": val,
        "val_question_role_pairs": role_val,
        "test_questions": test,
        "add_candidates_per_role": cands,
        "ablate_sites_per_role": sites,
        "val_baseline": sum(val.values()),
        "val_add": role_val * cands,
        "val_ablate": role_val * sites,
        "test_baseline": test,
        "test_persona": test * n_roles,
        "test_add_random": test * n_roles * 3,
        "test_ablate": test * n_roles,
        "extraction_prompts": (n_roles + 1) * N_PROMPTS,
        "reuse_blocks_saved_per_val_question_role": sum(positions * 2 * layer for layer in layers)
        - max(layers),
        "mean_candidate_layer": sum(layers) / len(layers),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--per-domain", type=int, default=None, help="questions per domain (default 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    bench = Bench(args, "cost", quick_repeats=2)
    data = find_data(args.data)

    from rolevec.core.records import RecordStore
    from rolevec.data.mcq import load_mcq, make_split
    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.evaluation.conditions import Condition, evaluate_conditions, score
    from rolevec.evaluation.scoring import LetterScorer
    from rolevec.evaluation.sweep import default_layers, run_sweep
    from rolevec.vectors.extraction import extract_role_vectors

    dtype = args.dtype
    adapter = load(dtype, args)
    adapter32 = load("float32", args) if dtype != "float32" else adapter
    bench.mark("load")
    n = adapter.n_layers
    per_domain = args.per_domain or (1 if args.quick else 4)
    mcq = load_mcq(data / "mmlu_domains")
    split = make_split(mcq, seed=0)
    items = [it for d in mcq.domains for it in split.select(mcq, d, "val", per_domain)]
    q = len(items)
    role = "lawyer"
    n_prompts = 16 if args.quick else 32
    role_set = sample(load_role_prompts(role, data / "roles"), n_prompts, 42)
    base_set = sample(load_base(data / "base" / "alpaca_train.json"), n_prompts, 42)
    vectors = extract_role_vectors(adapter, {role: role_set}, base_set, seed=42, progress=False)
    k = len(vectors.positions)
    a, b = default_layers(n)
    step = 11 if args.quick else 2
    sweep_layers = list(range(a, b, step))
    sweep_q = items if args.quick else [it for d in mcq.domains for it in split.select(mcq, d, "val", 2)]
    # the marginal candidate's blocks, as a fraction of a full stack (block-count theory)
    theory_marginal = sum(n - layer for layer in sweep_layers) / (len(sweep_layers) * n)
    print(
        f"{q} validation questions ({per_domain} per domain); sweep subset: {len(sweep_q)} questions, layers "
        f"{sweep_layers}, position -1, α 1 (and α 1, 3: the difference is the marginal candidate cost); "
        f"positions k = {k}",
        flush=True,
    )

    scorer = LetterScorer(adapter)
    naive32 = NaiveScorer(adapter32)
    site = (12, -1)
    persona = Condition.make("persona", role=role)
    ablation = Condition.make("ablate", role=role, layer=site[0], position=site[1])
    all_roles = {role: role_set}
    test_conditions = [
        Condition.make("add", role=role, layer=site[0], position=site[1], alpha=1.0),
        Condition.make("add", role=role, layer=site[0], position=site[1], alpha=3.0),
        Condition.make("random", role=role, layer=site[0], position=site[1], alpha=1.0),
    ]

    # The test stage scores a whole domain per call (about 245 test questions on average); a few questions
    # per domain would price its fixed per-call work (the steered prefix, the residual advance) far too
    # high. Its cost is measured on two domains' whole validation splits, relative to the fast scorer on
    # the same questions, and that ratio prices the test stage's additions.
    test_domains = ["politics", "psychology"] if not args.quick else ["psychology"]
    test_limit = None if not args.quick else 12
    test_items = [it for d in test_domains for it in split.select(mcq, d, "val", test_limit)]

    def in_store(run: Any) -> Any:
        """``run(store)`` with a throwaway record store (nothing is reused between rounds)."""
        with tempfile.TemporaryDirectory() as tmp, RecordStore(Path(tmp) / "r.jsonl") as store:
            return run(store)

    def test_stage(conditions: list[Any]) -> Any:
        return in_store(
            lambda store: evaluate_conditions(
                adapter,
                mcq,
                split,
                conditions,
                store,
                vectors=vectors,
                domains=test_domains,
                split_name="val",
                limit=test_limit,
                batch_size=args.batch_size,
                scorer=scorer,
                progress=False,
            )
        )

    def sweep(alphas: tuple[float, ...]) -> Any:
        return in_store(
            lambda store: run_sweep(
                adapter,
                vectors,
                role,
                sweep_q,
                store,
                domain=sweep_q[0].domain,
                layers=(a, b),
                layer_step=step,
                positions=[-1],
                alphas=alphas,
                ablate_scope="none",
                batch_size=args.batch_size,
                scorer=scorer,
                progress=False,
            )
        )

    names = {
        "naive32": "straightforward, float32, per question",
        "fast": f"rolevec fast scorer, {dtype}, per question",
        "persona": f"rolevec persona, {dtype}, per question",
        "ablate": f"rolevec ablation, {dtype}, per question",
        "sweep1": f"rolevec run_sweep, {len(sweep_layers)} layers × α 1, {dtype}",
        "sweep2": f"rolevec run_sweep, {len(sweep_layers)} layers × α 1, 3, {dtype}",
        "test3": f"rolevec test stage, add α 1, α 3, random at layer {site[0]}, {dtype}",
        "test_base": f"rolevec test stage, baseline on the same questions, {dtype}",
        "extract": f"rolevec extraction, {dtype}, per prompt",
        "fast_sq": f"rolevec fast scorer on the sweep subset, {dtype}",
    }
    methods: dict[str, Any] = {
        names["naive32"]: lambda: naive32.predict(items),
        names["fast"]: lambda: score(adapter, items, scorer=scorer, batch_size=args.batch_size),
        names["persona"]: lambda: score(adapter, items, persona, scorer=scorer, batch_size=args.batch_size),
        names["ablate"]: lambda: score(
            adapter, items, ablation, vectors=vectors, scorer=scorer, batch_size=args.batch_size
        ),
        names["sweep1"]: lambda: sweep((1.0,)),
        names["sweep2"]: lambda: sweep((1.0, 3.0)),
        names["test3"]: lambda: test_stage(test_conditions),
        names["test_base"]: lambda: test_stage([Condition("baseline")]),
        names["extract"]: lambda: extract_role_vectors(adapter, all_roles, base_set, progress=False),
        names["fast_sq"]: lambda: score(adapter, sweep_q, scorer=scorer, batch_size=args.batch_size),
    }
    warm = items[:4]
    timings = interleaved(
        methods,
        args.repeats,
        warmup={
            "naive": lambda: naive32.predict(warm),
            "fast": lambda: score(adapter, warm, scorer=scorer),
            "sweep": lambda: sweep((1.0,)),  # its one-time resume check, kept on the scorer, is not timed
        },
    )
    bench.add_timings(timings)
    t = {key: timings[v] for key, v in names.items()}

    per_q = {
        "naive32": t["naive32"].best / q,
        "fast": t["fast"].best / q,
        "persona": t["persona"].best / q,
        "ablate": t["ablate"].best / q,
    }
    # a test-stage addition in units of a fast forward of the same questions, priced at the mean question
    test_equiv = t["test3"].best / (len(test_conditions) * t["test_base"].best)
    per_q["test_add_random"] = test_equiv * per_q["fast"]
    per_prompt_extract = t["extract"].best / (2 * n_prompts)
    # One more α adds one candidate per layer and nothing else, so the difference of the two sweeps is the
    # marginal cost of a candidate; what the α=1 sweep costs beyond its candidates is the fixed cost per
    # (question, role): baseline, residual advance, tokenisation, record I/O (the one-time parity probe
    # runs in the warm-up, and the real grid pays it once per loaded model).
    n_sq, n_l = len(sweep_q), len(sweep_layers)
    marginal = max(0.0, t["sweep2"].best - t["sweep1"].best) / (n_l * n_sq)
    fixed = max(0.0, t["sweep1"].best - n_l * n_sq * marginal) / n_sq
    # In units of one fast forward of the subset's own questions, then priced at the mean question of
    # all domains (the subset's questions may be longer or shorter than average).
    fast_sq = t["fast_sq"].best / n_sq
    marginal_equiv = marginal / fast_sq
    fixed_equiv = fixed / fast_sq
    fixed_beyond_baseline = max(0.0, fixed_equiv - 1.0) * per_q["fast"]  # the grid counts the baseline

    g = grid(adapter, data, k)
    n_layers_grid = g["n_sweep_layers"]
    # the grid's candidates sit on every layer of the range, the subset's on every step-th: rescale
    grid_fraction = sum(n - layer for layer in range(g["layers"][0], g["layers"][1])) / (n_layers_grid * n)
    per_candidate = marginal_equiv * per_q["fast"] * grid_fraction / theory_marginal
    inferences = {
        "validation baseline": g["val_baseline"],
        "validation addition": g["val_add"],
        "validation ablation": g["val_ablate"],
        "test baseline": g["test_baseline"],
        "test persona": g["test_persona"],
        "test addition + random": g["test_add_random"],
        "test ablation": g["test_ablate"],
    }
    total_inf = sum(inferences.values())
    hook_factor = per_q["ablate"] / per_q["fast"]
    naive_cost = {
        key: count * per_q["naive32"] * (hook_factor if "ablation" in key else 1.0)
        for key, count in inferences.items()
    }
    rolevec_cost = {
        "validation baseline": g["val_baseline"] * per_q["fast"],
        "validation addition": g["val_question_role_pairs"]
        * (g["add_candidates_per_role"] * per_candidate + fixed_beyond_baseline),
        "validation ablation": g["val_ablate"] * per_q["ablate"],
        "test baseline": g["test_baseline"] * per_q["fast"],
        "test persona": g["test_persona"] * per_q["persona"],
        "test addition + random": g["test_add_random"] * per_q["test_add_random"],
        "test ablation": g["test_ablate"] * per_q["ablate"],
    }
    no_reuse_add = g["val_add"] * per_q["fast"]
    extraction_s = g["extraction_prompts"] * per_prompt_extract
    naive_total = sum(naive_cost.values())
    rolevec_total = sum(rolevec_cost.values()) + extraction_s
    no_reuse_test = g["test_add_random"] * per_q["fast"]
    no_reuse_total = (
        rolevec_total
        - rolevec_cost["validation addition"]
        - rolevec_cost["test addition + random"]
        + no_reuse_add
        + no_reuse_test
    )

    # forward passes saved, as full-forward equivalents (block and unembedding parameter counts)
    block_params = sum(p.numel() for blk in adapter.blocks for p in blk.parameters())
    head_params = int(adapter.unembed.weight.numel())
    head_share = head_params / (block_params + head_params)
    reuse_saved = g["val_question_role_pairs"] * g["reuse_blocks_saved_per_val_question_role"] / n
    letter_saved = total_inf * head_share

    rows = [
        [key, f"{count:,}", f"{naive_cost[key] / 3600:.1f}", f"{rolevec_cost[key] / 3600:.1f}"]
        for key, count in inferences.items()
    ]
    rows.append(["extraction (prompts)", f"{g['extraction_prompts']:,}", "-", f"{extraction_s / 3600:.2f}"])
    rows.append(
        ["total", f"{total_inf:,}", f"{naive_total / 3600:.1f}", f"{rolevec_total / 3600:.1f}"],
    )
    unit = "CPU" if args.device == "cpu" else "GPU"
    table = markdown_table(
        [
            "paper preset, this model",
            "inferences",
            f"straightforward fp32, {unit} h",
            f"rolevec {dtype}, {unit} h",
        ],
        rows,
    )
    unit_rows = [
        ["straightforward, float32", f"{1 / per_q['naive32']:.2f}", f"{per_q['naive32'] * 1000:.0f}"],
        [f"rolevec fast scorer, {dtype}", f"{1 / per_q['fast']:.2f}", f"{per_q['fast'] * 1000:.0f}"],
        [f"rolevec persona, {dtype}", f"{1 / per_q['persona']:.2f}", f"{per_q['persona'] * 1000:.0f}"],
        [f"rolevec ablation, {dtype}", f"{1 / per_q['ablate']:.2f}", f"{per_q['ablate'] * 1000:.0f}"],
        [
            f"rolevec test stage, add/random at layer {site[0]} (reuse), {dtype}",
            f"{1 / per_q['test_add_random']:.2f}",
            f"{per_q['test_add_random'] * 1000:.0f}",
        ],
        [
            f"rolevec sweep, marginal addition candidate (reuse), {dtype}, paper grid's layers",
            f"{1 / per_candidate:.2f}" if per_candidate else "-",
            f"{per_candidate * 1000:.0f}",
        ],
        [
            f"rolevec sweep, fixed cost per (question, role) beyond the baseline, {dtype}",
            f"{1 / fixed_beyond_baseline:.2f}" if fixed_beyond_baseline else "-",
            f"{fixed_beyond_baseline * 1000:.0f}",
        ],
        [
            f"rolevec extraction, {dtype} (per prompt)",
            f"{1 / per_prompt_extract:.2f}",
            f"{per_prompt_extract * 1000:.0f}",
        ],
    ]
    unit_table = markdown_table(["measured unit", "per second", "ms each"], unit_rows)
    paper_rate = PAPER_INFERENCES / (PAPER_GPU_HOURS * 3600)
    rolevec_rate = total_inf / rolevec_total
    lines = [
        f"grid: {g['roles']} roles, layers {g['layers'][0]}..{g['layers'][1] - 1} of {n} ({n_layers_grid}), "
        f"{k} positions, α 1 and 3 = {g['add_candidates_per_role']} addition candidates and "
        f"{g['ablate_sites_per_role']} ablation sites per role, on {g['val_question_role_pairs']:,} "
        f"(validation question, role) pairs; test: {g['test_questions']:,} questions × "
        f"(1 + {g['roles']} × {TEST_CONDITIONS_PER_ROLE}) conditions",
        f"sweep: a marginal candidate costs {marginal_equiv:.3f} fast forwards on the subset's layers "
        f"(block-count theory {theory_marginal:.3f}); on the grid's layers "
        f"{per_candidate / per_q['fast']:.3f}; fixed cost per (question, role) {fixed_equiv:.2f} fast "
        "forwards, the baseline included",
        f"test stage: an addition or random control at layer {site[0]} costs {test_equiv:.3f} fast forwards "
        f"({len(test_items)} validation questions of {', '.join(test_domains)}; block-count theory "
        f"{(site[0] / n + len(test_conditions) * (n - site[0]) / n) / len(test_conditions):.3f})",
        f"inferences: {total_inf:,.0f} for this model vs the paper's {PAPER_INFERENCES:,.0f} "
        f"({PAPER_INFERENCES / total_inf:.0f}x more, over the paper's models and grid)",
        f"projected on this machine ({bench.data['machine']['threads']} thread(s)): straightforward float32 "
        f"{naive_total / 3600:.1f} h; rolevec {dtype} without reuse {no_reuse_total / 3600:.1f} h; rolevec "
        f"{dtype} {rolevec_total / 3600:.1f} h ({ratio(naive_total, rolevec_total):.1f}x cheaper than "
        "straightforward)",
        f"rate: rolevec {rolevec_rate:.1f} inferences/s on this {unit} with "
        f"{bench.data['machine']['model']}; the paper: "
        f"{paper_rate:.1f} inferences/s per GPU on average (213M / 4,500 GPU-h, larger models)",
        f"the paper's 213M inferences at rolevec's rate here: "
        f"{PAPER_INFERENCES / rolevec_rate / 3600:,.0f} {unit} h; at the straightforward rate: "
        f"{PAPER_INFERENCES / (total_inf / naive_total) / 3600:,.0f} {unit} h",
        f"forward passes saved (full-forward equivalents): reuse {reuse_saved:,.0f} "
        f"({reuse_saved / g['val_add']:.1%} of the addition sweep); 4-letter scorer {letter_saved:,.0f} "
        f"(the unembedding is {head_share:.1%} of the parameters a token passes through)",
    ]
    table = unit_table + "\n\n" + table + "\n\n" + "\n".join(lines)
    bench.data.update(
        {
            "questions": q,
            "sweep_subset": {"questions": n_sq, "layers": sweep_layers, "alphas": [[1.0], [1.0, 3.0]]},
            "methods": {key: {"label": names[key], **t[key].to_json()} for key in t},
            "seconds_per_question": per_q,
            "seconds_per_extraction_prompt": per_prompt_extract,
            "sweep_marginal_candidate_s": marginal,
            "sweep_marginal_candidate_fast_forwards": marginal_equiv,
            "sweep_marginal_candidate_theory": theory_marginal,
            "sweep_candidate_s_on_grid_layers": per_candidate,
            "sweep_fixed_s_per_question_role": fixed,
            "sweep_fixed_fast_forwards_per_question_role": fixed_equiv,
            "test_stage": {
                "domains": test_domains,
                "questions": len(test_items),
                "fast_forwards": test_equiv,
            },
            "grid": g,
            "inferences": inferences,
            "total_inferences": total_inf,
            "projected_hours": {
                "straightforward_float32": naive_total / 3600,
                "rolevec_no_reuse": no_reuse_total / 3600,
                "rolevec": rolevec_total / 3600,
                "by_part_rolevec": {key: v / 3600 for key, v in rolevec_cost.items()},
                "extraction": extraction_s / 3600,
            },
            "paper": {"inferences": PAPER_INFERENCES, "gpu_hours": PAPER_GPU_HOURS, "rate_per_s": paper_rate},
            "rolevec_inferences_per_s": rolevec_rate,
            "hours_on": unit,
            "paper_inferences_at_rolevec_rate_hours": PAPER_INFERENCES / rolevec_rate / 3600,
            "forward_passes_saved": {
                "reuse": reuse_saved,
                "letter_scorer": letter_saved,
                "head_share": head_share,
            },
            "assumptions": [
                "costs per question measured on validation questions of all 8 domains (their length mix)",
                "addition candidates: the marginal cost measured as the difference of two sweeps (α 1 vs "
                "α 1, 3) on every other layer, in units of a fast forward of the same questions, priced at "
                "the mean question and rescaled by block counts to every layer of the range; the fixed cost "
                "per (question, role) beyond the baseline, measured on 16 questions, is kept; the one-time "
                "parity probe is not timed (warm-up), as the real grid pays it once per loaded model",
                "straightforward ablation costs the same hook overhead as rolevec's ablation",
                f"the test stage's additions and random controls are priced at layer {site[0]} (the middle "
                "of the grid) for one role; roles that chose the same layer also share the blocks below it "
                "in rolevec run, which is not counted",
                "the test split is scored for every role on all 8 domains; baseline records are shared",
                "interpretation (logit lens, judge) and the report are not counted",
            ],
        }
    )
    bench.finish(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
