"""Steered text generation: rolevec's own decoding loop, so steering, streaming and seeds stay explicit.

The loop keeps the KV cache (one forward per new token), so hooks see the prompt once and then one
single-token forward per step — which is what ``where="prompt"|"generated"`` relies on. Rows of a batch
are left-padded with explicit position ids and an attention mask, so each row decodes as it would alone.
Greedy by default; sampling draws from a ``torch.Generator`` seeded by the caller (no global RNG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from ..errors import RolevecError
from ..model.loading import ModelAdapter
from .interventions import WHERE, Steering


@dataclass
class Generation:
    """One generated answer."""

    prompt: str
    text: str
    token_ids: list[int]
    stopped: bool  # True when a stop token ended it before max_new_tokens


class TextStream:
    """Turns a growing list of token ids into printable text pieces, holding back incomplete characters."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.printed = 0

    def _text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def put(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if len(text) > self.printed:
            self.emit(text[self.printed :])
            self.printed = len(text)

    def end(self) -> None:
        text = self._text()
        if len(text) > self.printed:
            self.emit(text[self.printed :])
            self.printed = len(text)


def stop_token_ids(adapter: ModelAdapter) -> set[int]:
    """EOS of the tokenizer and of the model's generation config (which may list several)."""
    ids: set[int] = set()
    eos = getattr(adapter.tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    config = getattr(adapter.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return ids


def _check_options(max_new_tokens: int, temperature: float, where: str, use_cache: bool) -> None:
    if max_new_tokens < 1:
        raise RolevecError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if not temperature >= 0.0 or temperature == float("inf"):
        raise RolevecError(f"temperature must be a finite number ≥ 0 (0 = greedy), not {temperature}")
    if where not in WHERE:
        raise RolevecError(f"where must be one of {', '.join(WHERE)}, not {where!r}")
    if where != "all" and not use_cache:
        raise RolevecError(
            "where='prompt'/'generated' tells prompt from decoding steps by the KV cache: pass use_cache=True"
        )


@torch.inference_mode()
def _decode(
    adapter: ModelAdapter,
    rows: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    use_cache: bool,
    stop_ids: set[int],
    on_token: Callable[[int, int], None] | None,
    progress: bool,
) -> tuple[list[list[int]], list[bool]]:
    batch = adapter.pad(rows, padding_side="left")
    ids, mask = batch.input_ids, batch.attention_mask
    n = ids.shape[0]
    generator = torch.Generator(device=adapter.device).manual_seed(seed) if temperature > 0 else None
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)
    out: list[list[int]] = [[] for _ in range(n)]
    pad_id = int(adapter.tokenizer.pad_token_id)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=ids.device)
    cache_arg = adapter.cache_argument
    past: Any = None
    for _ in tqdm(range(max_new_tokens), desc="generating", disable=not progress, leave=False):
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if past is None:
            result = adapter.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache
            )
        else:
            result = adapter.model(
                input_ids=ids[:, -1:],
                attention_mask=mask,
                position_ids=positions[:, -1:],
                use_cache=True,
                **{cache_arg: past},
            )
        if use_cache:
            past = getattr(result, cache_arg)
        logits = result.logits[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for i in range(n):
            if not bool(done[i]):
                out[i].append(int(token[i]))
                if on_token is not None:
                    on_token(i, int(token[i]))
        done = done | torch.isin(token, stops)
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(done.all()):
            break
    return out, [bool(x) for x in done]


def generate_batch(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    *,
    steering: Steering | None = None,
    where: str = "all",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = True,
    system: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Answer several prompts at once (left-padded), each as it would be answered alone.

    ``chat`` renders each prompt as the user turn of the chat template; ``on_token(row, id)`` sees every
    new token as it is chosen.
    """
    _check_options(max_new_tokens, temperature, where, use_cache)
    if not prompts:
        raise RolevecError("no prompts to answer: pass at least one")
    texts = [adapter.render(p, system) if chat else p for p in prompts]
    add_special = adapter.chat.add_special_tokens if chat else True
    rows = [list(adapter.tokenizer(t, add_special_tokens=add_special)["input_ids"]) for t in texts]
    if any(not r for r in rows):
        raise RolevecError("a prompt tokenised to nothing: pass some text")
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "use_cache": use_cache,
        "stop_ids": stop_token_ids(adapter),
        "on_token": on_token,
        "progress": progress,
    }
    if steering is None:
        if where != "all":
            raise RolevecError("where= only applies to steered generation: pass a steering")
        tokens, stopped = _decode(adapter, rows, **kwargs)
    else:
        with steering.apply(adapter, where=where):
            tokens, stopped = _decode(adapter, rows, **kwargs)
    stop_ids = kwargs["stop_ids"]
    return [
        Generation(
            prompt=p,
            text=str(
                adapter.tokenizer.decode([t for t in ids if t not in stop_ids], skip_special_tokens=True)
            ),
            token_ids=ids,
            stopped=s,
        )
        for p, ids, s in zip(prompts, tokens, stopped, strict=True)
    ]


def generate(
    adapter: ModelAdapter,
    prompt: str,
    *,
    steering: Steering | None = None,
    where: str = "all",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = True,
    system: str | None = None,
    use_cache: bool = True,
    stream: Callable[[str], None] | None = None,
) -> Generation:
    """Answer one prompt; ``stream`` receives text pieces as they are decoded (e.g. ``print``).

    Args:
        adapter: The model to generate with.
        prompt: The user's prompt.
        steering: The intervention applied while generating (default: none).
        where: For a steering: ``all`` (default), ``prompt`` or ``generated`` tokens only (needs
            ``use_cache``).
        max_new_tokens: The most tokens to generate (default 64).
        temperature: Sampling temperature; 0 (default) decodes greedily.
        seed: The sampling seed, for reproducible answers at a temperature above 0.
        chat: Render the prompt as the user turn of the chat template (default ``True``).
        system: A system prompt for the chat template (e.g. a persona).
        use_cache: Decode with a KV cache (default ``True``).
        stream: Called with each decoded piece of text as it is generated.

    Returns:
        The ``Generation``: its ``text``, ``token_ids`` and whether a stop token ended it.

    Example:
        ```python
        adapter = load_model()
        steering = resolve_steering(RoleVectors.load("runs/quick/vectors.safetensors"), "doctor",
                                    layers=12, alpha=3.0, adapter=adapter)
        answer = generate(adapter, "What causes a fever?", steering=steering, max_new_tokens=48)
        print(answer.text)
        ```
    """
    streamer = TextStream(adapter.tokenizer, stream) if stream is not None else None
    stops = stop_token_ids(adapter)

    def on_token(row: int, token: int) -> None:
        if streamer is not None and token not in stops:
            streamer.put(token)

    (result,) = generate_batch(
        adapter,
        [prompt],
        steering=steering,
        where=where,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        chat=chat,
        system=system,
        use_cache=use_cache,
        on_token=on_token,
    )
    if streamer is not None:
        streamer.end()
    return result
