"""`rolevec prompts`: generate a role prompt set from personas, as the paper built D_r."""

from __future__ import annotations

import argparse
import os

from ..errors import RolevecError
from .common import check_out, positive_int


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "prompts",
        help="generate a role prompt file from PersonaHub-style personas with a generator model",
        description="Pick personas that mention the role, ask a generator for one short instruction per "
        "persona and task type, strip commentary and duplicates, and write a JSON list of prompts.",
    )
    parser.add_argument("--role", required=True, help="role name, e.g. mathematician or data_scientist")
    parser.add_argument(
        "--personas", required=True, help='JSONL file of {"persona": ...} objects (PersonaHub format)'
    )
    parser.add_argument(
        "--generator",
        default=None,
        help="local model (hub id, folder or .gguf; default: the embedded SmolLM2) or an OpenAI-compatible "
        "URL http(s)://HOST[:PORT]",
    )
    parser.add_argument(
        "--generator-model",
        default=None,
        help="model name sent to a URL generator (default: its first model)",
    )
    parser.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the URL generator's API key, if it needs one",
    )
    parser.add_argument("--n", type=positive_int, default=128, help="prompts to generate (default: 128)")
    parser.add_argument("--seed", type=int, default=42, help="seed for the persona order (default: 42)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="requests per generator call")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="reply length limit")
    parser.add_argument("--device", default="auto", help="device of a local generator (default: auto)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="local generator dtype",
    )
    parser.add_argument("--out", default=None, help="output JSON file (default: <role>.json)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..data.prompts import (
        Generator,
        LocalGenerator,
        OpenAIGenerator,
        generate_prompts,
        is_url,
        load_personas,
        write_prompts,
    )
    from ..data.sources import normalise_role

    role = normalise_role(args.role)
    if not role:
        raise RolevecError("--role is empty: pass a role name such as mathematician")
    out = check_out(args.out or f"{role}.json", args.force, example=f"{role}.json")
    personas = load_personas(args.personas)
    generator: Generator
    if is_url(args.generator):
        generator = OpenAIGenerator(
            args.generator,
            model=args.generator_model,
            api_key=os.environ.get(args.api_key_env) or None,
            max_tokens=args.max_new_tokens,
        )
    else:
        from ..model.loading import load_model

        adapter = load_model(
            args.generator, device=args.device, dtype=args.dtype, progress=not args.no_progress
        )
        generator = LocalGenerator(adapter, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    result = generate_prompts(
        role,
        personas,
        generator,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        source=str(args.personas),
        progress=not args.no_progress,
    )
    path = write_prompts(result.prompts, out, force=args.force)
    print(
        f"wrote {path}: {len(result.prompts)} prompts for {role} from {result.n_personas} matching personas "
        f"({result.n_requests} requests, {result.n_rejected} unusable replies, "
        f"{result.prompts.n_duplicates_dropped} duplicates dropped)"
    )
    return 0
