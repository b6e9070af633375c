"""The validation sweep over steering sites (layer × position × α) for one role, reusing work.

Addition at layer l leaves everything below l unchanged, so per batch of questions the unsteered residual
is advanced block by block (only the current layer's input is cached) and each candidate runs only the
blocks from l up, with blocks below skipped and ``cached + α·d`` put in place at the input of l. Several
candidates can share one forward, stacked along the batch (rows = questions × candidates). A one-batch
parity probe checks that resuming mid-stack reproduces the full forward on this architecture; if not, the
sweep warns and runs every candidate independently. Ablation touches every layer, so its candidates always
run independently (with the fast scorer).

Every per-question result goes to the run's record store, so a killed sweep resumes where it stopped.
Entry points::

    default_layers(n_layers, fraction=0.8) -> tuple[int, int]           # half-open [a, b)
    parse_layers(text, n_layers) / parse_positions(text, available) / parse_alphas(text)
    run_sweep(adapter, vectors, role, items, store, *, domain, layers, positions, alphas, ...) -> SweepResult
    grid_rows(records, *, role, domain, qids, split="val") -> list[GridRow]
    write_sweep_file(path, rows)     # sweep.jsonl; rows of the same role/domain are replaced
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import RolevecError
from .evaluation import (
    Condition,
    LetterScorer,
    Prepared,
    PromptFormat,
    Resume,
    _batch,
    _tolerance,
    intervention,
    iter_scores,
    plan_batches,
    prepare,
    results_from_logits,
    to_record,
)
from .hooks import StopForward, hooked, input_hook, skipped
from .mcq import MCQItem
from .model import Batch, ModelAdapter
from .prefix import PrefixKV, PrefixMemo, PrefixSplit, forward_kwargs, prefix_kv
from .records import RecordStore, read_records
from .vectors import RoleVectors, atomic_write, check_alpha

DEFAULT_MAX_CACHE_BYTES = 512 * 1024**2
ABLATE_SCOPES = ("all", "passing", "none")


# --- arguments -------------------------------------------------------------------------------------


def default_layers(n_layers: int, fraction: float = 0.8) -> tuple[int, int]:
    """The paper's search range, the first ``fraction`` of the layers, as half-open ``[1, b)``.

    Layer 0 is left out: its input is the token embedding, and the post-instruction tokens are the same
    template tokens for every prompt, so every role vector there is exactly zero.
    """
    return 1, max(2, round(fraction * n_layers))


def parse_layers(text: str | None, n_layers: int) -> tuple[int, int]:
    """``"a:b"`` (half-open, like a Python slice), ``"a:"``, ``":b"`` or ``"l"``; None -> first 80%."""
    if text is None:
        return default_layers(n_layers)
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            a = int(lo) if lo.strip() else 0
            b = int(hi) if hi.strip() else n_layers + 1
        else:
            a = int(text)
            b = a + 1
    except ValueError:
        raise RolevecError(f"--layers {text!r} is not a range: pass e.g. 0:24, 10:, or 12") from None
    if not 0 <= a < b <= n_layers + 1:
        raise RolevecError(f"--layers {text!r} is out of range: this model has layers 0..{n_layers}")
    return a, b


def parse_positions(text: str | None, available: Sequence[int]) -> tuple[int, ...]:
    """``"-1,-2"`` or ``"all"`` (every post-instruction position of the vector file)."""
    if text is None or text.strip() == "all":
        return tuple(available)
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RolevecError(f"--positions {text!r}: pass integers like -1,-2 or all") from None
    bad = [p for p in values if p not in available]
    if bad or not values:
        raise RolevecError(f"--positions {text!r}: this vector file has positions {list(available)}")
    return values


def parse_alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(check_alpha(float(t)) for t in text.split(",") if t.strip())
    except ValueError:
        raise RolevecError(f"--alphas {text!r}: pass numbers like 1,3") from None
    if not values:
        raise RolevecError("--alphas is empty: pass e.g. 1,3")
    return tuple(dict.fromkeys(values))


# --- grid rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridRow:
    """One aggregated sweep cell (a line of ``sweep.jsonl``)."""

    role: str
    domain: str
    condition: str
    layer: int
    position: int
    alpha: float | None
    n: int
    correct: int
    accuracy: float
    baseline_accuracy: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def grid_rows(
    records: Iterable[Mapping[str, Any]], *, role: str, domain: str, qids: Iterable[str], split: str = "val"
) -> list[GridRow]:
    """Aggregate add/ablate records of one role and domain over ``qids`` (baseline on the same qids)."""
    wanted = set(qids)
    base: dict[str, bool] = {}
    cells: dict[tuple[str, int, int, float | None], dict[str, bool]] = {}
    for r in records:
        if r["split"] != split or r["domain"] != domain or r["qid"] not in wanted:
            continue
        if r["condition"] == "baseline":
            base[r["qid"]] = bool(r["correct"])
        elif r["condition"] in ("add", "ablate") and r["role"] == role:
            alpha = None if r["alpha"] is None else float(r["alpha"])
            key = (r["condition"], int(r["layer"]), int(r["position"]), alpha)
            cells.setdefault(key, {})[r["qid"]] = bool(r["correct"])
    rows = []
    for (cond, layer, position, alpha), answers in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], kv[0][3] or 0.0)
    ):
        n = len(answers)
        k = sum(answers.values())
        paired = [q for q in answers if q in base]
        base_acc = sum(base[q] for q in paired) / len(paired) if paired else float("nan")
        rows.append(GridRow(role, domain, cond, layer, position, alpha, n, k, k / n, base_acc))
    return rows


def write_sweep_file(path: str | Path, rows: Sequence[GridRow]) -> Path:
    """Rewrite ``sweep.jsonl`` atomically: rows of the (role, domain) pairs in ``rows`` replace old ones."""
    p = Path(path)
    replaced = {(r.role, r.domain) for r in rows}
    kept: list[dict[str, Any]] = []
    if p.exists():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                old = json.loads(line)
                if (old["role"], old["domain"]) not in replaced:
                    kept.append(old)
    lines = [json.dumps(r, ensure_ascii=False) for r in [*kept, *(row.to_json() for row in rows)]]
    text = "".join(line + "\n" for line in lines)
    atomic_write(p, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
    return p


# --- mid-stack machinery ---------------------------------------------------------------------------


def residual_at(
    adapter: ModelAdapter,
    batch: Batch,
    layer: int,
    start: tuple[int, torch.Tensor] | None = None,
    prefix: PrefixKV | None = None,
) -> torch.Tensor:
    """The residual at the input of ``layer``; from ``start=(l0, x0)`` only blocks l0..layer-1 run.

    For a batch split after its common prefix, ``prefix`` holds the prefix's (unsteered) states and the
    residual covers the remaining columns only.
    """
    if start is not None and start[0] == layer:
        return start[1]
    grabbed: dict[str, torch.Tensor] = {}

    def grab(x: torch.Tensor) -> None:
        grabbed["x"] = x
        raise StopForward

    pre: list[Any] = []
    skip: Any = nullcontext()
    if start is not None:
        l0, x0 = start
        if l0 > layer:
            raise RolevecError(f"cannot advance the residual from layer {l0} down to {layer}")
        skip = skipped(list(adapter.blocks[:l0]))
        pre.append((adapter.residual_site(l0), input_hook(lambda x: x0)))
    pre.append((adapter.residual_site(layer), input_hook(grab)))
    kwargs = forward_kwargs(adapter, batch, prefix)
    with torch.inference_mode(), skip, hooked(pre=pre), suppress(StopForward):
        adapter.model(**kwargs)
    if "x" not in grabbed:
        raise RolevecError(f"the forward never reached layer {layer}; the architecture map is wrong")
    return grabbed["x"]


def _stack(batch: Batch, copies: int) -> Batch:
    if copies == 1:
        return batch
    return replace(
        batch,
        input_ids=batch.input_ids.repeat(copies, 1),
        attention_mask=batch.attention_mask.repeat(copies, 1),
        position_ids=batch.position_ids.repeat(copies, 1),
        lengths=batch.lengths.repeat(copies),
    )


def _shift(
    vectors: RoleVectors, role: str, layer: int, position: int, alpha: float, like: torch.Tensor
) -> torch.Tensor:
    """α·d exactly as :func:`rolevec.interventions.add` forms it (cast to the model dtype, then scaled)."""
    vec = vectors.vector(role, layer, position).detach().to(device=like.device, dtype=like.dtype)
    return alpha * vec


@dataclass(frozen=True)
class _Work:
    """One question batch as the sweep runs it: split after the common prefix where the scorer shares it."""

    batch: Batch  # the suffix when split
    split: PrefixSplit | None
    base: PrefixKV | None  # the prefix's unsteered states

    @staticmethod
    def of(batch: Batch, scorer: LetterScorer, memo: PrefixMemo | None = None) -> _Work:
        split = scorer.split(batch, memo)  # unsteered: no hooks are active here
        if split is None:
            return _Work(batch, None, None)
        return _Work(split[0].suffix, *split)

    @property
    def offset(self) -> int:
        return self.batch.prefix_length

    def resume(
        self, adapter: ModelAdapter, layer: int, shifts: list[torch.Tensor], x: torch.Tensor
    ) -> Resume:
        """Candidates ``shifts`` at ``layer`` stacked along the batch, from the unsteered residual ``x``."""
        stacked = torch.cat([x + s.to(x.dtype) for s in shifts])
        prefix = None
        if self.split is not None:
            prefix = prefix_kv(adapter, self.split, shift=(layer, torch.stack(shifts)))
        return Resume(layer, stacked, prefix)


def probe_reuse(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    role: str,
    prepared: Sequence[Prepared],
    layers: tuple[int, int],
    position: int,
    alpha: float,
    scorer: LetterScorer,
) -> tuple[bool, float]:
    """Does resuming mid-stack reproduce full forwards here? One small batch of questions.

    The residual is advanced from the first to the middle and the last layer of the range, as the sweep
    advances it between candidate layers (with the prefix shared when the scorer shares it), and compared
    with a plain forward there; then one candidate resumed at the middle layer is compared with the same
    addition done by hooks on whole rows. The result is kept on the scorer, so one check serves
    every role swept with it.
    """
    key = (layers[0], layers[1], scorer.share_prefix)
    if key in scorer.resume_checks:
        return scorer.resume_checks[key]
    chunk = list(prepared[:4])
    batch, letter_ids = _batch(adapter, chunk)
    a, b = layers
    mid = (a + b - 1) // 2
    checkpoints = sorted({a, mid, b - 1})
    full: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def fn(x: torch.Tensor) -> None:
            full[layer] = x.detach().clone()

        return fn

    pre = [(adapter.residual_site(layer), input_hook(keep(layer))) for layer in checkpoints]
    with torch.inference_mode(), hooked(pre=pre):
        adapter.model(**batch.model_kwargs(), use_cache=False)
    atol, rtol = _tolerance(adapter.dtype)
    work = _Work.of(batch, scorer)
    worst = 0.0
    advanced: dict[int, torch.Tensor] = {}
    prev: tuple[int, torch.Tensor] | None = None
    for layer in checkpoints:
        x = advanced[layer] = residual_at(adapter, work.batch, layer, start=prev, prefix=work.base)
        prev = (layer, x)
        # Relative to the whole state, not element by element: half precision moves single large
        # activations by a few units whenever the batch shape changes; a wrong resume moves everything.
        ref = full[layer][:, work.offset :].float()
        worst = max(worst, float((x.float() - ref).norm() / ref.norm().clamp(min=1e-12)))
    x_mid = advanced[mid]
    shift = _shift(vectors, role, mid, position, alpha, x_mid)
    resumed = scorer.letter_logits(work.batch, letter_ids, start=work.resume(adapter, mid, [shift], x_mid))
    cond = Condition.make("add", role=role, layer=mid, position=position, alpha=alpha)
    # The reference is the same addition by hooks on whole rows, scored by the fast path (which the
    # scorer's own probe checks against model(...).logits): full logits in half precision are rounded to
    # steps of up to 0.25, coarser than any tolerance that would still catch a wrong resume.
    with intervention(adapter, cond, vectors):
        independent = scorer.fast(batch, letter_ids, share=False)
    logit_err = float((resumed - independent).abs().max())
    ok = worst <= rtol and torch.allclose(resumed, independent, atol=atol, rtol=rtol)
    scorer.resume_checks[key] = (ok, max(worst, logit_err))
    return scorer.resume_checks[key]


def cache_batches(
    prepared: Sequence[Prepared], batch_size: int, bytes_per_token: int, max_cache_bytes: int
) -> list[list[int]]:
    """Length-sorted question batches whose cached residual takes at most half of ``max_cache_bytes``.

    The other half is for the stacked candidate copies. A single question too long for the bound still
    forms a batch of one (nothing smaller is possible).
    """
    return plan_batches(
        [len(p.ids) for p in prepared],
        batch_size,
        max_tokens=max_cache_bytes // (2 * bytes_per_token),
    )


# --- the sweep -------------------------------------------------------------------------------------


Candidate = tuple[int, int, float]  # layer, position, alpha


@dataclass
class SweepResult:
    role: str
    domain: str
    rows: list[GridRow]
    baseline_accuracy: float
    reuse: str  # "reuse" | "independent"
    probe_error: float | None = None
    n_new: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


class _Sweep:
    def __init__(
        self,
        adapter: ModelAdapter,
        vectors: RoleVectors,
        role: str,
        prepared: list[Prepared],
        store: RecordStore,
        split_label: str,
        scorer: LetterScorer,
        batch_size: int,
        bar: Any,
    ) -> None:
        self.adapter = adapter
        self.vectors = vectors
        self.role = role
        self.prepared = prepared
        self.store = store
        self.split_label = split_label
        self.scorer = scorer
        self.batch_size = batch_size
        self.bar = bar
        self.n_new = 0

    def pending(self, cond: Condition) -> set[str]:
        ident = cond.identity()
        return {
            p.item.qid for p in self.prepared if not self.store.done((*ident, self.split_label, p.item.qid))
        }

    def independent(self, cond: Condition, todo: set[str]) -> None:
        chunk = [p for p in self.prepared if p.item.qid in todo]
        if not chunk:
            return
        with intervention(self.adapter, cond, self.vectors):
            for results in iter_scores(self.adapter, chunk, scorer=self.scorer, batch_size=self.batch_size):
                self.n_new += self.store.append(to_record(cond, r, self.split_label) for r in results)
                self.bar.update(len(results))

    def reuse(
        self,
        pending: dict[Candidate, set[str]],
        max_rows: int,
        max_cache_bytes: int,
    ) -> None:
        adapter = self.adapter
        itemsize = torch.empty((), dtype=adapter.dtype).element_size()
        per_token = adapter.hidden_size * itemsize
        memo = PrefixMemo([p.ids for p in self.prepared])
        for idx in cache_batches(self.prepared, self.batch_size, per_token, max_cache_bytes):
            chunk = [self.prepared[i] for i in idx]
            qids = {p.item.qid for p in chunk}
            work_todo = {c: todo & qids for c, todo in pending.items() if todo & qids}
            if not work_todo:
                continue
            batch, letter_ids = _batch(adapter, chunk)
            rows_q = len(chunk)
            width = batch.input_ids.shape[1]
            by_mem = max(1, max_cache_bytes // max(1, rows_q * width * per_token) - 1)
            copies = max(1, min(max_rows // rows_q, by_mem))
            work = _Work.of(batch, self.scorer, memo)
            x: torch.Tensor | None = None
            cur = -1
            for layer in sorted({c[0] for c in work_todo}):
                x = residual_at(
                    adapter, work.batch, layer, start=(cur, x) if x is not None else None, prefix=work.base
                )
                cur = layer
                cands = [c for c in work_todo if c[0] == layer]
                for s in range(0, len(cands), copies):
                    group = cands[s : s + copies]
                    shifts = [_shift(self.vectors, self.role, c[0], c[1], c[2], x) for c in group]
                    logits = self.scorer.letter_logits(
                        _stack(work.batch, len(group)),
                        letter_ids.repeat(len(group), 1),
                        start=work.resume(adapter, layer, shifts, x),
                    )
                    records = []
                    for g, cand in enumerate(group):
                        cond = Condition.make(
                            "add", role=self.role, layer=cand[0], position=cand[1], alpha=cand[2]
                        )
                        part = logits[g * rows_q : (g + 1) * rows_q]
                        for r in results_from_logits([p.item for p in chunk], part):
                            if r.qid in work_todo[cand]:
                                records.append(to_record(cond, r, self.split_label))
                    self.n_new += self.store.append(records)
                    self.bar.update(len(records))
                    del logits
            del x


def run_sweep(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    role: str,
    items: Sequence[MCQItem],
    store: RecordStore,
    *,
    domain: str,
    layers: tuple[int, int] | None = None,
    positions: Sequence[int] | None = None,
    alphas: Sequence[float] = (1.0, 3.0),
    prompt_format: PromptFormat | None = None,
    split_label: str = "val",
    batch_size: int = 16,
    max_rows: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    layer_step: int = 1,
    reuse: bool = True,
    ablate_scope: str = "all",
    scorer: LetterScorer | None = None,
    progress: bool = True,
) -> SweepResult:
    """Score baseline, every addition candidate and the ablation sites of one role on ``items``.

    ``layers`` is half-open ``[a, b)`` (default: first 80%), of which every ``layer_step``-th layer from ``a``
    is swept (a coarse grid for quick runs); ``max_rows`` bounds rows per forward when
    candidates are stacked (default ``batch_size``); ``max_cache_bytes`` bounds the cached residual plus the
    stacked copies of one question batch. ``ablate_scope``: ``all`` sites, only sites where some α beats the
    baseline (``passing``, enough for the selection criterion), or ``none``.
    """
    from tqdm.auto import tqdm

    if not items:
        raise RolevecError(f"no validation questions for {domain}: pass more data or a larger --val-fraction")
    if ablate_scope not in ABLATE_SCOPES:
        raise RolevecError(f"ablate scope must be one of {', '.join(ABLATE_SCOPES)}, not {ablate_scope!r}")
    vectors.check_compatible(adapter)
    a, b = layers or default_layers(adapter.n_layers)
    for layer in (a, b - 1):
        vectors.check_layer(layer)
    pos = tuple(positions) if positions is not None else tuple(vectors.positions)
    for p in pos:
        vectors.position_index(p)
    alpha_list = tuple(dict.fromkeys(float(check_alpha(x)) for x in alphas))
    scorer = scorer or LetterScorer(adapter)
    prepared, _ = prepare(adapter, items, prompt_format)
    qids = [p.item.qid for p in prepared]
    max_rows = max_rows or batch_size

    base_cond = Condition("baseline")
    if layer_step < 1:
        raise RolevecError(f"layer step must be at least 1, not {layer_step}")
    zero = [
        (layer, p)
        for layer in range(a, b, layer_step)
        for p in pos
        if float(vectors.vector(role, layer, p).norm()) == 0.0
    ]
    if zero:
        warnings.warn(
            f"{len(zero)} site(s) of {role} have an all-zero vector (e.g. layer {zero[0][0]}, position "
            f"{zero[0][1]}: the same template token for every prompt) and are left out of the sweep",
            stacklevel=2,
        )
    layer_list = [layer for layer in range(a, b, layer_step) if any((layer, p) not in zero for p in pos)]
    if not layer_list:
        raise RolevecError(f"every vector of {role} in layers {a}:{b} is zero: pass a higher --layers range")
    cands: list[Candidate] = [
        (layer, p, al) for layer in layer_list for p in pos for al in alpha_list if (layer, p) not in zero
    ]
    with tqdm(total=0, disable=not progress, desc=f"sweep {role}", unit="q") as bar:
        sweep = _Sweep(adapter, vectors, role, prepared, store, split_label, scorer, batch_size, bar)
        base_todo = sweep.pending(base_cond)
        pending = {
            c: sweep.pending(Condition.make("add", role=role, layer=c[0], position=c[1], alpha=c[2]))
            for c in cands
        }
        ablate_sites = [(layer, p) for layer in layer_list for p in pos if (layer, p) not in zero]
        ablate_pending = {
            s: sweep.pending(Condition.make("ablate", role=role, layer=s[0], position=s[1]))
            for s in ablate_sites
        }
        bar.total = len(base_todo) + sum(len(t) for t in pending.values())
        if ablate_scope == "all":
            bar.total += sum(len(t) for t in ablate_pending.values())
        bar.refresh()

        bar.set_description(f"sweep {role}: baseline")
        sweep.independent(base_cond, base_todo)

        mode = "reuse" if reuse else "independent"
        probe_error: float | None = None
        if reuse and any(pending.values()):
            ok, probe_error = probe_reuse(
                adapter, vectors, role, prepared, (a, b), pos[0], alpha_list[0], scorer
            )
            if not ok:
                warnings.warn(
                    f"resuming the forward mid-stack does not reproduce full runs on {adapter.name} "
                    f"(difference {probe_error:.2e}); running every sweep candidate independently (slower)",
                    stacklevel=2,
                )
                mode = "independent"
        bar.set_description(f"sweep {role}: add")
        if mode == "reuse":
            sweep.reuse(pending, max_rows, max_cache_bytes)
        else:
            for c, todo in pending.items():
                sweep.independent(
                    Condition.make("add", role=role, layer=c[0], position=c[1], alpha=c[2]), todo
                )

        if ablate_scope != "none":
            sites = ablate_sites
            if ablate_scope == "passing":
                rows = grid_rows(
                    read_records(store.path), role=role, domain=domain, qids=qids, split=split_label
                )
                good = {
                    (r.layer, r.position)
                    for r in rows
                    if r.condition == "add" and r.accuracy > r.baseline_accuracy
                }
                sites = [s for s in ablate_sites if s in good]
                bar.total += sum(len(ablate_pending[s]) for s in sites)
                bar.refresh()
            bar.set_description(f"sweep {role}: ablate")
            for s in sites:
                sweep.independent(
                    Condition.make("ablate", role=role, layer=s[0], position=s[1]), ablate_pending[s]
                )

    rows = grid_rows(read_records(store.path), role=role, domain=domain, qids=qids, split=split_label)
    in_range = [
        r
        for r in rows
        if r.layer in layer_list and r.position in pos and (r.alpha is None or r.alpha in alpha_list)
    ]
    base_acc = (
        in_range[0].baseline_accuracy
        if in_range
        else _baseline_accuracy(store.path, domain, qids, split_label)
    )
    return SweepResult(role, domain, in_range, base_acc, mode, probe_error, sweep.n_new)


def _baseline_accuracy(path: Path, domain: str, qids: Sequence[str], split: str) -> float:
    wanted = set(qids)
    answers = [
        bool(r["correct"])
        for r in read_records(path)
        if r["condition"] == "baseline"
        and r["domain"] == domain
        and r["split"] == split
        and r["qid"] in wanted
    ]
    return sum(answers) / len(answers) if answers else float("nan")
