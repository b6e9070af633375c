"""Save a random-weight model of a published shape as a model folder, for runs where no weights can be
fetched (a GPU machine without a hub): ``rolevec run --model FOLDER`` then exercises the whole pipeline.

    python benchmarks/save_random.py SHAPE FOLDER [--device cuda] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import RANDOM_SHAPES, random_model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=list(RANDOM_SHAPES))
    parser.add_argument("folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    args = parser.parse_args(argv)
    from rolevec.errors import RolevecError

    try:
        adapter = random_model(args.shape, args.tokenizer, args.device, args.dtype)
    except RolevecError as exc:
        parser.exit(2, f"save_random: error: {exc}\n")
    adapter.model.save_pretrained(args.folder)
    adapter.tokenizer.save_pretrained(args.folder)
    print(f"saved {args.shape} (random weights, {args.dtype}) to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
