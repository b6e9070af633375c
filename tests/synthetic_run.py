"""Synthetic run folders in the file formats of `rolevec run`, for the analysis and report tests.

By default they look like an MMLU run made before the scoring rule was recorded (the paper's 8 domains,
four choices, no ``scoring`` field); ``domains``, ``n_choices``, ``scoring`` and ``role_map`` make runs of
other benchmarks (any domains, 2..26 choices, continuation records with acc_norm).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rolevec.analysis.tables import builtin_domains
from rolevec.data.mcq import ALL_LETTERS
from rolevec.vectors.role_vectors import RoleVectors

DOMAINS = tuple(builtin_domains())
ROLES = ("mathematician", "doctor", "lawyer")
N_LAYERS = 6
POSITIONS = (-3, -2, -1)


#: Number of choices per question: one count for all, or a count per domain (4 where a domain is missing).
Choices = int | Mapping[str, int]


def domain_of(role: str, role_map: Mapping[str, str] | None = None) -> str:
    if role_map and role in role_map:
        return role_map[role]
    return next(d for d, roles in builtin_domains().items() if role in roles)


def _count(n_choices: Choices, domain: str) -> int:
    return n_choices if isinstance(n_choices, int) else n_choices.get(domain, 4)


def _row(
    condition: str,
    role: str | None,
    domain: str,
    qid: str,
    correct: bool,
    *,
    n_choices: int = 4,
    scoring: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    h = sum(map(ord, qid))
    letters = ALL_LETTERS[:n_choices]
    gold = letters[h % n_choices]
    pred = gold if correct else letters[(h + 1) % n_choices]
    probs = [0.1, 0.2, 0.3, 0.4] if n_choices == 4 else [1.0 / n_choices] * n_choices
    row: dict[str, Any] = {
        "condition": condition,
        "role": role,
        "persona_template": None,
        "layer": None,
        "position": None,
        "alpha": None,
        "domain": domain,
        "split": "test",
        "qid": qid,
        "subject": f"{domain}_subject",
        "gold": gold,
        "pred": pred,
        "correct": correct,
        "p_gold": 0.7 if correct else 0.2,
        "probs": probs,
    }
    if scoring is not None:
        row["scoring"] = scoring
    if scoring == "continuation":
        # per-character normalisation agrees with the sum on every question but a fixed third
        correct_norm = correct if (h + len(condition)) % 3 else not correct
        row["pred_norm"] = gold if correct_norm else letters[(h + 1) % n_choices]
        row["correct_norm"] = correct_norm
        row["logliks"] = [-1.0 - i for i in range(n_choices)]
    row.update(extra)
    return row


def make_records(
    roles: Sequence[str] = ROLES,
    *,
    n: int = 30,
    seed: int = 0,
    alphas: Sequence[float] = (1.0, 3.0),
    domains: Sequence[str] = DOMAINS,
    n_choices: Choices = 4,
    scoring: str | None = None,
    role_map: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Baseline, persona, add (each α), ablate and random rows for every role × domain, plus val rows.

    ``scoring`` None writes records as before the scoring rule was recorded; ``continuation`` adds
    ``pred_norm``, ``correct_norm`` and ``logliks``."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    base_p = {d: 0.3 + 0.05 * i for i, d in enumerate(domains)}
    baseline: dict[tuple[str, str], bool] = {}

    def row(condition: str, role: str | None, d: str, qid: str, ok: bool, **extra: Any) -> dict[str, Any]:
        return _row(condition, role, d, qid, ok, n_choices=_count(n_choices, d), scoring=scoring, **extra)

    for d in domains:
        for i in range(n):
            ok = rng.random() < base_p[d]
            baseline[(d, f"{d}-{i}")] = ok
            rows.append(row("baseline", None, d, f"{d}-{i}", ok))
        rows.append(row("baseline", None, d, f"{d}-val", True, split="val"))
    site = {"layer": 2, "position": -1}
    for role in roles:
        own = domain_of(role, role_map)
        effects: list[tuple[str, dict[str, Any], float]] = [
            ("persona", {"persona_template": "You are a {role}."}, 0.05),
            *[("add", {**site, "alpha": a}, 0.1 * a) for a in alphas],
            ("ablate", site, -0.2),
            ("random", {**site, "alpha": 3.0}, 0.0),
        ]
        for condition, extra, effect in effects:
            for d in domains:
                shift = effect if d == own else effect / 4
                qids = [q for (dd, q) in baseline if dd == d]
                # flip a fixed share of the answers that can move in the effect's direction
                movable = [q for q in qids if baseline[(d, q)] != (shift > 0)]
                flipped = set(rng.sample(movable, round(abs(shift) * len(movable))))
                for q in qids:
                    ok = baseline[(d, q)]
                    rows.append(row(condition, role, d, q, not ok if q in flipped else ok, **extra))
    return rows


def make_sweep(
    roles: Sequence[str] = ROLES,
    *,
    seed: int = 0,
    n: int = 12,
    role_map: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for role in roles:
        d = domain_of(role, role_map)
        for layer in range(N_LAYERS - 1):
            for position in POSITIONS:
                for alpha in (1.0, 3.0):
                    correct = rng.randint(2, n)
                    rows.append(
                        {
                            "role": role,
                            "domain": d,
                            "condition": "add",
                            "layer": layer,
                            "position": position,
                            "alpha": alpha,
                            "n": n,
                            "correct": correct,
                            "accuracy": correct / n,
                            "baseline_accuracy": 0.5,
                        }
                    )
                correct = rng.randint(0, n // 2)
                rows.append(
                    {
                        "role": role,
                        "domain": d,
                        "condition": "ablate",
                        "layer": layer,
                        "position": position,
                        "alpha": None,
                        "n": n,
                        "correct": correct,
                        "accuracy": correct / n,
                        "baseline_accuracy": 0.5,
                    }
                )
    return rows


def make_selection(roles: Sequence[str] = ROLES, role_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "model": "synthetic",
        "model_fingerprint": "0123456789abcdef",
        "split_seed": 7,
        "layers": [0, N_LAYERS - 2],
        "roles": {
            role: {
                "domain": domain_of(role, role_map),
                "layer": 2 if i else 3,
                "position": -1,
                "alpha": 3.0,
                "val_accuracy": 0.6,
                "val_baseline": 0.5,
                "val_ablate_accuracy": 0.3,
                "criterion_met": True,
                "n_candidates_passing": 4,
            }
            for i, role in enumerate(roles)
        },
    }


def make_vectors(roles: Sequence[str] = ROLES, *, hidden: int = 16, seed: int = 0) -> RoleVectors:
    gen = torch.Generator().manual_seed(seed)
    shape = (len(POSITIONS), N_LAYERS + 1, hidden)
    base = torch.randn(shape, generator=gen)
    scale = torch.linspace(0.5, 3.0, N_LAYERS + 1).view(1, -1, 1)
    means = {role: base + scale * torch.randn(shape, generator=gen) for role in roles}
    return RoleVectors(
        role_means=means,
        base_mean=base,
        positions=POSITIONS,
        position_tokens=("<|im_start|>", "assistant", "\n"),
        metadata={"model": "synthetic"},
    )


def make_interpret(
    roles: Sequence[str] = ROLES, *, judge: bool = True, role_map: Mapping[str, str] | None = None
) -> dict[str, Any]:
    def lens(word: str) -> dict[str, Any]:
        top = [{"id": i, "token": f" {word}{i}", "piece": f"Ġ{word}{i}", "logit": 5.0 - i} for i in range(3)]
        bottom = [{"id": 90 + i, "token": f" x{i}", "piece": f"Ġx{i}", "logit": -5.0 + i} for i in range(3)]
        return {"top": top, "bottom": bottom}

    out_roles: dict[str, Any] = {}
    for i, role in enumerate(roles):
        verdict = {"related": i % 2 == 0, "answer": "yes" if i % 2 == 0 else "no"}
        out_roles[role] = {
            "domain": domain_of(role, role_map),
            "layer": 2,
            "position": -1,
            "vector_norm": 3.5,
            "patchscope": {"steered": f"It represents a {role} <b>& \x17", "unsteered": "A diamond."},
            "logit_lens": {"normed": lens(role), "raw": lens(role[:3])},
            "judge": {"patchscope": verdict, "logit_lens": {"related": None, "answer": "maybe"}}
            if judge
            else None,
        }
    return {
        "format": "rolevec.interpret/1",
        "model": "synthetic",
        "model_fingerprint": "0123456789abcdef",
        "prompt": "What does ♦ represent?",
        "rendered_prompt": "<|im_start|>user\nWhat does ♦ represent?<|im_end|>\n<|im_start|>assistant\n",
        "placeholder": "♦",
        "where": "placeholder",
        "steered_positions": [5, 6],
        "alpha": 3.0,
        "max_new_tokens": 24,
        "top_k": 3,
        "unsteered": "A diamond.",
        "judge": {"url": "http://127.0.0.1:1", "model": "fake"} if judge else None,
        "roles": out_roles,
    }


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_run_dir(
    root: Path,
    roles: Sequence[str] = ROLES,
    *,
    n: int = 30,
    seed: int = 0,
    optional: bool = True,
    domains: Sequence[str] = DOMAINS,
    n_choices: Choices = 4,
    scoring: str | None = None,
    role_map: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """A run folder with records.jsonl and, when ``optional``, every other file the report reads;
    ``settings`` is written as settings.json (none by default, as in runs before it pinned anything)."""
    root.mkdir(parents=True, exist_ok=True)
    records = make_records(
        roles, n=n, seed=seed, domains=domains, n_choices=n_choices, scoring=scoring, role_map=role_map
    )
    write_jsonl(root / "records.jsonl", records)
    if settings is not None:
        (root / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    if optional:
        write_jsonl(root / "sweep.jsonl", make_sweep(roles, seed=seed, role_map=role_map))
        selection = make_selection(roles, role_map)
        (root / "selection.json").write_text(json.dumps(selection), encoding="utf-8")
        make_vectors(roles, seed=seed).save(root / "vectors.safetensors")
        interpret = make_interpret(roles, role_map=role_map)
        (root / "interpret.json").write_text(json.dumps(interpret), encoding="utf-8")
        manifest = {
            "model": "synthetic-model",
            "seed": seed,
            "preset": "smoke",
            "sampled": {"questions_per_domain": n},
            "arguments": {"out": str(root)},
            "timings_s": {"extract": 1.0},
        }
        (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root
