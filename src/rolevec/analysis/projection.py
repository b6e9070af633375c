"""Projections of prompts' activations on role vectors: how far along a role's direction a prompt sits.

For each prompt and direction the scalar is ``h · d/|d|``, with ``h`` the residual at the input of one
layer, read at the last prompt token (the end of the chat template's generation prompt) and averaged over
the user text's tokens. Prompts stream through window by window (encoded, batched by length, read, then
dropped), so memory holds one window of token ids and one batch of activations, however many prompts
there are. Hooks are registered around each forward only, so none is left on the model between batches
or when the caller stops early.
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence, Sized
from contextlib import suppress
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import RolevecError
from ..model.batching import batch_overhead_tokens, plan_batches
from ..model.hooks import StopForward, hooked, input_hook
from ..model.loading import ModelAdapter
from ..vectors.extraction import encode_prompts
from ..vectors.role_vectors import RoleVectors

#: The two summaries of a prompt: its last token, or the mean over its user text's tokens.
SUMMARIES = ("last", "mean")
#: The reference for single tokens' projections: every user-text token of every reference prompt, pooled.
TOKEN = "token"
#: Windows hold this many batches' worth of prompts (encoded and length-planned together).
WINDOW_BATCHES = 16
#: Stands in for the user text to find where the template's head ends.
_PROBE = "ROLEVEC_PROJECTION_PROBE"


@dataclass(frozen=True)
class ProjectionBatch:
    """The projections of one batch of prompts.

    Args:
        indices: Each row's place in the prompts as passed (batches are planned by length, not in order).
        last: float64 ``[rows, directions]``: the projection at the last prompt token.
        mean: float64 ``[rows, directions]``: the mean projection over the user text's tokens.
        square: float64 ``[rows, directions]``: the mean squared projection over the user text's tokens
            (with ``mean`` and ``n_user``, the pooled per-token spread of :func:`projection_stats`).
        n_user: Each row's number of user-text tokens.
    """

    indices: tuple[int, ...]
    last: torch.Tensor
    mean: torch.Tensor
    square: torch.Tensor | None = None
    n_user: tuple[int, ...] = ()

    def scores(self, by: str) -> torch.Tensor:
        """``last`` or ``mean``, by name."""
        check_by(by)
        return self.last if by == "last" else self.mean


@dataclass(frozen=True)
class ProjectionStats:
    """Mean and standard deviation (population, ddof 0) of projections over a reference set, per direction.

    Args:
        n: Prompts the statistics come from.
        mean: ``{"last": [directions], "mean": [directions]}`` float64 means; ``"token"`` too when the
            statistics pool single tokens (the projections of every user-text token of every prompt).
        std: The standard deviations, in the same layout.
        n_tokens: The user-text tokens pooled into ``"token"`` (0 without it).
    """

    n: int
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    n_tokens: int = 0

    def z(self, values: torch.Tensor, by: str) -> torch.Tensor:
        """``(values - mean) / std`` for summary ``by`` (``last``, ``mean`` or ``token``); values
        ``[rows, directions]``."""
        if by != TOKEN:
            check_by(by)
        elif TOKEN not in self.mean:
            raise RolevecError("these statistics pool no single tokens: compute them with `projection_stats`")
        return (values.double() - self.mean[by]) / self.std[by]

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_tokens": self.n_tokens,
            "mean": {k: v.tolist() for k, v in self.mean.items()},
            "std": {k: v.tolist() for k, v in self.std.items()},
        }


def check_by(by: str) -> None:
    if by not in SUMMARIES:
        raise RolevecError(f"`by` must be 'last' or 'mean', not {by!r}")


def unit_directions(vectors: RoleVectors, roles: Sequence[str], layer: int, position: int) -> torch.Tensor:
    """The roles' vectors at one site as unit rows, float32 ``[len(roles), hidden]``.

    Args:
        vectors: The vector file's contents.
        roles: Roles to project on (each in ``vectors``).
        layer: The layer the vectors are taken from (and the activations read at).
        position: The post-instruction position the vectors are taken from.

    Returns:
        One unit direction per role.

    Example:
        ```python
        dirs = unit_directions(RoleVectors.load("vectors.safetensors"), ["doctor"], layer=12, position=-1)
        ```
    """
    if not roles:
        raise RolevecError("no roles to project on: pass at least one `role`")
    rows = []
    for role in roles:
        d = vectors.vector(role, layer, position).float()
        norm = float(d.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise RolevecError(
                f"role {role!r} has a zero vector at layer {layer}, position {position}: pass another `layer`"
            )
        rows.append(d / norm)
    return torch.stack(rows)


def head_ids(adapter: ModelAdapter, system: str | None = None) -> list[int]:
    """Token ids of the template's text before the user turn's content (with ``system``'s turn, if any)."""
    probe = adapter.render(_PROBE, system)
    head = probe[: probe.index(_PROBE)]
    enc = adapter.tokenizer(head, add_special_tokens=adapter.chat.add_special_tokens, verbose=False)
    return [int(i) for i in enc["input_ids"]]


def _windows(prompts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(prompts)
    while window := list(islice(it, size)):
        yield window


def project_prompts(
    adapter: ModelAdapter,
    prompts: Iterable[str],
    directions: torch.Tensor,
    layer: int,
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "projecting",
) -> Iterator[ProjectionBatch]:
    """Project every prompt's activations at ``layer`` on ``directions``, one batch at a time.

    Each prompt is rendered as the user turn of the chat template. Prompts are read from ``prompts``
    lazily, ``batch_size * WINDOW_BATCHES`` at a time, so an iterator of any length streams through.

    Args:
        adapter: The model to read activations from.
        prompts: User texts (any iterable; each non-empty).
        directions: ``[directions, hidden]`` (or ``[hidden]``); rows are used as given, so pass unit
            rows (:func:`unit_directions`) for projections.
        layer: Read the residual at the input of this block (``n_layers``: the final norm's input).
        batch_size: Prompts per forward (default 16); the values do not depend on it.
        max_tokens: Longer prompts have their user text shortened (default: the model's context).
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        An iterator of :class:`ProjectionBatch`, whose ``indices`` place each row in ``prompts``.

    Example:
        ```python
        dirs = unit_directions(vectors, ["doctor"], layer=12, position=-1)
        scores = {}
        for b in project_prompts(adapter, ["Describe a cell.", "Fix my bike."], dirs, 12):
            scores.update(zip(b.indices, b.last[:, 0].tolist()))
        ```
    """
    if batch_size < 1:
        raise RolevecError(f"`batch_size` must be at least 1, not {batch_size}")
    site = adapter.residual_site(layer)
    dirs = directions.reshape(1, -1) if directions.ndim == 1 else directions
    if dirs.ndim != 2 or dirs.shape[1] != adapter.hidden_size:
        raise RolevecError(
            f"directions have shape {tuple(directions.shape)}, expected [n, {adapter.hidden_size}]: pass "
            "vectors extracted from this model"
        )
    dirs = dirs.detach().float()
    head = head_ids(adapter)
    n_head, n_tail = len(head), adapter.chat.n_positions
    total = len(prompts) if isinstance(prompts, Sized) else None
    with tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=not progress) as bar:
        start = 0
        for window in _windows(prompts, batch_size * WINDOW_BATCHES):
            for i, text in enumerate(window):
                if not text.strip():
                    raise RolevecError(f"prompt {start + i} is empty: pass a non-empty text")
            encoded = encode_prompts(adapter, window, max_tokens=max_tokens)
            ids = encoded.ids
            if encoded.n_shortened:
                warnings.warn(
                    f"{encoded.n_shortened} prompt(s) were longer than `max_tokens`; their user text was "
                    "shortened (template tokens kept)",
                    stacklevel=2,
                )
            for i, row in enumerate(ids):
                if row[:n_head] != head or len(row) <= n_head + n_tail:
                    raise RolevecError(
                        f"prompt {start + i} ({window[i][:40]!r}): its user text's tokens cannot be told "
                        "apart from the chat template's; pass another text"
                    )
            for chunk in plan_batches(
                [len(r) for r in ids], batch_size, overhead_tokens=batch_overhead_tokens(adapter.device)
            ):
                rows = [ids[i] for i in chunk]
                last, mean, square = _read(adapter, site, rows, dirs, n_head, n_tail)
                bar.update(len(chunk))
                n_user = tuple(len(r) - n_head - n_tail for r in rows)
                yield ProjectionBatch(tuple(start + i for i in chunk), last, mean, square, n_user)
            start += len(window)
    if start == 0:
        raise RolevecError("there are no prompts to project: pass at least one prompt")


def _read(
    adapter: ModelAdapter,
    site: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    dirs: torch.Tensor,
    n_head: int,
    n_tail: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward up to ``site``: (last-token, user-mean, user-mean-square) projections, float64
    ``[rows, directions]``."""
    batch = adapter.pad(rows, padding_side="right")
    got: dict[str, torch.Tensor] = {}

    def reader(hidden: torch.Tensor) -> None:
        lengths = batch.lengths.to(hidden.device)
        proj = hidden.float() @ dirs.to(hidden.device).T  # [B, T, R]
        got["last"] = proj[torch.arange(len(rows), device=hidden.device), lengths - 1]
        cols = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        user = (cols >= n_head) & (cols < (lengths - n_tail)[:, None])  # [B, T]
        kept = torch.where(user[..., None], proj, torch.zeros((), device=proj.device))
        got["mean"] = kept.sum(1) / user.sum(1, keepdim=True)
        got["square"] = (kept * kept).sum(1) / user.sum(1, keepdim=True)
        raise StopForward

    with torch.inference_mode(), hooked(pre=[(site, input_hook(reader))]), suppress(StopForward):
        adapter.model(**batch.model_kwargs())
    if not got:
        raise RolevecError("the forward pass never reached the layer read; check `block_pattern`")
    return got["last"].double().cpu(), got["mean"].double().cpu(), got["square"].double().cpu()


def projection_stats(
    adapter: ModelAdapter,
    prompts: Iterable[str],
    directions: torch.Tensor,
    layer: int,
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = True,
) -> ProjectionStats:
    """Mean and spread of the projections over a reference set (the base prompts), for z-scores.

    Float64 sums over batches: memory does not grow with the set. Besides the two prompt summaries
    (``last``, ``mean``) the statistics pool single tokens (``token``: every user-text token of every
    prompt, each counted once), the reference for a per-token projection (``rolevec monitor``).

    Args:
        adapter: The model to read activations from.
        prompts: The reference prompts (at least two, whose projections differ).
        directions: As for :func:`project_prompts`.
        layer: As for :func:`project_prompts`.
        batch_size: Prompts per forward.
        max_tokens: Longer prompts have their user text shortened (default: the model's context).
        progress: Show a progress bar.

    Returns:
        The :class:`ProjectionStats`.

    Example:
        ```python
        stats = projection_stats(adapter, load_base().prompts, dirs, 12)
        z = stats.z(batch.last, "last")
        ```
    """
    n = n_tokens = 0
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    for b in project_prompts(
        adapter, prompts, directions, layer, batch_size=batch_size, max_tokens=max_tokens,
        progress=progress, desc="base prompts",
    ):  # fmt: skip
        n += len(b.indices)
        for by in SUMMARIES:
            v = b.scores(by)
            sums[by] = sums.get(by, 0) + v.sum(0)
            squares[by] = squares.get(by, 0) + (v * v).sum(0)
        assert b.square is not None  # project_prompts always gives it
        counts = torch.tensor(b.n_user, dtype=torch.float64)[:, None]
        n_tokens += sum(b.n_user)
        sums[TOKEN] = sums.get(TOKEN, 0) + (b.mean * counts).sum(0)
        squares[TOKEN] = squares.get(TOKEN, 0) + (b.square * counts).sum(0)
    if n == 0:  # project_prompts has refused no prompts already; this keeps the division safe
        raise RolevecError("there are no prompts to project: pass at least one prompt")
    counts_by = {**dict.fromkeys(SUMMARIES, n), TOKEN: n_tokens}
    mean = {by: sums[by] / k for by, k in counts_by.items()}
    std = {by: (squares[by] / k - mean[by] ** 2).clamp(min=0).sqrt() for by, k in counts_by.items()}
    if n < 2 or any(
        bool((s <= 1e-12 * (1 + m.abs())).any()) for s, m in zip(std.values(), mean.values(), strict=True)
    ):
        raise RolevecError(
            f"the {n} base prompt(s) give projections without spread, so z-scores are undefined: pass a "
            "`base` of at least two different prompts"
        )
    return ProjectionStats(n, mean, std, n_tokens)


def histogram_png(scores: Sequence[float], *, label: str, title: str, bins: int = 40) -> bytes:
    """A histogram of scores as PNG bytes (its own Agg canvas: no pyplot, nothing left registered)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(list(scores), bins=max(1, min(bins, len(scores))), color="tab:blue", edgecolor="white")
    ax.set_xlabel(label)
    ax.set_ylabel("prompts")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
