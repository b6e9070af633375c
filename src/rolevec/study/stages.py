"""The study's seven stages as plain functions, which `rolevec run`, `rolevec sweep` and `rolevec evaluate`
call.

Each takes its inputs explicitly, writes into a run folder, resumes from what is already there and works
on any subset of its work (roles, domains or conditions), so a scheduler can split a stage across calls.
How subsets merge into the one run folder:

- ``prompts.json``: roles already sampled are kept as they are, missing ones are sampled and added.
- ``vectors.safetensors``: missing roles are extracted and added; stored roles and the base mean stay
  byte for byte, so every vector is relative to one ν (:meth:`RoleVectors.merged`).
- ``split.json``: a domain added later gets what a split of all domains at once gives.
- ``records.jsonl``: records are appended once per identity (condition, split, question).
- ``sweep.jsonl``: the rows of a (role, domain) pair replace that pair's old rows.
- ``selection.json``: entries merge by role (same model, split seed and layer range).
- ``interpret.json``: entries merge by role when the settings (prompt, α, model) match.
- ``diagnostics.json``: entries merge by role while the role's site, the model and the settings match.

Entry points::

    sample_prompts(run_dir, roles, *, n_prompts, n_base, seed, ...) -> StudyPrompts
    extract_vectors(adapter, prompts, run_dir, roles, *, batch_size=16) -> RoleVectors
    load_questions(adapter, run_dir, domains, *, source, split_seed, val_fraction, ...) -> StudyQuestions
    select_sites(adapter, vectors, roles, mcq, split, run_dir, *, domain_of, layers, ...) -> SiteSelection
    diagnose_sites(adapter, prompts, run_dir, roles, *, batch_size=16) -> dict   # after selection
    study_conditions(choices, *, alphas, persona_templates, random_control) -> list[Condition]
    open_records(run_dir, log=None) -> RecordStore   # the test stage: evaluate_conditions(..., store, ...)
    interpret_vectors(adapter, vectors, run_dir, roles, *, alpha=3.0, ...) -> dict
    write_report(run_dir, force=True)                 # the report stage (rolevec.analysis.report)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.interpret import DEFAULT_JUDGE_MODEL, DEFAULT_PROMPT, interpret_roles, save_interpret
from ..analysis.interpret import FORMAT as INTERPRET_FORMAT
from ..core.files import atomic_write, read_text
from ..core.records import RecordStore, check_settings
from ..core.spec import check_alpha
from ..data.mcq import MCQSet, Split, ensure_split, load_mcq
from ..data.mcq_layouts import MCQSpec
from ..data.sources import PromptSet, load_base, load_role_prompts, sample
from ..errors import RolevecError
from ..evaluation.conditions import Condition, run_settings
from ..evaluation.scoring import DEFAULT_MAX_CACHE_BYTES, LetterScorer, PromptFormat
from ..evaluation.selection import Choice, select, write_selection
from ..evaluation.sweep import SweepResult, write_sweep_file
from ..model.loading import ModelAdapter
from ..vectors.extraction import extract_role_vectors
from ..vectors.role_vectors import RoleVectors
from .executors import Executor, LocalExecutor, SweepJob, SweepSettings


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
    executor: Executor | None = None,
    scoring: str = "letter",
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
        executor: Where the sweeps run (default :class:`LocalExecutor`, this process; a
            :class:`~rolevec.study.distributed.RayExecutor` spreads the roles over a Ray cluster).
        scoring: ``letter`` (default) or ``continuation`` (each choice's log-likelihood).

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
    executor = executor or LocalExecutor()
    choices: list[Choice] = []
    used: dict[str, list[str]] = {}
    jobs = []
    for role in roles:
        domain = domain_of[role]
        items = split.select(mcq, domain, "val", limit)
        used[domain] = [it.qid for it in items]
        jobs.append(SweepJob(role, domain, tuple(items)))
    settings = SweepSettings(
        layers=layers,
        positions=tuple(positions),
        alphas=tuple(alphas),
        layer_step=layer_step,
        prompt_format=prompt_format,
        batch_size=batch_size,
        max_rows=max_rows,
        max_cache_bytes=max_cache_bytes,
        reuse=reuse,
        ablate_scope=ablate_scope,
        scoring=scoring,
    )

    def finished(result: SweepResult) -> None:
        write_sweep_file(run_dir / "sweep.jsonl", result.rows)
        choice = select(result.rows)
        choices.append(choice)
        if on_choice is not None:
            on_choice(choice)

    with open_records(run_dir, log) as store:
        sweeps = executor.sweep(
            adapter, vectors, jobs, store, settings, scorer=scorer, progress=progress, on_result=finished
        )
    order = {role: i for i, role in enumerate(roles)}
    choices.sort(key=lambda ch: order[ch.role])
    sweeps.sort(key=lambda r: order[r.role])
    write_selection(
        run_dir / "selection.json",
        adapter,
        split_seed=split.seed,
        layers=layers,
        choices=choices,
        validation=used,
    )
    return SiteSelection(choices, sweeps, used)


def read_stored(path: Path) -> dict[str, Any]:
    """A JSON object an earlier stage wrote; a damaged one is one line, not a traceback."""
    try:
        data = json.loads(read_text(path, what="run file"))
        reason = "not a JSON object"
    except ValueError as exc:
        data, reason = None, f"not valid JSON: {exc}"
    if not isinstance(data, dict):
        raise RolevecError(f"{path} is damaged ({reason}): delete it to redo its stage, or use `force=True`")
    return data


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)


@dataclass(frozen=True)
class StudyPrompts:
    """The prompt lists a run samples (``prompts.json``); extraction reads exactly these.

    Attributes:
        seed: The sampling seed.
        base: The sampled base set D_base.
        roles: Role -> its sampled set D_r (every role the file holds, in the order first sampled).

    Example:
        ```python
        prompts = StudyPrompts.from_json(json.loads(Path("runs/quick/prompts.json").read_text()))
        print(prompts.seed, list(prompts.roles))
        ```
    """

    seed: int
    base: PromptSet
    roles: Mapping[str, PromptSet]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "base": {"source": self.base.source, "prompts": list(self.base.prompts)},
            "roles": {r: {"source": ps.source, "prompts": list(ps.prompts)} for r, ps in self.roles.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyPrompts:
        base = data["base"]
        return cls(
            int(data["seed"]),
            PromptSet("base", tuple(base["prompts"]), base["source"]),
            {r: PromptSet(r, tuple(v["prompts"]), v["source"]) for r, v in data["roles"].items()},
        )


def sample_prompts(
    run_dir: str | Path,
    roles: Sequence[str],
    *,
    n_prompts: int | None,
    n_base: int | None,
    seed: int,
    roles_dir: str | Path | None = None,
    base: str | Path | None = None,
    base_column: str | None = None,
) -> StudyPrompts:
    """The prompts stage: sample each role's prompts and the base prompts into ``prompts.json``.

    Roles the file already holds keep their lists; missing roles are sampled and added (a role's sample
    depends only on its file, ``n_prompts`` and ``seed``, so adding roles later gives what one call gives).

    Args:
        run_dir: The run folder.
        roles: The roles to have sampled.
        n_prompts: Prompts per role (fewer when a role has fewer; ``None``: all).
        n_base: Base prompts (``None``: all).
        seed: The sampling seed; must equal a stored file's.
        roles_dir: Folder of role prompt files (default: the paper's data when present, else built-in).
        base: The base prompt file (default: the paper's Alpaca split when present, else built-in).
        base_column: The column of ``base`` that holds the prompt (default: guessed).

    Returns:
        The ``StudyPrompts`` now in the file.

    Example:
        ```python
        prompts = sample_prompts("runs/mine", ["doctor", "lawyer"], n_prompts=32, n_base=64, seed=0)
        print(len(prompts.roles["doctor"].prompts), len(prompts.base.prompts))
        ```
    """
    path = Path(run_dir) / "prompts.json"
    stored = StudyPrompts.from_json(read_stored(path)) if path.exists() else None
    if stored is not None and stored.seed != seed:
        raise RolevecError(
            f"{path} was sampled with prompt_seed {stored.seed}, not {seed}: use another run folder"
        )
    have = dict(stored.roles) if stored is not None else {}
    missing = [r for r in roles if r not in have]
    if stored is not None and not missing:
        return stored
    for role in missing:
        have[role] = sample(load_role_prompts(role, roles_dir), n_prompts, seed)
    base_set = (
        stored.base if stored is not None else sample(load_base(base, column=base_column), n_base, seed)
    )
    prompts = StudyPrompts(seed, base_set, have)
    _write_json(path, prompts.to_json())
    return prompts


def extract_vectors(
    adapter: ModelAdapter,
    prompts: StudyPrompts,
    run_dir: str | Path,
    roles: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> RoleVectors:
    """The vectors stage: extract the roles ``vectors.safetensors`` lacks and add them to it.

    Args:
        adapter: The model to read activations from.
        prompts: The sampled prompts (:func:`sample_prompts`).
        run_dir: The run folder.
        roles: The roles whose vectors are wanted.
        batch_size: Prompts per forward (default 16).
        progress: Show a progress bar.

    Returns:
        The vectors now in the file (stored roles and the new ones).

    Example:
        ```python
        vectors = extract_vectors(adapter, prompts, "runs/mine", ["doctor", "lawyer"])
        print(vectors.roles)
        ```
    """
    path = Path(run_dir) / "vectors.safetensors"
    stored: RoleVectors | None = None
    if path.exists():
        stored = RoleVectors.load(path)
        stored.check_compatible(adapter)
        if stored.metadata.get("model_fingerprint") != adapter.fingerprint():
            raise RolevecError(f"{path} was extracted from another model: use another run folder")
    missing = [r for r in roles if stored is None or r not in stored.roles]
    if stored is not None and not missing:
        return stored
    unknown = [r for r in missing if r not in prompts.roles]
    if unknown:
        raise RolevecError(f"no sampled prompts for role(s) {', '.join(unknown)}: run sample_prompts first")
    new = extract_role_vectors(
        adapter,
        {r: prompts.roles[r] for r in missing},
        prompts.base,
        batch_size=batch_size,
        seed=prompts.seed,
        progress=progress,
    )
    vectors = new if stored is None else stored.merged(new)
    vectors.save(path, force=True)
    return vectors


@dataclass(frozen=True)
class StudyQuestions:
    """The questions of a run, their split and the prompt format they are scored with.

    Attributes:
        mcq: The questions of the loaded domains.
        split: The run's validation/test split (``split.json``).
        prompt_format: How a question becomes the prompt.

    Example:
        ```python
        q = load_questions(adapter, "runs/mine", ["law"])
        print(q.mcq.kind, len(q.split.select(q.mcq, "law", "val")))
        ```
    """

    mcq: MCQSet
    split: Split
    prompt_format: PromptFormat


def load_questions(
    adapter: ModelAdapter,
    run_dir: str | Path,
    domains: Sequence[str],
    *,
    source: str | Path | MCQSpec | Mapping[str, Any] | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    random_seed: int | None = None,
    prompt_format: PromptFormat | None = None,
    scoring: str = "letter",
) -> StudyQuestions:
    """The questions stage: load the domains' questions, make or extend ``split.json``, record the
    scoring settings (a folder scored with other settings is refused, not mixed).

    Args:
        adapter: The model the records are for (its fingerprint goes into the settings).
        run_dir: The run folder.
        domains: The domains to load (test domains and the roles' own domains).
        source: The question source (default: the paper's MMLU files when present, else built-in).
        split_seed: The split's seed; must equal a stored split's.
        val_fraction: The validation share of each domain.
        random_seed: The seed of the random-direction control, part of the settings (default: none).
        prompt_format: How a question becomes the prompt (default: :class:`PromptFormat`'s).
        scoring: The scoring rule the records are made with (pinned in ``settings.json``).

    Returns:
        The ``StudyQuestions``.

    Example:
        ```python
        q = load_questions(adapter, "runs/mine", ["medicine", "law"], split_seed=0, val_fraction=0.2)
        print(len(q.split.select(q.mcq, "law", "test")))
        ```
    """
    run_dir = Path(run_dir)
    mcq = load_mcq(source, list(domains))
    split = ensure_split(run_dir / "split.json", mcq, seed=split_seed, val_fraction=val_fraction)
    prompt_format = prompt_format or PromptFormat()
    check_settings(run_dir, run_settings(adapter, prompt_format, split, random_seed, scoring=scoring))
    return StudyQuestions(mcq, split, prompt_format)


def study_conditions(
    choices: Mapping[str, Choice],
    *,
    alphas: Sequence[float],
    persona_templates: Sequence[str],
    random_control: bool = True,
) -> list[Condition]:
    """The test stage's conditions: the baseline, then per role its personas, additions at its chosen
    site (every α), the ablation and the random-direction control.

    Args:
        choices: Role -> its chosen site (:func:`select_sites`), in the roles' order.
        alphas: The α values of the additions.
        persona_templates: The persona system prompts (``{role}`` is filled in).
        random_control: Add a random direction of the vector's norm at the chosen site (default ``True``).

    Returns:
        The conditions, ready for :func:`rolevec.evaluate_conditions`.

    Example:
        ```python
        conditions = study_conditions({c.role: c for c in sel.choices}, alphas=[1.0, 3.0],
                                      persona_templates=["You are a {role}."])
        ```
    """
    out = [Condition.make("baseline")]
    for role, ch in choices.items():
        out += [Condition.make("persona", role=role, persona_template=t) for t in persona_templates]
        out += [
            Condition.make("add", role=role, layer=ch.layer, position=ch.position, alpha=a) for a in alphas
        ]
        out.append(Condition.make("ablate", role=role, layer=ch.layer, position=ch.position))
        if random_control:
            out.append(
                Condition.make("random", role=role, layer=ch.layer, position=ch.position, alpha=ch.alpha)
            )
    return out


def interpret_vectors(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    run_dir: str | Path,
    roles: Sequence[str],
    *,
    alpha: float = 3.0,
    judge_url: str | None = None,
    judge_model: str = DEFAULT_JUDGE_MODEL,
    judge_api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The interpret stage: patch-scoping and the logit lens of each role's vector at its chosen site
    (``selection.json``), added to ``interpret.json``.

    Roles already in the file are kept when it was made with the same model, prompt and α; otherwise
    the given roles are redone and the file replaced.

    Args:
        adapter: The model to steer.
        vectors: The role vectors.
        run_dir: The run folder (reads ``selection.json``, writes ``interpret.json``).
        roles: The roles to interpret.
        alpha: The patch-scoping α (default 3, as in the paper).
        judge_url: An OpenAI-compatible endpoint that judges relatedness (default: no judge).
        judge_model: The judge's model name.
        judge_api_key: The judge's API key (default: none).
        progress: Show a progress bar.

    Returns:
        The content of ``interpret.json``.

    Example:
        ```python
        result = interpret_vectors(adapter, vectors, "runs/mine", ["doctor"])
        print(result["roles"]["doctor"]["patchscope"]["steered"])
        ```
    """
    run_dir = Path(run_dir)
    path = run_dir / "interpret.json"
    stored = read_stored(path) if path.exists() else None
    same = stored is not None and (
        stored.get("format"),
        stored.get("model_fingerprint"),
        stored.get("prompt"),
        stored.get("where"),
        stored.get("alpha"),
    ) == (INTERPRET_FORMAT, adapter.fingerprint(), DEFAULT_PROMPT, "placeholder", check_alpha(alpha))
    done = set(stored.get("roles", {})) if stored is not None and same else set()
    missing = [r for r in roles if r not in done]
    if stored is not None and not missing:
        return stored
    result = interpret_roles(
        adapter,
        vectors,
        run_dir / "selection.json",
        roles=missing,
        alpha=alpha,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_api_key=judge_api_key,
        progress=progress,
    )
    if stored is not None and same:
        result["roles"] = {**stored["roles"], **result["roles"]}
    save_interpret(result, path, force=True)
    return result


#: The layout of ``diagnostics.json``; a file of another layout is redone.
DIAGNOSTICS_FORMAT = 1


def diagnose_sites(
    adapter: ModelAdapter,
    prompts: StudyPrompts,
    run_dir: str | Path,
    roles: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """The diagnostics step after selection: each role's vector at its chosen site (``selection.json``)
    is checked for consistency, separation and stability against random directions and label shuffles, into
    ``diagnostics.json`` (see :mod:`rolevec.vectors.diagnostics`).

    A role already in the file is kept when its site, its prompts and the file's model and settings are
    unchanged; the base prompts are read once per site that some missing role needs.

    Args:
        adapter: The model the vectors came from.
        prompts: The run's sampled prompts (``prompts.json``), the ones the vectors were extracted from.
        run_dir: The run folder (reads ``selection.json``, writes ``diagnostics.json``).
        roles: The roles to diagnose.
        batch_size: Prompts per forward.
        progress: Show a progress bar.

    Returns:
        The content of ``diagnostics.json``.

    Example:
        ```python
        result = diagnose_sites(adapter, prompts, "runs/mine", ["doctor"])
        print(result["roles"]["doctor"]["separation"], result["roles"]["doctor"]["flagged"])
        ```
    """
    from ..vectors.diagnostics import (
        DEFAULT_BOOTSTRAPS,
        DEFAULT_FOLDS,
        DEFAULT_RANDOM,
        DEFAULT_SEED,
        DEFAULT_SHUFFLES,
        diagnose_activations,
        site_activations,
    )

    run_dir = Path(run_dir)
    selection = read_stored(run_dir / "selection.json")
    sites = selection.get("roles")
    if not isinstance(sites, dict):
        raise RolevecError(f"{run_dir / 'selection.json'} has no 'roles': rerun the selection stage")
    header = {
        "format": DIAGNOSTICS_FORMAT,
        "model_fingerprint": adapter.fingerprint(),
        "folds": DEFAULT_FOLDS,
        "bootstraps": DEFAULT_BOOTSTRAPS,
        "n_random": DEFAULT_RANDOM,
        "seed": DEFAULT_SEED,
        "shuffles": DEFAULT_SHUFFLES,  # a file from before the label-shuffle null lacks it: redone
    }
    path = run_dir / "diagnostics.json"
    stored = read_stored(path) if path.exists() else None
    done: dict[str, Any] = {}
    if stored is not None and all(stored.get(k) == v for k, v in header.items()):
        done = dict(stored.get("roles") or {})

    def site(role: str) -> tuple[int, int]:
        entry = sites.get(role)
        if not isinstance(entry, dict):
            raise RolevecError(f"selection.json has no site for role {role!r}: rerun the selection stage")
        return int(entry["layer"]), int(entry["position"])

    def digest(role: str) -> str:
        """The role's and the base prompts, hashed: other prompts (a forced rerun) redo the role."""
        text = json.dumps([prompts.roles[role].prompts, prompts.base.prompts], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def current(role: str) -> bool:
        got = done.get(role)
        return isinstance(got, dict) and (got.get("layer"), got.get("position"), got.get("prompts")) == (
            *site(role),
            digest(role),
        )

    missing = [r for r in roles if not current(r)]
    if stored is not None and not missing and done == stored.get("roles"):
        return stored
    base_at: dict[tuple[int, int], Any] = {}
    for role in missing:
        layer, position = site(role)
        if (layer, position) not in base_at:
            base_at[layer, position] = site_activations(
                adapter,
                prompts.base.prompts,
                layer,
                position,
                batch_size=batch_size,
                progress=progress,
                desc=f"base @ {layer},{position}",
            )
        acts = site_activations(
            adapter,
            prompts.roles[role].prompts,
            layer,
            position,
            batch_size=batch_size,
            progress=progress,
            desc=role,
        )
        diag = diagnose_activations(
            acts,
            base_at[layer, position],
            layer=layer,
            position=position,
            folds=DEFAULT_FOLDS,
            bootstraps=DEFAULT_BOOTSTRAPS,
            n_random=DEFAULT_RANDOM,
            seed=DEFAULT_SEED,
            shuffles=DEFAULT_SHUFFLES,
        )
        done[role] = {"domain": sites[role].get("domain"), "prompts": digest(role), **diag.to_json()}
    result = {**header, "roles": done}
    _write_json(path, result)
    return result
