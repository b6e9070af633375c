"""`rolevec export`: role vectors for llama.cpp (control-vector GGUF) or lm-evaluation-harness (.pt)."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, as_flags, check_out, load_from_args
from .steer_args import add_vector_args, check_alpha_arg, steer_vectors


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "export",
        help="export a role vector as a llama.cpp control vector (.gguf) or lm-eval steering file (.pt)",
        description=(
            "Export α·d for one or more layers. gguf: llama.cpp adds direction.N to the output of block N, "
            "so rolevec layer L is written as direction.(L-1) and only layers 2..n_layers can be exported. "
            "pt: the steer_path file of `lm_eval --model steered` (hookpoint = output of block L-1)."
        ),
    )
    add_model_args(parser)
    parser.add_argument("--format", required=True, choices=["gguf", "pt"], help="target runtime's format")
    add_vector_args(parser)
    layers = parser.add_mutually_exclusive_group(required=True)
    layers.add_argument("--layer", type=int, default=None, help="one layer L (input of block L)")
    layers.add_argument(
        "--layers", default=None, help="a range a:b of layers, b excluded (each uses its own vector)"
    )
    parser.add_argument("--alpha", type=float, required=True, help="strength α, multiplied into the file")
    parser.add_argument(
        "--model-hint", default=None, help="gguf: controlvector.model_hint (default: the model's type)"
    )
    parser.add_argument(
        "--vector-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="pt: dtype of the stored vectors; match the dtype lm-eval loads the model in",
    )
    parser.add_argument("--out", required=True, help="output file (.gguf or .pt)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..core.spec import parse_layers
    from ..errors import RolevecError
    from ..steering.export import PT_DTYPES, export_control_vector, export_lm_eval, llama_cpp_index
    from ..steering.interventions import resolve_steering

    out = check_out(args.out, args.force)
    check_alpha_arg(args.alpha)
    suffixes = {"gguf": {".gguf"}, "pt": {".pt", ".pth"}}[args.format]
    if out.suffix not in suffixes:
        raise RolevecError(
            f"--format {args.format} writes {'/'.join(sorted(suffixes))} files: fix --out {out}"
        )
    with as_flags(layers="--layers"):
        layer_list = [args.layer] if args.layer is not None else parse_layers(args.layers)
    if args.format == "gguf":
        for layer in layer_list:
            llama_cpp_index(layer)
    elif 0 in layer_list:
        raise RolevecError("layer 0 cannot be exported for lm-evaluation-harness (it hooks block outputs)")
    position = -1 if args.position is None else args.position
    vectors, role = steer_vectors(args)
    resolve_steering(vectors, role, layers=layer_list, position=position, alpha=args.alpha)
    adapter = load_from_args(args)
    steering = resolve_steering(
        vectors,
        role,
        layers=layer_list,
        position=position,
        alpha=args.alpha,
        adapter=adapter,
        allow_other_model=args.allow_other_model,
        warn_zero=False,  # warned above, before the model loaded
    )
    if args.format == "gguf":
        hint = args.model_hint or str(getattr(adapter.config, "model_type", "") or "")
        if not hint:
            raise RolevecError("the model has no model_type: pass --model-hint (e.g. llama)")
        export_control_vector(steering, out, model_hint=hint, force=args.force)
        names = ", ".join(f"direction.{llama_cpp_index(layer)}" for layer in steering.layers)
        print(f"wrote {out}: {steering.describe()} as {names} (model_hint {hint!r})", file=sys.stderr)
        print(f"  use: llama-cli -m MODEL.gguf --control-vector {out}", file=sys.stderr)
    else:
        export_lm_eval(steering, adapter, out, dtype=PT_DTYPES[args.vector_dtype], force=args.force)
        print(f"wrote {out}: {steering.describe()} for lm-evaluation-harness", file=sys.stderr)
        print(
            f"  use: lm_eval --model steered --model_args pretrained=MODEL,steer_path={out}", file=sys.stderr
        )
        if len(steering.layers) > 1:
            print(
                "  note: lm-eval releases before 0.4.13 bind their add-hooks late, so there a file with "
                "several hookpoints steers each with the last one's vector (export one layer per file)",
                file=sys.stderr,
            )
    return 0
