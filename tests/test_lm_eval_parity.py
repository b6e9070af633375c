"""Parity with lm-evaluation-harness on the embedded SmolLM2 (float32, CPU, chat template, 0-shot).

Two local tasks of 200 documents each (benchmarks/bench_lm_eval.py writes them: text continuations, and MMLU
rows whose choices are the letters A-D) are scored by ``lm_eval --model hf`` (``simple_evaluate`` with
``apply_chat_template=True``, which drops the target delimiter, so rolevec loads the items with
``chat_template=True``) and by rolevec's ``score``; then once more under one addition, by
``lm_eval --model steered`` fed rolevec's own ``.pt`` export. Predictions must agree on >= 99% of the
questions and the log-likelihoods within 1e-4. ``ROLEVEC_LM_EVAL_PARITY_N`` sets fewer documents for a
quicker look (the requirement is stated for 200).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rolevec.data.lm_eval_tasks import letter_scoring_valid, load_lm_eval_task
from rolevec.evaluation.conditions import Condition, score
from rolevec.model.loading import ModelAdapter

pytestmark = pytest.mark.e2e
pytest.importorskip("lm_eval")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
N = int(os.environ.get("ROLEVEC_LM_EVAL_PARITY_N", "200"))
AGREE, TOLERANCE = 0.99, 1e-4
STEER = {"role": "doctor", "layer": 12, "position": -1, "alpha": 0.3}


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_lm_eval as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def setup(
    bench: ModuleType, embedded: ModelAdapter, paper_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The task folder, the embedded model saved as a model folder, and lm-eval's HF model on it."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    root = tmp_path_factory.mktemp("lm_eval_parity")
    folder = bench.write_tasks(root / "tasks", paper_data / "mmlu_domains", N)
    model_dir = bench.save_model(embedded, root / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=8)
    return {"folder": folder, "model_dir": model_dir, "lm": lm, "root": root}


def _items(setup: dict[str, Any], name: str) -> list[Any]:
    items = load_lm_eval_task(name, setup["folder"], chat_template=True).items[name]
    assert len(items) == N and {it.delimiter for it in items} == {""}
    return items


def _check(name: str, parity: dict[str, Any]) -> None:
    print(f"\n{name}: {parity}")
    assert parity["n"] == N
    assert parity["agreement"] >= AGREE, parity
    assert parity["max_abs_loglik_diff"] <= TOLERANCE, parity


def test_text_continuations_match_lm_eval_hf(
    bench: ModuleType, setup: dict[str, Any], embedded: ModelAdapter
) -> None:
    lls = bench.run_lm_eval(setup["lm"], bench.lm_eval_task(setup["folder"], bench.ENDINGS))
    items = _items(setup, bench.ENDINGS)
    assert not letter_scoring_valid(items)
    results = score(embedded, items, scoring="continuation", batch_size=8)
    assert {r.scoring for r in results} == {"continuation"}
    _check("continuation task, continuation scoring", bench.compare(lls, results))
    # lm-eval's acc from its own log-likelihoods is rolevec's accuracy
    answers = [it.answer_index for it in items]
    theirs = sum(max(range(len(ll)), key=ll.__getitem__) == a for ll, a in zip(lls, answers, strict=True))
    assert abs(theirs - sum(r.correct for r in results)) <= (1 - AGREE) * N


def test_letter_task_matches_lm_eval_hf(
    bench: ModuleType, setup: dict[str, Any], embedded: ModelAdapter
) -> None:
    lls = bench.run_lm_eval(setup["lm"], bench.lm_eval_task(setup["folder"], bench.LETTERS_TASK))
    items = _items(setup, bench.LETTERS_TASK)
    assert letter_scoring_valid(items)
    # continuation scoring: the same log-likelihoods lm-eval sums (its context's trailing newline moves into
    # the continuation, as lm-eval's _encode_pair does)
    _check(
        "letter task, continuation scoring",
        bench.compare(lls, score(embedded, items, scoring="continuation")),
    )
    # letter scoring: raw letter logits, so compared as differences from the first choice's
    _check(
        "letter task, letter scoring",
        bench.compare(lls, score(embedded, items, scoring="letter"), relative=True),
    )


def test_steered_matches_lm_eval_steered(
    bench: ModuleType, setup: dict[str, Any], embedded: ModelAdapter
) -> None:
    from lm_eval.models.hf_steered import SteeredModel

    from rolevec.steering.export import export_lm_eval

    vectors = bench.random_vectors(embedded, seed=0)
    condition = Condition.make("add", **STEER)
    steering = condition.steering(vectors)
    assert steering is not None
    pt = export_lm_eval(steering, embedded, setup["root"] / "doctor.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = SteeredModel(
            pretrained=str(setup["model_dir"]),
            steer_path=str(pt),
            device="cpu",
            dtype="float32",
            batch_size=8,
        )
    for name, rule in ((bench.ENDINGS, "continuation"), (bench.LETTERS_TASK, "letter")):
        lls = bench.run_lm_eval(lm, bench.lm_eval_task(setup["folder"], name))
        items = _items(setup, name)
        steered = score(embedded, items, condition, vectors=vectors, scoring="continuation", batch_size=8)
        _check(f"{name} steered, continuation scoring", bench.compare(lls, steered))
        if rule == "letter":
            letters = score(embedded, items, condition, vectors=vectors, scoring="letter", batch_size=8)
            _check(f"{name} steered, letter scoring", bench.compare(lls, letters, relative=True))
        baseline = score(embedded, items[:16], scoring="continuation", batch_size=8)
        pairs = zip(steered[:16], baseline, strict=True)
        moved = max(abs(a - b) for s, r in pairs for a, b in zip(s.logits, r.logits, strict=True))
        assert moved > 1e-2, f"the addition barely changed {name}'s log-likelihoods ({moved:.2e})"
