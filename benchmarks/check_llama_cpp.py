"""Does llama.cpp serve a folded checkpoint as rolevec steers it? A check, not a CI test (it needs
llama-cpp-python, built from source, and llama.cpp's converter).

On the embedded SmolLM2-135M-Instruct: extract a role vector from the built-in prompts, fold the
addition at a middle layer with ``target="llama.cpp"`` (a bias on ``mlp.down_proj``, ``mlp_bias=True``),
save it, convert it with llama.cpp's ``convert_hf_to_gguf.py`` and decode greedily with
``llama_cpp.Llama``, feeding the token ids rolevec's chat template gives. The same is done for the
unsteered model (its own conversion), as the control. Printed as JSON: per prompt, how many greedy
tokens llama.cpp and rolevec's hooked generation share, the first step's largest logit difference, and
whether steering changed llama.cpp's answer.

    pip install llama-cpp-python           # builds llama.cpp (about 25 minutes on 2 cores)
    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    LLAMA_CPP_SRC=llama_cpp_python-0.3.36/vendor/llama.cpp .venv/bin/python benchmarks/check_llama_cpp.py

Exit status 0 when every prompt's tokens match (steered and unsteered) and steering changed at least
one answer.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPTS = (
    "What should I do about a persistent cough?",
    "Give me three tips for writing a cover letter.",
    "Explain why the sky is blue.",
    "How do I make a simple tomato sauce?",
    "What is a good way to start learning to program?",
)
CONVERTER = "convert_hf_to_gguf.py"


def find_llama_cpp_source(given: str | None) -> Path | None:
    """The llama.cpp folder holding convert_hf_to_gguf.py: ``given``, $LLAMA_CPP_SRC, or a source install."""
    candidates = [given, os.environ.get("LLAMA_CPP_SRC")]
    try:
        import llama_cpp

        package = Path(llama_cpp.__file__).resolve().parent
        candidates += [str(package.parent / "vendor" / "llama.cpp"), str(package / "vendor" / "llama.cpp")]
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and (Path(candidate) / CONVERTER).is_file():
            return Path(candidate)
    return None


def convert(source: Path, folder: Path, outfile: Path, outtype: str) -> float:
    """Run llama.cpp's converter (its own gguf-py, beside it); returns the seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            str(source / CONVERTER),
            str(folder),
            "--outfile",
            str(outfile),
            "--outtype",
            outtype,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{CONVERTER} failed on {folder}:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def _last_logits(llm: Any) -> Any:
    """The logits of the last evaluated token, read from the context (``Llama.scores`` is only filled with
    ``logits_all=True`` since llama-cpp-python moved sampling into llama.cpp's sampler)."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)


def llama_greedy(
    llm: Any, prompt_ids: Sequence[int], max_new_tokens: int, stops: set[int]
) -> tuple[list[int], Any]:
    """Greedy tokens by argmax of llama.cpp's logits (no sampler in the way), and the first step's logits."""
    llm.reset()
    llm.eval(list(prompt_ids))
    first = _last_logits(llm)
    out: list[int] = []
    logits = first
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits))
        out.append(token)
        if token in stops:
            break
        llm.eval([token])
        logits = _last_logits(llm)
    return out, first


def _compare(ours: Sequence[int], theirs: Sequence[int]) -> dict[str, Any]:
    prefix = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        prefix += 1
    return {
        "rolevec_tokens": len(ours),
        "llama_cpp_tokens": len(theirs),
        "matching_prefix": prefix,
        "identical": list(ours) == list(theirs),
    }


def run_check(
    source: Path,
    *,
    work: Path,
    role: str = "doctor",
    layer: int = 12,
    alpha: float = 4.0,
    ablate: bool = False,
    n_prompts: int = len(PROMPTS),
    max_new_tokens: int = 24,
    n_vector_prompts: int = 32,
    outtype: str = "f32",
    threads: int = 2,
) -> dict[str, Any]:
    """Fold, save, convert and decode; the JSON-ready result (``ok`` says whether everything matched)."""
    from llama_cpp import Llama
    from llama_cpp import __version__ as llama_cpp_version

    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.model.loading import ModelAdapter, load_model
    from rolevec.steering.folding import drop_gguf_quantizer_, fold, logits_error, save_folded
    from rolevec.steering.generation import generate, stop_token_ids
    from rolevec.steering.interventions import resolve_steering
    from rolevec.vectors.extraction import extract_role_vectors

    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_model(None, device="cpu", dtype="float32", progress=False)
        roles = {role: sample(load_role_prompts(role), n_vector_prompts, seed=0)}
        vectors = extract_role_vectors(
            adapter, roles, sample(load_base(), n_vector_prompts, seed=0), seed=0, progress=False
        )
    steering = resolve_steering(
        vectors, role, layers=layer, alpha=None if ablate else alpha, ablate=ablate, adapter=adapter
    )
    timings["load_and_extract_s"] = time.perf_counter() - start

    folded = fold(adapter, steering, target="llama.cpp")
    steered_dir = save_folded(folded, work / "steered", check=(adapter, steering))
    plain = ModelAdapter(
        copy.deepcopy(adapter.model),
        adapter.tokenizer,
        name=adapter.name,
        block_pattern=adapter.arch.blocks_path,
    )
    drop_gguf_quantizer_(plain)
    plain_dir = save_folded(plain, work / "unsteered")
    ggufs = {"steered": work / "steered.gguf", "unsteered": work / "unsteered.gguf"}
    timings["convert_s"] = convert(source, steered_dir, ggufs["steered"], outtype) + convert(
        source, plain_dir, ggufs["unsteered"], outtype
    )

    stops = stop_token_ids(adapter)
    rows: list[dict[str, Any]] = []
    llms = {
        kind: Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False, seed=0)
        for kind, path in ggufs.items()
    }
    start = time.perf_counter()
    for prompt in PROMPTS[:n_prompts]:
        ids = list(
            adapter.tokenizer(adapter.render(prompt), add_special_tokens=adapter.chat.add_special_tokens)[
                "input_ids"
            ]
        )
        row: dict[str, Any] = {"prompt": prompt, "prompt_tokens": len(ids)}
        answers: dict[str, list[int]] = {}
        for kind, use in (("steered", steering), ("unsteered", None)):
            ours = generate(adapter, prompt, steering=use, max_new_tokens=max_new_tokens).token_ids
            theirs, first = llama_greedy(llms[kind], ids, max_new_tokens, stops)
            batch = adapter.encode([adapter.render(prompt)])
            with torch.inference_mode():
                if use is None:
                    want = adapter.model(**batch.model_kwargs()).logits[0, -1].double()
                else:
                    with use.apply(adapter):
                        want = adapter.model(**batch.model_kwargs()).logits[0, -1].double()
            got = torch.from_numpy(first)
            row[kind] = {
                **_compare(ours, theirs),
                "first_logits_max_abs_diff": float((want - got).abs().max()),
                "first_logits_relative_error": logits_error(want, got),
                "text": adapter.tokenizer.decode(
                    [t for t in theirs if t not in stops], skip_special_tokens=True
                ),
            }
            answers[kind] = theirs
        row["steered_differs_from_unsteered"] = answers["steered"] != answers["unsteered"]
        rows.append(row)
    timings["decode_s"] = time.perf_counter() - start
    summary = {
        "prompts": len(rows),
        "steered_identical": sum(r["steered"]["identical"] for r in rows),
        "unsteered_identical": sum(r["unsteered"]["identical"] for r in rows),
        "steered_differs_from_unsteered": sum(r["steered_differs_from_unsteered"] for r in rows),
        "steered_matching_tokens": f"{sum(r['steered']['matching_prefix'] for r in rows)}/"
        f"{sum(r['steered']['rolevec_tokens'] for r in rows)}",
        "unsteered_matching_tokens": f"{sum(r['unsteered']['matching_prefix'] for r in rows)}/"
        f"{sum(r['unsteered']['rolevec_tokens'] for r in rows)}",
    }
    ok = (
        summary["steered_identical"] == summary["unsteered_identical"] == len(rows)
        and summary["steered_differs_from_unsteered"] >= 1
    )
    return {
        "check": "llama.cpp serves a folded steering as rolevec's hooks apply it",
        "model": adapter.name,
        "role": role,
        "layer": layer,
        "steering": steering.describe(),
        "fold": folded.source.get("fold_edits", ""),
        "target": folded.source.get("fold_target", ""),
        "outtype": outtype,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "llama_cpp_python": llama_cpp_version,
        "converter": str(source / CONVERTER),
        "torch": torch.__version__,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "prompts": rows,
        "summary": summary,
        "ok": ok,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--llama-cpp-src", default=None, help="folder with convert_hf_to_gguf.py ($LLAMA_CPP_SRC)"
    )
    parser.add_argument(
        "--role", default="doctor", help="built-in role whose vector is folded (default doctor)"
    )
    parser.add_argument("--layer", type=int, default=12, help="layer of the addition (default 12 of 30)")
    parser.add_argument("--alpha", type=float, default=4.0, help="addition strength α (default 4)")
    parser.add_argument(
        "--ablate", action="store_true", help="fold the ablation of the direction instead (unties the head)"
    )
    parser.add_argument(
        "--prompts", type=int, default=len(PROMPTS), help=f"prompts to answer (max {len(PROMPTS)})"
    )
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per answer (default 24)")
    parser.add_argument(
        "--outtype", choices=("f32", "f16"), default="f32", help="GGUF weight type (default f32)"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp (default 2)")
    parser.add_argument(
        "--work", default=None, help="folder for the checkpoints and GGUF files (default: temporary)"
    )
    args = parser.parse_args(argv)
    source = find_llama_cpp_source(args.llama_cpp_src)
    if source is None:
        print(f"no {CONVERTER} found: pass --llama-cpp-src or set LLAMA_CPP_SRC", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rolevec-llama-cpp-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run_check(
            source,
            work=work,
            role=args.role,
            layer=args.layer,
            alpha=args.alpha,
            ablate=args.ablate,
            n_prompts=args.prompts,
            max_new_tokens=args.tokens,
            outtype=args.outtype,
            threads=args.threads,
        )
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
