"""`rolevec generate`: stream a steered answer, optionally followed by the unsteered one."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, load_from_args
from .steer_args import (
    DEFAULT_LAYER_FRACTION,
    add_cap_args,
    add_strength_args,
    add_vector_args,
    check_alpha_arg,
    check_selection_model,
    choose,
    parse_cap,
    parse_cap_layers,
    steer_vectors,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "generate",
        help="generate with a role vector applied (streams the answer; --compare adds the unsteered one)",
        description=(
            "Answer PROMPT (rendered as the user turn of the chat template) with the role vector applied "
            "by hooks at every position, prompt and generated tokens alike. Layer, position and alpha "
            "come from the options, else from --selection, else layer = round("
            f"{DEFAULT_LAYER_FRACTION}·n_layers) and position -1; alpha has no default."
        ),
    )
    add_model_args(parser)
    add_vector_args(parser, required=False)
    parser.add_argument(
        "--control-vector",
        default=None,
        help="steer with a llama.cpp/repeng control-vector .gguf instead of --vectors (--alpha scales it)",
    )
    parser.add_argument("--layer", type=int, default=None, help="layer L (input of block L) to steer")
    parser.add_argument(
        "--selection", default=None, help="selection JSON giving layer/position/alpha per role"
    )
    add_strength_args(parser, required=False)
    add_cap_args(parser)
    parser.add_argument(
        "--where",
        default="all",
        choices=["all", "prompt", "generated"],
        help="which tokens addition steers (default all)",
    )
    parser.add_argument("--compare", action="store_true", help="also print the unsteered answer")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling when --temperature > 0")
    parser.add_argument("--system", default=None, help="optional system prompt (e.g. a persona)")
    parser.add_argument("--raw", action="store_true", help="send PROMPT as is, without the chat template")
    parser.add_argument("prompt", help="the user message")
    parser.set_defaults(func=run)


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..errors import RolevecError
    from ..steering.export import steering_from_control_vector
    from ..steering.generation import generate
    from ..steering.interventions import Steering, resolve_steering

    check_alpha_arg(args.alpha)
    cap = None if args.cap is None else parse_cap(args.cap)
    cap_layers = None if args.cap_layers is None else parse_cap_layers(args.cap_layers)
    if cap_layers is not None and cap is None:
        raise RolevecError("--cap-layers only applies to capping: pass --cap LO:HI too")
    if cap is not None and (args.alpha is not None or args.ablate or args.control_vector):
        raise RolevecError(
            "--cap replaces the addition: pass one of --cap, --alpha or --ablate (and no --control-vector)"
        )
    if args.max_new_tokens < 1:
        raise RolevecError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if not args.temperature >= 0.0 or args.temperature == float("inf"):
        raise RolevecError(f"--temperature must be a finite number ≥ 0 (0 = greedy), not {args.temperature}")
    steering: Steering
    if args.control_vector:
        given = [
            flag
            for flag, value in (
                ("--vectors", args.vectors),
                ("--selection", args.selection),
                ("--ablate", args.ablate),
                ("--role", args.role),
                ("--compose", args.compose),
                ("--layer", args.layer),
                ("--position", args.position),
            )
            if value not in (None, False)
        ]
        if given:
            raise RolevecError(
                f"--control-vector carries its own layers and vectors, so {', '.join(given)} would be "
                "ignored: pass --control-vector (with --alpha to scale it) or those options, not both"
            )
        steering = steering_from_control_vector(
            args.control_vector, scale=1.0 if args.alpha is None else args.alpha
        )
        adapter = load_from_args(args)
        steering.check_model(adapter)
    else:
        if not args.vectors or not (args.role or args.compose):
            raise RolevecError(
                "pass --vectors FILE and --role ROLE or --compose ROLE:W,... (or --control-vector FILE.gguf)"
            )
        vectors, role = steer_vectors(args)
        choice, selection = choose(args, vectors, need_alpha=cap is None, role=role)
        alpha = None if cap is not None else choice.alpha
        resolve_steering(
            vectors,
            role,
            layers=choice.layer,
            position=choice.position,
            alpha=alpha,
            ablate=args.ablate,
            cap=cap,
            cap_layers=cap_layers,
        )
        adapter = load_from_args(args)
        check_selection_model(selection, adapter, args.allow_other_model)
        steering = resolve_steering(
            vectors,
            role,
            layers=choice.layer,
            position=choice.position,
            alpha=alpha,
            ablate=args.ablate,
            adapter=adapter,
            allow_other_model=args.allow_other_model,
            warn_zero=False,  # warned above, before the model loaded
            cap=cap,
            cap_layers=cap_layers,
        )
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "chat": not args.raw,
        "system": args.system,
    }
    print(f"[steered: {steering.describe()}]", flush=True)
    generate(adapter, args.prompt, steering=steering, where=args.where, stream=_emit, **options)
    print(flush=True)
    if args.compare:
        print("\n[unsteered]", flush=True)
        generate(adapter, args.prompt, stream=_emit, **options)
        print(flush=True)
    return 0
