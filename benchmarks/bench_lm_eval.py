"""rolevec's scorer against lm-evaluation-harness on the same multiple-choice questions, in one process.

Two local lm-eval tasks are written to a temporary folder (task YAML over a JSON file):

* ``rv_endings``: text continuations (deterministic arithmetic sentences, 4 number-word endings each);
* ``rv_letters``: MMLU rows of the paper's ``mmlu_domains`` files, ``doc_to_text`` listing A-D and ending
  in ``Answer:``, ``doc_to_choice`` the letters A-D.

lm-eval (``--model hf``, the embedded SmolLM2 saved as a model folder, float32, ``apply_chat_template``)
and rolevec (``load_lm_eval_task(..., chat_template=True)`` + ``score``) score the same documents; the
timed runs alternate. Prints questions/s, their ratio, the prediction agreement and the largest
log-likelihood difference, and writes ``benchmarks/results/lm-eval-float32.json``.

The parity test (tests/test_lm_eval_parity.py) imports the task writers and the lm-eval runner from here.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENDINGS, LETTERS_TASK = "rv_endings", "rv_letters"
TARGET = 1.5
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
_ONES += "sixteen seventeen eighteen nineteen"
_WORDS = _ONES.split()
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    """0..199 in English words (``42`` -> ``forty-two``)."""
    if n >= 100:
        rest = n - 100
        return "one hundred" + (f" and {number_word(rest)}" if rest else "")
    if n < 20:
        return _WORDS[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_WORDS[ones]}" if ones else "")


def ending_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` sentence completions: "Three plus four makes" -> 4 number words, one right, shuffled by seed."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    ops = [("plus", lambda a, b: a + b), ("times", lambda a, b: a * b)]
    pairs = [(op, a, b) for op in ops for a in range(1, 11) for b in range(1, 11)]
    for i in range(n):
        (word, fn), a, b = pairs[i % len(pairs)]
        right = fn(a, b)
        wrong = sorted({right + d for d in (-2, -1, 1, 2, 10) if 0 <= right + d < 200} - {right})
        options = [right, *rng.sample(wrong, 3)]
        rng.shuffle(options)
        lead = number_word(a).capitalize()
        rows.append(
            {
                "ctx": f"{lead} {word} {number_word(b)} makes",
                "endings": [number_word(x) for x in options],
                "label": options.index(right),
            }
        )
    return rows


def letter_rows(mmlu_dir: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` four-choice rows of the paper's domain files, round-robin over the domains."""
    files = sorted(mmlu_dir.glob("*.json"))
    per_file = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    rows: list[dict[str, Any]] = []
    index = 0
    while len(rows) < n:
        for data in per_file:
            if index < len(data) and len(rows) < n and len(data[index]["choices"]) == 4:
                row = data[index]
                rows.append(
                    {
                        "question": row["question"],
                        "choices": row["choices"],
                        "answer": "ABCD".index(row["answer"]),
                    }
                )
        index += 1
    return rows


def _yaml(name: str, data: Path, fields: dict[str, str]) -> str:
    lines = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": f"{{data_files: {{test: {json.dumps(str(data))}}}}}",
        "test_split": "test",
        "output_type": "multiple_choice",
        **fields,
        "metric_list": "[{metric: acc}, {metric: acc_norm}]",
    }
    return "".join(f"{key}: {value}\n" for key, value in lines.items())


def write_tasks(folder: Path, mmlu_dir: Path, n: int) -> Path:
    """The two tasks' YAML and JSON files in ``folder`` (``n`` documents each); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    endings = folder / f"{ENDINGS}.json"
    endings.write_text(json.dumps(ending_rows(n)), encoding="utf-8")
    fields = {"doc_to_text": json.dumps("{{ctx}}"), "doc_to_choice": "endings", "doc_to_target": "label"}
    (folder / f"{ENDINGS}.yaml").write_text(_yaml(ENDINGS, endings, fields), encoding="utf-8")
    letters = folder / f"{LETTERS_TASK}.json"
    letters.write_text(json.dumps(letter_rows(mmlu_dir, n)), encoding="utf-8")
    text = "{{question.strip()}}\n" + "".join(f"{c}. {{{{choices[{i}]}}}}\n" for i, c in enumerate("ABCD"))
    fields = {
        "doc_to_text": json.dumps(text + "Answer:"),
        "doc_to_choice": '["A", "B", "C", "D"]',
        "doc_to_target": "answer",
    }
    (folder / f"{LETTERS_TASK}.yaml").write_text(_yaml(LETTERS_TASK, letters, fields), encoding="utf-8")
    return folder


def lm_eval_task(folder: Path, name: str) -> Any:
    """lm-eval's Task object of one of the written tasks (built once, reused by every run)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False).load(name)["tasks"][name]


def run_lm_eval(lm: Any, task: Any, batch_size: int = 8) -> list[list[float]]:
    """lm-eval's per-choice log-likelihoods of every document (0-shot, chat template), in document order."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=0,
        batch_size=batch_size,
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    assert out is not None
    samples = sorted(out["samples"][task.config.task], key=lambda s: s["doc_id"])
    return [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]


def compare(
    lm_lls: Sequence[Sequence[float]], results: Sequence[Any], *, relative: bool = False
) -> dict[str, Any]:
    """Prediction agreement and the largest |log-likelihood difference| (``relative``: each choice's
    difference from the first choice, for letter logits, which lack the softmax's normaliser)."""
    agree = 0
    worst = 0.0
    for lls, result in zip(lm_lls, results, strict=True):
        mine = list(result.logits)
        if relative:
            lls = [x - lls[0] for x in lls]
            mine = [x - mine[0] for x in mine]
        agree += int(max(range(len(lls)), key=lls.__getitem__) == max(range(len(mine)), key=mine.__getitem__))
        worst = max(worst, *(abs(a - b) for a, b in zip(lls, mine, strict=True)))
    return {"n": len(results), "agreement": agree / len(results), "max_abs_loglik_diff": worst}


def random_vectors(adapter: Any, seed: int = 0) -> Any:
    """Seeded random role vectors (doctor, lawyer) shaped for ``adapter``, as the tests build them."""
    import torch

    from rolevec.vectors.role_vectors import RoleVectors

    gen = torch.Generator().manual_seed(seed)
    shape = (adapter.chat.n_positions, adapter.n_layers + 1, adapter.hidden_size)
    return RoleVectors(
        role_means={"doctor": torch.randn(shape, generator=gen), "lawyer": torch.randn(shape, generator=gen)},
        base_mean=torch.randn(shape, generator=gen),
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata={"model": adapter.name, "model_fingerprint": adapter.fingerprint()},
    )


def save_model(adapter: Any, folder: Path) -> Path:
    """The loaded model and tokenizer as a Hugging Face folder, for lm-eval's ``pretrained=``."""
    adapter.model.save_pretrained(folder)
    adapter.tokenizer.save_pretrained(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    import common

    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--questions", type=int, default=None, help="documents per task (default 200)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of both (default 8)")
    args = parser.parse_args(argv)
    if args.dtype != "float32" or args.device != "cpu" or args.model is not None:
        sys.exit("benchmark: error: this benchmark runs the embedded model on cpu in float32 only")
    bench = common.Bench(args, "lm-eval", repeats=2, quick_repeats=1)
    n = args.questions or (40 if args.quick else 200)
    data = common.find_data(args.data)

    from lm_eval.models.huggingface import HFLM

    from rolevec.data.lm_eval_tasks import load_lm_eval_task
    from rolevec.evaluation.conditions import score
    from rolevec.evaluation.continuation import ContinuationScorer
    from rolevec.evaluation.scoring import LetterScorer

    adapter = common.load("float32", args)
    bench.mark("load")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tasks(Path(tmp) / "tasks", data / "mmlu_domains", n)
        model_dir = save_model(adapter, Path(tmp) / "model")
        lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=args.batch_size)
        tasks = {name: lm_eval_task(folder, name) for name in (ENDINGS, LETTERS_TASK)}
        items = {
            name: load_lm_eval_task(name, folder, chat_template=True).items[name]
            for name in (ENDINGS, LETTERS_TASK)
        }
        scoring = {ENDINGS: "continuation", LETTERS_TASK: "letter"}
        methods: dict[str, Any] = {}
        warmup: dict[str, Any] = {}
        for name in (ENDINGS, LETTERS_TASK):
            rule = scoring[name]
            # one scorer per task, as a study keeps one per run: its one-off parity probe (a first batch
            # scored a second way) runs in the warm-up, not in the timed runs
            scorer = ContinuationScorer(adapter) if rule == "continuation" else LetterScorer(adapter)

            def rv(subset: Sequence[Any], rule: str = rule, scorer: Any = scorer) -> Any:
                return score(adapter, subset, scoring=rule, batch_size=args.batch_size, scorer=scorer)

            methods[f"lm-eval {name}"] = lambda task=tasks[name]: run_lm_eval(lm, task, args.batch_size)
            methods[f"rolevec {name} ({rule})"] = lambda subset=items[name], fn=rv: fn(subset)
            warmup[f"rolevec {name}"] = lambda subset=items[name][:8], fn=rv: fn(subset)
        timings = common.interleaved(methods, args.repeats, warmup=warmup)
        bench.add_timings(timings)
    rows = []
    summary: dict[str, Any] = {}
    for name in (ENDINGS, LETTERS_TASK):
        rule = scoring[name]
        theirs = timings[f"lm-eval {name}"]
        mine = timings[f"rolevec {name} ({rule})"]
        parity = compare(theirs.result, mine.result, relative=rule == "letter")
        speedup = common.ratio(theirs.best, mine.best)
        summary[name] = {
            "scoring": rule,
            "questions": n,
            "lm_eval_questions_per_s": n / theirs.best,
            "rolevec_questions_per_s": n / mine.best,
            "ratio": speedup,
            "ratio_median": common.ratio(theirs.median, mine.median),
            **parity,
        }
        rows.append(
            [
                name,
                rule,
                f"{n / theirs.best:.2f}",
                f"{n / mine.best:.2f}",
                f"{speedup:.2f}x",
                f"{parity['agreement']:.1%}",
                f"{parity['max_abs_loglik_diff']:.2e}",
                common.verdict(speedup, TARGET, at_least=True),
            ]
        )
    bench.data["tasks"] = summary
    table = common.markdown_table(
        [
            "task",
            "rolevec scoring",
            "lm-eval q/s",
            "rolevec q/s",
            "ratio",
            "same predictions",
            "max |Δ loglik|",
            f"target ≥ {TARGET:g}x",
        ],
        rows,
    )
    bench.finish(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
