"""Role prompt generation as the paper built D_r: personas that mention a role -> short instructions.

For each PersonaHub persona whose text mentions the role, a generator model is asked for one short
instruction per task type (the ten opening verbs seen in the paper's data). Replies are stripped of the
commentary generators like to add ("This prompt fits the persona because ..."), de-duplicated, and written
as a JSON list that :func:`rolevec.data.sources.load_prompts` reads. The generator is a local model (any the
adapter loads, the embedded one by default) or an OpenAI-compatible chat endpoint.
"""

from __future__ import annotations

import json
import random
import re
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..core.files import atomic_write, read_text
from ..errors import RolevecError, path_problem
from ..model.loading import ModelAdapter
from .sources import PromptSet, role_display

#: Opening words of the paper's role prompts, about equally frequent there (one instruction each per persona).
TASK_TYPES = (
    "Describe",
    "Compare",
    "Analyze",
    "Create",
    "Design",
    "How to",
    "Recommend",
    "What is",
    "Explain",
    "Solve",
)

REQUEST_TEMPLATE = (
    "Persona: {persona}\n\n"
    "Write one instruction that this person, as a {role}, might give to an AI assistant. "
    'It must be specific, under 15 words, and start with "{task}". '
    "Reply with the instruction only, with no explanation."
)

_OPENERS = r"(sure|certainly|okay|ok|of course|absolutely|here(?:'s| is| are)|great)\b"
_PREAMBLE = re.compile(_OPENERS + r"[^.?!:]*[:!.]?\s*$", re.IGNORECASE)
_INLINE_PREAMBLE = re.compile(r"^" + _OPENERS + r"[^:]*:\s*(?P<rest>\S.*)$", re.IGNORECASE)
_LIST_MARK = re.compile(r"^(\d+[.)]|[-*•])\s+")
_LABEL = re.compile(r"^(instruction|prompt|task|user|request)\s*\d*\s*:\s*", re.IGNORECASE)
_TRAILING_NOTE = re.compile(
    r"\s*(\((this|note|it|the persona)\b[^)]*\)|\bnote\s*:.*|(?<=[.?!])\s*this (prompt|instruction)\b.*)$",
    re.IGNORECASE,
)
_QUOTED_AFTER_COLON = re.compile(r"^[^\"“:]{0,80}:\s*[\"“](?P<q>[^\"”]{8,})[\"”]?\s*$")
_REPEATED_LABEL = re.compile(r"^(?P<w>\w+(?: \w+)?)\s*:\s*(?=(?P=w)\b)", re.IGNORECASE)
_QUOTES = "\"'“”‘’`*"
MIN_WORDS = 3
MAX_WORDS = 40


def clean_instruction(text: str) -> str | None:
    """The instruction in a generator reply, without preamble, labels, quotes or commentary; None if none."""
    body = text.strip().strip("`").strip()
    first_block = re.split(r"\n\s*\n", body, maxsplit=1)[0] if body else ""
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    candidates = [ln for ln in first_block.splitlines() if ln.strip()] + lines
    for raw in candidates:
        line = raw.strip()
        if _PREAMBLE.match(line):
            continue
        inline = _INLINE_PREAMBLE.match(line)
        if inline:
            line = inline.group("rest")
        quoted = _QUOTED_AFTER_COLON.match(line)
        if quoted:
            line = quoted.group("q")
        line = _LIST_MARK.sub("", line)
        line = _LABEL.sub("", line)
        line = _REPEATED_LABEL.sub("", line)
        line = _TRAILING_NOTE.sub("", line).strip().strip(_QUOTES).strip()
        if not line or line.endswith(":"):
            continue
        words = line.split()
        if len(words) < MIN_WORDS or len(words) > MAX_WORDS or re.search(r"\bpersona\b", line, re.I):
            return None
        return line
    return None


def _key(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt.lower()).strip(" .?!")


def _echoes(prompt: str, persona: str) -> bool:
    """A reply that copies the persona description is a failed generation, not an instruction."""
    head = _key(persona)[:40]
    return len(head) >= 20 and head in _key(prompt)


def load_personas(path: str | Path) -> list[str]:
    """Persona texts from a PersonaHub-style JSONL file (objects with a ``persona`` field) or a JSON list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RolevecError(
            f"persona file {p} {path_problem(p)}: pass a JSONL file of {{'persona': ...}} objects"
        )
    text = read_text(p, what="persona file")
    items: list[tuple[str, Any]] = []  # (where, item): "path:line" or "path (item i)"
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RolevecError(f"{p}:{exc.lineno}: malformed JSON persona list ({exc.msg})") from exc
        if not isinstance(data, list):
            raise RolevecError(
                f"{p}: expected a JSON list of personas, found {type(data).__name__}; pass a list of "
                "strings or {'persona': ...} objects"
            )
        items = [(f"{p} (item {i})", item) for i, item in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{p}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RolevecError(f"{p}:{lineno}: malformed JSON line ({exc.msg})") from exc
    personas = []
    for where, item in items:
        value = item.get("persona") if isinstance(item, dict) else item
        if not isinstance(value, str):
            raise RolevecError(f"{where}: expected an object with a string 'persona' field")
        if value.strip():
            personas.append(value.strip())
    if not personas:
        raise RolevecError(f"{p} holds no personas: pass a JSONL file of {{'persona': ...}} objects")
    return personas


def role_pattern(role: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive match of the role name (spaces, hyphens or underscores; plural ok)."""
    words = role_display(role).split()
    return re.compile(r"\b" + r"[\s_-]+".join(map(re.escape, words)) + r"s?\b", re.IGNORECASE)


def select_personas(personas: Sequence[str], role: str, *, seed: int) -> list[str]:
    """Personas whose text mentions the role, in a seeded random order."""
    pattern = role_pattern(role)
    chosen = [p for p in personas if pattern.search(p)]
    random.Random(seed).shuffle(chosen)
    return chosen


class Generator(Protocol):
    """Turns user requests into model replies (one reply per request)."""

    name: str

    def complete(self, requests: Sequence[str]) -> list[str]: ...


class LocalGenerator:
    """Greedy generation with a locally loaded model, batched with left padding."""

    def __init__(self, adapter: ModelAdapter, *, max_new_tokens: int = 48, batch_size: int = 8) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @torch.inference_mode()
    def complete(self, requests: Sequence[str]) -> list[str]:
        from transformers import GenerationConfig

        tok = self.adapter.tokenizer
        eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int)]
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos or None,
        )
        model: Any = self.adapter.model  # a transformers model: has .generate
        replies: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            batch = self.adapter.encode([self.adapter.render(r) for r in chunk], padding_side="left")
            out = model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config
            )
            new = out[:, batch.input_ids.shape[1] :]
            replies.extend(str(t) for t in tok.batch_decode(new, skip_special_tokens=True))
        return replies


class OpenAIGenerator:
    """An OpenAI-compatible chat endpoint: POST ``{url}/v1/chat/completions``, one request per prompt."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 64,
        temperature: float = 0.7,
    ) -> None:
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.api_key = api_key
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.model = model or self._first_model()
        self.name = f"{self.model} at {self.base}"

    def _call(self, path: str, body: dict[str, Any] | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200]
            raise RolevecError(
                f"generator endpoint {self.base}{path} answered HTTP {exc.code} ({detail.strip()}); check "
                "`generator`, `generator_model` and the API key"
            ) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RolevecError(
                f"could not reach generator endpoint {self.base}{path} ({reason}); pass a reachable "
                "`generator` URL, or a local model"
            ) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RolevecError(
                f"generator endpoint {self.base}{path} did not answer UTF-8 JSON: check that `generator` "
                "is an OpenAI-compatible server"
            ) from exc

    def _first_model(self) -> str:
        try:
            listing = self._call("/v1/models", None)
            return str(listing["data"][0]["id"])
        except (RolevecError, KeyError, IndexError, TypeError) as exc:
            raise RolevecError(
                f"could not list the models at {self.base} ({exc}); pass `generator_model` NAME"
            ) from exc

    def complete(self, requests: Sequence[str]) -> list[str]:
        replies = []
        for text in requests:
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
            answer = self._call("/v1/chat/completions", body)
            try:
                replies.append(str(answer["choices"][0]["message"]["content"] or ""))
            except (KeyError, IndexError, TypeError) as exc:
                raise RolevecError(
                    f"generator endpoint {self.base} answered without choices[0].message.content"
                ) from exc
        return replies


def is_url(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(("http://", "https://"))


@dataclass(frozen=True)
class Generated:
    """A generated prompt set and what happened on the way."""

    prompts: PromptSet
    n_personas: int
    n_requests: int
    n_rejected: int


def generate_prompts(
    role: str,
    personas: Sequence[str],
    generator: Generator,
    *,
    n: int = 128,
    seed: int = 42,
    task_types: Sequence[str] = TASK_TYPES,
    batch_size: int = 8,
    source: str = "personas",
    progress: bool = True,
) -> Generated:
    """Up to ``n`` unique instructions for ``role``: one per (matching persona, task type), persona-major."""
    if n < 1:
        raise RolevecError(f"`n` must be at least 1, not {n}")
    chosen = select_personas(personas, role, seed=seed)
    if not chosen:
        raise RolevecError(
            f"no persona in {source} mentions {role_display(role)!r}: pass a persona file that does, or "
            "another `role`"
        )
    pairs = [(p, t) for p in chosen for t in task_types]
    kept: dict[str, str] = {}
    rejected = duplicates = requested = 0
    with tqdm(total=n, desc=role, unit="prompt", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            if len(kept) >= n:
                break
            chunk = pairs[start : start + batch_size]
            requests = [REQUEST_TEMPLATE.format(persona=p, role=role_display(role), task=t) for p, t in chunk]
            replies = generator.complete(requests)
            if len(replies) != len(requests):
                raise RolevecError(
                    f"generator {generator.name!r} gave {len(replies)} replies to {len(requests)} requests"
                )
            requested += len(requests)
            for (persona, _), reply in zip(chunk, replies, strict=True):
                prompt = clean_instruction(reply)
                if prompt is None or _echoes(prompt, persona):
                    rejected += 1
                elif _key(prompt) in kept:
                    duplicates += 1
                elif len(kept) < n:
                    kept[_key(prompt)] = prompt
                    bar.update(1)
    if not kept:
        raise RolevecError(
            f"the generator {generator.name!r} gave no usable instruction in {requested} replies; pass a "
            "stronger `generator`"
        )
    if len(kept) < n:
        warnings.warn(
            f"{role}: only {len(kept)} usable prompts from {len(chosen)} personas (n={n} asked); pass more "
            "personas for more",
            stacklevel=2,
        )
    ps = PromptSet(
        name=role,
        prompts=tuple(kept.values()),
        source=f"generated by {generator.name} from {source}",
        n_duplicates_dropped=duplicates,
    )
    return Generated(ps, n_personas=len(chosen), n_requests=requested, n_rejected=rejected)


def write_prompts(ps: PromptSet, path: str | Path, *, force: bool = False) -> Path:
    """A JSON list of strings (the format of ``roles/<role>.json``), written atomically."""
    out = Path(path).expanduser()
    text = json.dumps(list(ps.prompts), indent=1, ensure_ascii=False) + "\n"
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)
    return out
