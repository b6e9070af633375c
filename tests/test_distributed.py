"""The Ray executor on a local Ray instance with a tiny model: the same records and selection as the local
executor, a killed worker's shard rerun without loss or duplicates, a driver killed with SIGKILL resumed,
and one clear line for each bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.core.records import MemoryStore, RecordStore, read_records, record_identity
from rolevec.data.mcq import builtin_mcq_dir, load_mcq, make_split
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition
from rolevec.model.loading import load_model
from rolevec.model.testing import make_adapter
from rolevec.study.distributed import RayExecutor, check_address, import_ray, role_groups
from rolevec.study.executors import EvalSettings, LocalExecutor
from rolevec.study.stages import select_sites
from rolevec.vectors.role_vectors import RoleVectors

if os.environ.get("CI") != "true":
    pytest.importorskip("ray")  # CI installs the ray extra, so there a missing Ray fails instead

ROLES = ("lawyer", "mathematician")
DOMAIN_OF = {"lawyer": "law", "mathematician": "math"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a model folder (every worker loads it), and a random vector file."""
    root = tmp_path_factory.mktemp("tiny_ray")
    adapter = make_adapter("llama")
    adapter.model.save_pretrained(root / "model")
    adapter.tokenizer.save_pretrained(root / "model")
    loaded = load_model(str(root / "model"), device="cpu", progress=False)
    torch.manual_seed(0)
    shape = (len(loaded.chat.positions), loaded.n_layers + 1, loaded.hidden_size)
    RoleVectors(
        role_means={r: torch.randn(shape) for r in ROLES},
        base_mean=torch.randn(shape),
        positions=tuple(loaded.chat.positions),
        position_tokens=tuple(loaded.chat.position_tokens()),
        metadata={"model": "tiny", "model_fingerprint": loaded.fingerprint()},
    ).save(root / "vectors.safetensors")
    return root


def _records(path: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = list(read_records(path))
    keyed = {record_identity(r): r for r in rows}
    assert len(keyed) == len(rows), "duplicate records"
    return keyed


def _same(a: Path, b: Path) -> int:
    """Same keys, predictions and (to float32 noise) probabilities; returns the record count."""
    ra, rb = _records(a), _records(b)
    assert set(ra) == set(rb)
    for key, r in ra.items():
        assert r["pred"] == rb[key]["pred"], key
        assert r["probs"] == pytest.approx(rb[key]["probs"], abs=1e-5)
    return len(ra)


class _Killing:
    """A record store that SIGKILLs every Ray worker when it has taken ``after`` batches (``every``: each
    batch after that too), so the shards in flight die mid-way."""

    def __init__(self, store: RecordStore, executor: RayExecutor, after: int, every: bool = False) -> None:
        self.store, self.executor, self.after, self.every = store, executor, after, every
        self.batches = 0
        self.kills = 0

    def done(self, identity: tuple[Any, ...]) -> bool:
        return self.store.done(identity)

    def records(self) -> Iterator[dict[str, Any]]:
        return self.store.records()

    def identities(self) -> frozenset[tuple[Any, ...]]:
        return self.store.identities()

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        n = self.store.append(records)
        self.batches += 1
        if self.batches == self.after or (self.every and self.batches > self.after):
            for pid in self.executor.worker_pids():
                with suppress(ProcessLookupError):  # a worker killed before and not yet back
                    os.kill(pid, signal.SIGKILL)
            self.kills += 1
        return n


@pytest.fixture(scope="module")
def stage_inputs(tiny_dir: Path) -> dict[str, Any]:
    adapter = load_model(str(tiny_dir / "model"), device="cpu", progress=False)
    mcq = load_mcq(str(builtin_mcq_dir()), ["law", "math"])
    return {
        "adapter": adapter,
        "vectors": RoleVectors.load(tiny_dir / "vectors.safetensors"),
        "mcq": mcq,
        "split": make_split(mcq, seed=0, val_fraction=0.5),
    }


def _conditions() -> list[Condition]:
    out = [Condition("baseline")]
    for role, layer in (("lawyer", 1), ("mathematician", 2)):
        out += [
            Condition.make("persona", role=role),
            Condition.make("add", role=role, layer=layer, position=-1, alpha=3.0),
            Condition.make("ablate", role=role, layer=layer, position=-1),
            Condition.make("random", role=role, layer=layer, position=-1, alpha=3.0),
        ]
    return out


def _composed_and_capped() -> list[Condition]:
    """A composition's addition and a capping: their records carry extra identity fields through Ray."""
    mix = [("lawyer", 1.0), ("mathematician", -0.5)]
    return [
        Condition.make("add", compose=mix, compose_mode="orthogonal", layer=2, position=-1, alpha=3.0),
        Condition.make("cap", role="lawyer", layer=1, position=-1, cap=(-0.5, 0.5), cap_layers=[1, 2]),
    ]


def test_stages_on_ray_equal_local_and_survive_killed_workers(
    tiny_dir: Path, stage_inputs: dict[str, Any], tmp_path: Path
) -> None:
    adapter, vectors, mcq, split = (stage_inputs[k] for k in ("adapter", "vectors", "mcq", "split"))
    grid = {"layers": (0, 3), "positions": [-1, -2], "alphas": [1.0, 3.0], "limit": 6, "batch_size": 2}
    settings = EvalSettings(domains=("law", "math"), limit=6, batch_size=1)

    def stages(run: Path, executor: Any, wrap: Any = None) -> None:
        select_sites(
            adapter,
            vectors,
            ROLES,
            mcq,
            split,
            run,
            domain_of=DOMAIN_OF,
            progress=False,
            executor=executor,
            **grid,
        )
        with RecordStore(run / "records.jsonl") as disk:
            store = disk if wrap is None else wrap(disk)
            executor.evaluate(
                adapter, mcq, split, _conditions(), store, settings, vectors=vectors, progress=False
            )

    local = tmp_path / "local"
    stages(local, LocalExecutor())
    kwargs = {"model": str(tiny_dir / "model"), "dtype": "float32"}
    with RayExecutor(kwargs, workers=2, init_kwargs={"num_cpus": 2}) as executor:
        ray_run = tmp_path / "ray"
        stages(ray_run, executor)
        n = _same(local / "records.jsonl", ray_run / "records.jsonl")
        assert n == 2 * 6 * (1 + 3 * 2 * 3) + 9 * 2 * 6  # sweeps (baseline, adds, ablations) + test stage
        assert (
            json.loads((ray_run / "selection.json").read_text())["roles"]
            == json.loads((local / "selection.json").read_text())["roles"]
        )
        rows = [sorted((d / "sweep.jsonl").read_text().splitlines()) for d in (local, ray_run)]
        assert rows[0] == rows[1] and len(rows[0]) == 2 * 18
        described = executor.describe()
        assert [w["shards"] > 0 for w in described["workers"]] == [True, True]
        assert sum(w["records"] for w in described["workers"]) == n

        # continuation scoring travels with the settings: the same records, sums and acc_norm as locally
        cont = EvalSettings(domains=("law", "math"), limit=4, batch_size=2, scoring="continuation")
        for name, where in (("cont-local", LocalExecutor()), ("cont-ray", executor)):
            with RecordStore(tmp_path / name / "records.jsonl") as disk:
                where.evaluate(
                    adapter, mcq, split, _conditions(), disk, cont, vectors=vectors, progress=False
                )
        here, there = (_records(tmp_path / name / "records.jsonl") for name in ("cont-local", "cont-ray"))
        assert set(here) == set(there) and len(here) == 9 * 2 * 4
        for key, r in here.items():
            assert r["scoring"] == there[key]["scoring"] == "continuation"
            assert (r["pred"], r["pred_norm"]) == (there[key]["pred"], there[key]["pred_norm"])
            assert r["logliks"] == pytest.approx(there[key]["logliks"], abs=1e-4)

        # a composition and a capping travel too: the same records, their identity fields included
        extra = [Condition("baseline"), *_composed_and_capped()]
        for name, where in (("mix-local", LocalExecutor()), ("mix-ray", executor)):
            with RecordStore(tmp_path / name / "records.jsonl") as disk:
                where.evaluate(adapter, mcq, split, extra, disk, settings, vectors=vectors, progress=False)
        here, there = (_records(tmp_path / name / "records.jsonl") for name in ("mix-local", "mix-ray"))
        assert set(here) == set(there) and len(here) == 3 * 2 * 6
        assert {r["condition"] for r in there.values()} == {"baseline", "add", "cap"}
        for key, r in here.items():
            assert {k: r.get(k) for k in ("compose", "cap", "cap_layers", "pred")} == {
                k: there[key].get(k) for k in ("compose", "cap", "cap_layers", "pred")
            }
            assert r["probs"] == pytest.approx(there[key]["probs"], abs=1e-5)

        # every worker SIGKILLed after the test stage's 5th batch: the shards in flight rerun from their
        # start, the driver drops what it already stored, and nothing is lost
        killed = tmp_path / "killed"
        select_sites(
            adapter,
            vectors,
            ROLES,
            mcq,
            split,
            killed,
            domain_of=DOMAIN_OF,
            progress=False,
            executor=executor,
            **grid,
        )
        holder: list[_Killing] = []

        def wrap(disk: RecordStore) -> _Killing:
            holder.append(_Killing(disk, executor, after=5))
            return holder[0]

        stages_evaluate = _conditions()
        with RecordStore(killed / "records.jsonl") as disk:
            store = wrap(disk)
            report = executor.evaluate(
                adapter, mcq, split, stages_evaluate, store, settings, vectors=vectors, progress=False
            )
        assert holder[0].kills == 1
        assert sum(w["failures"] for w in executor.describe()["workers"]) >= 1
        assert report.n_new == 9 * 2 * 6
        assert _same(local / "records.jsonl", killed / "records.jsonl") == n

        # a worker that keeps dying: the run stops naming the shard, and keeps every record it stored
        dying = tmp_path / "dying"
        executor.max_retries = 1
        with RecordStore(dying / "records.jsonl") as disk, pytest.raises(RolevecError) as err:
            executor.evaluate(
                adapter,
                mcq,
                split,
                _conditions(),
                _Killing(disk, executor, 2, every=True),
                settings,
                vectors=vectors,
                progress=False,
            )
        message = str(err.value)
        assert "failed 2 time(s)" in message and "test " in message and "rerun the same command" in message
        kept = _records(dying / "records.jsonl")
        assert kept and all(kept[k]["pred"] == _records(local / "records.jsonl")[k]["pred"] for k in kept)


def test_role_groups_keep_roles_whole_and_order_by_layer() -> None:
    conds = _conditions()
    assert role_groups(conds, 1) == [conds]
    first, second = role_groups(conds, 2)
    assert first[0] == Condition("baseline")
    assert {c.role for c in first[1:]} == {"lawyer"} and {c.role for c in second} == {"mathematician"}
    assert role_groups(conds, 9) == [first, second]


def test_memory_store_counts_and_streams_batches() -> None:
    sent: list[list[dict[str, Any]]] = []
    record = {
        "condition": "baseline",
        "role": None,
        "persona_template": None,
        "layer": None,
        "position": None,
        "alpha": None,
        "domain": "law",
        "split": "val",
        "qid": "q1",
        "subject": "s",
        "gold": "A",
        "pred": "B",
        "correct": False,
        "p_gold": 0.1,
        "probs": [0.1, 0.7, 0.1, 0.1],
    }
    store = MemoryStore(done=[record_identity({**record, "qid": "q0"})], on_append=sent.append)
    assert store.append([record, record]) == 1 and store.append([record]) == 0
    assert len(sent) == 1 and sent[0][0]["qid"] == "q1" and len(store) == 2
    assert store.done(record_identity(record)) and [r["qid"] for r in store.records()] == ["q1"]


# --- the command line ------------------------------------------------------------------------------


def _cli(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(tiny_dir / "model"),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--mcq-dir",
        str(builtin_mcq_dir()),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_run_quick_preset_on_ray_equals_local(tiny_dir: Path, tmp_path: Path) -> None:
    common = [
        "run",
        "--preset",
        "quick",
        "--roles",
        "lawyer,mathematician,doctor",
        "--domains",
        "law,math,medicine",
        "--layer-step",
        "1",
        "--no-interpret",
    ]
    assert main([*common, *_cli(tiny_dir, tmp_path / "local")]) == 0
    ray_dir = tmp_path / "ray"
    assert main([*common, *_cli(tiny_dir, ray_dir, "--executor", "ray", "--workers", "2")]) == 0
    assert _same(tmp_path / "local" / "records.jsonl", ray_dir / "records.jsonl") > 0
    sel = [json.loads((d / "selection.json").read_text())["roles"] for d in (tmp_path / "local", ray_dir)]
    assert sel[0] == sel[1]
    manifest = json.loads((ray_dir / "manifest.json").read_text())["execution"]
    assert manifest["executor"] == "ray" and len(manifest["workers"]) == 2
    assert {"host", "device", "shards", "seconds"} <= set(manifest["workers"][0])
    assert set(manifest["stages"]) == {"selection", "test"}
    assert json.loads((tmp_path / "local" / "manifest.json").read_text())["execution"] == {
        "executor": "local"
    }


def test_driver_killed_with_sigkill_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [
        "evaluate",
        "--vectors",
        str(tiny_dir / "vectors.safetensors"),
        "--role",
        "lawyer,mathematician",
        "--layer",
        "1",
        "--position",
        "-1",
        "--alpha",
        "3",
        "--domains",
        "law,math",
        "--limit",
        "10",
        "--batch-size",
        "1",
    ]
    args = [*common, *_cli(tiny_dir, run)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolevec", *args, "--executor", "ray", "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    records = run / "records.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = len(_records(records))
    assert 20 <= before < 2 * 10 * 9
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0
    assert len(_records(records)) == 2 * 10 * 9
    reference = tmp_path / "reference"
    assert main([*common, *_cli(tiny_dir, reference)]) == 0
    assert _same(reference / "records.jsonl", records) == 2 * 10 * 9


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rolevec: error:")
    return err[-1]


def test_bad_ray_input_is_one_line_and_writes_nothing(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["evaluate", "--conditions", "baseline", "--limit", "2", "--domains", "law"]
    out = tmp_path / "never"
    with pytest.raises(RolevecError, match="not HOST:PORT"):
        check_address("10.0.0.1")
    line = _error(capsys, [*base, *_cli(tiny_dir, out, "--workers", "2")])
    assert "--workers apply to the Ray executor: add --executor ray" in line
    line = _error(capsys, [*base, *_cli(tiny_dir, out, "--executor", "ray", "--address", "127.0.0.1:9")])
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in line and "ray start --head" in line
    line = _error(
        capsys, [*base, *_cli(tiny_dir, out, "--executor", "ray", "--gpus-per-worker", "1", "--workers", "1")]
    )
    assert "GPU(s), not the 1 that 1 worker(s)" in line and "--gpus-per-worker" in line
    line = _error(capsys, [*base, *_cli(tiny_dir, out, "--executor", "ray", "--address", "nowhere")])
    assert "is not HOST:PORT" in line
    monkeypatch.setitem(sys.modules, "ray", None)
    line = _error(capsys, [*base, *_cli(tiny_dir, out, "--executor", "ray")])
    assert "pip install 'rolevec[ray]'" in line
    assert not out.exists()
    with pytest.raises(RolevecError, match="pip install"):
        import_ray()
