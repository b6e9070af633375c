"""Per-token projections on role vectors: how role-laden each token of a text, or of a generation, is.

For every token and direction the scalar is ``h_t · d/|d|``, with ``h_t`` the residual at the input of
decoder block ``layer`` (rolevec's layer convention, :meth:`ModelAdapter.residual_site`; ``n_layers`` is
the final norm's input) at token ``t``: the quantity :mod:`.projection` summarises per prompt, kept for
every token. The text is rendered as the user turn of the chat template, and every token is tagged with
its segment:

* ``template``: the template's head, before the user text (a system turn, when given, included);
* ``user``: the user text's own tokens;
* ``post-instruction``: the template's tokens after the user text (where role vectors are extracted);
* ``generated``: the model's answer, with ``generate=True`` (a final stop token is left out, as the
  answer's text leaves it out).

With ``generate=True`` the answer is decoded greedily first (steered, if ``steering`` is given, by
rolevec's :func:`~rolevec.steering.generation.generate`), then one forward over prompt and answer reads
every token, with the same steering applied to that forward. The read is a forward pre-hook on block
``layer`` registered inside the steering's hooks, and PyTorch calls pre-hooks in registration order, so
the read sees what block ``layer`` receives: after an addition, capping or ablation at ``layer`` or below
(an addition of α·d at the read layer shifts every projection by α·(d·d̂)). Hooks live only around that
forward and are removed when it ends or fails.

z-scores (with ``stats`` from :func:`reference_stats`, the base prompts' projections): a token's value
against the pooled projections of every user-text token of the base prompts (``stats``' ``token``
statistics); the last-prompt-token summary against the base prompts' last tokens (``last``); the
user-text mean against the base prompts' user-text means (``mean``); the generated mean is the mean of
its tokens' z-scores (the token reference again).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RolevecError
from ..model.hooks import StopForward, hooked, input_hook
from ..model.loading import ModelAdapter
from ..steering.generation import generate as generate_answer
from ..steering.generation import stop_token_ids
from ..steering.interventions import Steering
from ..vectors.extraction import default_max_tokens
from .projection import TOKEN, ProjectionStats, head_ids, projection_stats

#: Each token's place in the rendered prompt (or the answer), in reading order.
SEGMENTS = ("template", "user", "post-instruction", "generated")
#: Tokens on each side of a token decoded with it, so a tokenizer that drops a word's leading space when
#: it decodes the word alone (SentencePiece) still shows the space.
_CONTEXT = 4


@dataclass(frozen=True)
class Summary:
    """One direction's summary scores of one trace (``*_z``: against the base prompts; ``None`` without
    statistics, ``generated_*`` ``None`` without a generation).

    Args:
        last: The projection at the last prompt token (the end of the template's generation prompt).
        user_mean: The mean projection over the user text's tokens.
        generated_mean: The mean projection over the generated tokens.
        last_z: ``last`` against the base prompts' last-token projections.
        user_mean_z: ``user_mean`` against the base prompts' user-text means.
        generated_mean_z: The mean of the generated tokens' z-scores.
    """

    last: float
    user_mean: float
    generated_mean: float | None = None
    last_z: float | None = None
    user_mean_z: float | None = None
    generated_mean_z: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {
            "last": self.last,
            "user_mean": self.user_mean,
            "generated_mean": self.generated_mean,
            "last_z": self.last_z,
            "user_mean_z": self.user_mean_z,
            "generated_mean_z": self.generated_mean_z,
        }


@dataclass(frozen=True)
class Trace:
    """The per-token projections of one text (and its generated answer) on several directions.

    Args:
        prompt: The user text.
        roles: The directions' names, in row order.
        layer: The layer read (the input of this block).
        token_ids: Every token of the rendered prompt, then of the answer.
        tokens: Each token's text, decoded in context (joined, they give the decoded sequence).
        segments: Each token's segment (one of :data:`SEGMENTS`).
        values: float64 ``[roles, tokens]``: the projections on the unit directions.
        z: float64 ``[roles, tokens]``: each value against the base prompts' pooled token projections, or
            ``None`` without statistics.
        summaries: Role -> its :class:`Summary`.
        generated_text: The answer's text, or ``None`` without a generation.
        steering: The steering applied (its description), or ``None``.
        system: The system prompt, or ``None``.
    """

    prompt: str
    roles: tuple[str, ...]
    layer: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    segments: tuple[str, ...]
    values: torch.Tensor
    z: torch.Tensor | None
    summaries: dict[str, Summary]
    generated_text: str | None = None
    steering: str | None = None
    system: str | None = None

    @property
    def n_prompt(self) -> int:
        """Tokens of the rendered prompt (the answer's start)."""
        return sum(s != "generated" for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-ready: per role its values (and z-scores) per token, and its summaries."""
        return {
            "prompt": self.prompt,
            "system": self.system,
            "generated_text": self.generated_text,
            "steering": self.steering,
            "layer": self.layer,
            "roles": list(self.roles),
            "token_ids": list(self.token_ids),
            "tokens": list(self.tokens),
            "segments": list(self.segments),
            "values": {r: self.values[i].tolist() for i, r in enumerate(self.roles)},
            "z": None if self.z is None else {r: self.z[i].tolist() for i, r in enumerate(self.roles)},
            "summaries": {r: s.to_json() for r, s in self.summaries.items()},
        }


def unit_rows(directions: Mapping[str, torch.Tensor], hidden_size: int) -> torch.Tensor:
    """The directions as unit rows, float32 ``[len(directions), hidden]``; a zero one is refused."""
    if not directions:
        raise RolevecError("no directions to project on: pass at least one in `directions`")
    rows = []
    for role, d in directions.items():
        d = d.detach().float().reshape(-1)
        if d.shape[0] != hidden_size:
            raise RolevecError(
                f"direction {role!r} has {d.shape[0]} entries but the model's hidden size is {hidden_size}: "
                "pass vectors extracted from this model"
            )
        norm = float(d.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise RolevecError(f"direction {role!r} is zero (or not finite), so it has no unit direction")
        rows.append(d / norm)
    return torch.stack(rows)


def reference_stats(
    adapter: ModelAdapter,
    prompts: Iterable[str],
    directions: Mapping[str, torch.Tensor],
    layer: int,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> ProjectionStats:
    """The base prompts' projection statistics that :func:`monitor` z-scores against.

    :func:`~rolevec.analysis.projection.projection_stats` on the unit ``directions`` (in their order):
    last-token, user-text-mean and pooled per-token means and spreads.

    Args:
        adapter: The model.
        prompts: The reference prompts (the base prompts; at least two different ones).
        directions: Name -> direction, as passed to :func:`monitor`.
        layer: The layer read.
        batch_size: Prompts per forward.
        progress: Show a progress bar.

    Returns:
        The statistics, one column per direction.

    Example:
        ```python
        stats = reference_stats(adapter, load_base().prompts, {"doctor": d}, 12)
        ```
    """
    dirs = unit_rows(directions, adapter.hidden_size)
    return projection_stats(adapter, prompts, dirs, layer, batch_size=batch_size, progress=progress)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text, decoded with up to four tokens before it, so leading spaces survive.

    A piece is what the token adds to the text of the tokens before it; where that is not a clean
    extension (an incomplete multi-byte character), the token decoded alone.
    """
    pieces = []
    for i, token in enumerate(ids):
        before = list(ids[max(0, i - _CONTEXT) : i])
        alone = str(tokenizer.decode([token], skip_special_tokens=False))
        if not before:
            pieces.append(alone)
            continue
        head = str(tokenizer.decode(before, skip_special_tokens=False))
        both = str(tokenizer.decode([*before, token], skip_special_tokens=False))
        pieces.append(both[len(head) :] if both.startswith(head) and "\ufffd" not in head else alone)
    return pieces


def _prompt_ids(adapter: ModelAdapter, text: str, system: str | None) -> tuple[list[int], int, int]:
    """(token ids of the rendered prompt, template-head tokens, post-instruction tokens)."""
    if not text.strip():
        raise RolevecError("the text is empty: pass some text to monitor")
    rendered = adapter.render(text, system)
    ids = [
        int(i)
        for i in adapter.tokenizer(rendered, add_special_tokens=adapter.chat.add_special_tokens)["input_ids"]
    ]
    head = head_ids(adapter, system)
    suffix = list(adapter.chat.suffix_ids)
    n_head, n_tail = len(head), len(suffix)
    if ids[:n_head] != head or ids[-n_tail:] != suffix or len(ids) <= n_head + n_tail:
        raise RolevecError(
            f"the text {text[:40]!r}: its tokens cannot be told apart from the chat template's (it merges "
            "with the template's tokens after tokenisation); remove leading or trailing special characters"
        )
    return ids, n_head, n_tail


def _read(
    adapter: ModelAdapter, ids: Sequence[int], dirs: torch.Tensor, layer: int, steering: Steering | None
) -> torch.Tensor:
    """One forward over ``ids`` (steered), stopped at block ``layer``: float64 ``[tokens, directions]``."""
    site = adapter.residual_site(layer)
    batch = adapter.pad([list(ids)], padding_side="right")
    got: list[torch.Tensor] = []

    def reader(hidden: torch.Tensor) -> None:
        got.append((hidden[0].float() @ dirs.to(hidden.device).T).double().cpu())
        raise StopForward

    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if steering is not None:
            stack.enter_context(steering.apply(adapter))
        # Registered after the steering's hooks, so on block `layer` this one runs after theirs.
        stack.enter_context(hooked(pre=[(site, input_hook(reader))]))
        with suppress(StopForward):
            adapter.model(**batch.model_kwargs())
    if not got:
        raise RolevecError("the forward pass never reached the layer read; check `block_pattern`")
    return got[0]


def _mean(x: torch.Tensor) -> float | None:
    return float(x.mean()) if x.numel() else None


def monitor(
    adapter: ModelAdapter,
    text: str,
    directions: Mapping[str, torch.Tensor],
    layer: int,
    *,
    steering: Steering | None = None,
    generate: bool = False,
    max_new_tokens: int = 64,
    stats: ProjectionStats | None = None,
    system: str | None = None,
) -> Trace:
    """Project every token of ``text`` (rendered as the chat template's user turn), and of its answer with
    ``generate``, on each direction at ``layer``.

    Args:
        adapter: The model.
        text: The user text.
        directions: Name -> direction ``[hidden]`` (any length; each is normalised, a zero one refused).
        layer: Read the residual at the input of this block (``n_layers``: the final norm's input).
        steering: Applied to the read forward (and to the generation): the read sees the residual after
            the steering's hooks at ``layer`` and below.
        generate: Decode an answer greedily first and project its tokens too.
        max_new_tokens: The longest answer (default 64).
        stats: The base prompts' statistics (:func:`reference_stats`, same directions in the same order)
            for z-scores; ``None`` for none.
        system: A system prompt for the chat template.

    Returns:
        The :class:`Trace`.

    Example:
        ```python
        vectors = RoleVectors.load("runs/quick/vectors.safetensors")
        dirs = {"doctor": vectors.vector("doctor", 12, -1)}
        trace = monitor(adapter, "What causes a fever?", dirs, 12, generate=True, max_new_tokens=32)
        trace.summaries["doctor"].last, trace.summaries["doctor"].generated_mean
        ```
    """
    dirs = unit_rows(directions, adapter.hidden_size)
    roles = tuple(directions)
    if not 0 <= layer <= adapter.n_layers:
        raise RolevecError(f"layer {layer} is out of range: this model has layers 0..{adapter.n_layers}")
    if stats is not None and int(stats.mean["last"].shape[0]) != len(roles):
        raise RolevecError(
            f"`stats` has {int(stats.mean['last'].shape[0])} directions, not {len(roles)}: compute them with "
            "reference_stats on the same directions"
        )
    if stats is not None and TOKEN not in stats.mean:
        raise RolevecError("`stats` pools no single tokens: compute them with reference_stats")
    if max_new_tokens < 1:
        raise RolevecError(f"`max_new_tokens` must be at least 1, not {max_new_tokens}")
    ids, n_head, n_tail = _prompt_ids(adapter, text, system)
    n_prompt = len(ids)
    context = default_max_tokens(adapter)
    need = n_prompt + (max_new_tokens if generate else 0)
    if need > context:
        what = f"{n_prompt} tokens" + (f" and {max_new_tokens} new ones" if generate else "")
        raise RolevecError(
            f"the text takes {what}, more than the model's context of {context}: pass a shorter text"
            + (" or a smaller `max_new_tokens`" if generate else "")
        )
    answer: list[int] = []
    generated_text = None
    if generate:
        gen = generate_answer(adapter, text, steering=steering, max_new_tokens=max_new_tokens, system=system)
        answer = list(gen.token_ids)
        if gen.stopped and answer and answer[-1] in stop_token_ids(adapter):
            answer = answer[:-1]
        generated_text = gen.text
    all_ids = ids + answer
    values = _read(adapter, all_ids, dirs, layer, steering).T.contiguous()  # [roles, tokens]
    n_user_end = n_prompt - n_tail
    segments = (
        ["template"] * n_head
        + ["user"] * (n_user_end - n_head)
        + ["post-instruction"] * n_tail
        + ["generated"] * len(answer)
    )
    z = stats.z(values.T, TOKEN).T.contiguous() if stats is not None else None
    summaries = {}
    for i, role in enumerate(roles):
        row = values[i]
        last, user = float(row[n_prompt - 1]), float(row[n_head:n_user_end].mean())
        gen_mean = _mean(row[n_prompt:]) if generate else None
        summary = Summary(last, user, gen_mean)
        if stats is not None and z is not None:
            m, s = stats.mean, stats.std
            summary = Summary(
                last,
                user,
                gen_mean,
                last_z=float((last - m["last"][i]) / s["last"][i]),
                user_mean_z=float((user - m["mean"][i]) / s["mean"][i]),
                generated_mean_z=_mean(z[i, n_prompt:]) if generate else None,
            )
        summaries[role] = summary
    return Trace(
        prompt=text,
        roles=roles,
        layer=layer,
        token_ids=tuple(all_ids),
        tokens=tuple(token_pieces(adapter.tokenizer, all_ids)),
        segments=tuple(segments),
        values=values,
        z=z,
        summaries=summaries,
        generated_text=generated_text,
        steering=None if steering is None else steering.describe(),
        system=system,
    )
