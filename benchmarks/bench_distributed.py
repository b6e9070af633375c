"""Benchmark 6: the quick preset's test stage on the Ray executor against the local executor.

The test stage of the quick preset (8 roles, 8 domains × 8 test questions, 41 conditions: 2624 records)
on the embedded model in float32, scored four ways in one process, each into a fresh run folder:

* local executor, 1 torch thread;
* local executor, 2 torch threads (what a user of this 2-core machine would otherwise run);
* Ray, 1 worker × 1 thread (against local with 1 thread: the driver's overhead);
* Ray, 2 workers × 1 thread (against Ray with 1 worker: the target is at least 1.8× the throughput).

Ray's start (a local instance and the workers loading the model) is timed apart from the stage. The
records of every run are compared with the first one's: same keys and predictions, largest probability
difference. The sites come from a finished quick run (``--run DIR``: its vectors, split and selection),
else vectors are extracted here from the quick preset's prompt counts and every role is steered at
layer 12, position -1 (the cost barely depends on the site).

    python benchmarks/bench_distributed.py [--run runs/quick] [--test-limit 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import RESULTS, find_data
from rolevec.core.records import RecordStore, read_records, record_identity
from rolevec.data.mcq import DOMAINS, Split, load_mcq, make_split
from rolevec.evaluation.selection import Choice
from rolevec.model.loading import load_model
from rolevec.study.distributed import RayExecutor
from rolevec.study.executors import EvalSettings, LocalExecutor
from rolevec.study.pipeline import PRESETS
from rolevec.study.stages import study_conditions
from rolevec.vectors.role_vectors import RoleVectors

TARGET = 1.8


def _inputs(args: argparse.Namespace, adapter: Any) -> tuple[Any, Split, RoleVectors, dict[str, Choice]]:
    mcq = load_mcq(str(find_data(args.data) / "mmlu_domains"), list(DOMAINS))
    roles = PRESETS["quick"]["roles"]
    if args.run:
        run = Path(args.run)
        vectors = RoleVectors.load(run / "vectors.safetensors")
        split = Split.load(run / "split.json")
        chosen = json.loads((run / "selection.json").read_text())["roles"]
        sites = {
            r: (int(chosen[r]["layer"]), int(chosen[r]["position"]), float(chosen[r]["alpha"])) for r in roles
        }
    else:
        from rolevec.data.sources import load_base, load_role_prompts, sample
        from rolevec.vectors.extraction import extract_role_vectors

        n, n_base = PRESETS["quick"]["n_prompts"], PRESETS["quick"]["n_base"]
        sets = {r: sample(load_role_prompts(r), n, 42) for r in roles}
        vectors = extract_role_vectors(adapter, sets, sample(load_base(None), n_base, 42), progress=False)
        split = make_split(mcq, seed=0, val_fraction=0.2)
        sites = {r: (12, -1, 3.0) for r in roles}
    choices = {
        r: Choice(
            role=r,
            domain="",
            layer=layer,
            position=pos,
            alpha=alpha,
            val_accuracy=0.0,
            val_baseline=0.0,
            val_ablate_accuracy=None,
            criterion_met=True,
            n_candidates_passing=0,
        )
        for r, (layer, pos, alpha) in sites.items()
    }
    return mcq, split, vectors, choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a finished quick run folder (vectors, split, selection)")
    parser.add_argument("--test-limit", type=int, default=PRESETS["quick"]["test_limit"])
    parser.add_argument("--rounds", type=int, default=1, help="repeat the four runs (best time kept)")
    parser.add_argument("--data", default=None, help="the paper's data folder (default: found)")
    parser.add_argument("--out", default=str(RESULTS / "distributed-float32.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    adapter = load_model(None, device="cpu", dtype="float32", progress=False)
    mcq, split, vectors, choices = _inputs(args, adapter)
    conditions = study_conditions(choices, alphas=(1.0, 3.0), persona_templates=["you_are"])
    settings = EvalSettings(domains=tuple(DOMAINS), limit=args.test_limit, batch_size=16)
    runs: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    folders: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))

    def local(name: str, threads: int, folder: Path) -> None:
        torch.set_num_threads(threads)
        try:
            with RecordStore(folder / "records.jsonl") as store:
                begin = time.perf_counter()
                LocalExecutor().evaluate(
                    adapter, mcq, split, conditions, store, settings, vectors=vectors, progress=False
                )
                runs.setdefault(name, []).append(time.perf_counter() - begin)
        finally:
            torch.set_num_threads(1)

    def ray(name: str, workers: int, folder: Path) -> None:
        begin = time.perf_counter()
        with RayExecutor(
            {"model": None, "dtype": "float32"},
            workers=workers,
            cpus_per_worker=1,
            init_kwargs={"num_cpus": 2},
        ) as executor:
            starts.setdefault(name, []).append(time.perf_counter() - begin)
            with RecordStore(folder / "records.jsonl") as store:
                begin = time.perf_counter()
                executor.evaluate(
                    adapter, mcq, split, conditions, store, settings, vectors=vectors, progress=False
                )
                runs.setdefault(name, []).append(time.perf_counter() - begin)

    plan = [
        ("local 1 thread", lambda f: local("local 1 thread", 1, f)),
        ("local 2 threads", lambda f: local("local 2 threads", 2, f)),
        ("ray 1 worker", lambda f: ray("ray 1 worker", 1, f)),
        ("ray 2 workers", lambda f: ray("ray 2 workers", 2, f)),
    ]
    for round_ in range(args.rounds):
        order = plan[round_ % 4 :] + plan[: round_ % 4]
        for name, fn in order:
            folder = tmp / f"{name.replace(' ', '-')}-{round_}"
            fn(folder)
            folders.setdefault(name, folder)
            print(f"{name}: {runs[name][-1]:.1f} s", flush=True)

    reference = {record_identity(r): r for r in read_records(folders["local 1 thread"] / "records.jsonl")}
    n = len(reference)
    best = {k: min(v) for k, v in runs.items()}
    rows: dict[str, Any] = {}
    for name, folder in folders.items():
        mine = {record_identity(r): r for r in read_records(folder / "records.jsonl")}
        same_keys = set(mine) == set(reference)
        preds = sum(mine[k]["pred"] != reference[k]["pred"] for k in reference if k in mine)
        delta = max(
            (
                abs(a - b)
                for k in reference
                if k in mine
                for a, b in zip(mine[k]["probs"], reference[k]["probs"], strict=True)
            ),
            default=0.0,
        )
        rows[name] = {
            "seconds": round(best[name], 2),
            "records_per_s": round(n / best[name], 2),
            "ray_start_s": round(min(starts[name]), 2) if name in starts else None,
            "same_keys": same_keys,
            "pred_differences": preds,
            "max_prob_difference": delta,
        }
    ratios = {
        "ray 2 workers / ray 1 worker (throughput)": best["ray 1 worker"] / best["ray 2 workers"],
        "ray 2 workers / local 2 threads (throughput)": best["local 2 threads"] / best["ray 2 workers"],
        "ray 1 worker / local 1 thread (driver overhead, time)": best["ray 1 worker"]
        / best["local 1 thread"],
    }
    result = {
        "benchmark": "distributed",
        "records": n,
        "test_limit": args.test_limit,
        "sites": "from " + args.run if args.run else "layer 12, position -1 (vectors extracted here)",
        "rounds": args.rounds,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "runs": rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "target": f"ray 2 workers ≥ {TARGET}× ray 1 worker",
        "target_met": ratios["ray 2 workers / ray 1 worker (throughput)"] >= TARGET,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
