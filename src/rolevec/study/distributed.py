"""The sweep and test stages on a Ray cluster: actors that load the model once and score many shards.

Shards: the selection stage has one per role (its whole sweep); the test stage one per domain and group of
roles (the baseline rides with the first group), roles grouped by their chosen layer. A shard scores
exactly what the local executor scores for it, question batches included, so padding, and with it
near-tie predictions, cannot differ.

Nothing assumes a shared file system: vectors (safetensors bytes), questions, split and settings travel
through Ray's object store, and each worker streams its records back per batch. The driver is the run
folder's only writer: it appends them to the one :class:`~rolevec.core.records.RecordStore`, which drops
a record whose identity is stored, so a shard that runs twice (a retry, Ray's at-least-once delivery)
leaves no duplicate and a driver killed mid-run resumes from the records already on disk, like the
local executor.

A worker that dies mid-shard (killed, out of memory) is restarted by Ray and the shard is run again from
the state it started from; after ``max_retries`` failures the run stops, naming the shard, with every
finished record kept. Entry points::

    RayExecutor(model_kwargs, address=None, workers=None, gpus_per_worker=0, cpus_per_worker=1, ...)
    with RayExecutor(...) as executor: run_study(adapter, config, run_dir, executor=executor)
"""

from __future__ import annotations

import math
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..core.records import Identity, MemoryStore, Store, record_identity
from ..data.mcq import MCQSet, Split
from ..errors import RolevecError
from ..evaluation.conditions import STEERED, Condition, EvaluationReport
from ..evaluation.scoring import LetterScorer
from ..evaluation.sweep import SweepResult
from ..model.loading import ModelAdapter
from ..vectors.role_vectors import RoleVectors
from .executors import EvalSettings, SweepJob, SweepSettings

#: The pip extra that installs Ray.
RAY_EXTRA = "ray"


def import_ray() -> Any:
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RolevecError(
            f"the Ray executor needs Ray, which is not installed: pip install 'rolevec[{RAY_EXTRA}]' "
            "(or leave `executor` at local)"
        ) from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a HOST:PORT nobody listens on at once (``ray.init`` would retry it for minutes)."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise RolevecError(f"Ray address {address!r} is not HOST:PORT: pass e.g. 10.0.0.1:6379, or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RolevecError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}): start its head with "
            "`ray start --head`, pass the address it prints, or leave `address` unset for a local instance"
        ) from None


def vectors_bytes(vectors: RoleVectors | None) -> bytes | None:
    """The vectors as the bytes of their safetensors file (what travels to the workers)."""
    if vectors is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = vectors.save(Path(tmp) / "vectors.safetensors")
        return path.read_bytes()


def vectors_from_bytes(data: bytes | None) -> RoleVectors | None:
    if data is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vectors.safetensors"
        path.write_bytes(data)
        return RoleVectors.load(path)


# --- the worker (a Ray actor; plain class here, wrapped with ray.remote on start) -------------------


class _RemoteBar:
    """Stands in for a sweep's tqdm bar on a worker: reports the shard's total to the driver's one bar."""

    def __init__(self, send: Callable[[tuple[str, Any]], None]) -> None:
        self._send = send
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = int(value)
        self._send(("total", self._total))

    def update(self, n: int = 1) -> None:  # the driver counts the records it stores
        pass

    def refresh(self) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass


class Worker:
    """Loads the model once, then scores shards; each call streams ``(kind, payload)`` messages:
    ``("total", n)`` (a sweep's questions), ``("records", [...])`` per batch, then ``("result", ...)``."""

    def __init__(self, model_kwargs: Mapping[str, Any], threads: int) -> None:
        import torch

        from ..model.loading import load_model

        torch.set_num_threads(max(1, threads))
        self.threads = threads
        self.adapter = load_model(**{**model_kwargs, "progress": False})
        self.scorer = LetterScorer(self.adapter)
        self._context: tuple[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.adapter.device),
            "threads": torch.get_num_threads(),
            "fingerprint": self.adapter.fingerprint(),
            "dtype": str(self.adapter.dtype).replace("torch.", ""),
        }

    def _vectors(self, key: str, data: bytes | None) -> RoleVectors | None:
        if self._context is None or self._context[0] != key:
            self._context = (key, vectors_from_bytes(data))
        vectors: RoleVectors | None = self._context[1]
        return vectors

    def _stream(
        self,
        work: Callable[[MemoryStore, Callable[[tuple[str, Any]], None]], Any],
        seed: Sequence[Mapping[str, Any]],
        done: Sequence[Identity],
    ) -> Iterator[tuple[str, Any]]:
        messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        store = MemoryStore(seed, done=done, on_append=lambda batch: messages.put(("records", batch)))

        def target() -> None:
            try:
                messages.put(("result", work(store, messages.put)))
            except BaseException as exc:  # re-raised below, in the actor's own thread
                messages.put(("error", exc))

        thread = threading.Thread(target=target, name="rolevec-shard", daemon=True)
        thread.start()
        while True:
            kind, payload = messages.get()
            if kind == "error":
                thread.join()
                raise payload
            yield kind, payload
            if kind == "result":
                thread.join()
                return

    def sweep_shard(
        self, context: Mapping[str, Any], job: SweepJob, seed: Sequence[Mapping[str, Any]]
    ) -> Iterator[tuple[str, Any]]:
        vectors = self._vectors(context["key"], context["vectors"])
        assert vectors is not None
        settings: SweepSettings = context["settings"]

        def work(store: MemoryStore, send: Callable[[tuple[str, Any]], None]) -> SweepResult:
            return settings.run(
                self.adapter, vectors, job, store, self.scorer, progress=False, bar=_RemoteBar(send)
            )

        yield from self._stream(work, seed, ())

    def evaluate_shard(
        self,
        context: Mapping[str, Any],
        conditions: Sequence[Condition],
        domain: str,
        done: Sequence[Identity],
    ) -> Iterator[tuple[str, Any]]:
        vectors = self._vectors(context["key"], context["vectors"])
        settings: EvalSettings = context["settings"]

        def work(store: MemoryStore, send: Callable[[tuple[str, Any]], None]) -> dict[str, Any]:
            report = settings.run(
                self.adapter,
                context["mcq"],
                context["split"],
                conditions,
                store,
                self.scorer,
                vectors=vectors,
                domains=[domain],
                progress=False,
            )
            return {
                "persona_folded": report.persona_folded,
                "scorer_mode": report.scorer_mode,
                "skipped": list(report.skipped),
            }

        yield from self._stream(work, (), done)


# --- the driver -------------------------------------------------------------------------------------


@dataclass
class _Shard:
    """One unit of work and what its reruns need: the call that runs it and its retry count."""

    name: str
    call: Callable[[Any], Any]
    group: int = 0
    attempts: int = 0
    total: int = 0


@dataclass
class _WorkerLog:
    index: int
    info: dict[str, Any]
    shards: int = 0
    seconds: float = 0.0
    records: int = 0
    failures: int = 0
    names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "host": self.info.get("host"),
            "pid": self.info.get("pid"),
            "device": self.info.get("device"),
            "threads": self.info.get("threads"),
            "shards": self.shards,
            "seconds": round(self.seconds, 2),
            "records": self.records,
            "failures": self.failures,
        }


class RayExecutor:
    """The sweep and test stages spread over Ray actors, each loading the model once.

    Use as a context manager (or call :meth:`start` and :meth:`close`): it starts a local Ray instance,
    or joins the cluster at ``address``, and creates the workers.

    Args:
        model_kwargs: What each worker passes to :func:`rolevec.load_model` (model, dtype, device_map,
            ...); the device is the worker's (``cuda`` with GPUs, else ``cpu``; a ``device_map`` places a
            model larger than one GPU over the worker's ``gpus_per_worker`` GPUs).
        address: ``None`` starts a local Ray instance; ``auto`` or ``HOST:PORT`` joins a running cluster.
        workers: How many workers (default: as many as the cluster's GPUs, or CPUs, allow).
        gpus_per_worker: GPUs each worker holds (default 0: CPU workers).
        cpus_per_worker: CPU cores, and torch threads, each worker holds (default 1).
        max_retries: How often a shard whose worker died is run again before the run stops (default 3).
        groups_per_domain: Role groups per domain in the test stage (default: enough for two shards a
            worker; 1 keeps every domain's additions in one shared-residual pass).
        init_kwargs: Further ``ray.init`` arguments for a local instance (e.g. ``{"num_cpus": 2}``).
        log: Receives one line per worker started (default: none).

    Example:
        ```python
        with RayExecutor({"model": None, "dtype": "float32"}, workers=2) as executor:
            run_study(adapter, config_from("quick", None, {}), "runs/quick", executor=executor)
        ```
    """

    def __init__(
        self,
        model_kwargs: Mapping[str, Any],
        *,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: int = 1,
        max_retries: int = 3,
        groups_per_domain: int | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise RolevecError(f"`workers` must be at least 1, not {workers}")
        if gpus_per_worker < 0 or cpus_per_worker < 1:
            raise RolevecError(
                f"`gpus_per_worker` must be 0 or more and `cpus_per_worker` at least 1, not "
                f"{gpus_per_worker} and {cpus_per_worker}"
            )
        if max_retries < 0:
            raise RolevecError(f"`max_retries` must be 0 or more, not {max_retries}")
        if groups_per_domain is not None and groups_per_domain < 1:
            raise RolevecError(f"`groups_per_domain` must be at least 1, not {groups_per_domain}")
        # A device map places the weights itself (and `device` must then stay auto).
        device = "auto" if model_kwargs.get("device_map") else "cuda" if gpus_per_worker > 0 else "cpu"
        self.model_kwargs = {**model_kwargs, "device": device}
        self.address = address
        self.n_workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.max_retries = max_retries
        self.groups_per_domain = groups_per_domain
        self.init_kwargs = dict(init_kwargs or {})
        self.log = log
        self._ray: Any = None
        self._started_ray = False
        self._actors: list[Any] = []
        self._logs: list[_WorkerLog] = []
        self._cluster: dict[str, float] = {}
        self._stages: dict[str, dict[str, Any]] = {}

    # --- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start or join Ray, check its resources and create the workers (each loads the model)."""
        import logging

        if self._actors:
            return
        ray = import_ray()
        self._ray = ray
        if self.address is not None:
            check_address(self.address)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
                "configure_logging": True,
            }
            if self.address is None:
                kwargs.update(address="local", **self.init_kwargs)
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise RolevecError(
                    f"cannot join the Ray cluster at {self.address} ({str(exc).splitlines()[0]}): start it "
                    "with `ray start --head`, or leave `address` unset for a local instance"
                ) from None
            self._started_ray = True
        try:
            self._create_workers(ray)
        except BaseException:
            self.close()
            raise

    def _create_workers(self, ray: Any) -> None:
        resources = ray.cluster_resources()
        self._cluster = {k: float(v) for k, v in resources.items() if k in ("CPU", "GPU")}
        cpus, gpus = self._cluster.get("CPU", 0.0), self._cluster.get("GPU", 0.0)
        n = self.n_workers
        if n is None:
            n = (
                int(gpus // self.gpus_per_worker)
                if self.gpus_per_worker > 0
                else int(cpus // self.cpus_per_worker)
            )
            n = max(1, n)
        if self.gpus_per_worker > 0 and n * self.gpus_per_worker > gpus:
            raise RolevecError(
                f"the Ray cluster has {gpus:g} GPU(s), not the {n * self.gpus_per_worker:g} that {n} "
                f"worker(s) × {self.gpus_per_worker:g} need: pass fewer `workers` or `gpus_per_worker`"
            )
        if n * self.cpus_per_worker > cpus:
            raise RolevecError(
                f"the Ray cluster has {cpus:g} CPU(s), not the {n * self.cpus_per_worker} that {n} "
                f"worker(s) × {self.cpus_per_worker} need: pass fewer `workers` or `cpus_per_worker`"
            )
        remote = ray.remote(Worker).options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=-1,
            max_task_retries=0,
        )
        self._actors = [remote.remote(self.model_kwargs, self.cpus_per_worker) for _ in range(n)]
        infos = []
        for i, actor in enumerate(self._actors):
            try:
                infos.append(ray.get(actor.info.remote()))
            except ray.exceptions.RayError as exc:
                raise RolevecError(f"Ray worker {i} could not load the model: {_cause(exc)}") from None
        self._logs = [_WorkerLog(i, info) for i, info in enumerate(infos)]
        if self.log is not None:
            for w in self._logs:
                self.log(
                    f"ray worker {w.index}: {w.info['host']} pid {w.info['pid']} on {w.info['device']}, "
                    f"{w.info['threads']} thread(s)"
                )

    def close(self) -> None:
        """Stop the workers, and the local Ray instance if this executor started it."""
        ray = self._ray
        if ray is None:
            return
        for actor in self._actors:
            with suppress(Exception):  # already gone
                ray.kill(actor)
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def _wait_alive(self, index: int, actor: Any, timeout: float = 600.0) -> bool:
        """Wait for Ray to restart a dead worker (calls fail fast while it restarts); False if it is gone
        for good. A restart reloads the model, hence the long timeout."""
        ray = self._ray
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._logs[index].info = ray.get(actor.info.remote(), timeout=timeout)
                return True
            except ray.exceptions.ActorDiedError:
                return False
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        return False

    def worker_pids(self) -> list[int]:
        """The workers' process ids as last seen (a restarted worker's new id once its shard reruns)."""
        return [int(w.info["pid"]) for w in self._logs]

    def describe(self) -> dict[str, Any]:
        return {
            "executor": "ray",
            "address": self.address or "local",
            "cluster": self._cluster,
            "gpus_per_worker": self.gpus_per_worker,
            "cpus_per_worker": self.cpus_per_worker,
            "workers": [w.to_json() for w in self._logs],
            "stages": self._stages,
        }

    def _check_model(self, adapter: ModelAdapter) -> None:
        if not self._actors:
            raise RolevecError("the Ray executor is not started: use it as a context manager (`with`)")
        mine = adapter.fingerprint()
        for w in self._logs:
            if w.info["fingerprint"] != mine:
                raise RolevecError(
                    f"Ray worker {w.index} on {w.info['host']} loaded another model than this process "
                    f"(fingerprint {w.info['fingerprint']}, here {mine}): give every node the same `model`"
                )
            if w.info["dtype"] != str(adapter.dtype).replace("torch.", ""):
                raise RolevecError(
                    f"Ray worker {w.index} runs {w.info['dtype']}, this process {adapter.dtype}: pass `dtype`"
                )

    # --- the stages ---------------------------------------------------------------------------------
    def sweep(
        self,
        adapter: ModelAdapter,
        vectors: RoleVectors,
        jobs: Sequence[SweepJob],
        store: Store,
        settings: SweepSettings,
        *,
        scorer: LetterScorer | None = None,
        progress: bool = True,
        on_result: Callable[[SweepResult], None] | None = None,
    ) -> list[SweepResult]:
        ray = self._ray
        self._check_model(adapter)
        vectors.check_compatible(adapter)
        context = ray.put(
            {"key": f"sweep-{time.time_ns()}", "vectors": vectors_bytes(vectors), "settings": settings}
        )
        mine: dict[tuple[str, str], list[dict[str, Any]]] = {(j.role, j.domain): [] for j in jobs}
        domains = {j.domain for j in jobs}
        for r in store.records():
            if r["split"] != "val" or r["domain"] not in domains:
                continue
            for job in jobs:
                if job.domain == r["domain"] and (r["condition"] == "baseline" or r["role"] == job.role):
                    mine[(job.role, job.domain)].append(r)
        shards = []
        for job in jobs:
            seed = ray.put(mine[(job.role, job.domain)])
            shards.append(
                _Shard(
                    f"sweep {job.role}",
                    partial(_stream_call, "sweep_shard", context, job, seed),
                )
            )
        results: dict[str, SweepResult] = {}

        def finished(shard: _Shard, payload: Any) -> None:
            results[shard.name] = payload
            if on_result is not None:
                on_result(payload)

        self._run("selection", shards, store, finished, progress=progress, total=None)
        return [results[f"sweep {job.role}"] for job in jobs]

    def evaluate(
        self,
        adapter: ModelAdapter,
        mcq: MCQSet,
        split: Split,
        conditions: Sequence[Condition],
        store: Store,
        settings: EvalSettings,
        *,
        vectors: RoleVectors | None = None,
        scorer: LetterScorer | None = None,
        progress: bool = True,
    ) -> EvaluationReport:
        ray = self._ray
        self._check_model(adapter)
        for cond in conditions:
            if cond.kind in STEERED:
                cond.steering(vectors, settings.random_seed)  # a missing role or site fails here, once
        domains = list(settings.domains) if settings.domains is not None else mcq.domains
        context = ray.put(
            {
                "key": f"evaluate-{time.time_ns()}",
                "vectors": vectors_bytes(vectors),
                "settings": settings,
                "mcq": mcq,
                "split": split,
            }
        )
        done = store_identities(store)
        report = EvaluationReport()
        groups = role_groups(
            conditions, self.groups_per_domain or math.ceil(2 * len(self._actors) / max(1, len(domains)))
        )
        shards = []
        totals = 0
        for domain in domains:
            items = split.select(mcq, domain, settings.split_name, limit=settings.limit)
            which = split.split_of(domain)
            for g, group in enumerate(groups):
                ids = {c.identity() for c in group}
                keys = [(*c.identity(), which[it.qid], it.qid) for c in group for it in items]
                pending = sum(1 for k in keys if k not in done)
                report.n_done_before += len(keys) - pending
                if not pending:
                    continue
                seen = [k for k in done if k[:-2] in ids and k[-1] in which]
                totals += pending
                shards.append(
                    _Shard(
                        f"test {domain} group {g + 1}/{len(groups)}",
                        partial(_stream_call, "evaluate_shard", context, group, domain, seen),
                        group=g,
                        total=pending,
                    )
                )

        def finished(shard: _Shard, payload: Any) -> None:
            report.persona_folded |= bool(payload["persona_folded"])
            report.skipped += [q for q in payload.get("skipped", ()) if q not in report.skipped]
            if payload["scorer_mode"] != "fast":
                report.scorer_mode = payload["scorer_mode"]

        def counted(records: Sequence[Mapping[str, Any]], new: int) -> None:
            report.n_new += new

        per_condition = self._run(
            "test", shards, store, finished, progress=progress, total=totals, on_records=counted
        )
        report.per_condition = per_condition
        return report

    # --- scheduling ---------------------------------------------------------------------------------
    def _run(
        self,
        stage: str,
        shards: list[_Shard],
        store: Store,
        finished: Callable[[_Shard, Any], None],
        *,
        progress: bool,
        total: int | None,
        on_records: Callable[[Sequence[Mapping[str, Any]], int], None] | None = None,
    ) -> dict[str, int]:
        """Run ``shards`` on the workers (a thread each pulls the next shard, preferring its last group);
        this thread is the only one that writes ``store``."""
        from tqdm.auto import tqdm

        ray = self._ray
        retryable = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.OutOfMemoryError,
            ray.exceptions.ObjectLostError,
        )
        pending = list(shards)
        lock = threading.Lock()
        stop = threading.Event()
        events: queue.Queue[tuple[str, _Shard | None, Any]] = queue.Queue()
        started = time.perf_counter()

        def take(last_group: int | None) -> _Shard | None:
            with lock:
                if stop.is_set() or not pending:
                    return None
                same = [s for s in pending if s.group == last_group]
                shard = same[0] if same else pending[0]
                pending.remove(shard)
                return shard

        def work(index: int, actor: Any) -> None:
            log = self._logs[index]
            last: int | None = None
            try:
                while (shard := take(last)) is not None:
                    last = shard.group
                    begin = time.perf_counter()
                    try:
                        for ref in shard.call(actor):
                            kind, payload = ray.get(ref)
                            events.put((kind, shard, (index, payload)))
                    except retryable as exc:
                        log.failures += 1
                        shard.attempts += 1
                        if shard.attempts > self.max_retries:
                            events.put(("failed", shard, _cause(exc)))
                            return
                        with lock:
                            pending.insert(0, shard)
                        events.put(("retry", shard, _cause(exc)))
                        if not self._wait_alive(index, actor):
                            return  # gone for good; the other workers take its shards
                        continue
                    except ray.exceptions.RayError as exc:
                        events.put(("error", shard, exc))
                        return
                    log.shards += 1
                    log.seconds += time.perf_counter() - begin
                    log.names.append(shard.name)
            finally:
                events.put(("exit", None, index))

        threads = [
            threading.Thread(target=work, args=(i, a), daemon=True, name=f"rolevec-ray-{i}")
            for i, a in enumerate(self._actors)
        ]
        per_condition: dict[str, int] = {}
        totals: dict[str, int] = {}
        failure: str | None = None
        error: BaseException | None = None
        desc = f"{stage} (ray, {len(self._actors)} workers)"
        with tqdm(total=total or 0, disable=not progress, desc=desc, unit="q") as bar:
            for t in threads:
                t.start()
            running = len(threads)
            while running:
                kind, shard, payload = events.get()
                if kind == "exit":
                    running -= 1
                elif kind == "records":
                    index, records = payload
                    fresh = [r for r in records if not store.done(record_identity(r))]
                    new = store.append(fresh)  # a rerun shard's records that are stored already drop out
                    self._logs[index].records += new
                    for r in fresh:
                        per_condition[r["condition"]] = per_condition.get(r["condition"], 0) + 1
                    if on_records is not None:
                        on_records(fresh, new)
                    bar.update(new)
                elif kind == "total" and shard is not None and total is None:
                    totals[shard.name] = int(payload[1])
                    bar.total = sum(totals.values())
                    bar.refresh()
                elif kind == "result" and shard is not None:
                    finished(shard, payload[1])
                elif kind == "retry" and shard is not None:
                    bar.write(
                        f"rolevec: {shard.name}: its worker died ({payload}); running it again "
                        f"({shard.attempts}/{self.max_retries})"
                    )
                elif kind == "failed" and shard is not None:
                    failure = failure or (
                        f"{shard.name} failed {shard.attempts} time(s), the last because "
                        f"its worker died ({payload})"
                    )
                    stop.set()
                elif kind == "error" and shard is not None:
                    error = error or payload
                    failure = failure or f"{shard.name}: {_cause(payload)}"
                    stop.set()
        self._stages[stage] = {"shards": len(shards), "seconds": round(time.perf_counter() - started, 2)}
        if error is not None:
            cause = getattr(error, "cause", None)
            if isinstance(cause, RolevecError):
                raise RolevecError(str(cause)) from None
        if failure is not None:
            raise RolevecError(
                f"the Ray run stopped: {failure}; every finished record is kept, rerun the same command to "
                "resume"
            )
        if pending:
            raise RolevecError(f"the Ray run stopped with {len(pending)} shard(s) not run (no worker left)")
        return per_condition


def _stream_call(method: str, *args: Any) -> Any:
    """Call a worker's generator method; the last argument is the actor (how _Shard.call is made)."""
    *payload, actor = args
    return getattr(actor, method).options(num_returns="streaming").remote(*payload)


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def store_identities(store: Store) -> frozenset[Identity]:
    """The identities a store holds (a RecordStore knows them; any other store is read)."""
    identities = getattr(store, "identities", None)
    if callable(identities):
        found: frozenset[Identity] = identities()
        return found
    return frozenset(record_identity(r) for r in store.records())


def role_groups(conditions: Sequence[Condition], n_groups: int) -> list[list[Condition]]:
    """The conditions in ``n_groups`` groups of whole roles, roles ordered by their steered layer (so a
    group's additions share the most lower blocks); the baseline joins the first group. Each group keeps
    the conditions' own order."""
    roles: dict[str, int] = {}
    for c in conditions:
        if c.role is not None:
            layer = -1 if c.layer is None else c.layer
            roles[c.role] = min(roles.get(c.role, layer), layer)
    ordered = sorted(roles, key=lambda r: roles[r])
    n = max(1, min(n_groups, len(ordered) or 1))
    size = math.ceil(len(ordered) / n) if ordered else 0
    group_of = {role: i // size for i, role in enumerate(ordered)} if size else {}
    groups: list[list[Condition]] = [[] for _ in range(n)]
    for c in conditions:
        groups[0 if c.role is None else group_of[c.role]].append(c)
    return [g for g in groups if g]
