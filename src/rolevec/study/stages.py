"""The study's stages that `rolevec run`, `rolevec sweep` and `rolevec evaluate` share, as plain functions.

Each takes its inputs explicitly, writes into a run folder, resumes from what is already there (records
by identity, sweep rows by role and domain, selection entries by role), and works on any subset of roles,
domains or conditions. Subsets merge: records are appended once per identity, ``sweep.jsonl`` rows of a
(role, domain) pair replace that pair's old rows, and ``selection.json`` entries are merged by role (same
model, split seed and layer range), so stages split across calls give the one run folder a single call
would.

Entry points::

    select_sites(adapter, vectors, roles, mcq, split, run_dir, *, domain_of, layers, ...) -> SiteSelection
    open_records(run_dir, log=None) -> RecordStore   # the test stage: evaluate_conditions(..., store, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.records import RecordStore
from ..data.mcq import MCQSet, Split
from ..evaluation.scoring import DEFAULT_MAX_CACHE_BYTES, LetterScorer, PromptFormat
from ..evaluation.selection import Choice, select, write_selection
from ..evaluation.sweep import SweepResult, run_sweep, write_sweep_file
from ..model.loading import ModelAdapter
from ..vectors.role_vectors import RoleVectors


@dataclass(frozen=True)
class SiteSelection:
    """What :func:`select_sites` chose, with each role's sweep and the validation questions it used."""

    choices: list[Choice]
    sweeps: list[SweepResult]
    validation: dict[str, list[str]]


@contextmanager
def open_records(run_dir: str | Path, log: Callable[[str], None] | None = None) -> Iterator[RecordStore]:
    """The run folder's ``records.jsonl`` as an open :class:`RecordStore`, saying so when a torn line was cut.

    The test stage is :func:`rolevec.evaluate_conditions` on this store; the selection stage opens it too.

    Args:
        run_dir: The run folder.
        log: Receives the note about a repaired records file (default: none).

    Example:
        ```python
        with open_records("runs/quick", log=print) as store:
            report = evaluate_conditions(adapter, mcq, split, conditions, store, vectors=vectors)
        ```
    """
    with RecordStore(Path(run_dir) / "records.jsonl") as store:
        if store.repaired_bytes and log is not None:
            log(f"cut a torn last line ({store.repaired_bytes} bytes) off {store.path}")
        yield store


def select_sites(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    roles: Sequence[str],
    mcq: MCQSet,
    split: Split,
    run_dir: str | Path,
    *,
    domain_of: Mapping[str, str],
    layers: tuple[int, int],
    positions: Sequence[int],
    alphas: Sequence[float],
    layer_step: int = 1,
    limit: int | None = None,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 16,
    max_rows: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    reuse: bool = True,
    ablate_scope: str = "all",
    scorer: LetterScorer | None = None,
    progress: bool = True,
    on_choice: Callable[[Choice], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SiteSelection:
    """The selection stage: sweep each role on its domain's validation questions and choose its site.

    Writes the role's ``sweep.jsonl`` rows as soon as its sweep ends and ``selection.json`` at the end,
    both merged with what the folder holds (see the module docstring). ``on_choice`` sees each choice as
    it is made.

    Args:
        adapter: The model to score with.
        vectors: The role vectors the candidates are taken from.
        roles: The roles to sweep.
        mcq: The questions.
        split: The split whose validation questions are swept.
        run_dir: The run folder written to (records, ``sweep.jsonl``, ``selection.json``).
        domain_of: Role -> the domain it is swept on (its own domain).
        layers: The half-open layer range ``(a, b)`` searched.
        positions: The positions searched (e.g. ``vectors.positions``).
        alphas: The α values searched for addition.
        layer_step: Search every k-th layer of the range from ``a`` (default 1).
        limit: Validation questions per domain (default: all).
        prompt_format: How a question becomes the prompt (default: :class:`PromptFormat`'s).
        batch_size: Questions per forward (default 16).
        max_rows: The most rows per forward when candidates are stacked (default ``batch_size``).
        max_cache_bytes: Bounds the cached residual plus stacked copies of a batch (default 512 MiB).
        reuse: Score additions from a shared unsteered residual (default ``True``).
        ablate_scope: Sweep ablation at ``all`` sites (default), ``passing`` ones or ``none``.
        scorer: A :class:`LetterScorer` to reuse (default: a new one).
        progress: Show progress bars.
        on_choice: Called with each role's ``Choice`` as it is made.
        log: Receives notes such as a repaired records file (default: none).

    Returns:
        The ``SiteSelection``: each role's choice, its sweep and the validation question ids used.

    Example:
        ```python
        sel = select_sites(adapter, vectors, ["doctor"], mcq, split, "runs/mine",
                           domain_of={"doctor": "medicine"}, layers=(1, 24), positions=[-1],
                           alphas=[1.0, 3.0], layer_step=4, limit=12)
        print(sel.choices[0].layer, sel.choices[0].alpha)
        ```
    """
    run_dir = Path(run_dir)
    scorer = scorer or LetterScorer(adapter)
    choices: list[Choice] = []
    sweeps: list[SweepResult] = []
    used: dict[str, list[str]] = {}
    with open_records(run_dir, log) as store:
        for role in roles:
            domain = domain_of[role]
            items = split.select(mcq, domain, "val", limit)
            used[domain] = [it.qid for it in items]
            result = run_sweep(
                adapter,
                vectors,
                role,
                items,
                store,
                domain=domain,
                layers=layers,
                layer_step=layer_step,
                positions=positions,
                alphas=alphas,
                prompt_format=prompt_format,
                batch_size=batch_size,
                max_rows=max_rows,
                max_cache_bytes=max_cache_bytes,
                reuse=reuse,
                ablate_scope=ablate_scope,
                scorer=scorer,
                progress=progress,
            )
            sweeps.append(result)
            write_sweep_file(run_dir / "sweep.jsonl", result.rows)
            choice = select(result.rows)
            choices.append(choice)
            if on_choice is not None:
                on_choice(choice)
    write_selection(
        run_dir / "selection.json",
        adapter,
        split_seed=split.seed,
        layers=layers,
        choices=choices,
        validation=used,
    )
    return SiteSelection(choices, sweeps, used)
