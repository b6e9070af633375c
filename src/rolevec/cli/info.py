"""`rolevec info`: how rolevec sees a model — the first thing to run on a new one."""

from __future__ import annotations

import argparse
import json

from .common import add_model_args, load_from_args


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("info", help="print the architecture mapping, positions and answer-letter ids")
    add_model_args(parser)
    parser.add_argument("--json", action="store_true", help="print the mapping as JSON")
    parser.set_defaults(func=run)


def describe(adapter: object) -> dict[str, object]:
    from ..model.loading import ModelAdapter

    assert isinstance(adapter, ModelAdapter)
    chat = adapter.chat
    example = adapter.render("Explain the central limit theorem.")
    letters = adapter.letter_token_ids(adapter.render("Question?\nAnswer:"))
    err = adapter.verify_writers()
    return {
        "model": adapter.name,
        "class": type(adapter.model).__name__,
        "fingerprint": adapter.fingerprint(),
        "device": str(adapter.device),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "n_layers": adapter.n_layers,
        "layers": f"0..{adapter.n_layers} (L = input of block L; {adapter.n_layers} = last block output)",
        "hidden_size": adapter.hidden_size,
        "blocks": adapter.arch.blocks_path,
        "residual_writers": list(adapter.arch.writer_names[0]),
        "writer_kind": adapter.arch.writer_kind,
        "writer_check_rel_error": float(f"{err:.3g}"),
        "embeddings": list(adapter.arch.embedding_names),
        "final_norm": adapter.arch.final_norm_name,
        "unembedding": adapter.arch.unembed_name,
        "chat_template": chat.has_template,
        "system_turn": "native" if chat.system_supported else "folded into the user turn",
        "positions": {str(p): tok for p, tok in zip(chat.positions, chat.position_tokens(), strict=True)},
        "answer_letter_ids": dict(zip("ABCD", letters, strict=True)),
        "template_preview": example,
    }


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    adapter = load_from_args(args)
    info = describe(adapter)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "template_preview":
            print(f"{key:<{width}}  (user text 'Explain the central limit theorem.')")
            for line in str(value).splitlines() or [""]:
                print(f"{'':<{width}}  | {line}")
        elif key == "positions":
            assert isinstance(value, dict)
            shown = "  ".join(f"{p}:{tok!r}" for p, tok in value.items())
            print(f"{key:<{width}}  {shown}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0
