"""What a role vector encodes, read three ways: patch-scoping, the logit lens, and an optional LLM judge.

* Patch-scoping: the model answers "What does ♦ represent?" while α·d is added at the vector's layer —
  by default only at the token positions of the ♦ placeholder in the prompt (the paper's set-up; the
  steering enters the answer through attention), or at every position with ``where="all"``. The
  unsteered answer is shown beside it; both are greedy.
* Logit lens: the direction read out through the final norm and the unembedding (``normed``), and the
  plain projection W_U·d (``raw``), as the top and bottom tokens.
* Judge: any OpenAI-compatible chat endpoint, asked whether a text relates to the role (the paper's
  Table 4 statistic is computed from these verdicts in :mod:`rolevec.analysis.report`).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write, read_text
from ..core.spec import check_alpha
from ..errors import RolevecError, path_problem
from ..model.hooks import onloaded
from ..model.loading import ModelAdapter
from ..steering.interventions import Steering, check_vector
from ..vectors.role_vectors import RoleVectors

FORMAT = "rolevec.interpret/1"
PLACEHOLDER = "♦"
DEFAULT_PROMPT = f"What does {PLACEHOLDER} represent?"
WHERE = ("placeholder", "all")
DEFAULT_JUDGE_MODEL = "gpt-4o-mini"
#: Environment variable the CLI reads the judge's API key from (the library takes it as an argument).
JUDGE_KEY_ENV = "ROLEVEC_JUDGE_API_KEY"


# --- patch-scoping ------------------------------------------------------------------------------------
def placeholder_positions(
    adapter: ModelAdapter, text: str, placeholder: str = PLACEHOLDER
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered prompt and the indices of the tokens that overlap the placeholder."""
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(placeholder), text)]
    if not spans:
        raise RolevecError(
            f"the prompt holds no {placeholder!r} placeholder: put one in, or pass where='all'"
        )
    try:
        enc = adapter.tokenizer(
            text, add_special_tokens=adapter.chat.add_special_tokens, return_offsets_mapping=True
        )
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise RolevecError(
            "this tokenizer cannot map tokens to characters (not a fast tokenizer), so the placeholder "
            "cannot be located: pass where='all'"
        ) from exc
    ids = [int(i) for i in enc["input_ids"]]
    positions = [
        j
        for j, (start, end) in enumerate(enc["offset_mapping"])
        if end > start and any(start < e and end > s for s, e in spans)
    ]
    if not positions:
        raise RolevecError(f"no token of the prompt covers {placeholder!r}: pass where='all'")
    return ids, positions


@torch.inference_mode()
def greedy_ids(adapter: ModelAdapter, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The new token ids of a greedy continuation of one prompt (with whatever hooks are open)."""
    batch = adapter.pad([list(ids)])
    generate: Any = adapter.model.generate
    out = generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=adapter.tokenizer.pad_token_id,
    )
    return [int(i) for i in out[0, len(ids) :].tolist()]


def _greedy(adapter: ModelAdapter, ids: Sequence[int], max_new_tokens: int) -> str:
    new = greedy_ids(adapter, ids, max_new_tokens)
    return str(adapter.tokenizer.decode(new, skip_special_tokens=True)).strip()


@dataclass(frozen=True)
class PatchScope:
    prompt: str
    where: str
    positions: tuple[int, ...]  # steered token indices of the prompt (all of them for where="all")
    steered: str
    unsteered: str


def patch_scope(
    adapter: ModelAdapter,
    vector: torch.Tensor,
    layer: int,
    *,
    alpha: float = 3.0,
    where: str = "placeholder",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 24,
    unsteered: str | None = None,
) -> PatchScope:
    """The model's greedy answer to ``prompt`` with α·vector added at ``layer``, and without it.

    ``unsteered`` may be passed in when it is already known (it does not depend on the vector).
    """
    if where not in WHERE:
        raise RolevecError(f"where must be one of {', '.join(WHERE)}, not {where!r}")
    if max_new_tokens < 1:
        raise RolevecError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    check_vector(adapter, vector)
    adapter.residual_site(layer)  # validates the layer
    steering = Steering.addition(vector, layer=layer, alpha=alpha)  # validates α
    text = adapter.render(prompt)
    if where == "placeholder":
        ids, positions = placeholder_positions(adapter, text)
    else:
        ids = [int(i) for i in adapter.encode([text]).input_ids[0].tolist()]
        positions = list(range(len(ids)))
    if unsteered is None:
        unsteered = _greedy(adapter, ids, max_new_tokens)
    if where == "placeholder":
        steering = replace(steering, tokens=tuple(positions))
    with steering.apply(adapter):
        steered = _greedy(adapter, ids, max_new_tokens)
    return PatchScope(prompt, where, tuple(positions), steered, unsteered)


# --- logit lens ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScore:
    id: int
    token: str  # decoded text
    piece: str  # the vocabulary entry, e.g. 'Ġdoctor'
    logit: float


@dataclass(frozen=True)
class Lens:
    top: tuple[TokenScore, ...]
    bottom: tuple[TokenScore, ...]


def _scores(adapter: ModelAdapter, logits: torch.Tensor, ids: torch.Tensor) -> tuple[TokenScore, ...]:
    pieces = adapter.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return tuple(
        TokenScore(int(i), str(adapter.tokenizer.decode([int(i)])), str(p), float(logits[int(i)]))
        for i, p in zip(ids, pieces, strict=True)
    )


@torch.inference_mode()
def logit_lens(adapter: ModelAdapter, vector: torch.Tensor, *, top_k: int = 10, normed: bool = True) -> Lens:
    """The tokens a direction promotes and suppresses most.

    ``normed``: the vector goes through the final norm (as a [1, 1, H] batch) and the unembedding, as a
    residual state would; otherwise the raw projection W_U·d, which ignores the norm's scaling.
    Vocabulary rows beyond the tokenizer's size (padding) are left out.
    """
    if top_k < 1:
        raise RolevecError(f"top_k must be at least 1, not {top_k}")
    d = check_vector(adapter, vector).to(device=adapter.device, dtype=adapter.dtype)
    if normed:
        hidden = adapter.final_norm(d.view(1, 1, -1))
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        logits = adapter.unembed(hidden)[0, 0].float()
    else:
        with onloaded(adapter.unembed):  # an offloaded head is brought in for the read
            weight = adapter.unembed.weight
            assert isinstance(weight, torch.Tensor)
            logits = weight.float() @ d.to(weight.device).float()
    logits = logits[: min(len(adapter.tokenizer), logits.shape[0])].cpu()
    k = min(top_k, logits.shape[0])
    top = torch.topk(logits, k).indices
    bottom = torch.topk(-logits, k).indices
    return Lens(_scores(adapter, logits, top), _scores(adapter, logits, bottom))


# --- judge --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    related: bool | None  # None when the answer was neither yes nor no
    answer: str


def _endpoint(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return f"{base}/chat/completions"
    return f"{base}/v1/chat/completions"


def parse_verdict(answer: str) -> bool | None:
    words: list[str] = re.findall(r"[a-z]+", answer.lower())
    for word in words:
        if word in ("yes", "no"):
            return word == "yes"
    return None


def judge_related(
    url: str,
    role: str,
    text: str,
    *,
    kind: str = "text",
    model: str = DEFAULT_JUDGE_MODEL,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> Verdict:
    """Ask an OpenAI-compatible chat endpoint whether ``text`` relates to ``role`` (yes/no)."""
    profession = role.replace("_", " ")
    payload = {
        "model": model,
        "temperature": 0,
        "max_tokens": 5,
        "messages": [
            {
                "role": "system",
                "content": "You judge whether a piece of model output relates to a profession. "
                "Answer with one word: yes or no.",
            },
            {
                "role": "user",
                "content": f"Profession: {profession}\n{kind.capitalize()}: {text}\n"
                f"Is this {kind} related to the profession of {profession}? Answer yes or no.",
            },
        ],
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = _endpoint(url)
    request = urllib.request.Request(
        endpoint, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200]
        raise RolevecError(
            f"the judge at {endpoint} answered HTTP {exc.code} ({detail}); check the judge URL, model name "
            f"and API key (${JUDGE_KEY_ENV}), or run without a judge"
        ) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise RolevecError(
            f"cannot reach the judge at {endpoint} ({exc}); pass the base URL of an OpenAI-compatible "
            "server, or run without a judge"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RolevecError(
            f"the judge at {endpoint} did not answer with UTF-8 JSON: pass the base URL of an "
            "OpenAI-compatible server"
        ) from exc
    try:
        answer = str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError) as exc:
        raise RolevecError(
            f"the judge at {endpoint} answered without choices[0].message.content: is it an "
            "OpenAI-compatible chat endpoint?"
        ) from exc
    return Verdict(parse_verdict(answer), answer.strip())


# --- all roles of a run -------------------------------------------------------------------------------
def _load_selection(selection: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(selection, Mapping):
        return selection
    path = Path(selection)
    if not path.is_file():
        raise RolevecError(f"selection file {path} {path_problem(path)}: run the validation sweep first")
    data = _read_json(path, "selection file", "rerun the validation sweep (rolevec sweep) to write it again")
    if not isinstance(data, dict):
        raise RolevecError(f"{path} is not a selection.json object: pass the selection.json of a sweep")
    return data


def _read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file (UTF-8, BOM-transparent), or one error naming it, the line and ``fix``."""
    text = read_text(path, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolevecError(f"{what} {path}:{exc.lineno}: malformed JSON ({exc.msg}); {fix}") from None


def _lens_dict(lens: Lens) -> dict[str, Any]:
    return {"top": [asdict(t) for t in lens.top], "bottom": [asdict(t) for t in lens.bottom]}


def interpret_roles(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    selection: Mapping[str, Any] | str | Path,
    *,
    roles: Sequence[str] | None = None,
    alpha: float = 3.0,
    top_k: int = 10,
    max_new_tokens: int = 24,
    where: str = "placeholder",
    prompt: str = DEFAULT_PROMPT,
    judge_url: str | None = None,
    judge_model: str = DEFAULT_JUDGE_MODEL,
    judge_api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Patch-scoping, logit lens (and judge verdicts) for each role at its chosen (layer, position).

    Returns the JSON-ready content of ``interpret.json`` (see :func:`save_interpret`).
    """
    from tqdm.auto import tqdm

    vectors.check_compatible(adapter)
    alpha = check_alpha(alpha)
    if where not in WHERE:
        raise RolevecError(f"where must be one of {', '.join(WHERE)}, not {where!r}")
    chosen: Mapping[str, Any] = _load_selection(selection).get("roles") or {}
    if roles is None:
        names = [r for r in chosen if r in vectors.roles]
    else:
        names = list(roles)
        missing = [r for r in names if r not in chosen]
        if missing:
            raise RolevecError(
                f"roles {', '.join(missing)} have no chosen (layer, position) in the selection: run the "
                "validation sweep for them, or leave them out"
            )
    text = adapter.render(prompt)
    if where == "placeholder":
        ids, positions = placeholder_positions(adapter, text)
    else:
        ids = [int(i) for i in adapter.encode([text]).input_ids[0].tolist()]
        positions = list(range(len(ids)))
    unsteered = _greedy(adapter, ids, max_new_tokens)
    out_roles: dict[str, Any] = {}
    for role in tqdm(names, desc="interpret", disable=not progress):
        info = chosen[role]
        if info.get("layer") is None or info.get("position") is None:
            out_roles[role] = {"domain": info.get("domain"), "skipped": "no chosen (layer, position)"}
            continue
        layer, position = int(info["layer"]), int(info["position"])
        vector = vectors.vector(role, layer, position)
        scope = patch_scope(
            adapter,
            vector,
            layer,
            alpha=alpha,
            where=where,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            unsteered=unsteered,
        )
        normed = logit_lens(adapter, vector, top_k=top_k, normed=True)
        raw = logit_lens(adapter, vector, top_k=top_k, normed=False)
        entry: dict[str, Any] = {
            "domain": info.get("domain"),
            "layer": layer,
            "position": position,
            "vector_norm": float(vector.norm()),
            "patchscope": {"steered": scope.steered, "unsteered": scope.unsteered},
            "logit_lens": {"normed": _lens_dict(normed), "raw": _lens_dict(raw)},
            "judge": None,
        }
        if judge_url:
            words = ", ".join(repr(t.token) for t in normed.top)
            verdicts = {
                "patchscope": judge_related(
                    judge_url, role, scope.steered, kind="text", model=judge_model, api_key=judge_api_key
                ),
                "logit_lens": judge_related(
                    judge_url, role, words, kind="word list", model=judge_model, api_key=judge_api_key
                ),
            }
            entry["judge"] = {k: asdict(v) for k, v in verdicts.items()}
        out_roles[role] = entry
    return {
        "format": FORMAT,
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint(),
        "prompt": prompt,
        "rendered_prompt": text,
        "placeholder": PLACEHOLDER,
        "where": where,
        "steered_positions": positions,
        "alpha": alpha,
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "unsteered": unsteered,
        "judge": {"url": judge_url, "model": judge_model} if judge_url else None,
        "roles": out_roles,
    }


def save_interpret(result: Mapping[str, Any], path: str | Path, *, force: bool = False) -> Path:
    """Write interpret.json atomically (refuses to overwrite unless ``force``)."""
    text = json.dumps(result, ensure_ascii=False, indent=1)
    out = Path(path)
    atomic_write(out, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), force=force)
    return out


def load_interpret(path: str | Path) -> dict[str, Any]:
    """An interpret.json written by :func:`save_interpret`, checked for its format."""
    p = Path(path)
    data = _read_json(p, "interpret file", "rerun the interpretation to write it again")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("roles"), dict):
        raise RolevecError(
            f"{p} is not a rolevec interpret.json (no {FORMAT!r} format): pass the interpret.json of a run"
        )
    return data
