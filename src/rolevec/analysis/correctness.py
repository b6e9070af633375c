"""Does the last-token projection on a role vector predict whether the model answers a question correctly?

For each question the score is ``h · d/|d|``: the residual ``h`` at the input of one block, read at the
last prompt token (the token whose logits give the answer letter), dotted with the unit role direction.
The AUROC of that score for correctness (correct = the positive class, ties count half) is set against the
same AUROC of ``n_random`` Gaussian unit directions of the same hidden size, drawn from one seeded
generator: the same directions for every role and reading, so comparisons between them are paired.

A direction may predict with either sign, so the empirical p-value is two-sided on ``|AUROC − 0.5|``:
``(1 + #{random k: |A_k − 0.5| ≥ |A_role − 0.5|}) / (n_random + 1)``.

The role and random directions are projected in one forward per batch (one ``[prompts, 1 + n_random]``
matrix of float64 scores is all that is kept). Two readings, each by the caller's choice of labels and
steering:

- *unsteered*: the baseline condition's correctness, projections read from the unsteered model;
- *steered*: the ``add`` condition's correctness, projections read with the role's addition applied
  (:meth:`~rolevec.steering.interventions.Steering.apply` around the forward). Read at the addition's own
  layer, the residual is the unsteered one plus ``α·v`` (the blocks below are untouched), so every
  direction's scores shift by a constant and only the labels differ from the unsteered reading; a later
  ``read_layer`` reads what the addition did to the residual.

Entry points::

    random_unit_directions(hidden, n, seed) -> Tensor            # [n, hidden], float32 unit rows
    direction_aurocs(scores, correct) -> list[float]             # one AUROC per column
    last_token_projections(adapter, items, prompt_format, directions, layer, *, steering=None) -> Tensor
    correctness_auroc(adapter, items, correct, vector, layer, *, prompt_format, ...) -> CorrectnessAUROC
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from ..data.mcq import MCQItem
from ..errors import RolevecError
from ..model.loading import ModelAdapter
from ..steering.interventions import Steering
from ..vectors.diagnostics import auroc
from .projection import project_prompts

#: Defaults: random directions in the null, and the seed they are drawn from.
DEFAULT_RANDOM = 32
DEFAULT_SEED = 0
#: The quantiles of the random directions' AUROCs that the result reports.
QUANTILES = (0.05, 0.5, 0.95)
READINGS = ("unsteered", "steered")


class UserTurn(Protocol):
    """How a question becomes the user turn (:class:`rolevec.PromptFormat` is one)."""

    @property
    def answer_prefix(self) -> str | None: ...

    def user_text(self, item: MCQItem) -> str: ...


@dataclass(frozen=True)
class CorrectnessAUROC:
    """The AUROC of the role direction's last-token projection for correctness, against random directions.

    Attributes:
        reading: ``unsteered`` or ``steered`` (a label; what was steered is the caller's choice).
        layer: The layer the residual was read at (the input of this block).
        n: Questions scored.
        n_correct: Of them answered correctly (the positive class).
        role_auroc: The role direction's AUROC (above 0.5: higher projection, more often correct).
        random_aurocs: Each random direction's AUROC, in the generator's order.
        random_mean: Their mean.
        random_sd: Their standard deviation (sample, ddof 1).
        random_quantiles: Their 5th, 50th and 95th percentiles, keyed ``"5"``, ``"50"``, ``"95"``.
        exceeded_by: Random directions whose ``|AUROC − 0.5|`` is at least the role's.
        p_value: ``(1 + exceeded_by) / (n_random + 1)``: two-sided, either sign of prediction counts.
        seed: The random directions' seed.
    """

    reading: str
    layer: int
    n: int
    n_correct: int
    role_auroc: float
    random_aurocs: tuple[float, ...]
    random_mean: float
    random_sd: float
    random_quantiles: dict[str, float]
    exceeded_by: int
    p_value: float
    seed: int

    @property
    def n_random(self) -> int:
        return len(self.random_aurocs)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["random_aurocs"] = list(self.random_aurocs)
        out["n_random"] = self.n_random
        return out

    def line(self) -> str:
        """One line for a console: the role's AUROC, the null's spread and the p-value."""
        q = self.random_quantiles
        return (
            f"{self.reading}: AUROC {self.role_auroc:.3f} (n={self.n}, {self.n_correct} correct); "
            f"{self.n_random} random: mean {self.random_mean:.3f} sd {self.random_sd:.3f}, "
            f"5–95% [{q['5']:.3f}, {q['95']:.3f}]; p(two-sided) {self.p_value:.3f}"
        )


def random_unit_directions(hidden: int, n: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``n`` Gaussian directions of unit norm, float32 ``[n, hidden]``: a function of (hidden, n, seed) only.

    The first ``m`` rows for ``n`` are the rows for ``m``, so a larger null extends a smaller one.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RolevecError(f"`n_random` must be an integer >= 1, not {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    rows = torch.randn(n, hidden, generator=gen, dtype=torch.float64)
    unit: torch.Tensor = rows / rows.norm(dim=1, keepdim=True)
    return unit.float()


def _labels(correct: Sequence[bool] | torch.Tensor, n: int) -> torch.Tensor:
    labels = torch.as_tensor(correct).reshape(-1)
    if labels.numel() != n:
        raise RolevecError(f"{labels.numel()} correctness labels for {n} questions: pass one per question")
    if labels.dtype != torch.bool:
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise RolevecError("correctness labels must be booleans (or 0/1)")
        labels = labels.bool()
    n_correct = int(labels.sum())
    if n_correct in (0, n):
        raise RolevecError(
            f"all {n} questions were answered {'correctly' if n_correct else 'wrongly'}: an AUROC needs "
            "both; pass more questions"
        )
    return labels


def direction_aurocs(scores: torch.Tensor, correct: Sequence[bool] | torch.Tensor) -> list[float]:
    """The AUROC for correctness of each column of ``scores`` (``[questions, directions]``).

    Correct answers are the positive class; ties count half (:func:`rolevec.vectors.diagnostics.auroc`).
    """
    if scores.ndim != 2:
        raise RolevecError(f"scores must be [questions, directions], not {tuple(scores.shape)}")
    labels = _labels(correct, scores.shape[0])
    pos, neg = scores[labels].double(), scores[~labels].double()
    return [auroc(pos[:, k], neg[:, k]) for k in range(scores.shape[1])]


def last_token_projections(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    prompt_format: UserTurn,
    directions: torch.Tensor,
    layer: int,
    *,
    steering: Steering | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Each question's residual at the input of ``layer``, last prompt token, dotted with each direction.

    The prompt is the question's user turn in the chat template with no system turn: the letter scorer's
    prompt, so the last token is the one whose logits give the answer. With ``steering`` its hooks are on
    around every forward (registered before the reading hook, so a steering at ``layer`` is seen).

    Returns:
        float64 ``[len(items), len(directions)]``, rows in the order of ``items``.
    """
    if not items:
        raise RolevecError("no questions to project: pass at least one item")
    if prompt_format.answer_prefix:
        raise RolevecError(
            "the prompt format has an answer prefix: the letter is read after it, not at the end of the "
            "user turn that projections read; use a format without `answer_prefix`"
        )
    dirs = directions.reshape(1, -1) if directions.ndim == 1 else directions
    out = torch.full((len(items), dirs.shape[0]), math.nan, dtype=torch.float64)
    texts = [prompt_format.user_text(item) for item in items]
    with nullcontext() if steering is None else steering.apply(adapter):
        for batch in project_prompts(
            adapter, texts, dirs, layer, batch_size=batch_size, progress=progress, desc="questions"
        ):
            out[list(batch.indices)] = batch.last
    return out


def _summary(
    reading: str, layer: int, labels: torch.Tensor, aurocs: Sequence[float], seed: int
) -> CorrectnessAUROC:
    role, null = aurocs[0], torch.tensor(aurocs[1:], dtype=torch.float64)
    distance = abs(role - 0.5)
    # a hair of slack so a random AUROC equal to the role's (same pairs won) counts as reaching it
    exceeded = int(((null - 0.5).abs() >= distance - 1e-12).sum())
    quantiles = torch.quantile(null, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return CorrectnessAUROC(
        reading=reading,
        layer=layer,
        n=len(labels),
        n_correct=int(labels.sum()),
        role_auroc=role,
        random_aurocs=tuple(float(a) for a in null.tolist()),
        random_mean=float(null.mean()),
        random_sd=float(null.std()) if len(null) > 1 else 0.0,
        random_quantiles={f"{q * 100:g}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
        exceeded_by=exceeded,
        p_value=(1 + exceeded) / (len(null) + 1),
        seed=seed,
    )


def correctness_auroc(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    correct: Sequence[bool] | torch.Tensor,
    vector: torch.Tensor,
    layer: int,
    *,
    prompt_format: UserTurn,
    steering: Steering | None = None,
    read_layer: int | None = None,
    n_random: int = DEFAULT_RANDOM,
    seed: int = DEFAULT_SEED,
    batch_size: int = 16,
    progress: bool = False,
) -> CorrectnessAUROC:
    """How well the last-token projection on ``vector`` predicts correctness, against random directions.

    The role's unit direction and ``n_random`` seeded Gaussian unit directions are projected in one
    forward per batch; each gets the AUROC of its scores for ``correct``. Pass the labels that match the
    model read: the baseline condition's with no ``steering`` (the *unsteered* reading), the ``add``
    condition's with that addition as ``steering`` (the *steered* reading).

    Args:
        adapter: The model the vector comes from.
        items: The questions (each scored by the letter scorer with ``prompt_format``, no system turn).
        correct: Whether each item was answered correctly, in the order of ``items``.
        vector: The role's vector at its site (``vectors.vector(role, layer, position)``); only its
            direction matters.
        layer: The vector's layer; the residual is read at the input of this block.
        prompt_format: How a question becomes the user turn (a :class:`rolevec.PromptFormat`; one with an
            ``answer_prefix`` is refused).
        steering: Applied around every forward (the steered reading); ``None`` reads the unsteered model.
        read_layer: Read the residual at the input of this block instead (default ``layer``).
        n_random: Random directions in the null (default 32).
        seed: Their seed (default 0); the same seed gives the same directions for every role and reading.
        batch_size: Questions per forward.
        progress: Show a progress bar.

    Returns:
        A :class:`CorrectnessAUROC`: the role's AUROC, the random AUROCs' spread and the two-sided p-value.

    Example:
        ```python
        from rolevec import PromptFormat, correctness_auroc, score

        items = split.select(mcq, "medicine", "test")
        correct = [r.correct for r in score(adapter, items, "baseline")]
        result = correctness_auroc(adapter, items, correct, vectors.vector("doctor", 12, -1), 12,
                                   prompt_format=PromptFormat())
        print(result.line())
        ```
    """
    labels = _labels(correct, len(items))
    if vector.ndim != 1 or vector.shape[0] != adapter.hidden_size:
        raise RolevecError(
            f"vector has shape {tuple(vector.shape)}, expected [{adapter.hidden_size}]: pass one role's "
            "vector at one site"
        )
    norm = float(vector.double().norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise RolevecError("the role vector is zero (or not finite) at this site: pass another layer")
    at = layer if read_layer is None else read_layer
    dirs = torch.cat(
        [(vector.double() / norm).float()[None], random_unit_directions(adapter.hidden_size, n_random, seed)]
    )
    scores = last_token_projections(
        adapter,
        items,
        prompt_format,
        dirs,
        at,
        steering=steering,
        batch_size=batch_size,
        progress=progress,
    )
    reading = "unsteered" if steering is None else "steered"
    return _summary(reading, at, labels, direction_aurocs(scores, labels), seed)
