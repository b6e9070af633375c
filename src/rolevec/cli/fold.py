"""`rolevec fold`: write a steered model as a standard checkpoint that transformers loads without rolevec."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, load_from_args
from .steer_args import add_strength_args, add_vector_args, check_alpha_arg, steer_vectors

#: rolevec.steering.targets.TARGETS, spelled out: importing that module here would import torch for --help.
TARGETS = ("transformers", "llama.cpp", "vllm")
#: How to serve the written folder with each target (docs/serving.md says more).
SERVE = {
    "transformers": "AutoModelForCausalLM.from_pretrained({out!r})",
    "llama.cpp": "python convert_hf_to_gguf.py {out} --outfile folded.gguf --outtype f16 && "
    "llama-server -m folded.gguf",
    "vllm": "vllm serve {out}",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "fold",
        help="fold addition or ablation into the weights and save a Hugging Face checkpoint",
        description=(
            "Fold a role vector into the model weights (exact constructions only; verified by reloading "
            "the written checkpoint with plain transformers) and save it with tokenizer and manifest.json. "
            "--target names the engine that will serve it: rolevec refuses a fold that engine's loader "
            "would drop silently (docs/serving.md)."
        ),
    )
    add_model_args(parser)
    add_vector_args(parser)
    parser.add_argument("--layer", type=int, required=True, help="layer L (input of block L) to steer")
    add_strength_args(parser, required=True)
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="transformers",
        help="engine that will serve the checkpoint; a fold its loader would drop is refused "
        "(default transformers; see docs/serving.md)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="fold although --target keeps only part of the edit (with a warning)",
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier `rolevec fold` output (never a run folder, nor files rolevec did not write)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..errors import RolevecError
    from ..model.manifest import build_manifest, vector_provenance
    from ..steering.folding import check_folder_out, fold, fold_problem, save_folded
    from ..steering.interventions import resolve_steering
    from ..steering.targets import target_verdict

    out = check_folder_out(args.out, force=args.force)
    check_alpha_arg(args.alpha)
    vectors, role = steer_vectors(args)
    position = -1 if args.position is None else args.position
    steering = resolve_steering(
        vectors, role, layers=args.layer, position=position, alpha=args.alpha, ablate=args.ablate
    )
    adapter = load_from_args(args)
    steering = resolve_steering(
        vectors,
        role,
        layers=args.layer,
        position=position,
        alpha=args.alpha,
        ablate=args.ablate,
        adapter=adapter,
        allow_other_model=args.allow_other_model,
        warn_zero=False,
    )
    problem = fold_problem(adapter, steering)
    if problem:
        raise RolevecError(problem)
    verdict = target_verdict(adapter, steering, args.target)
    folded = fold(adapter, steering, target=args.target, allow_partial=args.allow_partial)
    manifest = build_manifest(
        {k: v for k, v in vars(args).items() if k != "func"},
        adapter,
        {
            "steering": steering.provenance(),
            "vectors": vector_provenance(args.vectors, vectors.metadata),
            "fold": {
                "edits": folded.source.get("fold_edits", ""),
                "layer_convention": "layer L = residual stream at the input of decoder block L",
                "target": verdict.record(),
            },
        },
    )
    save_folded(folded, out, manifest=manifest, force=args.force, check=(adapter, steering))
    print(f"wrote {out}: {steering.describe()} folded into {adapter.name}", file=sys.stderr)
    print(f"  {folded.source.get('fold_edits', '')}", file=sys.stderr)
    print("  verified: reloaded with transformers, logits match hooked steering", file=sys.stderr)
    print(f"  target {verdict.message()} ({verdict.level}; {verdict.source})", file=sys.stderr)
    print(f"  serve: {SERVE[args.target].format(out=out)}", file=sys.stderr)
    return 0
