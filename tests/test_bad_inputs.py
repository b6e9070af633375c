"""Bad inputs to every `rolevec` command, table-driven: each must fail as one error line and touch nothing.

Each case writes its input files into its own ``tmp_path`` (the current folder during the call, so a
stray relative output is caught too), runs ``rolevec.cli.main(argv)`` in-process on a tiny random model
saved once per session, and checks that

(a) the exit status is not 0 (argparse's SystemExit counts with its code);
(b) stderr holds exactly one ``rolevec: error:`` line (for argparse errors: its ``usage:`` block and
    ``rolevec CMD: error:`` line), no traceback, and besides it only ``rolevec: warning:`` lines, progress
    bars and the commands' known progress notes (``rolevec: questions from ...``, ``ROLE: N prompts
    from ...``) — any other line (a second error line, the continuation of a multi-line message, library
    logging) fails the case;
(c) nothing under ``tmp_path`` changed (files by path, size, mtime and sha256; folders by path), nor in
    the session's model folder;
(d) every ``--flag`` the error line names is an option of that command (exactly, no abbreviation), or of
    a command the message names as ``rolevec OTHER``;
and, where the case gives one, that the error line contains ``expect`` (case-insensitive), so a case
cannot pass by failing on something other than the input it is about.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import build_parser, main
from snapshots import changes, snapshot

# --- inputs ---------------------------------------------------------------------------------------

ROLE_PROMPTS = {
    "mathematician": ["Prove 2 is prime.", "Integrate x squared.", "Define a ring.", "What is a group?"],
    "doctor": ["Treat a fever.", "Explain blood pressure.", "What is an antibiotic?", "Describe a vaccine."],
    "pirate": ["Hoist the sail.", "Find the treasure.", "Swab the deck.", "Sing a shanty."],
}
BASE_TEXT = "Write a poem.\nName two animals.\nGive three tips for sleep.\nTranslate hello.\n"


def _questions(domain: str, n: int = 10) -> list[dict[str, Any]]:
    return [
        {
            "question": f"{domain} question {i}?",
            "choices": ["w", "x", "y", "z"],
            "answer": "ABCD"[i % 4],
            "subject": domain,
        }
        for i in range(n)
    ]


def _jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


MATH_JSON = json.dumps(_questions("math"))
MEDICINE_JSON = json.dumps(_questions("medicine"))
PERSONAS = _jsonl([{"persona": f"A mathematician who studies topic {i}."} for i in range(6)])
#: latin-1 bytes where UTF-8 is expected (0xe9 is "é" in latin-1, an invalid start byte in UTF-8)
LATIN1 = "caf\xe9".encode("latin-1")

DIR = object()  # a file spec value: make this folder
GONE = None  # a file spec value: delete this path (from a copied asset)


@dataclass(frozen=True)
class Asset:
    """A file spec value: copy this file or folder from the session's assets."""

    name: str


@dataclass(frozen=True)
class Derived:
    """A file spec value: bytes computed from the session's assets folder."""

    make: Callable[[Path], bytes]


def _edit_json(name: str, change: Callable[[Any], Any]) -> Derived:
    def make(assets: Path) -> bytes:
        doc = json.loads((assets / name).read_text(encoding="utf-8"))
        return json.dumps(change(doc)).encode()

    return Derived(make)


def _cut(name: str, keep: Callable[[int], int]) -> Derived:
    def make(assets: Path) -> bytes:
        data = (assets / name).read_bytes()
        return data[: keep(len(data))]

    return Derived(make)


ROLES = {f"roles/{r}.json": json.dumps(p) for r, p in ROLE_PROMPTS.items()}
BASE = {"base.txt": BASE_TEXT}
MCQ = {"mcq/math.json": MATH_JSON, "mcq/medicine.json": MEDICINE_JSON}
VEC = {"v.safetensors": Asset("v.safetensors")}
SEL = {"sel.json": Asset("run/selection.json")}
RUN = {"run": Asset("run")}
CV = {"cv.gguf": Asset("cv.gguf")}
MODEL_COPY = {"model": Asset("model")}
PERSONA_FILES = {"personas.jsonl": PERSONAS}

# --- commands: a good call of each, which a case then breaks in one place -------------------------

MODEL = {"model": "{model}", "device": "cpu"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "info": {**MODEL},
    "extract": {
        **MODEL,
        "roles": "mathematician",
        "roles_dir": "{t}/roles",
        "base": "{t}/base.txt",
        "n": "4",
        "out": "{t}/out.safetensors",
        "no_progress": True,
    },
    "diagnose": {
        **MODEL,
        "roles": "mathematician",
        "roles_dir": "{t}/roles",
        "base": "{t}/base.txt",
        "n": "4",
        "layers": "1:3",
        "folds": "2",
        "bootstraps": "2",
        "random": "2",
        "shuffles": "2",
        "out": "{t}/diag",
        "no_progress": True,
    },
    "prompts": {
        "role": "mathematician",
        "personas": "{t}/personas.jsonl",
        "generator": "{model}",
        "device": "cpu",
        "n": "2",
        "max_new_tokens": "4",
        "out": "{t}/out.json",
        "no_progress": True,
    },
    "generate": {
        **MODEL,
        "vectors": "{t}/v.safetensors",
        "role": "mathematician",
        "layer": "2",
        "alpha": "1",
        "max_new_tokens": "2",
        "_pos": "Hello",
    },
    "fold": {**MODEL, "vectors": "{t}/v.safetensors", "role": "mathematician", "layer": "2", "alpha": "1"}
    | {"out": "{t}/folded"},
    "export": {**MODEL, "format": "gguf", "vectors": "{t}/v.safetensors", "role": "mathematician"}
    | {"layer": "2", "alpha": "1", "out": "{t}/out.gguf"},
    "sweep": {
        **MODEL,
        "vectors": "{t}/v.safetensors",
        "role": "mathematician",
        "mcq_dir": "{t}/mcq",
        "alphas": "1",
        "positions": "-1",
        "limit": "2",
        "out": "{t}/run",
        "no_progress": True,
    },
    "evaluate": {
        **MODEL,
        "vectors": "{t}/v.safetensors",
        "role": "mathematician",
        "domains": "math",
        "layer": "2",
        "position": "-1",
        "alpha": "1",
        "mcq_dir": "{t}/mcq",
        "limit": "2",
        "out": "{t}/run",
        "no_progress": True,
    },
    "run": {
        **MODEL,
        "roles": "mathematician",
        "domains": "math",
        "roles_dir": "{t}/roles",
        "base": "{t}/base.txt",
        "n": "4",
        "n_base": "4",
        "mcq_dir": "{t}/mcq",
        "val_limit": "2",
        "test_limit": "2",
        "alphas": "1",
        "positions": "-1",
        "no_interpret": True,
        "out": "{t}/run",
        "no_progress": True,
    },
    "report": {"_pos": "{t}/run"},
    "rank": {
        **MODEL,
        "vectors": "{t}/v.safetensors",
        "role": "mathematician",
        "layer": "2",
        "out": "{t}/rank",
        "no_progress": True,
        "_pos": "{t}/prompts.json",
    },
    "monitor": {
        **MODEL,
        "vectors": "{t}/v.safetensors",
        "layer": "2",
        "out": "{t}/monitor",
        "no_progress": True,
        "_pos": "Explain an integral.",
    },
}
DEFAULT_FILES: dict[str, dict[str, Any]] = {
    "info": {},
    "extract": {**ROLES, **BASE},
    "diagnose": {**ROLES, **BASE},
    "prompts": {**PERSONA_FILES},
    "generate": {**VEC},
    "fold": {**VEC},
    "export": {**VEC},
    "sweep": {**VEC, **MCQ},
    "evaluate": {**VEC, **MCQ},
    "run": {**ROLES, **BASE, **MCQ},
    "report": {**RUN},
    "rank": {
        **VEC,
        "prompts.json": json.dumps(["Explain an integral.", "Tell me a joke.", "What is a prime?"]),
    },
    "monitor": {
        **VEC,
        "prompts.json": json.dumps(["Explain an integral.", "Tell me a joke.", "What is a prime?"]),
    },
}


@dataclass(frozen=True)
class Case:
    id: str
    cmd: str
    argv: tuple[str, ...]
    files: Mapping[str, Any] = field(default_factory=dict)
    expect: str | None = None


CASES: list[Case] = []


def case(
    id: str,
    cmd: str,
    *files: Mapping[str, Any],
    expect: str | None = None,
    extra: tuple[str, ...] = (),
    **over: Any,
) -> None:
    """Register a call of ``cmd``: its good defaults, changed by ``over`` (None drops a flag, True is a
    bare flag), with ``extra`` arguments appended and ``files`` written over the command's good files."""
    flags = {**DEFAULTS[cmd], **over}
    argv = [cmd]
    for key, value in flags.items():
        if key == "_pos" or value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    argv += list(extra)
    if flags.get("_pos") is not None:
        argv.append(str(flags["_pos"]))
    merged: dict[str, Any] = dict(DEFAULT_FILES[cmd])
    for spec in files:
        merged.update(spec)
    assert id not in {c.id for c in CASES}, id
    CASES.append(Case(id, cmd, tuple(argv), merged, expect))


# --- info: model paths and model files --------------------------------------------------------------
case("info-model-missing", "info", model="{t}/nope", expect="nope")
case("info-model-is-file", "info", {"model.txt": "not a model"}, model="{t}/model.txt", expect="model.txt")
case("info-model-folder-no-config", "info", {"empty": DIR}, model="{t}/empty", expect="config.json")
case("info-gguf-missing", "info", model="{t}/nope.gguf", expect="nope.gguf")
case("info-gguf-is-folder", "info", {"dir.gguf": DIR}, model="{t}/dir.gguf", expect="dir.gguf")
case("info-gguf-empty", "info", {"m.gguf": b""}, model="{t}/m.gguf", expect="m.gguf")
case("info-gguf-fake-text", "info", {"m.gguf": "I am not a GGUF file\n"}, model="{t}/m.gguf", expect="m.gguf")
case(
    "info-gguf-truncated-header",
    "info",
    {"m.gguf": _cut("cv.gguf", lambda n: 40)},
    model="{t}/m.gguf",
    expect="m.gguf",
)
case(
    "info-gguf-truncated-data",
    "info",
    {"m.gguf": _cut("cv.gguf", lambda n: n - 16)},
    model="{t}/m.gguf",
    expect="m.gguf",
)
case("info-gguf-control-vector", "info", {"m.gguf": Asset("cv.gguf")}, model="{t}/m.gguf", expect="m.gguf")
case(
    "info-gguf-llama-no-metadata",
    "info",
    {"m.gguf": Asset("arch.gguf")},
    model="{t}/m.gguf",
    expect="m.gguf",
)
case(
    "info-config-malformed",
    "info",
    MODEL_COPY,
    {"model/config.json": '{"model_type": "llama",'},
    model="{t}/model",
    expect="model",
)
case(
    "info-config-non-utf8",
    "info",
    MODEL_COPY,
    {"model/config.json": b'{"model_type": "llama", "name": "' + LATIN1 + b'"}'},
    model="{t}/model",
    expect="model",
)
case(
    "info-config-unknown-model-type",
    "info",
    MODEL_COPY,
    {"model/config.json": '{"model_type": "llamma"}'},
    model="{t}/model",
    expect="model",
)
case(
    "info-weights-truncated",
    "info",
    MODEL_COPY,
    {"model/model.safetensors": _cut("model/model.safetensors", lambda n: n // 2)},
    model="{t}/model",
    expect="model",
)
case(
    "info-weights-missing",
    "info",
    MODEL_COPY,
    {"model/model.safetensors": GONE},
    model="{t}/model",
    expect="model",
)
case(
    "info-tokenizer-missing",
    "info",
    MODEL_COPY,
    {"model/tokenizer.json": GONE, "model/tokenizer_config.json": GONE},
    model="{t}/model",
    expect="model",
)
case("info-device-unknown", "info", device="tpu", expect="tpu")
case("info-device-cuda-index", "info", device="cuda:99", expect="cuda")
case("info-dtype-choice", "info", dtype="float8", expect="--dtype")
case("info-block-pattern-wrong", "info", block_pattern="model.nope", expect="model.nope")
case("info-unknown-flag", "info", extra=("--jsn",), expect="--jsn")

# --- extract: prompt sets of every format, counts, outputs ---------------------------------------------
# --- rank: prompts scored by their projection on a role vector ------------------------------------
K = "rank"
case("rank-role-unknown", K, role="mathematican", expect="mathematican")
case("rank-layer-out-of-range", K, layer="99", expect="99")
case("rank-no-layer", K, layer=None, expect="--layer")
case("rank-position-missing", K, position="-99", expect="-99")
case("rank-prompts-empty", K, {"prompts.json": "[]"}, expect="prompts.json")
case("rank-prompts-missing", K, _pos="{t}/nope.json", expect="nope.json")
case("rank-base-without-zscore", K, base="{t}/prompts.json", expect="--zscore")

# --- monitor: per-token projections of a text, a prompt file or a generation -------------------------
M = "monitor"
case("monitor-role-unknown", M, roles="mathematican", expect="mathematican")
case("monitor-roles-blank-name", M, roles="doctor,,pirate", expect="--roles")
case("monitor-compose-role-unknown", M, compose="mathematician:1,chef:-0.5", expect="chef")
case("monitor-compose-weight-not-number", M, compose="mathematician:1,doctor:lots", expect="lots")
case("monitor-steer-role-unknown", M, steer="chef", alpha="1", expect="chef")
case("monitor-steer-weight-not-number", M, steer="doctor:heavy", alpha="1", expect="heavy")
case("monitor-steer-without-strength", M, steer="doctor", expect="--alpha")
case("monitor-cap-lo-above-hi", M, steer="doctor", extra=("--cap=5:-2",), expect="LO > HI")
case("monitor-cap-and-alpha", M, steer="doctor", alpha="1", cap="-2:5", expect="--cap")
case("monitor-alpha-without-steer", M, alpha="1", expect="--steer")
case("monitor-ablate-without-steer", M, ablate=True, expect="--steer")
case("monitor-steer-layer-out-of-range", M, steer="doctor", alpha="1", steer_layer="99", expect="99")
case("monitor-layer-out-of-range", M, layer="99", expect="99")
case("monitor-layer-zero-vector", M, layer="0", expect="zero")
case("monitor-position-missing", M, position="-99", expect="-99")
case("monitor-text-empty", M, _pos="   ", expect="empty")
case("monitor-generate-empty", M, _pos=None, generate=" ", expect="--generate")
case("monitor-text-and-generate", M, generate="Tell me a joke.", expect="--generate")
case("monitor-text-and-prompts", M, prompts="{t}/prompts.json", expect="--prompts")
case("monitor-no-input", M, _pos=None, expect="TEXT")
case("monitor-prompts-missing", M, _pos=None, prompts="{t}/nope.json", expect="nope.json")
case("monitor-prompts-empty", M, {"p.json": "[]"}, _pos=None, prompts="{t}/p.json", expect="p.json")
case("monitor-limit-without-prompts", M, limit="2", expect="--prompts")
case("monitor-max-new-tokens-without-generate", M, max_new_tokens="4", expect="--generate")
case("monitor-base-without-zscore", M, base="{t}/prompts.json", expect="--zscore")
case("monitor-base-missing", M, zscore=True, base="{t}/nope.txt", expect="nope.txt")
case("monitor-vectors-missing", M, vectors="{t}/nope.safetensors", expect="nope.safetensors")
case("monitor-out-is-file", M, {"o.txt": "x"}, out="{t}/o.txt", expect="o.txt")
case("monitor-no-layer", M, layer=None, expect="--layer")

# --- diagnose: the diagnostics of role vectors at every layer ------------------------------------------
D = "diagnose"
case("diagnose-role-unknown", D, roles="mathematican", expect="mathematican")
case("diagnose-roles-dir-missing", D, roles_dir="{t}/nope", expect="nope")
case("diagnose-layer-out-of-range", D, layers="2:99", expect="99")
case("diagnose-layer-zero", D, layers="0", expect="layer 0")
case("diagnose-layers-from-zero", D, layers="0:3", expect="layer 0")
case("diagnose-layers-open-from-zero", D, layers=":", expect="layer 0")
case("diagnose-layers-not-a-range", D, layers="one:two", expect="--layers")
case("diagnose-layers-empty-range", D, layers="3:2", expect="empty")
case("diagnose-position-not-negative", D, position="0", expect="--position")
case("diagnose-position-missing", D, position="-99", expect="-99")
case("diagnose-n-zero", D, n="0", expect="--n")
case("diagnose-n-one", D, n="1", expect="at least 2")
case("diagnose-folds-one", D, folds="1", expect="--folds")
case("diagnose-shuffles-not-a-number", D, shuffles="many", expect="--shuffles")
case("diagnose-base-missing", D, base="{t}/nope.txt", expect="nope.txt")
case("diagnose-out-is-file", D, {"o.txt": "x"}, out="{t}/o.txt", expect="o.txt")
case(
    "diagnose-out-holds-earlier-outputs",
    D,
    {"diag/diagnostics-layers.json": "{}", "diag/figures/diagnostics-layers.png": b"png"},
    expect="--force",
)

X = "extract"
case("extract-roles-dir-missing", X, roles_dir="{t}/nope", expect="nope")
case("extract-roles-dir-is-file", X, {"r.txt": "x\n"}, roles_dir="{t}/r.txt", expect="r.txt")
case("extract-role-unknown", X, roles="mathematican", expect="mathematican")
case("extract-roles-empty", X, roles=",", expect="--roles")
case("extract-roles-all-empty-folder", X, {"none": DIR}, roles="all", roles_dir="{t}/none", expect="none")
case("extract-role-file-is-folder", X, {"r2/mathematician.json": DIR}, roles_dir="{t}/r2", expect="r2")
case(
    "extract-role-json-malformed",
    X,
    {"roles/mathematician.json": '["ok",\n "no end\n]'},
    expect="mathematician.json",
)
case(
    "extract-role-json-non-utf8",
    X,
    {"roles/mathematician.json": b'["ok",\n "' + LATIN1 + b'"]'},
    expect="mathematician.json",
)
case("extract-role-json-empty-list", X, {"roles/mathematician.json": "[]"}, expect="mathematician.json")
case(
    "extract-role-json-numbers",
    X,
    {"roles/mathematician.json": "[1, 2, 3]"},
    expect="mathematician.json",
)
case(
    "extract-role-json-object-no-field",
    X,
    {"roles/mathematician.json": '[{"question": "a"}, {"question": "b"}]'},
    expect="mathematician.json",
)
case(
    "extract-role-jsonl-non-utf8",
    X,
    {"r3/mathematician.jsonl": b'{"instruction": "a"}\n{"instruction": "' + LATIN1 + b'"}\n'},
    roles_dir="{t}/r3",
    expect="mathematician.jsonl",
)
case(
    "extract-role-csv-non-utf8",
    X,
    {"r3/mathematician.csv": b"instruction\nok\n" + LATIN1 + b"\n"},
    roles_dir="{t}/r3",
    expect="mathematician.csv",
)
case(
    "extract-role-txt-non-utf8",
    X,
    {"r3/mathematician.txt": b"ok\n" + LATIN1 + b"\n"},
    roles_dir="{t}/r3",
    expect="mathematician.txt",
)
case("extract-base-missing", X, base="{t}/nope.txt", expect="nope.txt")
case("extract-base-is-folder", X, {"b": DIR}, base="{t}/b", expect="b")
case("extract-base-empty-file", X, {"b.txt": b""}, base="{t}/b.txt", expect="b.txt")
case("extract-base-blank-lines", X, {"b.txt": "  \n\n\t\n"}, base="{t}/b.txt", expect="b.txt")
case("extract-base-txt-non-utf8", X, {"b.txt": b"hello\n" + LATIN1 + b"\n"}, base="{t}/b.txt", expect="b.txt")
case("extract-base-json-malformed", X, {"b.json": '["a", "b"'}, base="{t}/b.json", expect="b.json")
case("extract-base-json-scalar", X, {"b.json": "42"}, base="{t}/b.json", expect="b.json")
case(
    "extract-base-json-two-lists",
    X,
    {"b.json": '{"a": ["x"], "b": ["y"]}'},
    base="{t}/b.json",
    expect="b.json",
)
case("extract-base-json-nested-lists", X, {"b.json": '[["a"], ["b"]]'}, base="{t}/b.json", expect="b.json")
case(
    "extract-base-json-non-utf8",
    X,
    {"b.json": b'["a",\n "' + LATIN1 + b'"]'},
    base="{t}/b.json",
    expect="b.json",
)
case(
    "extract-base-json-column-missing",
    X,
    {"b.json": '[{"instruction": "a"}]'},
    base="{t}/b.json",
    base_column="prompt_text",
    expect="prompt_text",
)
case(
    "extract-base-json-object-no-field",
    X,
    {"b.json": '[{"q": "a"}, {"q": "b"}]'},
    base="{t}/b.json",
    expect="--base-column",
)
case(
    "extract-base-jsonl-malformed",
    X,
    {"b.jsonl": '{"instruction": "a"}\n{"instruction": \n'},
    base="{t}/b.jsonl",
    expect="b.jsonl",
)
case(
    "extract-base-jsonl-non-utf8",
    X,
    {"b.jsonl": b'{"instruction": "a"}\n{"instruction": "' + LATIN1 + b'"}\n'},
    base="{t}/b.jsonl",
    expect="b.jsonl",
)
case(
    "extract-base-jsonl-wrong-type",
    X,
    {"b.jsonl": '{"instruction": 5}\n'},
    base="{t}/b.jsonl",
    expect="b.jsonl",
)
case(
    "extract-base-csv-ragged", X, {"b.csv": "instruction,id\na,1\nb, c,2\n"}, base="{t}/b.csv", expect="b.csv"
)
case("extract-base-csv-no-column", X, {"b.csv": "q,id\na,1\nb,2\n"}, base="{t}/b.csv", expect="b.csv")
case(
    "extract-base-csv-column-missing",
    X,
    {"b.csv": "instruction,id\na,1\n"},
    base="{t}/b.csv",
    base_column="prompt_text",
    expect="prompt_text",
)
case(
    "extract-base-csv-unclosed-quote",
    X,
    {"b.csv": 'instruction,id\n"a,1\nb,2\n'},
    base="{t}/b.csv",
    expect="b.csv",
)
case(
    "extract-base-csv-non-utf8",
    X,
    {"b.csv": b"instruction,id\na,1\n" + LATIN1 + b",2\n"},
    base="{t}/b.csv",
    expect="b.csv",
)
case("extract-base-hf-no-name", X, base="hf:", expect="hf:")
case("extract-n-zero", X, n="0", expect="--n")
case("extract-n-negative", X, n="-3", expect="--n")
case("extract-n-text", X, n="many", expect="--n")
case("extract-n-float", X, n="2.5", expect="--n")
case("extract-n-nan", X, n="nan", expect="--n")
case("extract-batch-size-zero", X, batch_size="0", expect="--batch-size")
case("extract-batch-size-negative", X, batch_size="-1", expect="--batch-size")
case("extract-batch-size-text", X, batch_size="big", expect="--batch-size")
case("extract-max-tokens-zero", X, max_tokens="0", expect="--max-tokens")
case("extract-seed-text", X, seed="abc", expect="--seed")
case("extract-out-exists", X, {"out.safetensors": b"keep me"}, expect="--force")
case("extract-out-is-folder", X, {"outdir": DIR}, out="{t}/outdir", expect="outdir")
case("extract-out-under-a-file", X, {"f.txt": "x"}, out="{t}/f.txt/v.safetensors", expect="f.txt")
case("extract-out-missing", X, out=None, expect="--out")
case("extract-roles-missing", X, roles=None, expect="--roles")
case("extract-model-missing", X, model="{t}/nope", expect="nope")

# --- prompts: persona files, counts, outputs ------------------------------------------------------------
P = "prompts"
case("prompts-personas-missing", P, personas="{t}/nope.jsonl", expect="nope.jsonl")
case("prompts-personas-is-folder", P, {"p": DIR}, personas="{t}/p", expect="p")
case("prompts-personas-empty", P, {"p.jsonl": b""}, personas="{t}/p.jsonl", expect="p.jsonl")
case(
    "prompts-personas-jsonl-malformed",
    P,
    {"p.jsonl": '{"persona": "a"}\n{"persona": \n'},
    personas="{t}/p.jsonl",
    expect="p.jsonl",
)
case(
    "prompts-personas-jsonl-non-utf8",
    P,
    {"p.jsonl": b'{"persona": "a mathematician"}\n{"persona": "' + LATIN1 + b'"}\n'},
    personas="{t}/p.jsonl",
    expect="p.jsonl",
)
case(
    "prompts-personas-no-field",
    P,
    {"p.jsonl": '{"name": "a mathematician"}\n'},
    personas="{t}/p.jsonl",
    expect="p.jsonl",
)
case(
    "prompts-personas-json-not-list",
    P,
    {"p.json": '{"persona": "x"}'},
    personas="{t}/p.json",
    expect="p.json",
)
case(
    "prompts-personas-json-non-utf8",
    P,
    {"p.json": b'["a mathematician", "' + LATIN1 + b'"]'},
    personas="{t}/p.json",
    expect="p.json",
)
case("prompts-role-blank", P, role="  ", expect="--role")
case("prompts-n-zero", P, n="0", expect="--n")
case("prompts-batch-size-zero", P, batch_size="0", expect="--batch-size")
case("prompts-max-new-tokens-zero", P, max_new_tokens="0", expect="--max-new-tokens")
case("prompts-seed-text", P, seed="x", expect="--seed")
case("prompts-dtype-choice", P, dtype="int4", expect="--dtype")
case("prompts-out-exists", P, {"out.json": "[]"}, expect="--force")
case("prompts-out-is-folder", P, {"outdir": DIR}, out="{t}/outdir", expect="outdir")
case("prompts-default-out-exists", P, {"mathematician.json": "[]"}, out=None, expect="--force")
case("prompts-generator-missing", P, generator="{t}/nope", expect="nope")

# --- generate: vector files, sites, strengths, selection, control vectors -----------------------------
G = "generate"
case("generate-no-vectors", G, vectors=None, expect="--vectors")
case("generate-vectors-missing", G, vectors="{t}/nope.safetensors", expect="nope.safetensors")
case("generate-vectors-is-folder", G, {"vd": DIR}, vectors="{t}/vd", expect="vd")
case(
    "generate-vectors-garbage",
    G,
    {"bad.safetensors": b"not a safetensors file at all"},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-header-too-long",
    G,
    {"bad.safetensors": (10**9).to_bytes(8, "little") + b"{}"},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-header-non-utf8",
    G,
    {"bad.safetensors": (6).to_bytes(8, "little") + b'{"' + LATIN1},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-truncated",
    G,
    {"bad.safetensors": _cut("v.safetensors", lambda n: n - 100)},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-no-rolevec-header",
    G,
    {"bad.safetensors": Asset("v_nometa.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-nan",
    G,
    {"bad.safetensors": Asset("v_nan.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-inf",
    G,
    {"bad.safetensors": Asset("v_inf.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-shape-mismatch",
    G,
    {"bad.safetensors": Asset("v_shape.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "generate-vectors-other-hidden-size",
    G,
    {"h16.safetensors": Asset("v_h16.safetensors")},
    vectors="{t}/h16.safetensors",
    expect="hidden",
)
case(
    "generate-vectors-other-depth",
    G,
    {"l2.safetensors": Asset("v_l2.safetensors")},
    vectors="{t}/l2.safetensors",
    expect="layers",
)
case("generate-role-unknown", G, role="mathematican", expect="mathematican")
case("generate-layer-beyond-depth", G, layer="99", expect="99")
case("generate-layer-negative", G, layer="-1", expect="-1")
case("generate-layer-text", G, layer="two", expect="--layer")
case("generate-position-not-in-file", G, position="-99", expect="-99")
case("generate-position-positive", G, position="3", expect="position")
case("generate-alpha-nan", G, alpha="nan", expect="--alpha")
case("generate-alpha-inf", G, alpha="inf", expect="--alpha")
case("generate-alpha-text", G, alpha="strong", expect="--alpha")
case("generate-no-alpha", G, alpha=None, expect="--alpha")
case("generate-alpha-and-ablate", G, ablate=True, expect="--ablate")
case("generate-ablate-layer0-zero-vector", G, alpha=None, ablate=True, layer="0", expect="layer 0")
case("generate-temperature-negative", G, temperature="-1", expect="--temperature")
case("generate-cap-lo-above-hi", G, alpha=None, cap="5:1", expect="--cap")
case("generate-cap-not-two-numbers", G, alpha=None, cap="low:high", expect="--cap")
case("generate-cap-three-parts", G, alpha=None, cap="1:2:3", expect="--cap")
case("generate-cap-nan", G, alpha=None, cap="nan:1", expect="--cap")
case("generate-cap-and-alpha", G, cap="1:2", expect="--cap")
case("generate-cap-layers-without-cap", G, cap_layers="1,2", expect="--cap-layers")
case("generate-cap-layers-text", G, alpha=None, cap="1:2", cap_layers="one,two", expect="--cap-layers")
case("generate-cap-layer-beyond-depth", G, alpha=None, cap="1:2", cap_layers="1,99", expect="99")
case("generate-temperature-nan", G, temperature="nan", expect="--temperature")
case("generate-compose-unknown-role", G, role=None, compose="mathematician:1,pirat:2", expect="pirat")
case("generate-compose-weight-text", G, role=None, compose="mathematician:lots", expect="lots")
case("generate-compose-and-role", G, compose="doctor:1", expect="--compose")
case("generate-compose-empty-term", G, role=None, compose="mathematician,,doctor", expect="--compose")
case("generate-compose-twice-same-role", G, role=None, compose="doctor,doctor:2", expect="twice")
case(
    "generate-compose-with-selection",
    G,
    {**SEL},
    role=None,
    compose="doctor",
    selection="{t}/sel.json",
    expect="--selection",
)
case(
    "generate-compose-cap-lo-above-hi", G, role=None, alpha=None, compose="doctor", cap="3:1", expect="--cap"
)
case("generate-compose-layer-beyond-depth", G, role=None, compose="doctor,pirate:-1", layer="99", expect="99")
case(
    "generate-compose-mode-choice",
    G,
    role=None,
    compose="doctor",
    compose_mode="gram",
    expect="--compose-mode",
)
case("generate-temperature-inf", G, temperature="inf", expect="--temperature")
case("generate-max-new-tokens-zero", G, max_new_tokens="0", expect="--max-new-tokens")
case("generate-max-new-tokens-negative", G, max_new_tokens="-5", expect="--max-new-tokens")
case("generate-seed-text", G, seed="x", expect="--seed")
case("generate-where-choice", G, where="everywhere", expect="--where")
case("generate-prompt-missing", G, _pos=None, expect="prompt")
case("generate-selection-missing", G, layer=None, alpha=None, selection="{t}/nope.json", expect="nope.json")
case("generate-selection-is-folder", G, {"sd": DIR}, layer=None, alpha=None, selection="{t}/sd", expect="sd")
case(
    "generate-selection-malformed",
    G,
    {"s.json": '{"roles": {'},
    layer=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "generate-selection-non-utf8",
    G,
    {"s.json": b'{"model": "' + LATIN1 + b'", "roles": {}}'},
    layer=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "generate-selection-no-roles",
    G,
    {"s.json": '{"model": "x"}'},
    layer=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "generate-selection-role-absent",
    G,
    SEL,
    layer=None,
    alpha=None,
    role="doctor",
    selection="{t}/sel.json",
    expect="doctor",
)
case(
    "generate-selection-layer-text",
    G,
    {"s.json": _edit_json("run/selection.json", lambda d: d | {"roles": {"mathematician": {"layer": "x"}}})},
    layer=None,
    alpha=None,
    selection="{t}/s.json",
    expect="layer",
)
case(
    "generate-selection-layer-beyond-depth",
    G,
    {
        "s.json": _edit_json(
            "run/selection.json",
            lambda d: d | {"roles": {"mathematician": {"layer": 99, "position": -1, "alpha": 1.0}}},
        )
    },
    layer=None,
    alpha=None,
    selection="{t}/s.json",
    expect="99",
)
case(
    "generate-selection-other-model",
    G,
    {"s.json": _edit_json("run/selection.json", lambda d: d | {"model_fingerprint": "0123456789abcdef"})},
    layer=None,
    alpha=None,
    selection="{t}/s.json",
    expect="--allow-other-model",
)
case(
    "generate-control-vector-with-layer",
    G,
    CV,
    vectors=None,
    role=None,
    control_vector="{t}/cv.gguf",
    expect="--layer",
)
case(
    "generate-control-vector-with-vectors",
    G,
    CV,
    layer=None,
    role=None,
    control_vector="{t}/cv.gguf",
    expect="--vectors",
)
case(
    "generate-control-vector-missing",
    G,
    vectors=None,
    role=None,
    layer=None,
    control_vector="{t}/nope.gguf",
    expect="nope.gguf",
)
case(
    "generate-control-vector-fake",
    G,
    {"c.gguf": "GGUF? no.\n"},
    vectors=None,
    role=None,
    layer=None,
    control_vector="{t}/c.gguf",
    expect="c.gguf",
)
case(
    "generate-control-vector-truncated",
    G,
    {"c.gguf": _cut("cv.gguf", lambda n: n - 16)},
    vectors=None,
    role=None,
    layer=None,
    control_vector="{t}/c.gguf",
    expect="c.gguf",
)
case(
    "generate-control-vector-other-arch",
    G,
    {"c.gguf": Asset("arch.gguf")},
    vectors=None,
    role=None,
    layer=None,
    control_vector="{t}/c.gguf",
    expect="c.gguf",
)
case(
    "generate-control-vector-other-hidden-size",
    G,
    {"c.gguf": Asset("cv_h16.gguf")},
    vectors=None,
    role=None,
    layer=None,
    control_vector="{t}/c.gguf",
    expect="hidden",
)
case(
    "generate-control-vector-alpha-nan",
    G,
    CV,
    vectors=None,
    role=None,
    layer=None,
    alpha="nan",
    control_vector="{t}/cv.gguf",
    expect="--alpha",
)
case("generate-model-missing", G, model="{t}/nope", expect="nope")

# --- fold: checkpoint folders, sites, strengths ------------------------------------------------------
F = "fold"
case("fold-out-exists-folder", F, {"folded/keep.txt": "mine"}, expect="--force")
case("fold-out-exists-empty-folder", F, {"folded": DIR}, expect="--force")
case("fold-out-is-file", F, {"folded": "a file"}, expect="folded")
case("fold-out-is-file-force", F, {"folded": "a file"}, force=True, expect="folded")
case("fold-out-foreign-folder-force", F, {"folded/keep.txt": "mine"}, force=True, expect="folded")
case("fold-out-run-folder-force", F, {"folded": Asset("run")}, force=True, expect="folded")
case("fold-out-under-a-file", F, {"f.txt": "x"}, out="{t}/f.txt/folded", expect="f.txt")
case("fold-vectors-missing", F, vectors="{t}/nope.safetensors", expect="nope.safetensors")
case(
    "fold-vectors-nan",
    F,
    {"bad.safetensors": Asset("v_nan.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "fold-vectors-other-hidden-size",
    F,
    {"h16.safetensors": Asset("v_h16.safetensors")},
    vectors="{t}/h16.safetensors",
    expect="hidden",
)
case("fold-role-unknown", F, role="doctr", expect="doctr")
case("fold-layer-beyond-depth", F, layer="4", expect="4")
case("fold-layer-negative", F, layer="-2", expect="-2")
case("fold-layer-missing", F, layer=None, expect="--layer")
case("fold-strength-missing", F, alpha=None, expect="--alpha")
case("fold-alpha-nan", F, alpha="nan", expect="--alpha")
case("fold-alpha-inf", F, alpha="-inf", expect="--alpha")
case("fold-position-not-in-file", F, position="-50", expect="-50")
case("fold-ablate-layer0-zero-vector", F, alpha=None, ablate=True, layer="0", expect="layer 0")
case("fold-out-missing", F, out=None, expect="--out")
case("fold-compose-unknown-role", F, role=None, compose="doctor:1,doctr:1", expect="doctr")
case("fold-compose-weight-text", F, role=None, compose="doctor:half", expect="half")
case("fold-no-role-no-compose", F, role=None, expect="--role")
case(
    "fold-compose-ablate-layer0",
    F,
    role=None,
    alpha=None,
    ablate=True,
    compose="doctor,pirate",
    layer="0",
    expect="layer 0",
)

# --- export: formats, layers, outputs ------------------------------------------------------------------
E = "export"
case("export-format-choice", E, format="onnx", expect="--format")
case("export-out-wrong-suffix", E, out="{t}/out.pt", expect="--out")
case("export-pt-out-wrong-suffix", E, format="pt", out="{t}/out.gguf", expect="--out")
case("export-out-exists", E, {"out.gguf": b"keep"}, expect="--force")
case("export-out-is-folder", E, {"od.gguf": DIR}, out="{t}/od.gguf", expect="od.gguf")
case("export-out-under-a-file", E, {"f.txt": "x"}, out="{t}/f.txt/out.gguf", expect="f.txt")
case("export-layer-and-layers", E, layers="2:3", expect="--layers")
case("export-layers-text", E, layer=None, layers="a:b", expect="a:b")
case("export-layers-empty-range", E, layer=None, layers="3:2", expect="3:2")
case("export-layers-beyond-depth", E, layer=None, layers="2:9", expect="layer")
case("export-gguf-layer-1", E, layer="1", expect="--layer")
case("export-pt-layer-0", E, format="pt", out="{t}/out.pt", layer="0", expect="layer 0")
case("export-layer-beyond-depth", E, layer="7", expect="7")
case("export-alpha-nan", E, alpha="nan", expect="--alpha")
case("export-alpha-inf", E, alpha="inf", expect="--alpha")
case("export-alpha-missing", E, alpha=None, expect="--alpha")
case("export-role-unknown", E, role="pirat", expect="pirat")
case("export-compose-unknown-role", E, role=None, compose="doctor,pirat", expect="pirat")
case("export-compose-weight-inf", E, role=None, compose="doctor:inf", expect="finite")
case("export-compose-and-role", E, compose="doctor", expect="--compose")
case("export-position-not-in-file", E, position="-14", expect="-14")
case(
    "export-vectors-garbage",
    E,
    {"bad.safetensors": b"\x00" * 64},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "export-vectors-other-depth",
    E,
    {"l2.safetensors": Asset("v_l2.safetensors")},
    vectors="{t}/l2.safetensors",
    expect="layers",
)
case(
    "export-vector-dtype-choice",
    E,
    format="pt",
    out="{t}/out.pt",
    vector_dtype="int8",
    expect="--vector-dtype",
)

# --- sweep: roles, grid, questions, split, prompt format, run folder ------------------------------------
S = "sweep"
case("sweep-out-is-file", S, {"run": "a file"}, expect="run")
case("sweep-out-under-a-file", S, {"f.txt": "x"}, out="{t}/f.txt/run", expect="f.txt")
case("sweep-vectors-missing", S, vectors="{t}/nope.safetensors", expect="nope.safetensors")
case(
    "sweep-vectors-nan",
    S,
    {"bad.safetensors": Asset("v_nan.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "sweep-vectors-other-hidden-size",
    S,
    {"h16.safetensors": Asset("v_h16.safetensors")},
    vectors="{t}/h16.safetensors",
    expect="hidden",
)
case("sweep-role-not-in-vectors", S, role="lawyer", expect="lawyer")
case("sweep-role-empty", S, role=",", expect="--role")
case("sweep-role-no-domain", S, role="pirate", expect="--domain")
case("sweep-domain-unknown", S, domain="mathh", expect="mathh")
case("sweep-alphas-text", S, alphas="one,three", expect="--alphas")
case("sweep-alphas-nan", S, alphas="1,nan", expect="nan")
case("sweep-alphas-empty", S, alphas=",", expect="--alphas")
case("sweep-positions-not-in-file", S, positions="-1,-99", expect="--positions")
case("sweep-positions-text", S, positions="last", expect="--positions")
case("sweep-layers-text", S, layers="x:y", expect="--layers")
case("sweep-layers-beyond-depth", S, layers="0:99", expect="--layers")
case("sweep-layers-empty-range", S, layers="2:1", expect="--layers")
case("sweep-ablate-choice", S, ablate="some", expect="--ablate")
case("sweep-limit-zero", S, limit="0", expect="--limit")
case("sweep-limit-negative", S, limit="-2", expect="--limit")
case("sweep-batch-size-zero", S, batch_size="0", expect="--batch-size")
case("sweep-max-rows-zero", S, max_rows="0", expect="--max-rows")
case("sweep-max-cache-mb-zero", S, max_cache_mb="0", expect="--max-cache-mb")
case("sweep-seed-text", S, seed="s", expect="--seed")
case("sweep-val-fraction-zero", S, val_fraction="0", expect="--val-fraction")
case("sweep-val-fraction-one", S, val_fraction="1", expect="--val-fraction")
case("sweep-val-fraction-1.5", S, val_fraction="1.5", expect="--val-fraction")
case("sweep-val-fraction-nan", S, val_fraction="nan", expect="--val-fraction")
case("sweep-mcq-dir-missing", S, mcq_dir="{t}/nope", expect="nope")
case("sweep-mcq-dir-empty", S, {"m2": DIR}, mcq_dir="{t}/m2", expect="m2")
case("sweep-mcq-json-malformed", S, {"mcq/math.json": '[{"question": '}, expect="math.json")
case(
    "sweep-mcq-json-non-utf8", S, {"mcq/math.json": b'[{"question": "' + LATIN1 + b'"}]'}, expect="math.json"
)
case("sweep-mcq-json-scalar", S, {"mcq/math.json": "7"}, expect="math.json")
case(
    "sweep-mcq-one-choice",
    S,
    {"mcq/math.json": json.dumps([{**q, "choices": ["a"]} for q in _questions("math")])},
    expect="math.json",
)
case(
    "sweep-mcq-answer-e",
    S,
    {"mcq/math.json": json.dumps([{**q, "answer": "E"} for q in _questions("math")])},
    expect="math.json",
)
case(
    "sweep-mcq-jsonl-malformed",
    S,
    {"m3/math.jsonl": _jsonl(_questions("math")) + "{nope\n"},
    mcq_dir="{t}/m3",
    expect="math.jsonl",
)
case(
    "sweep-mcq-jsonl-non-utf8",
    S,
    {"m3/math.jsonl": _jsonl(_questions("math")).encode() + b'{"question": "' + LATIN1 + b'"}\n'},
    mcq_dir="{t}/m3",
    expect="math.jsonl",
)
case(
    "sweep-mcq-csv-no-choices",
    S,
    {"m3/math.csv": "question,answer\nWhat?,A\nWhy?,B\n"},
    mcq_dir="{t}/m3",
    expect="math.csv",
)
case(
    "sweep-mcq-csv-non-utf8",
    S,
    {"m3/math.csv": b"question,A,B,C,D,answer\nWhat,a,b,c,d,A\n" + LATIN1 + b",a,b,c,d,B\n"},
    mcq_dir="{t}/m3",
    expect="math.csv",
)
case(
    "sweep-mcq-two-files-one-domain",
    S,
    {"mcq/math.jsonl": _jsonl(_questions("math"))},
    expect="math",
)
case("sweep-mcq-too-few-for-split", S, {"mcq/math.json": json.dumps(_questions("math", 1))}, expect="math")
case("sweep-prompt-file-missing", S, prompt_file="{t}/nope.txt", expect="nope.txt")
case("sweep-prompt-file-is-folder", S, {"pf": DIR}, prompt_file="{t}/pf", expect="pf")
case(
    "sweep-prompt-file-non-utf8",
    S,
    {"pf.txt": b"{question}\n" + LATIN1 + b"\n"},
    prompt_file="{t}/pf.txt",
    expect="pf.txt",
)
case(
    "sweep-prompt-file-unknown-field",
    S,
    {"pf.txt": "{questin}\nA) {A}\n"},
    prompt_file="{t}/pf.txt",
    expect="questin",
)
case(
    "sweep-prompt-file-no-question",
    S,
    {"pf.txt": "Answer A, B, C or D.\n"},
    prompt_file="{t}/pf.txt",
    expect="{question}",
)
case("sweep-resume-split-other-seed", S, RUN, seed="5", expect="seed")
case("sweep-resume-split-garbage", S, RUN, {"run/split.json": "{ nope"}, expect="split.json")
case(
    "sweep-resume-split-non-utf8",
    S,
    RUN,
    {"run/split.json": b'{"seed": 0, "source": "' + LATIN1 + b'"}'},
    expect="split.json",
)
# the run folder's split names the session's question folder: resume cases read that one
SAME_MCQ = "{assets}/mcq"
case(
    "sweep-resume-settings-garbage",
    S,
    RUN,
    {"run/settings.json": "[1, 2"},
    mcq_dir=SAME_MCQ,
    expect="settings.json",
)
case(
    "sweep-resume-records-garbage",
    S,
    RUN,
    {"run/records.jsonl": "this is not json\n"},
    mcq_dir=SAME_MCQ,
    expect="records.jsonl",
)
case("sweep-resume-owners-garbage", S, RUN, {"run/rolevec-files.json": "{"}, expect="rolevec-files.json")
case(
    "sweep-resume-other-mcq", S, RUN, {"mcq2/math.json": MATH_JSON}, mcq_dir="{t}/mcq2", expect="same --mcq,"
)
case("sweep-force-bad-alphas", S, RUN, force=True, alphas="1,x", expect="--alphas")
case("sweep-force-bad-mcq", S, RUN, {"mcq/math.json": "[{"}, force=True, expect="math.json")
case(
    "sweep-out-is-checkpoint",
    S,
    {"run/rolevec-files.json": json.dumps({"format": "rolevec.folder/1", "kind": "checkpoint", "files": {}})},
    expect="checkpoint",
)
case(
    "sweep-force-foreign-records",
    S,
    {"run/records.jsonl": "my own notes\n"},
    force=True,
    expect="records.jsonl",
)

# --- evaluate: conditions, sites, selection, split files, run folder ------------------------------------
V = "evaluate"
case("evaluate-conditions-typo", V, conditions="baselin", expect="--conditions")
case("evaluate-conditions-empty", V, conditions=",", expect="--conditions")
case("evaluate-conditions-one-typo", V, conditions="baseline,ad", expect="--conditions")
case("evaluate-persona-no-role", V, role=None, conditions="persona", expect="--role")
case("evaluate-add-no-vectors", V, vectors=None, conditions="add", expect="--vectors")
case("evaluate-add-no-layer", V, layer=None, conditions="add", expect="--layer")
case("evaluate-add-no-alpha", V, alpha=None, conditions="add", expect="--alpha")
case(
    "evaluate-selection-with-layer",
    V,
    SEL,
    alpha=None,
    position=None,
    selection="{t}/sel.json",
    expect="--selection",
)
case("evaluate-role-not-in-vectors", V, role="lawyer", expect="lawyer")
case("evaluate-compose-unknown-role", V, compose="doctor,lawyer", expect="lawyer")
case("evaluate-compose-weight-text", V, compose="doctor:much", expect="much")
case(
    "evaluate-compose-only-persona", V, role=None, compose="doctor", conditions="persona", expect="--compose"
)
case(
    "evaluate-compose-with-selection",
    V,
    SEL,
    alpha=None,
    position=None,
    layer=None,
    compose="doctor",
    selection="{t}/sel.json",
    expect="--selection",
)
case("evaluate-cap-without-range", V, conditions="cap", expect="--cap")
case("evaluate-cap-lo-above-hi", V, conditions="cap", cap="4:-4", expect="--cap")
case("evaluate-cap-not-numbers", V, conditions="cap", cap="a:b", expect="--cap")
case("evaluate-cap-without-condition", V, cap="0:1", expect="--conditions")
case("evaluate-cap-layers-beyond-depth", V, conditions="cap", cap="0:1", cap_layers="2,42", expect="42")
case("evaluate-cap-layer0-zero-vector", V, conditions="cap", cap="0:1", layer="0", expect="layer 0")
case("evaluate-persona-template-typo", V, persona_template="you_ar", expect="you_ar")
case("evaluate-domains-unknown", V, domains="mathh", expect="mathh")
case("evaluate-domains-empty", V, domains=",", expect="--domains")
case("evaluate-split-choice", V, split="train", expect="--split")
case("evaluate-layer-beyond-depth", V, layer="99", expect="99")
case("evaluate-layer-negative", V, layer="-1", expect="-1")
case("evaluate-position-not-in-file", V, position="-99", expect="-99")
case("evaluate-alpha-nan", V, alpha="nan", expect="alpha")
case("evaluate-alpha-inf", V, alpha="inf", expect="alpha")
case("evaluate-random-seed-text", V, random_seed="r", expect="--random-seed")
case("evaluate-limit-zero", V, limit="0", expect="--limit")
case("evaluate-batch-size-negative", V, batch_size="-4", expect="--batch-size")
case("evaluate-val-fraction-zero", V, val_fraction="0", expect="--val-fraction")
case("evaluate-val-fraction-one", V, val_fraction="1", expect="--val-fraction")
case("evaluate-val-fraction-1.5", V, val_fraction="1.5", expect="--val-fraction")
case(
    "evaluate-vectors-nan",
    V,
    {"bad.safetensors": Asset("v_nan.safetensors")},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "evaluate-vectors-garbage",
    V,
    {"bad.safetensors": b"{}"},
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "evaluate-vectors-other-hidden-size",
    V,
    {"h16.safetensors": Asset("v_h16.safetensors")},
    vectors="{t}/h16.safetensors",
    expect="hidden",
)
case(
    "evaluate-selection-missing",
    V,
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/nope.json",
    expect="nope.json",
)
case(
    "evaluate-selection-malformed",
    V,
    {"s.json": "{"},
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "evaluate-selection-non-utf8",
    V,
    {"s.json": b'{"roles": {}, "model": "' + LATIN1 + b'"}'},
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "evaluate-selection-no-roles",
    V,
    {"s.json": "[]"},
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "evaluate-selection-role-absent",
    V,
    SEL,
    role="doctor",
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/sel.json",
    expect="doctor",
)
case(
    "evaluate-selection-entry-incomplete",
    V,
    {"s.json": _edit_json("run/selection.json", lambda d: d | {"roles": {"mathematician": {"layer": 1}}})},
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case(
    "evaluate-selection-other-model",
    V,
    {"s.json": _edit_json("run/selection.json", lambda d: d | {"model_fingerprint": "0123456789abcdef"})},
    layer=None,
    position=None,
    alpha=None,
    selection="{t}/s.json",
    expect="s.json",
)
case("evaluate-split-file-missing", V, split_file="{t}/nope.json", expect="nope.json")
case("evaluate-split-file-garbage", V, {"sp.json": "not json"}, split_file="{t}/sp.json", expect="sp.json")
case(
    "evaluate-split-file-non-utf8",
    V,
    {"sp.json": b'{"seed": 0, "source": "' + LATIN1 + b'"}'},
    split_file="{t}/sp.json",
    expect="sp.json",
)
case(
    "evaluate-split-file-wrong-types",
    V,
    {"sp.json": json.dumps({"seed": "zero", "val_fraction": 0.2, "source": "x", "domains": {}})},
    split_file="{t}/sp.json",
    expect="sp.json",
)
case(
    "evaluate-split-file-other-questions",
    V,
    {"sp.json": json.dumps({"seed": 0, "val_fraction": 0.2, "source": "elsewhere", "domains": {}})},
    split_file="{t}/sp.json",
    expect="same --mcq,",
)
case("evaluate-mcq-file-no-domain", V, {"q.json": MATH_JSON}, mcq_dir="{t}/q.json", expect="q.json")


# question sources of issue 17 (--mcq; --mcq-dir stays an alias): one line naming the file and the item
def _paper_rows(n: int = 10, unparsable: int | None = None) -> str:
    rows = []
    for i, q in enumerate(_questions("math", n)):
        lines = "".join(f"\n\t\t\t{x}. {c}" for x, c in zip("ABCD", q["choices"], strict=True))
        text = q["question"] + lines + "\n\t\t\tAnswer with the letter of the correct answer.\n\t\t\tAnswer:"
        rows.append(
            {"instruction": "No choices.\nAnswer:" if i == unparsable else text, "target_score": q["answer"]}
        )
    return json.dumps(rows)


def _arc_rows(bad: dict[str, Any]) -> str:
    good = [
        {"question": f"q{i}?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
        for i in range(10)
    ]
    return json.dumps([good[0], {**good[1], **bad}, *good[2:]])


PAPER_MCQ = "{t}/p/target_test_math.json"
case(
    "evaluate-mcq-paper-rerender-unparsable",
    V,
    {"p/target_test_math.json": _paper_rows(unparsable=3)},
    mcq_dir=PAPER_MCQ,
    rerender=True,
    expect="target_test_math.json item 3 has an instruction whose",
)
case(
    "evaluate-mcq-paper-bad-target",
    V,
    {"p/target_test_math.json": json.dumps([{"instruction": "Q?\nA. a\nB. b", "target_score": "C"}] * 10)},
    mcq_dir=PAPER_MCQ,
    expect="target_test_math.json item 0 answer 'C'",
)
case(
    "evaluate-mcq-field-missing",
    V,
    {"q.json": MATH_JSON},
    mcq_dir="{t}/q.json",
    question_field="qestion",
    mcq_domain="math",
    expect="did you mean 'question'",
)
case(
    "evaluate-mcq-choice-columns-missing",
    V,
    {"q.json": MATH_JSON},
    mcq_dir="{t}/q.json",
    choices_field="opa,opb",
    mcq_domain="math",
    expect="q.json item 0 has no field 'opa'",
)
case(
    "evaluate-mcq-ragged-labels",
    V,
    {"arc.json": _arc_rows({"choices": {"text": ["a", "b", "c"], "label": ["A", "B"]}})},
    mcq_dir="{t}/arc.json",
    layout="arc",
    mcq_domain="math",
    expect="arc.json item 1 has 3 choice text(s) but 2 label(s)",
)
case(
    "evaluate-mcq-empty-choices",
    V,
    {"arc.json": _arc_rows({"choices": {"text": [], "label": []}})},
    mcq_dir="{t}/arc.json",
    layout="arc",
    mcq_domain="math",
    expect="arc.json item 1 has 0 choice(s)",
)
case(
    "evaluate-mcq-duplicate-labels",
    V,
    {"arc.json": _arc_rows({"choices": {"text": ["a", "b"], "label": ["A", "A"]}})},
    mcq_dir="{t}/arc.json",
    layout="arc",
    mcq_domain="math",
    expect="arc.json item 1 has duplicate choice labels",
)
case(
    "evaluate-mcq-answer-outside",
    V,
    {"arc.json": _arc_rows({"answerKey": "E"})},
    mcq_dir="{t}/arc.json",
    layout="arc",
    mcq_domain="math",
    expect="arc.json item 1 answer 'E' is none of",
)
case("evaluate-mcq-field-without-source", V, mcq_dir=None, layout="arc", expect="--layout needs --mcq")
case("evaluate-mcq-hf-no-layout", V, mcq_dir="hf:me/quiz", expect="no layout preset for hf:me/quiz")
case(
    "evaluate-mcq-domain-map-missing",
    V,
    {"q.json": MATH_JSON},
    mcq_dir="{t}/q.json",
    domain_map="{t}/nope.json",
    expect="nope.json",
)
case(
    "evaluate-mcq-json-non-utf8",
    V,
    {"mcq/math.json": b'[{"question": "' + LATIN1 + b'"}]'},
    expect="math.json",
)
case(
    "evaluate-mcq-skip-bad-leaves-none",
    V,
    {"mcq/math.json": json.dumps([{"question": "q"}] * 4)},
    skip_bad=True,
    expect="math",
)
case(
    "evaluate-prompt-file-non-utf8",
    V,
    {"pf.txt": LATIN1 + b" {question}\n"},
    prompt_file="{t}/pf.txt",
    expect="pf.txt",
)
case(
    "evaluate-prompt-file-bad-brace",
    V,
    {"pf.txt": "{question} {A\n"},
    prompt_file="{t}/pf.txt",
    expect="--prompt-file",
)
case("evaluate-out-is-file", V, {"run": "a file"}, expect="run")
case("evaluate-resume-split-other-fraction", V, RUN, val_fraction="0.5", expect="val fraction")
case("evaluate-resume-split-garbage", V, RUN, {"run/split.json": "nope"}, expect="split.json")
case(
    "evaluate-resume-settings-garbage",
    V,
    RUN,
    {"run/settings.json": "nope"},
    mcq_dir=SAME_MCQ,
    expect="settings.json",
)
case(
    "evaluate-resume-records-garbage",
    V,
    RUN,
    {"run/records.jsonl": "{not json\n"},
    mcq_dir=SAME_MCQ,
    expect="records.jsonl",
)
case(
    "evaluate-resume-records-non-utf8",
    V,
    RUN,
    {"run/records.jsonl": b'{"qid": "' + LATIN1 + b'"}\n'},
    mcq_dir=SAME_MCQ,
    expect="records.jsonl",
)
case("evaluate-resume-owners-garbage", V, RUN, {"run/rolevec-files.json": "[]"}, expect="rolevec-files.json")
case(
    "evaluate-resume-other-mcq",
    V,
    RUN,
    {"mcq2/math.json": MATH_JSON},
    mcq_dir="{t}/mcq2",
    expect="same --mcq,",
)
case("evaluate-force-bad-template", V, RUN, force=True, persona_template="you_ar", expect="you_ar")
case("evaluate-force-bad-domains", V, RUN, force=True, domains="mathh", expect="mathh")
case(
    "evaluate-force-bad-vectors",
    V,
    RUN,
    {"bad.safetensors": b"x"},
    force=True,
    vectors="{t}/bad.safetensors",
    expect="bad.safetensors",
)
case(
    "evaluate-out-is-checkpoint",
    V,
    {"run/rolevec-files.json": json.dumps({"format": "rolevec.folder/1", "kind": "checkpoint", "files": {}})},
    expect="checkpoint",
)
case("evaluate-force-foreign-split", V, {"run/split.json": "{}"}, force=True, expect="split.json")

# --- run: presets, config files, roles, domains, counts, run folder -----------------------------------
R = "run"
case("run-preset-typo", R, preset="quik", expect="--preset")
case("run-dtype-choice", R, dtype="int4", expect="--dtype")
case("run-config-missing", R, config="{t}/nope.toml", expect="nope.toml")
case("run-config-is-folder", R, {"cfg": DIR}, config="{t}/cfg", expect="cfg")
case("run-config-json-malformed", R, {"c.json": '{"roles": '}, config="{t}/c.json", expect="c.json")
case("run-config-toml-malformed", R, {"c.toml": "roles = [\n"}, config="{t}/c.toml", expect="c.toml")
case(
    "run-config-json-non-utf8",
    R,
    {"c.json": b'{"judge_model": "' + LATIN1 + b'"}'},
    config="{t}/c.json",
    expect="c.json",
)
case(
    "run-config-toml-non-utf8",
    R,
    {"c.toml": b'judge_model = "' + LATIN1 + b'"\n'},
    config="{t}/c.toml",
    expect="c.toml",
)
case("run-config-not-object", R, {"c.json": "[1, 2]"}, config="{t}/c.json", expect="c.json")
case("run-config-unknown-key", R, {"c.json": '{"n_promts": 4}'}, config="{t}/c.json", expect="n_promts")
case("run-config-toml-unknown-key", R, {"c.toml": "layerstep = 2\n"}, config="{t}/c.toml", expect="layerstep")
case(
    "run-config-wrong-type", R, {"c.json": '{"split_seed": "zero"}'}, config="{t}/c.json", expect="split_seed"
)
case(
    "run-config-val-fraction-1.5",
    R,
    {"c.json": '{"val_fraction": 1.5}'},
    config="{t}/c.json",
    expect="val_fraction",
)
case(
    "run-config-val-fraction-zero",
    R,
    {"c.toml": "val_fraction = 0\n"},
    config="{t}/c.toml",
    expect="val_fraction",
)
case(
    "run-config-alphas-nan",
    R,
    {"c.json": '{"alphas": "1,nan"}'},
    config="{t}/c.json",
    alphas=None,
    expect="alphas",
)
case(
    "run-config-ablate-scope",
    R,
    {"c.json": '{"ablate_scope": "some"}'},
    config="{t}/c.json",
    expect="ablate_scope",
)
case(
    "run-config-roles-number", R, {"c.json": '{"roles": 5}'}, config="{t}/c.json", roles=None, expect="roles"
)
case(
    "run-config-batch-size-bool",
    R,
    {"c.json": '{"batch_size": true}'},
    config="{t}/c.json",
    expect="batch_size",
)
case(
    "run-config-persona-typo",
    R,
    {"c.json": '{"persona_templates": ["you_ar"]}'},
    config="{t}/c.json",
    expect="you_ar",
)
case("run-roles-unknown", R, roles="mathematican", expect="mathematican")
case("run-roles-no-domain", R, roles="pirate", expect="pirate")
case("run-domains-unknown", R, domains="mathh", expect="mathh")
case("run-roles-dir-missing", R, roles_dir="{t}/nope", expect="nope")
case("run-base-missing", R, base="{t}/nope.txt", expect="nope.txt")
case("run-base-non-utf8", R, {"base.txt": b"ok\n" + LATIN1 + b"\n"}, expect="base.txt")
case(
    "run-base-column-missing",
    R,
    {"b.csv": "instruction\na\nb\n"},
    base="{t}/b.csv",
    base_column="prompt_text",
    expect="prompt_text",
)
case(
    "run-role-file-non-utf8",
    R,
    {"roles/mathematician.json": b'["' + LATIN1 + b'"]'},
    expect="mathematician.json",
)
case("run-mcq-dir-missing", R, mcq_dir="{t}/nope", expect="nope")
case("run-mcq-non-utf8", R, {"mcq/math.json": b"[" + LATIN1 + b"]"}, expect="math.json")
case("run-val-fraction-one", R, val_fraction="1", expect="--val-fraction")
case("run-val-fraction-text", R, val_fraction="a fifth", expect="--val-fraction")
case(
    "run-mcq-malformed-item",
    R,
    {"mcq/math.json": json.dumps([{"question": "Q?", "choices": ["a"], "answer": "A"}])},
    expect="math.json",
)
case("run-mcq-domain-empty", R, {"mcq/math.json": "[]"}, expect="math")
case(
    "run-mcq-too-few-for-split",
    R,
    {"mcq/math.json": json.dumps(_questions("math", 1))},
    expect="too few",
)
case("sweep-mcq-domain-empty", S, {"mcq/math.json": "[]"}, domain="math", expect="math")
case("run-n-zero", R, n="0", expect="--n")
case("run-n-base-negative", R, n_base="-1", expect="--n-base")
case("run-n-base-text", R, n_base="lots", expect="--n-base")
case("run-val-limit-zero", R, val_limit="0", expect="--val-limit")
case("run-test-limit-zero", R, test_limit="0", expect="--test-limit")
case("run-layer-step-zero", R, layer_step="0", expect="--layer-step")
case("run-batch-size-zero", R, batch_size="0", expect="--batch-size")
case("run-alphas-text", R, alphas="a,b", expect="alphas")
case("run-alphas-inf", R, alphas="1,inf", expect="alphas")
case("run-layers-text", R, layers="x", expect="layers")
case("run-layers-beyond-depth", R, layers="0:99", expect="layers")
case("run-positions-not-in-vectors", R, positions="-99", expect="positions")
case("run-out-is-file", R, {"run": "a file"}, expect="run")
case("run-out-under-a-file", R, {"f.txt": "x"}, out="{t}/f.txt/run", expect="f.txt")
case(
    "run-force-bad-config",
    R,
    RUN,
    {"c.json": '{"bogus": 1}'},
    config="{t}/c.json",
    force=True,
    expect="bogus",
)
case("run-force-bad-roles", R, RUN, roles="mathematican", force=True, expect="mathematican")

# --- report: run folders and their records ---------------------------------------------------------------
REP = "report"
case("report-folder-missing", REP, {}, _pos="{t}/nope", expect="nope")
case("report-folder-is-file", REP, {"r.txt": "x"}, _pos="{t}/r.txt", expect="r.txt")
case("report-no-records", REP, {"run/records.jsonl": GONE}, expect="records.jsonl")
case("report-records-empty", REP, {"run/records.jsonl": b""}, expect="records.jsonl")
case("report-records-blank-lines", REP, {"run/records.jsonl": "\n\n  \n"}, expect="records.jsonl")
case("report-records-garbage", REP, {"run/records.jsonl": "garbage\nmore garbage\n"}, expect="records.jsonl")
case("report-records-binary", REP, {"run/records.jsonl": bytes(range(256)) + b"\n"}, expect="records.jsonl")
case(
    "report-records-non-utf8",
    REP,
    {"run/records.jsonl": b'{"qid": "' + LATIN1 + b'"}\n'},
    expect="records.jsonl",
)
case("report-records-not-objects", REP, {"run/records.jsonl": "[1, 2]\n3\n"}, expect="records.jsonl")
case("report-records-missing-fields", REP, {"run/records.jsonl": '{"a": 1}\n'}, expect="records.jsonl")
case(
    "report-records-wrong-types",
    REP,
    {"run/records.jsonl": Derived(lambda a: _bad_record(a))},
    expect="records.jsonl",
)
case("report-exists-no-force", REP, {"run/report.html": "<p>old</p>"}, expect="--force")
case(
    "report-owners-garbage-force",
    REP,
    {"run/rolevec-files.json": "{"},
    force=True,
    expect="rolevec-files.json",
)
case("report-unknown-flag", REP, extra=("--out", "{t}/x"), expect="--out")


def _bad_record(assets: Path) -> bytes:
    """The run's first record with its 'correct' field a word: valid JSON, not a usable record."""
    first = json.loads((assets / "run" / "records.jsonl").read_text(encoding="utf-8").splitlines()[0])
    first["correct"] = "maybe"
    first["layer"] = "high"
    return (json.dumps(first) + "\n").encode()


# --- session assets: a tiny model, its vectors, a swept and evaluated run folder ---------------------


def _run_ok(argv: list[str]) -> None:
    rc = main(argv)
    assert rc == 0, f"setup command failed: rolevec {' '.join(argv)}"


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good inputs for the tiny model: folder, vector file, run folder (sweep + evaluate), control vector,
    and broken variants derived from them (NaN/inf vectors, other shapes, foreign GGUF)."""
    import gguf
    import numpy as np
    from safetensors.torch import save_file

    from rolevec.model.testing import make_model, make_tokenizer
    from rolevec.steering.export import write_control_vector
    from rolevec.vectors.role_vectors import RoleVectors

    root = tmp_path_factory.mktemp("bad-inputs-assets")
    tokenizer = make_tokenizer()
    model: Any = make_model("llama", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for rel, text in {**ROLES, **BASE, **MCQ}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    tiny = ["--model", str(root / "model"), "--device", "cpu"]
    vec = str(root / "v.safetensors")
    _run_ok(
        [
            *["extract", *tiny, "--roles", "mathematician,doctor,pirate", "--roles-dir", str(root / "roles")],
            *["--base", str(root / "base.txt"), "--n", "4", "--out", vec, "--no-progress"],
        ]
    )
    run = ["--mcq-dir", str(root / "mcq"), "--out", str(root / "run"), "--no-progress"]
    _run_ok(
        [
            "sweep",
            *tiny,
            "--vectors",
            vec,
            "--role",
            "mathematician",
            "--alphas",
            "1",
            "--positions",
            "-1",
            *run,
        ]
    )
    sel = str(root / "run" / "selection.json")
    _run_ok(
        [
            "evaluate",
            *tiny,
            "--vectors",
            vec,
            "--role",
            "mathematician",
            "--domains",
            "math",
            "--selection",
            sel,
            *run,
        ]
    )
    cv = ["--format", "gguf", "--vectors", vec, "--role", "mathematician", "--layer", "2", "--alpha", "1"]
    _run_ok(["export", *tiny, *cv, "--out", str(root / "cv.gguf")])

    good = RoleVectors.load(vec)

    def variant(name: str, **change: Any) -> None:
        fields = {
            "role_means": dict(good.role_means),
            "base_mean": good.base_mean,
            "positions": good.positions,
            "position_tokens": good.position_tokens,
            "metadata": dict(good.metadata),
        }
        RoleVectors(**{**fields, **change}).save(root / name)

    nan = good.role_means["mathematician"].clone()
    nan[0, 2, 5] = float("nan")
    variant("v_nan.safetensors", role_means={**good.role_means, "mathematician": nan})
    inf = good.base_mean.clone()
    inf[-1, 1, 0] = float("inf")
    variant("v_inf.safetensors", base_mean=inf)
    torch.manual_seed(1)
    p = len(good.positions)
    variant(
        "v_h16.safetensors",
        role_means={r: torch.randn(p, 4, 16) for r in good.roles},
        base_mean=torch.randn(p, 4, 16),
    )
    variant(
        "v_l2.safetensors",
        role_means={r: torch.randn(p, 3, 32) for r in good.roles},
        base_mean=torch.randn(p, 3, 32),
    )
    tensors = {f"mean/{r}": m.contiguous() for r, m in good.role_means.items()}
    tensors["mean/__base__"] = good.base_mean.contiguous()
    save_file(tensors, str(root / "v_nometa.safetensors"))
    from safetensors import safe_open

    with safe_open(vec, framework="pt") as f:
        header = dict(f.metadata())
    shape = {**tensors, "mean/mathematician": torch.zeros(p, 4, 16)}
    save_file(shape, str(root / "v_shape.safetensors"), metadata=header)
    write_control_vector(root / "cv_h16.gguf", {2: torch.randn(16)}, model_hint="llama")
    writer = gguf.GGUFWriter(str(root / "arch.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return root


# --- checks ----------------------------------------------------------------------------------------------


def write_files(root: Path, files: Mapping[str, Any], assets: Path) -> None:
    for rel, value in files.items():
        target = root / rel
        if value is GONE:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if value is DIR:
            target.mkdir(parents=True, exist_ok=True)
        elif isinstance(value, Asset):
            source = assets / value.name
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copyfile(source, target)
        elif isinstance(value, Derived):
            target.write_bytes(value.make(assets))
        elif isinstance(value, bytes):
            target.write_bytes(value)
        else:
            target.write_text(value, encoding="utf-8")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("rolevec has no subcommands")


SUBPARSERS = _subparsers()
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OTHER_COMMAND = re.compile(r"\brolevec ([a-z]+)\b")
ERROR_LINE = re.compile(r"^rolevec(?: [a-z]+)?: error: ")
#: stderr lines a failing command may print besides its error: warnings, progress bars, progress notes
ALLOWED = (
    re.compile(r"^rolevec: warning: "),
    re.compile(r"^rolevec: questions from "),
    re.compile(r"^rolevec: skipped \d+ malformed question"),
    re.compile(r"^[\w.-]+: \d+ prompts from "),  # extract: one line per prompt set it read
    re.compile(r"\d+%\|"),  # tqdm progress bars
    re.compile(r"^rolevec run \(\w+\) on "),  # run's header, printed once the model is loaded
)


def unknown_flags(cmd: str, line: str) -> list[str]:
    """Flags in ``line`` that neither ``cmd`` nor a command the line names (`rolevec OTHER`) has."""
    commands = [cmd, *(c for c in OTHER_COMMAND.findall(line) if c in SUBPARSERS)]
    known: set[str] = set()
    for name in commands:
        known.update(SUBPARSERS[name]._option_string_actions)
    advice = line.split("unrecognized arguments:")[0]  # argparse echoes the user's flags after this
    return [flag for flag in dict.fromkeys(FLAG.findall(advice)) if flag not in known]


def stderr_problems(err: str, *, from_argparse: bool) -> tuple[list[str], list[str]]:
    """(error lines, problems) of a failing command's stderr."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problems: list[str] = []
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    errors = [ln for ln in lines if ERROR_LINE.match(ln)]
    in_usage = False
    for ln in lines:
        if ERROR_LINE.match(ln):
            in_usage = False
            continue
        if from_argparse and (ln.startswith("usage:") or (in_usage and ln.startswith(" "))):
            in_usage = True
            continue
        in_usage = False
        if not any(p.search(ln) for p in ALLOWED):
            problems.append(f"extra stderr line {ln[:200]!r}")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines, not 1: {[e[:200] for e in errors]}")
    return errors, problems


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROLEVEC_MMLU_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    bad: Case,
    assets: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_files(tmp_path, bad.files, assets)
    argv = [a.format(t=tmp_path, model=assets / "model", assets=assets) for a in bad.argv]
    monkeypatch.chdir(tmp_path)
    before, model_before = snapshot(tmp_path), snapshot(assets / "model")
    capsys.readouterr()
    crash: str | None = None
    from_argparse = False
    try:
        rc: int | str | None = main(argv)
    except SystemExit as exc:
        from_argparse = True
        rc = 0 if exc.code is None else exc.code
    except Exception as exc:  # an uncaught exception is a traceback for the user
        rc = "uncaught"
        crash = f"uncaught {type(exc).__name__}: {str(exc)[:300]}\n" + "".join(
            traceback.format_tb(exc.__traceback__)[-3:]
        )
    err = capsys.readouterr().err
    problems: list[str] = []
    if crash is not None:
        problems.append(crash)
    elif rc == 0:
        problems.append("exit status 0")
    errors, stderr_issues = stderr_problems(err, from_argparse=from_argparse)
    if crash is None:
        problems += stderr_issues
    touched = changes(before, snapshot(tmp_path))
    touched += [f"model folder {c}" for c in changes(model_before, snapshot(assets / "model"))]
    if touched:
        problems.append(f"files touched: {touched[:12]}")
    for line in errors[:1]:
        flags = unknown_flags(bad.cmd, line)
        if flags:
            problems.append(f"error names flag(s) {flags} that `rolevec {bad.cmd}` does not have")
        if bad.expect and bad.expect.lower() not in line.lower():
            problems.append(f"error line does not mention {bad.expect!r}")
    if problems:
        shown = " ".join(argv).replace(str(tmp_path), "$T").replace(str(assets), "$ASSETS")
        pytest.fail(
            f"rolevec {shown}\n  -> " + "\n  -> ".join(problems) + f"\n  stderr:\n{err[-1500:]}",
            pytrace=False,
        )


def test_enough_cases_on_every_command() -> None:
    per_command = {cmd: sum(c.cmd == cmd for c in CASES) for cmd in DEFAULTS}
    assert len(CASES) >= 120, len(CASES)
    assert all(n >= 5 for n in per_command.values()), per_command
    assert set(per_command) == set(SUBPARSERS), (set(per_command), set(SUBPARSERS))
