"""Where the two costly stages run: in this process (:class:`LocalExecutor`, the default) or spread over a
Ray cluster (:class:`rolevec.study.distributed.RayExecutor`).

The selection sweep and the test stage are the study's cost; both are lists of independent shards (one
role's sweep; one domain's conditions). An executor runs the shards and hands every record to the run
folder's one :class:`~rolevec.core.records.RecordStore`, so the stages above it (writing ``sweep.jsonl``,
choosing sites, the report) do not know where the forwards ran. Entry points::

    SweepJob(role, domain, items)                       # one role's sweep on its validation questions
    SweepSettings(layers, positions, alphas, ...)        # the grid and the batching of a sweep
    EvalSettings(split_name="test", limit=None, ...)     # what the test stage scores
    LocalExecutor().sweep(adapter, vectors, jobs, store, settings, ...) -> list[SweepResult]
    LocalExecutor().evaluate(adapter, mcq, split, conditions, store, settings, ...) -> EvaluationReport
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.records import Store
from ..data.mcq import MCQItem, MCQSet, Split
from ..evaluation.conditions import Condition, EvaluationReport, evaluate_conditions
from ..evaluation.scoring import DEFAULT_MAX_CACHE_BYTES, LetterScorer, PromptFormat
from ..evaluation.sweep import SweepResult, run_sweep
from ..model.loading import ModelAdapter
from ..vectors.role_vectors import RoleVectors


@dataclass(frozen=True)
class SweepJob:
    """One role's sweep: the unit of work of the selection stage."""

    role: str
    domain: str
    items: tuple[MCQItem, ...]


@dataclass(frozen=True)
class SweepSettings:
    """The grid and batching of every sweep of a stage (see :func:`rolevec.evaluation.sweep.run_sweep`)."""

    layers: tuple[int, int]
    positions: tuple[int, ...]
    alphas: tuple[float, ...]
    layer_step: int = 1
    prompt_format: PromptFormat | None = None
    batch_size: int = 16
    max_rows: int | None = None
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES
    reuse: bool = True
    ablate_scope: str = "all"
    scoring: str = "letter"

    def run(
        self,
        adapter: ModelAdapter,
        vectors: RoleVectors,
        job: SweepJob,
        store: Store,
        scorer: LetterScorer,
        *,
        progress: bool = True,
        bar: Any = None,
    ) -> SweepResult:
        """``job`` swept with these settings (what every executor runs for one shard)."""
        return run_sweep(
            adapter,
            vectors,
            job.role,
            job.items,
            store,
            domain=job.domain,
            layers=self.layers,
            layer_step=self.layer_step,
            positions=self.positions,
            alphas=self.alphas,
            prompt_format=self.prompt_format,
            batch_size=self.batch_size,
            max_rows=self.max_rows,
            max_cache_bytes=self.max_cache_bytes,
            reuse=self.reuse,
            ablate_scope=self.ablate_scope,
            scorer=scorer,
            progress=progress,
            bar=bar,
            scoring=self.scoring,
        )


@dataclass(frozen=True)
class EvalSettings:
    """What the test stage scores and how (see :func:`rolevec.evaluation.conditions.evaluate_conditions`)."""

    domains: tuple[str, ...] | None = None
    split_name: str = "test"
    limit: int | None = None
    prompt_format: PromptFormat | None = None
    batch_size: int = 16
    random_seed: int = 0
    reuse: bool = True
    scoring: str = "letter"
    skip_bad: bool = False

    def run(
        self,
        adapter: ModelAdapter,
        mcq: MCQSet,
        split: Split,
        conditions: Sequence[Condition],
        store: Store,
        scorer: LetterScorer,
        *,
        vectors: RoleVectors | None,
        domains: Sequence[str] | None = None,
        progress: bool = True,
    ) -> EvaluationReport:
        """``conditions`` scored on ``domains`` (default: the settings' domains) into ``store``."""
        return evaluate_conditions(
            adapter,
            mcq,
            split,
            conditions,
            store,
            vectors=vectors,
            domains=list(domains) if domains is not None else self.domains,
            split_name=self.split_name,
            limit=self.limit,
            prompt_format=self.prompt_format,
            batch_size=self.batch_size,
            # the executors keep one LetterScorer per model; continuation scoring makes its own
            scorer=scorer if self.scoring == "letter" else None,
            random_seed=self.random_seed,
            reuse=self.reuse,
            progress=progress,
            scoring=self.scoring,
            skip_bad=self.skip_bad,
        )


class Executor(Protocol):
    """Runs the shards of the sweep and test stages; records reach ``store`` (the run folder's)."""

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
    ) -> list[SweepResult]: ...

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
    ) -> EvaluationReport: ...

    def describe(self) -> dict[str, Any]: ...


class LocalExecutor:
    """Every shard in this process, one after another, on the given model (the default).

    Example:
        ```python
        results = LocalExecutor().sweep(adapter, vectors, [SweepJob("doctor", "medicine", items)], store,
                                        SweepSettings(layers=(1, 24), positions=(-1,), alphas=(1.0, 3.0)))
        ```
    """

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
        scorer = scorer or LetterScorer(adapter)
        results = []
        for job in jobs:
            result = settings.run(adapter, vectors, job, store, scorer, progress=progress)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results

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
        scorer = scorer or LetterScorer(adapter)
        return settings.run(
            adapter, mcq, split, conditions, store, scorer, vectors=vectors, progress=progress
        )

    def describe(self) -> dict[str, Any]:
        return {"executor": "local"}
